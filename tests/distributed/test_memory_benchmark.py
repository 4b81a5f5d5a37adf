"""benchmarks/memory.py in quick mode: XLA's per-device figures, checked against closed forms."""

import pytest

from tests.benchmarks import load


@pytest.mark.slow
def test_quick_run_accounts_for_every_buffer():
  out = load("memory").main(quick=True)
  assert out["kernel"] == [512, 2048] and out["devices"] == 8
  params = out["params_bytes_per_device"]
  assert params == 512 * 2048 * 4 // 8
  auto, explicit, rows = out["per_technique"], out["explicit"], out["row_sharded"]
  techniques = {"magnitude_prune", "int8_fake_quant", "svd_lowrank", "kmeans_cluster", "qlora"}
  assert set(auto) == set(explicit) == set(rows) == techniques
  for program in ("init", "step", "update"):
    assert out[f"{program}_over_params"] == max(row[program] for row in auto.values())
  # int8 FakeQuant init: the kernel in and the trainable kernel out, nothing else.
  assert auto["int8_fake_quant"]["init"] == 2.0 and auto["int8_fake_quant"]["init_temp"] == 0.0
  # An Adam step holds at least the trainables and their two moments: the dense
  # kernel, or for SVD the factors, U (512, 64) replicated and V (64, 2048) split
  # 8 ways, in float32 (all the SVD update holds: donated, it has nothing to do).
  factors = round((512 * 64 + 64 * 2048 // 8) * 4 / params, 3)
  assert auto["svd_lowrank"]["update"] == factors == 0.375
  assert auto["svd_lowrank"]["step"] >= 3 * factors
  assert all(auto[t]["step"] >= 3.0 for t in ("magnitude_prune", "int8_fake_quant", "kmeans_cluster"))
  # QLoRA with adapters_only: the frozen base has no moments, so its step holds
  # the base, its gradient-free forward and the small adapters' state.
  assert auto["qlora"]["step"] < 3.0 and explicit["qlora"]["step"] < 3.0
  # A program "gathers" when its temporaries reach the unsharded kernel: 8 per-device units.
  layouts = {"explicit": explicit, "row_sharded": rows}
  for name in out["gathers"]:
    parts = name.split(".")
    mesh, (tech, program) = (layouts[parts[0]], parts[1:]) if parts[0] in layouts else (auto, parts)
    assert mesh[tech][f"{program}_temp"] >= 8.0
  for mesh, prefix in ((auto, ""), (explicit, "explicit."), (rows, "row_sharded.")):
    for tech, row in mesh.items():
      for program in ("init", "step", "update"):
        if row[f"{program}_temp"] >= 8.0:
          assert f"{prefix}{tech}.{program}" in out["gathers"]

"""The serve benchmark's quick runs: every key, in float32 and in the bfloat16 (--gpu --pallas) mode.

On CPU the Pallas kernel of ``--pallas`` runs in Pallas's interpreter: its keys
and errors are checked, its times are not figures.
"""

import pytest

from tests.benchmarks import load

MODES = ("w8", "w4", "w4_channel", "w8a8", "nm24_w8", "lowrank_w8")
PALLAS_MODES = ("w8", "w4", "w4_channel")


@pytest.mark.slow
@pytest.mark.parametrize("gpu", [False, True])
def test_serve_benchmark_quick_run(gpu):
  out = load("serve").run(quick=True, gpu=gpu, pallas=gpu)
  for prefix in ("", "layer_"):
    assert out[f"{prefix}float_bytes"] > 0
    for mode in MODES:
      for b in (1, 16):
        assert out[f"{prefix}b{b}_{mode}"] > 0
      assert 0 < out[f"{prefix}{mode}_bytes"] < out[f"{prefix}float_bytes"]
      # Weight-only from the codes is the decoded float model to the inputs'
      # two-limb split (float32) or to bfloat16's rounding; w8a8 to its activations'.
      limit = 0.05 if mode == "w8a8" or gpu else 2e-4
      assert out[f"{prefix}{mode}_err"] < limit, (prefix, mode, out[f"{prefix}{mode}_err"])
    for mode in PALLAS_MODES:
      if not gpu:
        assert f"{prefix}pallas_{mode}_err" not in out and f"{prefix}pallas_b1_{mode}" not in out
        continue
      for b in (1, 16):
        assert out[f"{prefix}pallas_b{b}_{mode}"] > 0
      # The Pallas kernel: bfloat16 inputs and outputs, float32 accumulation.
      assert out[f"{prefix}pallas_{mode}_err"] < 0.05, (prefix, mode, out[f"{prefix}pallas_{mode}_err"])
  assert out.get("pallas", False) == gpu
  assert out["nm24_w8_bytes"] < out["w8_bytes"] and out["w4_bytes"] < out["w8_bytes"]
  assert set(out["targets"]) == ({"b1_w8", "b1_w4"} if gpu else
                                 {"b1_w8", "b1_w4", "b16_w8a8", "b256_w8a8", "b16_w4"})
  assert out["dtype"] == ("bfloat16" if gpu else "float32")
  assert out["quick"] and "flags" in out and "cpu" in out and len(out["load"]) == 2

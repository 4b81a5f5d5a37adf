"""The serve benchmark's quick runs: every key, in float32 and in the bfloat16 (--gpu) mode."""

import pytest

from tests.benchmarks import load

MODES = ("w8", "w4", "w4_channel", "w8a8", "nm24_w8", "lowrank_w8")


@pytest.mark.slow
@pytest.mark.parametrize("gpu", [False, True])
def test_serve_benchmark_quick_run(gpu):
  out = load("serve").run(quick=True, gpu=gpu)
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
  assert out["nm24_w8_bytes"] < out["w8_bytes"] and out["w4_bytes"] < out["w8_bytes"]
  assert set(out["targets"]) == ({"b1_w8", "b1_w4"} if gpu else
                                 {"b1_w8", "b1_w4", "b16_w8a8", "b256_w8a8", "b16_w4"})
  assert out["dtype"] == ("bfloat16" if gpu else "float32")
  assert out["quick"] and "flags" in out and "cpu" in out and len(out["load"]) == 2

"""benchmarks/quant.py runs in quick mode, both the CPU MLP and the bf16 GPU block.

No GPU is needed: the ``--gpu`` mode's model (the bf16 transformer MLP block
with real int8 and fp8 matmuls) runs here at a small size, so that the GPU
measurement cannot fail on a code path no test has run.
"""

import math

import pytest

from tests.benchmarks import load


@pytest.mark.slow
@pytest.mark.parametrize("gpu", [False, True])
def test_quick_run_reports_every_ratio(gpu):
  out = load("quant").main(quick=True, gpu=gpu)
  names = {"fq_w8", "fq_w8a8", "int8_fwd", "fp8_fwd", "int8_fwd_intercepted"}
  assert names <= set(out)
  assert out["model"].startswith("quick_mlp_block" if gpu else "quick_mlp_784")
  for name in names:
    assert math.isfinite(out[name]) and out[name] > 0


@pytest.mark.slow
def test_gpu_block_is_bf16_and_its_real_int8_forward_is_close_to_float():
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxcompress import quant

  bench = load("quant")
  make, (x, _), _ = bench._setup(gpu=True, quick=True)
  params = make().init(jax.random.key(1), x)["params"]
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  ref = np.asarray(make().apply({"params": params}, x), np.float32)
  got = np.asarray(make(quant.int8_dot_general()).apply({"params": params}, x), np.float32)
  assert got.dtype == np.float32 and np.all(np.isfinite(got))
  # Per-token/per-channel int8 of both operands: a few percent of the output's scale.
  assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05

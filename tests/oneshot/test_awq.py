"""AWQ against the float64 reference (output error measured on x @ w), and against RTN."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress import oneshot
from tests.oneshot import cases
from tests.oneshot import reference as ref

W = cases.kernel(256, 64)
X = cases.salient_channels(512, 256)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw", [dict(bits=4), dict(bits=3, symmetric=True), dict(bits=4, group_size=None, grid=5)],
    ids=["int4_g128", "int3_g128_sym", "int4_channel_grid5"],
)
def test_awq_matches_reference(kw):
  r = oneshot.awq(jnp.asarray(W), jnp.asarray(X), **kw)
  k_ref, s_ref, a_ref = ref.awq(W, X, bits=kw["bits"], group=kw.get("group_size", 128),
                                grid_points=kw.get("grid", 20), symmetric=kw.get("symmetric", False))
  e, e_ref = ref.out_err(X, W, r.kernel), ref.out_err(X, W, k_ref)
  assert abs(e / e_ref - 1) < 0.01, (e, e_ref)
  np.testing.assert_allclose(np.asarray(r.input_scale), s_ref, rtol=1e-4)  # the same exponent
  assert 0.0 < a_ref < 1.0  # the search found an interior exponent: not RTN, not all the way
  # The QArray holds diag(s) W; the float kernel is its dequantization over s.
  q = r.quantized
  assert q.values.dtype == jnp.int4 and q.dtype == np.float32
  assert q.scale.shape == ((2, 64) if kw.get("group_size", 128) else (1, 64))
  deq = np.asarray(jc.quant.dequantize(q), np.float64) / np.asarray(r.input_scale, np.float64)[:, None]
  np.testing.assert_allclose(np.asarray(r.kernel), deq, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_awq_clip_search_matches_reference():
  r = oneshot.awq(jnp.asarray(W), jnp.asarray(X), bits=3, clip=True)
  k_ref, _, _ = ref.awq(W, X, bits=3, group=128, clip_ratios=[1.0 - 0.05 * k for k in range(11)])
  e, e_ref = ref.out_err(X, W, r.kernel), ref.out_err(X, W, k_ref)
  assert abs(e / e_ref - 1) < 0.01, (e, e_ref)
  assert e < ref.out_err(X, W, oneshot.awq(jnp.asarray(W), jnp.asarray(X), bits=3).kernel)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 3])
def test_awq_beats_rtn_on_salient_channels(bits):
  e_awq = ref.out_err(X, W, oneshot.awq(jnp.asarray(W), jnp.asarray(X), bits=bits, group_size=128).kernel)
  e_rtn = ref.out_err(X, W, ref.rtn(W, bits, symmetric=False, group=128))
  assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)
  # grid=1 tries a = 0 only: plain RTN (the library's own group-wise RTN).
  rtn = oneshot.awq(jnp.asarray(W), jnp.asarray(X), bits=bits, grid=1)
  np.testing.assert_allclose(ref.out_err(X, W, rtn.kernel), e_rtn, rtol=1e-3)
  np.testing.assert_allclose(np.asarray(rtn.input_scale), 1.0)


@pytest.mark.slow
def test_awq_keeps_bf16():
  r = oneshot.awq(jnp.asarray(W, jnp.bfloat16), jnp.asarray(X, jnp.bfloat16), bits=4, grid=3)
  assert r.kernel.dtype == jnp.bfloat16 and r.quantized.dtype == jnp.bfloat16
  assert r.input_scale.dtype == jnp.float32

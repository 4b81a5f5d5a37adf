"""SmoothQuant and the w8a8 simulation against the float64 reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import oneshot
from tests.oneshot import cases
from tests.oneshot import reference as ref

W = cases.kernel(64, 32)
X = cases.outlier_channels(256, 64, factor=50.0)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85, 1.0])
def test_smoothquant_matches_reference(alpha):
  sm = oneshot.smoothquant(jnp.asarray(W), jnp.asarray(X.reshape(4, 64, 64)), alpha=alpha)
  k_ref, s_ref = ref.smoothquant(W, X, alpha)
  np.testing.assert_allclose(np.asarray(sm.input_scale), s_ref, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sm.kernel), k_ref, rtol=1e-5, atol=1e-6)
  # The float layer is unchanged: (x / s) (diag(s) W) = x W.
  y = np.asarray(X / np.asarray(sm.input_scale), np.float64) @ np.asarray(sm.kernel, np.float64)
  np.testing.assert_allclose(y, X.astype(np.float64) @ W, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_w8a8_matches_reference_and_smoothing_helps():
  y = X.astype(np.float64) @ W
  naive = np.asarray(oneshot.w8a8_matmul(jnp.asarray(X), jnp.asarray(W)))
  np.testing.assert_allclose(naive, ref.w8a8(X, W), rtol=1e-4, atol=1e-3)
  sm = oneshot.smoothquant(jnp.asarray(W), jnp.asarray(X), alpha=0.5)
  smoothed = np.asarray(oneshot.w8a8_matmul(jnp.asarray(X), sm.kernel, input_scale=sm.input_scale))
  k_ref, s_ref = ref.smoothquant(W, X, 0.5)
  e, e_ref = np.linalg.norm(smoothed - y), np.linalg.norm(ref.w8a8(X / s_ref, k_ref) - y)
  assert abs(e / e_ref - 1) < 0.01, (e, e_ref)
  e_naive = np.linalg.norm(naive - y)
  assert e < 0.5 * e_naive, (e, e_naive)


@pytest.mark.slow
def test_w8a8_shapes_and_dtype():
  x = jnp.asarray(X.reshape(4, 64, 64), jnp.bfloat16)
  out = oneshot.w8a8_matmul(x, jnp.asarray(W, jnp.bfloat16))
  assert out.shape == (4, 64, 32) and out.dtype == jnp.bfloat16

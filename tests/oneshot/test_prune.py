"""magnitude and wanda against the float64 numpy reference, and Wanda's outlier property."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import oneshot
from tests.oneshot import cases
from tests.oneshot import reference as ref

W = cases.kernel(64, 16)
X_CORR = cases.correlated(256, 64)
X_OUT = cases.outlier_channels(256, 64)
PATTERNS = [dict(sparsity=0.5), dict(sparsity=0.7), dict(n_m=(2, 4)), dict(n_m=(1, 8))]
IDS = ["s50", "s70", "2:4", "1:8"]


def check_nm(mask, n, m):
  runs = np.asarray(mask).reshape(-1, m, mask.shape[1]).sum(axis=1)
  np.testing.assert_array_equal(runs, n)


@pytest.mark.slow
@pytest.mark.parametrize("kw", PATTERNS, ids=IDS)
def test_magnitude_matches_reference(kw):
  p = oneshot.magnitude(jnp.asarray(W), **kw)
  k_ref, m_ref = ref.magnitude(W, **kw)
  np.testing.assert_array_equal(np.asarray(p.mask), m_ref)  # continuous weights: no ties
  np.testing.assert_array_equal(np.asarray(p.kernel), k_ref.astype(np.float32))
  assert p.kernel.dtype == jnp.float32 and p.mask.dtype == jnp.bool_
  if "n_m" in kw:
    check_nm(p.mask, *kw["n_m"])
  else:
    assert int(p.mask.sum()) == ref.keep_count(kw["sparsity"], W.size)


@pytest.mark.slow
@pytest.mark.parametrize("kw", PATTERNS, ids=IDS)
def test_wanda_matches_reference(kw):
  p = oneshot.wanda(jnp.asarray(W), jnp.asarray(X_CORR.reshape(4, 64, 64)), **kw)  # (..., in)
  k_ref, m_ref = ref.wanda(W, X_CORR, **kw)
  np.testing.assert_array_equal(np.asarray(p.mask), m_ref)
  np.testing.assert_array_equal(np.asarray(p.kernel), k_ref.astype(np.float32))
  if "n_m" in kw:
    check_nm(p.mask, *kw["n_m"])
  else:  # compared within each output: every column keeps the same count
    np.testing.assert_array_equal(np.asarray(p.mask).sum(axis=0), ref.keep_count(kw["sparsity"], 64))


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(n_m=(2, 4))], ids=["s50", "2:4"])
def test_wanda_beats_magnitude_on_outlier_channels(kw):
  e_mag = ref.out_err(X_OUT, W, oneshot.magnitude(jnp.asarray(W), **kw).kernel)
  e_wanda = ref.out_err(X_OUT, W, oneshot.wanda(jnp.asarray(W), jnp.asarray(X_OUT), **kw).kernel)
  assert e_wanda < 0.5 * e_mag, (e_wanda, e_mag)


@pytest.mark.slow
def test_ties_go_to_the_lower_index_and_bf16_is_kept():
  w = jnp.ones((8, 2), jnp.bfloat16)
  p = oneshot.magnitude(w, sparsity=0.5)
  assert p.kernel.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(p.mask).ravel(), np.arange(16) < 8)
  p = oneshot.wanda(w, jnp.ones((3, 8), jnp.bfloat16), n_m=(2, 4))
  np.testing.assert_array_equal(np.asarray(p.mask)[:, 0], [1, 1, 0, 0, 1, 1, 0, 0])
  assert oneshot.magnitude(w, sparsity=0.0).mask.all()
  assert not oneshot.magnitude(w, sparsity=0.99).mask.any()  # round(0.01 * 16) = 0

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.core.select import topk_masks


def reference(arrays, k):
  """numpy: keep the k largest, NaN lowest, ties to earlier arrays then lower index."""
  flat = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
  key = np.where(np.isnan(flat), -np.inf, flat)
  # NaN ranks below -inf: sort NaNs last among equals by giving them a second key.
  isnan = np.isnan(flat).astype(int)
  order = np.lexsort((np.arange(flat.size), isnan, -key))
  keep = np.zeros(flat.size, bool)
  keep[order[:k]] = True
  out, start = [], 0
  for a in arrays:
    out.append(keep[start : start + a.size].reshape(a.shape))
    start += a.size
  return out


@pytest.mark.parametrize("seed", range(6))
def test_matches_numpy_reference(seed):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(13, 7)).astype(np.float32)
  b = rng.integers(-2, 3, size=(19,)).astype(np.float32)  # many ties
  k = int(rng.integers(0, a.size + b.size + 1))
  got = jax.jit(topk_masks)([a, b], k)
  for g, r in zip(got, reference([a, b], k)):
    np.testing.assert_array_equal(np.asarray(g), r)


def test_nan_and_inf_do_not_crash_and_rank_as_documented():
  x = np.array([np.nan, 1.0, np.inf, -np.inf, 0.0, np.nan], np.float32)
  for k in range(x.size + 1):
    (m,) = topk_masks([jnp.asarray(x)], k)
    assert int(m.sum()) == k
  (m,) = topk_masks([jnp.asarray(x)], 4)
  # inf, 1, 0 and -inf are kept before either NaN.
  assert np.asarray(m).tolist() == [False, True, True, True, True, False]


@pytest.mark.parametrize("jit", [False, True])
def test_negative_zero_ties_with_zero(jit):
  x = jnp.array([-0.0, 0.0, -0.0, 1.0])
  f = jax.jit(topk_masks) if jit else topk_masks
  (m,) = f([x], 2)
  assert np.asarray(m).tolist() == [True, False, False, True]


def test_k_is_clipped_and_may_be_traced():
  x = jnp.arange(5.0)
  f = jax.jit(lambda k: topk_masks([x], k)[0])
  assert int(f(-3).sum()) == 0
  assert int(f(99).sum()) == 5
  assert np.asarray(f(2)).tolist() == [False, False, False, True, True]


def test_uses_no_sort():
  jaxpr = jax.make_jaxpr(lambda x: topk_masks([x], 10))(jnp.ones((100, 10)))
  names = {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}
  assert "scatter-add" in names or "scatter_add" in names
  assert not {"sort", "top_k", "approx_top_k"} & names

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.core.select import topk_rows


_topk = jax.jit(topk_rows)
_topk_guess = jax.jit(lambda s, k, p: topk_rows(s, k, previous=p))


def reference(x, k):
  """numpy, row by row: keep the k largest, NaN lowest, -0 == +0, ties to the lower column."""
  x = np.asarray(x, np.float64)
  keep = np.zeros(x.shape, bool)
  for r, row in enumerate(x):
    nan = np.isnan(row)
    value = np.where(nan, 0.0, row) + 0.0  # -0.0 + 0.0 == +0.0: both zeros tie
    order = np.lexsort((np.arange(row.size), -value, nan))
    keep[r, order[: max(0, min(k, row.size))]] = True
  return keep


def _cases(seed):
  rng = np.random.default_rng(seed)
  yield rng.normal(size=(13, 37)).astype(np.float32)  # distinct
  yield rng.integers(-2, 3, size=(9, 40)).astype(np.float32)  # many ties
  scale = 10.0 ** rng.integers(-30, 30, size=(7, 1))
  x = (rng.standard_t(2, size=(7, 64)) * scale).astype(np.float32)
  x[rng.random(x.shape) < 0.1] = np.nan
  x[rng.random(x.shape) < 0.05] = np.inf
  x[rng.random(x.shape) < 0.05] = -np.inf
  x[rng.random(x.shape) < 0.1] = -0.0
  x[rng.random(x.shape) < 0.1] = 0.0
  yield x  # a wide range, non-finite values and signed zeros


@pytest.mark.parametrize("seed", range(3))
def test_matches_numpy_reference(seed):
  f = _topk
  rng = np.random.default_rng(seed)
  for x in _cases(seed):
    n = x.shape[1]
    for k in {0, 1, n // 3, n // 2, n - 1, n, int(rng.integers(0, n + 1))}:
      got = np.asarray(f(x, k))
      np.testing.assert_array_equal(got, reference(x, k), err_msg=f"k={k}")
      assert (got.sum(axis=1) == k).all()


def test_eager_matches_jit_and_k_may_be_static_or_traced():
  x = np.random.default_rng(4).integers(0, 3, size=(5, 11)).astype(np.float32)
  traced = _topk
  static = jax.jit(topk_rows, static_argnums=1)
  for k in range(12):
    want = reference(x, k)
    np.testing.assert_array_equal(np.asarray(topk_rows(jnp.asarray(x), k)), want)
    np.testing.assert_array_equal(np.asarray(traced(x, jnp.int32(k))), want)
    if k in (0, 4, 11):  # each static k compiles anew
      np.testing.assert_array_equal(np.asarray(static(x, k)), want)


def test_k_is_clipped():
  x = jnp.arange(12.0).reshape(3, 4)
  f = _topk
  assert not np.asarray(f(x, -3)).any()
  assert np.asarray(f(x, 99)).all()


def test_ties_nan_inf_and_signed_zeros_rank_as_documented():
  x = jnp.array([
      [np.nan, 1.0, np.inf, -np.inf, 0.0, np.nan],
      [-0.0, 0.0, -0.0, 1.0, np.nan, -1.0],
      [2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
  ])
  got = np.asarray(topk_rows(x, 3)).tolist()
  assert got == [
      [False, True, True, False, True, False],  # inf, 1, 0 before -inf and NaN
      [True, True, False, True, False, False],  # 1, then the first two zeros (-0 == +0)
      [True, True, True, False, False, False],  # all tied: the lowest columns
  ]


def test_single_column_and_shape_errors():
  x = jnp.array([[1.0], [np.nan], [-2.0]])
  assert np.asarray(topk_rows(x, 1)).ravel().tolist() == [True, True, True]
  assert not np.asarray(topk_rows(x, 0)).any()
  with pytest.raises(ValueError, match=r"scores must be 2-D \(rows, n\), got shape \(4,\)"):
    topk_rows(jnp.ones(4), 1)
  with pytest.raises(ValueError, match=r"k must be a scalar"):
    topk_rows(jnp.ones((2, 3)), jnp.array([1, 2]))
  with pytest.raises(ValueError, match=r"previous must be a mask of the shape of scores, \(2, 3\)"):
    topk_rows(jnp.ones((2, 3)), 1, previous=jnp.ones((3, 2), bool))


def test_uses_no_sort():
  jaxpr = jax.make_jaxpr(lambda x, k: topk_rows(x, k, previous=x > 0))(jnp.ones((30, 50)), 7)
  names = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  assert "cond" in names and "reduce" in names  # the guess check and the counting passes
  assert not {"sort", "top_k", "approx_top_k", "argsort"} & names


def _random_rows_keeping(rng, shape, k):
  keep = np.zeros(shape, bool)
  for r in range(shape[0]):
    keep[r, rng.permutation(shape[1])[:k]] = True
  return keep


@pytest.mark.parametrize("seed", range(3))
def test_previous_masks_never_change_the_answer(seed):
  rng = np.random.default_rng(100 + seed)
  x = rng.normal(size=(6, 15)).astype(np.float32)
  x[:, :5] = rng.integers(0, 2, size=(6, 5))  # ties
  x[rng.integers(0, 6), rng.integers(0, 15)] = np.nan
  f = _topk_guess
  for k in (0, 1, int(rng.integers(2, 14)), 15):
    ref = reference(x, k)
    other = reference(x, max(k - 1, 0))
    mixed = ref.copy()
    mixed[0] = other[0]  # right in every row but one
    swapped = ref.copy()
    swapped[-1] = reference(x[-1:] * -1.0, k)[0]  # right count, wrong entries in one row
    guesses = [
        ref,
        other,
        mixed,
        swapped,
        rng.random(x.shape) < 0.5,
        np.zeros(x.shape, bool),
        np.ones(x.shape, bool),
        _random_rows_keeping(rng, x.shape, k),
    ]
    for guess in guesses:
      np.testing.assert_array_equal(np.asarray(f(x, k, guess)), ref)


def test_an_exact_guess_is_returned_and_a_tie_broken_differently_is_not():
  x = jnp.array([[1.0, 2.0, 2.0, 0.5], [0.0, 3.0, 0.0, 1.0]])
  right = jnp.array([[False, True, True, False], [False, True, False, True]])
  np.testing.assert_array_equal(np.asarray(topk_rows(x, 2, previous=right)), np.asarray(right))
  # Row 0 keeps the later of the tied 2.0s for k = 1: not exact, recomputed.
  wrong = jnp.array([[False, False, True, False], [False, True, False, False]])
  got = np.asarray(topk_rows(x, 1, previous=wrong)).tolist()
  assert got == [[False, True, False, False], [False, True, False, False]]

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.core.select import topk_masks


def _kth_largest_bits(bits, k, lo=None, hi=None):
  """(t, need, n_eq) of the one-row counting select over flat uint32 bits."""
  from jaxcompress.core.select import _kth_largest

  keys = [jnp.asarray(b).reshape(1, -1) for b in bits]
  band = None if lo is None else (lo, hi)
  t, at_least, above = _kth_largest(keys, jnp.reshape(k, (1,)), 32, band=band)
  return t[0], k - above[0], at_least[0] - above[0]


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


def first_fast(values, n):
  """The first n values run in README's test command, the rest under `slow`."""
  return [v if i < n else pytest.param(v, marks=pytest.mark.slow) for i, v in enumerate(values)]


@pytest.mark.parametrize("seed", first_fast(range(6), 2))
def test_matches_numpy_reference(seed):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(13, 7)).astype(np.float32)
  b = rng.integers(-2, 3, size=(19,)).astype(np.float32)  # many ties
  k = int(rng.integers(0, a.size + b.size + 1))
  got = jax.jit(topk_masks)([a, b], k)
  for g, r in zip(got, reference([a, b], k)):
    np.testing.assert_array_equal(np.asarray(g), r)


@pytest.mark.slow
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


def _primitives(jaxpr, names=None):
  """Every primitive in a jaxpr, its loops' and branches' bodies included."""
  names = set() if names is None else names
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for v in eqn.params.values():
      for j in v if isinstance(v, (tuple, list)) else (v,):
        inner = getattr(j, "jaxpr", None)
        if inner is not None:
          _primitives(getattr(inner, "jaxpr", inner), names)
  return names


def test_uses_no_sort():
  from jaxcompress.core.select import topk_rows

  for f in (lambda x: topk_masks([x], 10), lambda x: topk_masks([x], 10, previous=[x > 0]),
            lambda x: topk_rows(x, 3)):
    names = _primitives(jax.make_jaxpr(f)(jnp.ones((100, 10))).jaxpr)
    assert "while" in names and "reduce" in names or "reduce_sum" in names, names
    assert not {"sort", "top_k", "approx_top_k", "cumsum"} & names, names


def _random_masks_keeping(rng, shapes, k):
  sizes = [int(np.prod(s)) for s in shapes]
  flat = np.zeros(sum(sizes), bool)
  flat[rng.permutation(flat.size)[:k]] = True
  return [m.reshape(s) for m, s in zip(np.split(flat, np.cumsum(sizes)[:-1]), shapes)]


def _exact_tree(a):
  return [np.asarray(x) for x in a]


@pytest.mark.parametrize("seed", first_fast(range(8), 2))
def test_previous_masks_never_change_the_answer(seed):
  """Whatever guess is given, the result is the numpy reference's."""
  rng = np.random.default_rng(100 + seed)
  a = rng.normal(size=(11, 5)).astype(np.float32)
  b = rng.integers(-2, 3, size=(17,)).astype(np.float32)  # ties
  a[rng.integers(0, 11), rng.integers(0, 5)] = np.nan
  k = int(rng.integers(0, a.size + b.size + 1))
  ref = reference([a, b], k)
  guesses = [
      ref,  # the answer itself
      reference([a, b], max(k - 1, 0)),  # the answer for another k
      [rng.random(a.shape) < 0.5, rng.random(b.shape) < 0.5],  # noise
      [np.zeros(a.shape, bool), np.zeros(b.shape, bool)],
      [np.ones(a.shape, bool), np.ones(b.shape, bool)],
      _random_masks_keeping(rng, [a.shape, b.shape], k),  # right count, wrong entries
  ]
  f = jax.jit(lambda s, k, p: topk_masks(s, k, previous=p))
  for guess in guesses:
    got = f([a, b], k, [jnp.asarray(g) for g in guess])
    for g, r in zip(_exact_tree(got), ref):
      np.testing.assert_array_equal(g, r)


def test_a_guess_that_breaks_a_tie_differently_is_not_taken():
  x = jnp.array([1.0, 2.0, 2.0, 0.5])
  wrong = jnp.array([False, False, True, False])  # keeps the later of the tied 2.0s
  (m,) = topk_masks([x], 1, previous=[wrong])
  assert np.asarray(m).tolist() == [False, True, False, False]


def test_still_exact_predicate():
  from jaxcompress.core.select import _check_guess, sortable_bits

  def _still_exact(previous, bits, k):
    return _check_guess(previous, bits, k)[0]

  x = jnp.array([0.0, 3.0, 0.0, -2.0, 1.0])
  bits = [sortable_bits(jnp.abs(x))]
  right = [jnp.array([False, True, False, True, False])]
  assert bool(_still_exact(right, bits, jnp.int32(2)))
  assert not bool(_still_exact(right, bits, jnp.int32(3)))  # k moved
  swapped = [jnp.array([False, True, False, False, True])]
  assert not bool(_still_exact(swapped, bits, jnp.int32(2)))  # 1 kept, 2 dropped
  zeros = [jnp.array([True, False, False, False, False])]
  assert not bool(_still_exact(zeros, bits, jnp.int32(1)))  # a tie at 0 across the cut
  assert bool(_still_exact([jnp.zeros(5, bool)], bits, jnp.int32(0)))
  assert bool(_still_exact([jnp.ones(5, bool)], [sortable_bits(x * jnp.nan)], jnp.int32(5)))


def test_previous_must_match_the_scores():
  with pytest.raises(ValueError, match="one mask per score array"):
    topk_masks([jnp.ones(3)], 1, previous=[jnp.ones(4, bool)])


@pytest.mark.parametrize("scale", first_fast([1.0, 1e-3, 1e30], 1))
@pytest.mark.parametrize("drift", first_fast([0.0, 0.5, 1e-6, 1e-3], 2))
def test_band_from_the_last_masks_finds_the_exact_answer(scale, drift):
  """Guesses from slightly older scores give narrow bands (one pass) or wide ones (two)."""
  rng = np.random.default_rng(7)
  old = (rng.standard_t(3, size=(300, 40)) * scale).astype(np.float32)
  new = (old * (1 + drift * rng.normal(size=old.shape))).astype(np.float32)
  f = jax.jit(lambda s, k, p: topk_masks(s, k, previous=p))
  for k in (1, 17, 1200, 11999, 12000):
    guess = reference([np.abs(old)], k)
    (got,) = f([np.abs(new)], k, [jnp.asarray(guess[0])])
    np.testing.assert_array_equal(np.asarray(got), reference([np.abs(new)], k)[0])


@pytest.mark.slow
def test_band_limits_hold_for_a_wrong_guess_with_the_right_count():
  from jaxcompress.core.select import _check_guess, sortable_bits

  rng = np.random.default_rng(3)
  x = rng.normal(size=(64, 9)).astype(np.float32)
  bits = [sortable_bits(jnp.asarray(x))]
  for k in (1, 5, 300, 576):
    guess = [jnp.asarray(m) for m in _random_masks_keeping(rng, [x.shape], k)]
    still, lo, hi = _check_guess(guess, bits, jnp.int32(k))
    t, _, _ = _kth_largest_bits(bits, jnp.int32(k))
    if not bool(still):
      assert int(lo) <= int(t) <= int(hi)
      t_band, _, _ = _kth_largest_bits(bits, jnp.int32(k), lo, hi)
      assert int(t_band) == int(t)


@pytest.mark.parametrize("span_bits", first_fast([0, 17, 32, 5, 16, 18, 19, 20, 25], 3))
def test_every_refinement_step_against_numpy(span_bits):
  """Bands whose first histogram resolves every value, or needs a second one."""

  rng = np.random.default_rng(span_bits)
  lo = np.uint32(0x9000_0000) if span_bits < 32 else np.uint32(0)
  span = (1 << span_bits) - 1
  # Entries inside the band (with repeats, so ties) and some on either side.
  inside = lo + rng.integers(0, span + 1, size=400, dtype=np.uint64).astype(np.uint32)
  inside[:40] = inside[40:80]
  outside = np.concatenate([np.full(30, lo - 5 if lo else 0), np.full(20, lo + span + 3)]).astype(
      np.uint32
  ) if span_bits < 32 else np.zeros(0, np.uint32)
  bits = np.concatenate([inside, outside])
  desc = np.sort(bits)[::-1]
  n_above = int((bits > lo + span).sum()) if span_bits < 32 else 0
  for k in (n_above + 1, n_above + 7, n_above + 200, n_above + 400):
    t = desc[k - 1]
    want = (int(t), int(k - (bits > t).sum()), int((bits == t).sum()))
    got = _kth_largest_bits([jnp.asarray(bits)], jnp.int32(k), jnp.uint32(lo), jnp.uint32(lo + span))
    assert tuple(int(v) for v in got) == want


def test_sortable_bits_order_floats_and_decode_back():
  from jaxcompress.core.select import float_of_sortable_bits, sortable_bits

  x = np.array([-np.inf, -3.0e38, -1.0, -1e-30, 0.0, 1e-30, 2.0, 3.0e38, np.inf], np.float32)
  bits = np.asarray(sortable_bits(jnp.asarray(x)))
  assert (np.diff(bits.astype(np.int64)) > 0).all()  # strictly increasing, as numpy orders x
  np.testing.assert_array_equal(np.asarray(float_of_sortable_bits(jnp.asarray(bits))).view(np.uint32), x.view(np.uint32))
  assert sortable_bits(jnp.float32(-0.0)) == sortable_bits(jnp.float32(0.0))
  assert np.isnan(float_of_sortable_bits(jnp.uint32(0)))


def test_select_holds_one_uint32_image_of_the_scores():
  # The tie-break's flat indices were a second uint32 array of the scores'
  # size, hoisted out of the counting loop; they are now computed per pass.
  s = jax.random.normal(jax.random.key(0), (256, 1024))
  f = jax.jit(lambda s: topk_masks([s], 1000)[0])
  temp = f.lower(s).compile().memory_analysis().temp_size_in_bytes
  assert temp < 1.5 * s.size * 4, temp / (s.size * 4)


def test_lazy_scores_hold_no_image_of_the_scores():
  # LazyScores are recomputed in each counting pass from the weight: no
  # uint32 image of them is held (1 unit with arrays, above).
  from jaxcompress.core.select import LazyScores

  w = jax.random.normal(jax.random.key(0), (256, 1024))
  lazy = lambda w: LazyScores(lambda zero: jnp.abs(w + zero.astype(w.dtype)), w.shape)
  f = jax.jit(lambda w: topk_masks([lazy(w)], 1000)[0])
  temp = f.lower(w).compile().memory_analysis().temp_size_in_bytes
  assert temp < 0.5 * w.size * 4, temp / (w.size * 4)
  np.testing.assert_array_equal(f(w), topk_masks([jnp.abs(w)], 1000)[0])
  ties = jnp.round(w)  # many ties at the threshold: the tie-break path
  np.testing.assert_array_equal(jax.jit(lambda w: topk_masks([lazy(w)], 5000)[0])(ties), topk_masks([jnp.abs(ties)], 5000)[0])

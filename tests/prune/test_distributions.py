import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from tests.prune.reference import block_mask, erk_sparsities, keep_topk, keep_topk_many, n_keep

SHAPES = {"a": (40, 30), "b": (30, 10), "c": (10, 4), "conv": (3, 3, 4, 8)}


def params(seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def masks(stage, p):
  spec = jc.Spec([jc.Rule("a|b|c|conv", [stage])])
  _, s = jax.jit(spec.init)(jax.tree.map(jnp.asarray, p))
  return {k: np.asarray(s[k].stages["prune"].mask) for k in SHAPES}


def test_uniform_prunes_every_leaf_to_the_target():
  p = params(1)
  got = masks(jc.prune.magnitude(sparsity=0.8), p)
  for k, w in p.items():
    np.testing.assert_array_equal(got[k], keep_topk(np.abs(w), n_keep(w.size, 0.8)))


def test_global_uses_one_threshold_across_leaves():
  p = params(2)
  p["c"] = p["c"] * 10.0  # a leaf with larger weights keeps more under one threshold
  got = masks(jc.prune.magnitude(sparsity=0.8, distribution=jc.prune.Global()), p)
  total = sum(w.size for w in p.values())
  expected = keep_topk_many([np.abs(p[k]) for k in SHAPES], n_keep(total, 0.8))
  for k, e in zip(SHAPES, expected):
    np.testing.assert_array_equal(got[k], e)
  assert got["c"].mean() > 0.5 > got["a"].mean()


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
def test_erk_densities_match_the_rigl_algorithm(sparsity):
  shapes = list(SHAPES.values())
  got = np.asarray(jc.prune.ERK().densities(shapes, jnp.float32(sparsity)))
  expected = 1.0 - np.asarray(erk_sparsities(shapes, sparsity))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  sizes = np.array([np.prod(s) for s in shapes])
  np.testing.assert_allclose((got * sizes).sum() / sizes.sum(), 1.0 - sparsity, rtol=1e-5)


def test_erk_with_dense_layers_and_power():
  shapes = [(4, 4), (64, 64), (2, 100), (128, 64)]
  for sparsity, power in [(0.9, 1.0), (0.99, 1.0), (0.9, 0.5), (0.3, 1.0)]:
    got = np.asarray(jc.prune.ERK(power=power).densities(shapes, jnp.float32(sparsity)))
    expected = 1.0 - np.asarray(erk_sparsities(shapes, sparsity, power))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # The small layer is kept dense at 90%.
  assert np.asarray(jc.prune.ERK().densities(shapes, jnp.float32(0.9)))[0] == 1.0
  with pytest.raises(ValueError, match=r"ERK: power must be a number in \[0, inf\), got -1.0"):
    jc.prune.ERK(power=-1)
  with pytest.raises(ValueError, match=r"ERK: power must be a number in \[0, inf\), got nan"):
    jc.prune.ERK(power=float("nan"))


def test_erk_masks_keep_the_rounded_counts_and_follow_a_schedule():
  p = params(3)
  sched = jc.schedules.linear(0.0, 0.9, end_step=10)
  # The init mask is made at sparsity(begin_step) = sched(5), a traced value.
  got = masks(jc.prune.magnitude(sparsity=sched, distribution=jc.prune.ERK(), begin_step=5), p)
  sparsity = 0.45
  for (k, w), s in zip(p.items(), erk_sparsities(list(SHAPES.values()), sparsity)):
    np.testing.assert_array_equal(got[k], keep_topk(np.abs(w), int(np.round((1 - s) * w.size))))


def test_erk_with_blocks_counts_blocks():
  p = {"a": params(4)["a"], "b": params(4)["b"]}
  spec = jc.Spec([jc.Rule("a|b", [jc.prune.magnitude(sparsity=0.8, structure=jc.prune.Block((2, 2)), distribution=jc.prune.ERK())])])
  _, s = jax.jit(spec.init)(jax.tree.map(jnp.asarray, p))
  for (k, w), sp in zip(p.items(), erk_sparsities([w.shape for w in p.values()], 0.8)):
    n_blocks = w.size // 4
    expected = block_mask(np.abs(w), (2, 2), int(np.round((1 - sp) * n_blocks)))
    np.testing.assert_array_equal(np.asarray(s[k].stages["prune"].mask), expected)


def _keep_count(size, sparsity, min_kept):
  return max(n_keep(size, sparsity), min(min_kept, size))


def _init_masks(stage, p):
  spec = jc.Spec([jc.Rule(".*", [stage])])
  _, s = jax.jit(spec.init)(jax.tree.map(jnp.asarray, p))
  return {k: np.asarray(s[k].stages["prune"].mask) for k in p}


def test_rounding_never_empties_a_layer_by_default():
  rng = np.random.default_rng(40)
  p = {"one_channel": rng.normal(size=(4, 1)), "four_channels": rng.normal(size=(3, 4))}
  got = _init_masks(jc.prune.Prune(sparsity=0.5, structure=jc.prune.Channel()), p)
  np.testing.assert_array_equal(got["one_channel"], np.ones((4, 1), bool))  # round(0.5 * 1) = 0
  got = _init_masks(jc.prune.Prune(sparsity=0.9, structure=jc.prune.Channel()), p)
  keep = keep_topk(np.sqrt((p["four_channels"] ** 2).sum(0)), 1)  # round(0.1 * 4) = 0, kept 1
  np.testing.assert_array_equal(got["four_channels"], np.broadcast_to(keep, (3, 4)))
  off = _init_masks(jc.prune.Prune(sparsity=0.9, structure=jc.prune.Channel(), min_kept=0), p)
  assert not off["four_channels"].any()  # min_kept=0: the old count


def test_min_kept_uniform_and_erk_match_numpy():
  rng = np.random.default_rng(41)
  shapes = {"b": (30, 10), "c": (10, 4)}  # at 0.996: round(1.2) = 1 and round(0.16) = 0 kept
  p = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  got = _init_masks(jc.prune.magnitude(sparsity=0.996, min_kept=3), p)
  for k, w in p.items():
    np.testing.assert_array_equal(got[k], keep_topk(np.abs(w), _keep_count(w.size, 0.996, 3)))
  densities = np.asarray(jc.prune.ERK().densities(list(shapes.values()), jnp.float32(0.996)))
  got = _init_masks(jc.prune.magnitude(sparsity=0.996, distribution=jc.prune.ERK(), min_kept=3), p)
  for (k, w), d in zip(p.items(), densities):
    count = max(int(np.round(d * np.float32(w.size))), 3)
    np.testing.assert_array_equal(got[k], keep_topk(np.abs(w), count))


def test_min_kept_global_tops_up_leaves_after_the_threshold():
  rng = np.random.default_rng(42)
  p = {"a": rng.normal(size=(20, 10)).astype(np.float32), "c": 1e-3 * rng.normal(size=(3, 2)).astype(np.float32)}
  scores = [np.abs(p["a"]), np.abs(p["c"])]
  ref = keep_topk_many(scores, n_keep(206, 0.7))
  assert not ref[1].any()  # the threshold alone empties c
  for min_kept in (4, 100):  # 100: more than a's share (62 of 200) and than c's size (6)
    got = _init_masks(jc.prune.magnitude(sparsity=0.7, distribution=jc.prune.Global(), min_kept=min_kept), p)
    for k, r, sc in zip("ac", ref, scores):
      need = min(min_kept, sc.size)
      np.testing.assert_array_equal(got[k], r if r.sum() >= need else keep_topk(sc, need))


@pytest.mark.parametrize("min_kept", [1, 2, 9])
def test_min_kept_per_output_counts_per_channel(min_kept):
  w = np.random.default_rng(43).normal(size=(5, 3)).astype(np.float32)  # fan 5: round(0.1 * 5) = 0
  got = _init_masks(jc.prune.magnitude(sparsity=0.9, distribution=jc.prune.PerOutput(), min_kept=min_kept), {"w": w})["w"]
  for c in range(3):
    np.testing.assert_array_equal(got[:, c], keep_topk(np.abs(w[:, c]), min(min_kept, 5)))


def test_min_kept_is_checked():
  with pytest.raises(ValueError, match=r"Prune: min_kept must be an integer in \[0, inf\], got -1"):
    jc.prune.magnitude(sparsity=0.5, min_kept=-1)
  with pytest.raises(TypeError, match=r"Prune: min_kept must be an integer in \[0, inf\], got 1.5 of type float"):
    jc.prune.magnitude(sparsity=0.5, min_kept=1.5)

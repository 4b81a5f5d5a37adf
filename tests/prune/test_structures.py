import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from tests.prune.reference import block_mask, channel_scores, keep_topk, keep_topk_many, n_keep, nm_mask


def rand(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def init_mask(stage, w, path="w"):
  spec = jc.Spec([jc.Rule(path, [stage])])
  _, s = jax.jit(spec.init)({path: jnp.asarray(w)})
  return np.asarray(s[path].stages["prune"].mask)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 3)])
def test_nm_dense_kernel_groups_along_axis_0(n, m):
  w = rand((24, 5), n * 10 + m)
  mask = init_mask(jc.prune.Prune(structure=jc.prune.NM(n, m)), w)
  np.testing.assert_array_equal(mask, nm_mask(np.abs(w), n, m, axis=0))
  assert mask.dtype == np.bool_ and mask.sum() == 24 * 5 * n // m


def test_nm_conv_kernel_groups_along_the_input_axis_and_ties_go_to_lower_index():
  w = np.round(rand((2, 3, 8, 4), 3), 1)  # rounding makes ties
  mask = init_mask(jc.prune.Prune(structure=jc.prune.NM(2, 4)), w)
  np.testing.assert_array_equal(mask, nm_mask(np.abs(w), 2, 4, axis=2))
  w_tie = np.ones((4, 1), np.float32)
  np.testing.assert_array_equal(init_mask(jc.prune.Prune(structure=jc.prune.NM(2, 4)), w_tie).ravel(), [1, 1, 0, 0])


def test_nm_explicit_axis_and_padding():
  w = rand((3, 10), 4)
  mask = init_mask(jc.prune.Prune(structure=jc.prune.NM(2, 4, pad=True, axis=1)), w)
  np.testing.assert_array_equal(mask, nm_mask(np.abs(w), 2, 4, axis=1))
  # Groups [0:4], [4:8] keep 2 each; the partial group [8:10] keeps min(2, 2) = 2.
  assert mask.sum() == 3 * 6
  w1 = rand((9, 2), 5)
  mask1 = init_mask(jc.prune.Prune(structure=jc.prune.NM(3, 4, pad=True)), w1)
  np.testing.assert_array_equal(mask1, nm_mask(np.abs(w1), 3, 4, axis=0))
  assert mask1.sum() == 2 * (3 + 3 + 1)


def test_nm_sparsity_is_fixed_and_stays_through_updates():
  w = rand((8, 4), 6)
  spec = jc.Spec([jc.Rule("w", [jc.prune.Prune(structure=jc.prune.NM(2, 4), sparsity=0.5)])])
  t, s = jax.jit(spec.init)({"w": jnp.asarray(w)})
  w2 = rand((8, 4), 7)
  t, s = jax.jit(spec.update)({"w": jnp.asarray(w2)}, s, 3)
  np.testing.assert_array_equal(np.asarray(s["w"].stages["prune"].mask), nm_mask(np.abs(w2), 2, 4, axis=0))


def test_nm_errors():
  with pytest.raises(ValueError, match=r"NM\(2, 4\) at 'l/kernel': axis 0 of shape \(6, 3\) has size 6, not a multiple of m=4.*pad=True"):
    init_mask(jc.prune.Prune(structure=jc.prune.NM(2, 4)), np.ones((6, 3), np.float32), path="l/kernel")
  with pytest.raises(ValueError, match=r"NM\(2, 4\) at 'b'.*1-D leaf.*axis=0"):
    init_mask(jc.prune.Prune(structure=jc.prune.NM(2, 4)), np.ones(8, np.float32), path="b")
  with pytest.raises(ValueError, match=r"n \(5\) must be at most m \(4\)"):
    jc.prune.NM(5, 4)
  with pytest.raises(ValueError, match=r"NM: m must be an integer in \[1, inf\], got 0"):
    jc.prune.NM(1, 0)
  with pytest.raises(ValueError, match=r"sparsity=0.75 does not match NM\(n=2, m=4.*fixed at 0.5; leave sparsity=None"):
    jc.prune.Prune(structure=jc.prune.NM(2, 4), sparsity=0.75)
  with pytest.raises(ValueError, match=r"cannot take the distribution Global\(\)"):
    jc.prune.Prune(structure=jc.prune.NM(2, 4), distribution=jc.prune.Global())


@pytest.mark.parametrize("block", [(2, 2), (1, 4), (4, 1)])
def test_block_keeps_blocks_with_largest_summed_scores(block):
  w = rand((8, 12), sum(block))
  mask = init_mask(jc.prune.Prune(sparsity=0.5, structure=jc.prune.Block(block)), w)
  n_blocks = (8 // block[0]) * (12 // block[1])
  np.testing.assert_array_equal(mask, block_mask(np.abs(w), block, n_keep(n_blocks, 0.5)))


def test_block_errors_name_the_path():
  with pytest.raises(ValueError, match=r"Block\(\(4, 4\)\) at 'w': axis 1 of shape \(8, 6\) has size 6, not a multiple"):
    init_mask(jc.prune.Prune(sparsity=0.5, structure=jc.prune.Block((4, 4))), np.ones((8, 6), np.float32))
  with pytest.raises(ValueError, match=r"Block\(\(4,\)\) at 'w': the weight has 2 axes"):
    init_mask(jc.prune.Prune(sparsity=0.5, structure=jc.prune.Block((4,))), np.ones((8, 8), np.float32))
  with pytest.raises(ValueError, match=r"Block: shape must be a tuple of positive ints, got \(0, 2\)"):
    jc.prune.Block((0, 2))


def test_channel_prunes_whole_output_columns_by_l2_norm():
  w = rand((6, 10), 8)
  mask = init_mask(jc.prune.Prune(sparsity=0.7, structure=jc.prune.Channel()), w)
  keep_cols = keep_topk(channel_scores(np.abs(w)), n_keep(10, 0.7))
  np.testing.assert_array_equal(mask, np.broadcast_to(keep_cols, (6, 10)))
  w4 = rand((3, 3, 2, 5), 9)
  mask4 = init_mask(jc.prune.Prune(sparsity=0.4, structure=jc.prune.Channel()), w4)
  keep4 = keep_topk(channel_scores(np.abs(w4)), n_keep(5, 0.4))
  np.testing.assert_array_equal(mask4, np.broadcast_to(keep4, w4.shape))


def test_channel_global_competes_across_leaves():
  a, b = rand((4, 6), 10), rand((5, 3), 11) * 2
  spec = jc.Spec([jc.Rule("a|b", [jc.prune.Prune(sparsity=0.5, structure=jc.prune.Channel(), distribution=jc.prune.Global())])])
  _, s = jax.jit(spec.init)({"a": jnp.asarray(a), "b": jnp.asarray(b)})
  ka, kb = (np.asarray(s[k].stages["prune"].mask) for k in "ab")
  ea, eb = keep_topk_many([channel_scores(np.abs(a)), channel_scores(np.abs(b))], n_keep(9, 0.5))
  np.testing.assert_array_equal(ka, np.broadcast_to(ea, a.shape))
  np.testing.assert_array_equal(kb, np.broadcast_to(eb, b.shape))


@pytest.mark.parametrize(
    "structure, units",
    [
        (jc.prune.Unstructured(), (6, 4)),
        (jc.prune.Block((2, 2)), (3, 2)),
        (jc.prune.Block((1, 4)), (6, 1)),
        (jc.prune.Channel(), (4,)),
    ],
)
def test_unit_mask_inverts_expand(structure, units):
  keep = np.random.default_rng(0).random(units) < 0.5
  full = structure.expand(jnp.asarray(keep), (6, 4))
  np.testing.assert_array_equal(np.asarray(structure.unit_mask(full)), keep)


@pytest.mark.slow
def test_recomputed_masks_match_a_fresh_selection_every_step():
  """Masks reused from the last update (when still exact) equal a selection from scratch."""
  params = {"a": jnp.asarray(np.random.default_rng(1).normal(size=(8, 12)), jnp.float32)}
  for structure in (jc.prune.Unstructured(), jc.prune.Block((2, 3)), jc.prune.Channel()):
    stage = jc.prune.magnitude(sparsity=0.5, structure=structure, straight_through=True)
    spec = jc.Spec([jc.Rule("a", [stage])])
    t, s = spec.init(params)
    for step in range(4):
      t = jax.tree.map(lambda w: w + 0.3 * jnp.sin(w * 7.0 + step), t)  # reorders some scores
      t, s = jax.jit(spec.update)(t, s, step)
      fresh = jc.Spec([jc.Rule("a", [jc.prune.magnitude(sparsity=0.5, structure=structure)])])
      _, s_fresh = fresh.init(t)
      np.testing.assert_array_equal(
          np.asarray(s["a"].stages["prune"].mask), np.asarray(s_fresh["a"].stages["prune"].mask)
      )

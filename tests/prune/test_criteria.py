import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from tests.prune.reference import keep_topk, n_keep


def rand(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


class one_rule:
  """A one-rule spec with jitted init and update (eager mode recompiles every call)."""

  def __init__(self, stage, pattern="w"):
    self.spec = jc.Spec([jc.Rule(pattern, [stage])])
    self.init = jax.jit(self.spec.init)
    self.update = jax.jit(self.spec.update)


def mask_of(state, path="w"):
  return np.asarray(state[path].stages["prune"].mask)


def test_magnitude_matches_numpy_topk():
  w = rand((12, 10))
  spec = one_rule(jc.prune.Prune(sparsity=0.7, criterion=jc.prune.Magnitude()))
  _, s = spec.init({"w": jnp.asarray(w)})
  np.testing.assert_array_equal(mask_of(s), keep_topk(np.abs(w), n_keep(w.size, 0.7)))


def test_random_is_uniform_over_positions_nested_and_keyed():
  spec = one_rule(
      jc.prune.Prune(sparsity=jc.schedules.linear(0.25, 0.75, end_step=2), criterion=jc.prune.Random())
  )
  params = {"w": jnp.ones((20, 10), jnp.float32)}
  t, s = spec.init(params, key=jax.random.key(0))
  masks = [mask_of(s)]
  draw = np.asarray(s["w"].stages["prune"].score)
  for step in range(3):
    t, s = spec.update(t, s, step)  # no key needed after init
    masks.append(mask_of(s))
  # Each mask keeps the top of the one stored draw: nested as sparsity grows.
  for m, sp in zip(masks, [0.25, 0.25, 0.5, 0.75]):
    np.testing.assert_array_equal(m, keep_topk(draw, n_keep(200, sp)))
  assert np.all(masks[-1] <= masks[0])
  # Same key, same mask; another key, another mask.
  _, s_same = spec.init(params, key=jax.random.key(0))
  _, s_other = spec.init(params, key=jax.random.key(1))
  np.testing.assert_array_equal(mask_of(s_same), masks[0])
  assert not np.array_equal(mask_of(s_other), masks[0])
  # The draw is uniform in [0, 1), independent of the weights.
  assert draw.dtype == np.float32 and 0.0 <= draw.min() and draw.max() < 1.0
  assert 0.4 < draw.mean() < 0.6


def test_random_without_key_names_the_path():
  spec = one_rule(jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Random()), pattern=".*kernel")
  with pytest.raises(ValueError, match=r"Random criterion at 'l1/kernel' needs a PRNG key.*key="):
    spec.init({"l1": {"kernel": jnp.ones((4, 4))}})


def test_saliency_scores_weight_times_grad_and_falls_back_to_magnitude_at_init():
  w, g = rand((8, 6), 1), rand((8, 6), 2)
  spec = one_rule(jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Saliency(), end_step=1))
  t, s = spec.init({"w": jnp.asarray(w)})
  np.testing.assert_array_equal(mask_of(s), keep_topk(np.abs(w), 24))
  t, s = spec.update(t, s, 0, grads={"w": jnp.asarray(g)})
  expected = keep_topk(np.abs(w.astype(np.float64) * g), 24)
  np.testing.assert_array_equal(mask_of(s), expected)
  # One-shot: after end_step the mask stays although the gradients change.
  t, s = spec.update(t, s, 1, grads={"w": jnp.asarray(rand((8, 6), 3))})
  np.testing.assert_array_equal(mask_of(s), expected)


def test_saliency_without_grads_names_the_path():
  spec = one_rule(jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Saliency()))
  t, s = spec.init({"w": jnp.ones((4, 4))})
  with pytest.raises(ValueError, match=r"Saliency criterion at 'w' needs the gradient.*grads="):
    spec.update(t, s, 0)


def test_movement_accumulates_minus_w_times_g_over_updates():
  steps = 4
  ws = [rand((6, 5), 10 + i) for i in range(steps)]
  gs = [rand((6, 5), 20 + i) for i in range(steps)]
  spec = one_rule(
      jc.prune.Prune(sparsity=0.6, criterion=jc.prune.Movement(), straight_through=True)
  )
  t, s = spec.init({"w": jnp.asarray(ws[0])})
  np.testing.assert_array_equal(mask_of(s), keep_topk(np.abs(ws[0]), 12))  # init: magnitude
  score = np.zeros((6, 5))
  for i in range(steps):
    t = {"w": jnp.asarray(ws[i])}  # the optimizer moved the weights
    t, s = spec.update(t, s, i, grads={"w": jnp.asarray(gs[i])})
    score -= ws[i].astype(np.float64) * gs[i]
    np.testing.assert_allclose(np.asarray(s["w"].stages["prune"].score), score, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mask_of(s), keep_topk(score, 12))


def test_movement_without_grads_names_the_path():
  spec = one_rule(jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Movement()))
  t, s = spec.init({"w": jnp.ones((4, 4))})
  with pytest.raises(ValueError, match=r"Movement criterion at 'w' needs the gradient"):
    spec.update(t, s, 0)


@pytest.mark.parametrize("stat_key", ["dense/kernel", "dense"])
def test_wanda_scores_weight_times_input_norm(stat_key):
  w = rand((7, 5), 4)
  x = rand((32, 7), 5) * np.arange(1, 8, dtype=np.float32)  # feature scales differ
  norms = np.linalg.norm(x.astype(np.float64), axis=0)
  spec = one_rule(jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Wanda()), pattern=".*kernel")
  t, s = spec.init({"dense": {"kernel": jnp.asarray(w)}})
  t, s = spec.update(t, s, 0, stats={stat_key: jnp.asarray(norms, jnp.float32)})
  expected = keep_topk(np.abs(w) * norms[:, None], n_keep(35, 0.5))
  np.testing.assert_array_equal(np.asarray(s["dense"]["kernel"].stages["prune"].mask), expected)


def test_wanda_conv_kernel_uses_the_input_axis():
  w = rand((3, 3, 4, 2), 6)  # (h, w, in, out)
  norms = np.array([0.1, 5.0, 1.0, 20.0], np.float32)
  spec = one_rule(jc.prune.Prune(sparsity=0.75, criterion=jc.prune.Wanda()))
  t, s = spec.init({"w": jnp.asarray(w)})
  t, s = spec.update(t, s, 0, stats={"w": jnp.asarray(norms)})
  expected = keep_topk(np.abs(w) * norms[None, None, :, None], n_keep(w.size, 0.75))
  np.testing.assert_array_equal(mask_of(s), expected)


def test_wanda_errors_name_path_and_expected_shape():
  spec = one_rule(jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Wanda()), pattern=".*kernel")
  params = {"dense": {"kernel": jnp.ones((6, 3))}}
  t, s = spec.init(params)
  with pytest.raises(ValueError, match=r"Wanda criterion at 'dense/kernel' needs the activation norm.*\(6,\)"):
    spec.update(t, s, 0)
  with pytest.raises(ValueError, match=r"'dense/kernel'.*has shape \(3,\), expected \(6,\)"):
    spec.update(t, s, 0, stats={"dense": jnp.ones(3)})
  spec_b = one_rule(jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Wanda()), pattern="b")
  t, s = spec_b.init({"b": jnp.ones(4)})
  with pytest.raises(ValueError, match=r"Wanda criterion at 'b'.*ndim >= 2"):
    spec_b.update(t, s, 0, stats={"b": jnp.ones(4)})


def test_movement_skips_non_finite_gradient_entries():
  w0, g0, g1, g2 = rand((4, 5), 20), rand((4, 5), 21), rand((4, 5), 22), rand((4, 5), 23)
  g1[0, :3] = [np.nan, np.inf, -np.inf]  # one step's bad entries (an apply_if_finite skip)
  g2[:] = np.nan  # a whole skipped step
  ev = one_rule(jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Movement(), straight_through=True))
  t, s = ev.init({"w": jnp.asarray(w0)})
  expected = np.zeros((4, 5))
  for step, g in enumerate((g0, g1, g2)):
    t, s = ev.update(t, s, step, grads={"w": jnp.asarray(g)})
    contrib = w0.astype(np.float64) * g
    expected -= np.where(np.isfinite(contrib), contrib, 0.0)
  score = np.asarray(s["w"].stages["prune"].score)
  assert np.isfinite(score).all()
  np.testing.assert_allclose(score, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(s["w"].stages["prune"].mask), keep_topk(expected, 10))


@pytest.mark.parametrize("bad, shown", [(-1.0, r"-1.0"), (np.nan, r"nan")])
def test_wanda_refuses_negative_or_nan_norms_naming_the_leaf(bad, shown):
  spec = jc.Spec([jc.Rule(".*kernel", [jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Wanda())])])
  t, s = spec.init({"dense": {"kernel": jnp.asarray(rand((3, 2), 30))}})
  stats = {"dense": jnp.array([1.0, bad, 2.0])}
  with pytest.raises(ValueError, match=rf"Wanda criterion at 'dense/kernel': the activation-norm statistic has 1 negative or NaN entries \(input features \[1\], values \[{shown}\]\).*jnp.linalg.norm"):
    spec.update(t, s, 0, stats=stats)


def test_wanda_traced_bad_norms_make_the_leaf_visibly_nan():
  ev = one_rule(jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Wanda()), ".*kernel")
  p = {"dense": {"kernel": jnp.asarray(rand((3, 2), 31))}, "other": {"kernel": jnp.asarray(rand((2, 2), 32))}}
  t, s = ev.init(p)
  good = {"other": jnp.array([1.0, 2.0])}
  t1, s1 = ev.update(t, s, 0, stats={**good, "dense": jnp.array([1.0, -1.0, 2.0])})
  assert np.isnan(np.asarray(ev.spec.apply(t1, s1)["dense"]["kernel"])).any()
  assert np.isfinite(np.asarray(t1["other"]["kernel"])).all()  # only the leaf with the bad statistic
  t2, _ = ev.update(t, s, 0, stats={**good, "dense": jnp.array([1.0, 0.0, 2.0])})
  assert np.isfinite(np.asarray(t2["dense"]["kernel"])).all()

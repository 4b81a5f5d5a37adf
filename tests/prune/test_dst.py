import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc
from tests.prune.reference import erk_sparsities, keep_topk, n_keep


def rand(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def order(scores, idx):
  """``idx`` sorted by score descending, ties by index (numpy reference ranking)."""
  return idx[np.lexsort((idx, -scores[idx]))]


def rigl_reference(w, mask, g, frac):
  """One RigL rewiring in numpy: drop lowest |w| among active, grow highest |g| among the rest."""
  w, mask, g = w.ravel(), mask.ravel(), g.ravel()
  active = np.flatnonzero(mask)
  n_drop = int(np.round(frac * active.size))
  kept = order(np.abs(w.astype(np.float64)), active)[: active.size - n_drop]
  new = np.zeros(mask.size, bool)
  new[kept] = True
  candidates = np.flatnonzero(~new)
  new[order(np.abs(g.astype(np.float64)), candidates)[:n_drop]] = True
  value = np.where(new & mask, w, 0.0)
  return new, value


def cosine_fraction(alpha, t, t_end):
  return alpha * 0.5 * (1.0 + math.cos(math.pi * t / t_end))


def test_rigl_rewires_like_the_numpy_reference_over_a_schedule():
  shape, alpha, every, end = (12, 10), 0.4, 3, 9
  w0 = rand(shape, 0)
  stage = jc.prune.RigL(sparsity=0.8, end_step=end, update_every=every, drop_fraction=alpha)
  spec = jc.Spec([jc.Rule("w", [stage])])
  t, s = jax.jit(spec.init)({"w": jnp.asarray(w0)})
  update = jax.jit(spec.update)
  mask = keep_topk(np.abs(w0), n_keep(120, 0.8))  # the initial mask: magnitude
  np.testing.assert_array_equal(np.asarray(s["w"].stages["prune"].mask), mask)
  changed_steps = []
  for step in range(12):
    w = np.where(mask, rand(shape, 100 + step), 0.0).astype(np.float32)  # the optimizer moved w
    g = rand(shape, 200 + step)
    t, s = update({"w": jnp.asarray(w)}, s, step, grads={"w": jnp.asarray(g)})
    if step < end and step % every == 0:
      new, value = rigl_reference(w, mask, g, cosine_fraction(alpha, step, end))
      new, value = new.reshape(shape), value.reshape(shape)
    else:
      new, value = mask, np.where(mask, w, 0.0)
    got = np.asarray(s["w"].stages["prune"].mask)
    np.testing.assert_array_equal(got, new)
    np.testing.assert_array_equal(np.asarray(t["w"]), value)
    if not np.array_equal(new, mask):
      changed_steps.append(step)
    mask = new
    assert got.sum() == 24  # per-layer sparsity constant
  assert changed_steps == [0, 3, 6]


def test_drop_fraction_is_cosine_decayed():
  stage = jc.prune.RigL(sparsity=0.5, begin_step=10, end_step=110, drop_fraction=0.3)
  for step in [10, 35, 60, 85, 110]:
    expected = cosine_fraction(0.3, step - 10, 100)
    assert abs(float(stage.drop_fraction_at(step)) - expected) < 1e-6


def test_set_grows_at_random_among_inactive_and_keeps_counts():
  w0 = rand((16, 16), 1)
  stage = jc.prune.SET(sparsity=0.75, end_step=100, update_every=1, drop_fraction=0.5)
  spec = jc.Spec([jc.Rule("w", [stage])])
  t, s = jax.jit(spec.init)({"w": jnp.asarray(w0)})
  update = jax.jit(spec.update)
  old = np.asarray(s["w"].stages["prune"].mask)
  w = np.asarray(t["w"])
  t, s = update(t, s, 0, key=jax.random.key(0))
  new = np.asarray(s["w"].stages["prune"].mask)
  n_drop = round(0.5 * 64)
  assert new.sum() == old.sum() == 64
  # The survivors of the drop are the largest |w| among the active weights.
  active = np.flatnonzero(old.ravel())
  survivors = order(np.abs(w.ravel().astype(np.float64)), active)[: 64 - n_drop]
  assert new.ravel()[survivors].all()
  grown = new & ~old
  assert 0 < grown.sum() <= n_drop and np.all(np.asarray(t["w"])[grown] == 0.0)
  # Another key grows other weights.
  _, s2 = jax.jit(spec.init)({"w": jnp.asarray(w0)})
  _, s2 = update({"w": jnp.asarray(w0)}, s2, 0, key=jax.random.key(1))
  assert not np.array_equal(np.asarray(s2["w"].stages["prune"].mask), new)


def test_nan_weights_are_dropped_first_and_counts_stay_exact():
  w0 = rand((8, 8), 2)
  stage = jc.prune.RigL(sparsity=0.5, end_step=10, update_every=1, drop_fraction=0.3)
  spec = jc.Spec([jc.Rule("w", [stage])])
  t, s = jax.jit(spec.init)({"w": jnp.asarray(w0)})
  old = np.asarray(s["w"].stages["prune"].mask)
  w = w0.copy()
  w[np.unravel_index(np.flatnonzero(old)[[0, 5, 9]], w.shape)] = np.nan  # three active weights
  w[1, 1] = np.inf
  g = rand((8, 8), 3)
  g[0, :] = np.nan
  _, s = jax.jit(spec.update)({"w": jnp.asarray(w)}, s, 0, grads={"w": jnp.asarray(g)})
  new = np.asarray(s["w"].stages["prune"].mask)
  expected, _ = rigl_reference(w, old, g, 0.3)  # numpy ranks NaN last
  np.testing.assert_array_equal(new, expected.reshape(8, 8))
  assert new.sum() == 32 and not (new & np.isnan(w)).any()


@pytest.mark.slow
def test_rigl_with_erk_in_a_training_loop_keeps_layer_counts_and_zeros():
  k = jax.random.split(jax.random.key(0), 3)
  params = {
      "l1": {"kernel": jax.random.normal(k[0], (20, 16)) * 0.3},
      "l2": {"kernel": jax.random.normal(k[1], (16, 4)) * 0.3},
  }
  x = jax.random.normal(k[2], (32, 20))
  y = jnp.sin(x[:, :4])
  stage = jc.prune.RigL(sparsity=0.8, end_step=6, update_every=2, distribution=jc.prune.ERK())
  spec = jc.Spec([jc.Rule(r".*kernel", [stage])])
  opt = jc.masked_optimizer(optax.adam(1e-2))

  def loss(p, b):
    h = jnp.tanh(b[0] @ p["l1"]["kernel"])
    return jnp.mean((h @ p["l2"]["kernel"] - b[1]) ** 2)

  ts = jc.init_train_state(spec, opt, params)
  dens = 1.0 - np.asarray(erk_sparsities([(20, 16), (16, 4)], 0.8))
  counts = {n: int(np.round(d * params[n]["kernel"].size)) for n, d in zip(["l1", "l2"], dens)}
  step = jc.make_train_step(loss, spec, opt)
  get = lambda ts, n: np.asarray(ts.spec_state[n]["kernel"].stages["prune"].mask)
  masks = [get(ts, "l1")]
  for _ in range(7):
    before = {n: get(ts, n) for n in ["l1", "l2"]}
    ts, _ = step(ts, (x, y))
    for n in ["l1", "l2"]:
      m = get(ts, n)
      assert m.sum() == counts[n]
      assert np.all(np.asarray(ts.trainable[n]["kernel"])[~m] == 0.0)
      # Moments are zero where the optimizer step's mask was off: grown weights start clean.
      assert np.all(np.asarray(ts.opt_state[0].mu[n]["kernel"])[~before[n]] == 0.0)
    masks.append(get(ts, "l1"))
  assert not np.array_equal(masks[0], masks[-1])  # the topology changed


def test_dst_errors():
  spec = jc.Spec([jc.Rule("w", [jc.prune.RigL(sparsity=0.5, end_step=10)])])
  t, s = spec.init({"w": jnp.ones((4, 4))})
  with pytest.raises(ValueError, match=r"RigL at 'w' needs the gradient.*grads="):
    spec.update(t, s, 0)
  spec = jc.Spec([jc.Rule("w", [jc.prune.SET(sparsity=0.5, end_step=10)])])
  t, s = spec.init({"w": jnp.ones((4, 4))})
  with pytest.raises(ValueError, match=r"SET at 'w' needs a PRNG key.*key="):
    spec.update(t, s, 0)
  with pytest.raises(ValueError, match=r"RigL: sparsity must be a number in \[0, 1\).*schedule is not supported"):
    jc.prune.RigL(sparsity=jc.schedules.constant(0.5), end_step=10)
  with pytest.raises(ValueError, match=r"SET: drop_fraction must be in \(0, 1\], got 0"):
    jc.prune.SET(sparsity=0.5, end_step=10, drop_fraction=0)
  with pytest.raises(ValueError, match=r"RigL: end_step \(5\) must be after begin_step \(5\)"):
    jc.prune.RigL(sparsity=0.5, begin_step=5, end_step=5)
  with pytest.raises(ValueError, match=r"RigL: update_every must be a positive int, got 0"):
    jc.prune.RigL(sparsity=0.5, end_step=5, update_every=0)
  with pytest.raises(TypeError, match=r"distribution must be a Distribution instance.*'erk'"):
    jc.prune.RigL(sparsity=0.5, end_step=5, distribution="erk")

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxcompress as jc


def numpy_adam_masked(w, mask, x, y, steps, lr=0.1, b1=0.9, b2=0.999, eps=1e-8):
  """Independent reference: Adam on a masked linear model, moments held at zero."""
  w = np.where(mask, w, 0.0).astype(np.float64)
  m = np.zeros_like(w)
  v = np.zeros_like(w)
  for t in range(1, steps + 1):
    g = 2.0 / x.shape[0] * x.T @ (x @ w - y) / y.shape[1]
    g = np.where(mask, g, 0.0)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mhat = m / (1 - b1**t)
    vhat = v / (1 - b2**t)
    w = w - lr * mhat / (np.sqrt(vhat) + eps)
    w = np.where(mask, w, 0.0)
  return w


def test_masked_training_matches_numpy_adam_and_keeps_zeros():
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(6, 3)).astype(np.float32)
  x = rng.normal(size=(16, 6)).astype(np.float32)
  y = rng.normal(size=(16, 3)).astype(np.float32)
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5, end_step=0)])])
  opt = jc.masked_optimizer(optax.adam(0.1))
  loss = lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2)
  ts = jc.init_train_state(spec, opt, {"w": jnp.asarray(w0)})
  mask = np.asarray(ts.spec_state["w"].stages["prune"].mask)
  assert mask.sum() == 9
  step = jc.make_train_step(loss, spec, opt)
  for _ in range(5):
    ts, _ = step(ts, (x, y))
  model_w = spec.apply(ts.trainable, ts.spec_state)["w"]
  np.testing.assert_allclose(model_w, numpy_adam_masked(w0, mask, x, y, 5), rtol=2e-4, atol=1e-5)
  # Pruned trainable weights are frozen by the masked optimizer.
  np.testing.assert_array_equal(np.asarray(ts.trainable["w"])[~mask], w0[~mask])
  mu, nu = ts.opt_state[0].mu["w"], ts.opt_state[0].nu["w"]
  assert np.all(np.asarray(mu)[~mask] == 0) and np.all(np.asarray(nu)[~mask] == 0)


def test_moments_are_zeroed_when_a_weight_is_pruned_late():
  rng = np.random.default_rng(1)
  w0 = rng.normal(size=(8, 4)).astype(np.float32)
  x = rng.normal(size=(16, 8)).astype(np.float32)
  sched = jc.schedules.piecewise([3], [0.0, 0.75])
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=sched)])])
  opt = jc.masked_optimizer(optax.adam(0.05))
  loss = lambda p, b: jnp.mean((b @ p["w"]) ** 2)
  ts = jc.init_train_state(spec, opt, {"w": jnp.asarray(w0)})
  step = jc.make_train_step(loss, spec, opt)
  for _ in range(6):
    ts, _ = step(ts, x)
  mask = np.asarray(ts.spec_state["w"].stages["prune"].mask)
  assert mask.sum() == 8
  for leaf in (ts.trainable["w"], ts.opt_state[0].mu["w"], ts.opt_state[0].nu["w"]):
    assert np.all(np.asarray(leaf)[~mask] == 0)


def mlp_params(key):
  k1, k2 = jax.random.split(key)
  return {
      "l1": {"kernel": jax.random.normal(k1, (16, 32)) * 0.3, "bias": jnp.zeros(32)},
      "l2": {"kernel": jax.random.normal(k2, (32, 8)) * 0.3, "bias": jnp.zeros(8)},
  }


def mlp_loss(p, batch, logits_sharding=None):
  x, y = batch
  h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
  # Explicit sharding asks how a product over a sharded axis is laid out.
  logits = jnp.matmul(h, p["l2"]["kernel"], out_sharding=logits_sharding) + p["l2"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize(
    "axis_type",
    [pytest.param(a, marks=pytest.mark.slow) for a in (AxisType.Auto, AxisType.Explicit)],
    ids=["auto", "explicit"],
)
def test_sharded_step_equals_single_device_and_does_not_retrace(axis_type):
  spec = jc.Spec([jc.Rule(".*kernel", [jc.prune.magnitude(sparsity=jc.schedules.linear(0.0, 0.8, end_step=4))])])
  opt = jc.masked_optimizer(optax.adam(1e-2))
  params = mlp_params(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (32, 16))
  y = jnp.arange(32) % 8

  single = jc.init_train_state(spec, opt, params)
  step = jc.make_train_step(mlp_loss, spec, opt, donate=False)
  for _ in range(5):
    single, m1 = step(single, (x, y))

  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
  with jax.set_mesh(mesh):
    ts, m2, sharded_step = _sharded_run(spec, opt, params, mesh, x, y)
  assert sharded_step._cache_size() == 1
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(ts)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-4, atol=1e-6)
  assert ts.trainable["l1"]["kernel"].sharding.spec == P(None, "model")
  assert ts.spec_state["l1"]["kernel"].stages["prune"].mask.sharding.spec == P(None, "model")


def _sharded_run(spec, opt, params, mesh, x, y):
  pspecs = {"l1": {"kernel": P(None, "model"), "bias": P("model")},
            "l2": {"kernel": P("model", None), "bias": P()}}
  p_sh = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), pspecs)
  ts_sh = jc.train_state_shardings(spec, opt, params, p_sh)
  batch_sh = (NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data")))
  init = jax.jit(lambda p: jc.init_train_state(spec, opt, p), out_shardings=ts_sh)
  ts = init(jax.device_put(params, p_sh))
  assert ts.spec_state["l1"]["kernel"].stages["prune"].mask.sharding.spec == P(None, "model")
  assert ts.opt_state[0].mu["l1"]["kernel"].sharding.spec == P(None, "model")
  explicit = mesh.axis_types[0] == AxisType.Explicit
  loss = functools.partial(mlp_loss, logits_sharding=P("data", None) if explicit else None)
  sharded_step = jc.make_train_step(loss, spec, opt, state_shardings=ts_sh, batch_sharding=batch_sh)
  batch = jax.device_put((x, y), batch_sh)
  for _ in range(5):
    ts, m2 = sharded_step(ts, batch)
  return ts, m2, sharded_step

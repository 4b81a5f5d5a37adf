"""The distillation step: numpy reference, compressed teacher and student, sharding."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxcompress as jc
from jaxcompress import distill


@dataclasses.dataclass(frozen=True, kw_only=True)
class FakeInt8(jc.Stage):
  """Per-tensor symmetric int8 fake quantization (a stand-in for an int8 teacher)."""

  name: ClassVar[str] = "int8"

  def apply(self, value, params, state):
    scale = jnp.max(jnp.abs(value)) / 127.0
    return (jnp.round(value / scale) * scale).astype(value.dtype)


def np_int8(w):
  scale = np.abs(w).max() / 127.0
  return np.round(w / scale) * scale


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def linear_teacher(p, x):
  return x @ p["w"]


def test_step_matches_numpy_sgd_with_a_temperature_schedule():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 5)).astype(np.float32)
  w_t = rng.normal(size=(5, 4)).astype(np.float32)
  w0 = rng.normal(size=(5, 4)).astype(np.float32) * 0.1
  temp = jc.schedules.linear(1.0, 3.0, end_step=2)

  def loss_fn(p, batch, teacher_logits, step):
    return distill.soft_target_loss(batch @ p["w"], teacher_logits, temperature=temp(step)).mean()

  spec, opt = jc.Spec([]), optax.sgd(0.3)
  ts = jc.init_train_state(spec, opt, {"w": jnp.asarray(w0)})
  step = distill.make_distill_step(loss_fn, linear_teacher, spec, opt)
  w = w0.astype(np.float64)
  for i, T in enumerate([1.0, 2.0, 3.0, 3.0]):
    ts, m = step(ts, {"w": jnp.asarray(w_t)}, jnp.asarray(x))
    q, p = np_softmax(x @ w / T), np_softmax(x @ w_t / T)
    assert np.isclose(float(m["loss"]), T * T * np.mean(np.sum(p * np.log(p / q), -1)), rtol=1e-5)
    w = w - 0.3 * x.T @ (T * (q - p)) / x.shape[0]  # gradient T (q - p), averaged over the batch
    np.testing.assert_allclose(ts.trainable["w"], w, rtol=1e-4, atol=1e-6)
  assert int(ts.step) == 4 and step._cache_size() == 1


def test_int8_teacher_and_pruned_student():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(32, 6)).astype(np.float32)
  labels = (np.arange(32) % 3).astype(np.int32)
  w_t = rng.normal(size=(6, 3)).astype(np.float32)
  teacher_spec = jc.Spec([jc.Rule("w", [FakeInt8()])])
  teacher = jax.jit(teacher_spec.init)({"w": jnp.asarray(w_t)})
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5, end_step=0)])])
  opt = jc.masked_optimizer(optax.adam(0.05))

  def loss_fn(p, batch, teacher_logits, step):
    xb, yb = batch
    return distill.distillation_loss(xb @ p["w"], teacher_logits, yb, alpha=0.7, temperature=2.0).mean()

  w0 = rng.normal(size=(6, 3)).astype(np.float32)
  ts = jax.jit(lambda p: jc.init_train_state(spec, opt, p))({"w": jnp.asarray(w0)})
  mask = np.asarray(ts.spec_state["w"].stages["prune"].mask)
  step = distill.make_distill_step(
      loss_fn, lambda p, batch: batch[0] @ p["w"], spec, opt, teacher_spec=teacher_spec
  )
  ts, m = step(ts, teacher, (jnp.asarray(x), jnp.asarray(labels)))
  # Step 0's loss: pruned student, int8 teacher, computed in numpy.
  ws = np.where(mask, w0, 0.0)
  q, p = np_softmax(x @ ws / 2.0), np_softmax(x @ np_int8(w_t) / 2.0)
  soft = 4.0 * np.sum(p * np.log(p / q), -1)
  hard = -np.log(np_softmax(x @ ws)[np.arange(32), labels])
  assert np.isclose(float(m["loss"]), np.mean(0.7 * soft + 0.3 * hard), rtol=1e-5)
  p_fp = np_softmax(x @ w_t / 2.0)
  assert not np.isclose(np.mean(0.7 * 4.0 * np.sum(p_fp * np.log(p_fp / q), -1) + 0.3 * hard), float(m["loss"]), rtol=1e-5)
  for _ in range(3):
    ts, m = step(ts, teacher, (jnp.asarray(x), jnp.asarray(labels)))
  assert np.all(np.asarray(spec.apply(ts.trainable, ts.spec_state)["w"])[~mask] == 0)
  np.testing.assert_array_equal(np.asarray(ts.trainable["w"])[~mask], w0[~mask])  # frozen
  assert np.all(np.asarray(ts.opt_state[0].mu["w"])[~mask] == 0)
  np.testing.assert_array_equal(teacher[0]["w"], w_t)  # the teacher is never donated nor changed


def test_teacher_spec_needs_the_pair_from_init():
  spec = jc.Spec([])
  step = distill.make_distill_step(
      lambda p, b, t, s: jnp.sum(t), linear_teacher, spec, optax.sgd(0.1),
      teacher_spec=jc.Spec([jc.Rule("w", [FakeInt8()])]),
  )
  ts = jc.init_train_state(spec, optax.sgd(0.1), {"w": jnp.ones((2, 2))})
  with pytest.raises(TypeError, match=r"takes teacher=\(trainable, state\).*got a dict"):
    step(ts, {"w": jnp.ones((2, 2))}, jnp.ones((1, 2)))
  with pytest.raises(TypeError, match=r"jc.Spec\(\[\]\) for an uncompressed student"):
    distill.make_distill_step(lambda *a: 0.0, linear_teacher, None, optax.sgd(0.1))


# --------------------------------------------------------------------------
# Sharded on the 8-device CPU mesh.
# --------------------------------------------------------------------------


def mlp(seed, widths):
  rng = np.random.default_rng(seed)
  return {
      f"l{i}": {
          "kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=(b,)) * 0.1, jnp.float32),
      }
      for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))
  }


def mlp_apply(p, x):
  h = jax.nn.relu(x @ p["l0"]["kernel"] + p["l0"]["bias"])
  return h, h @ p["l1"]["kernel"] + p["l1"]["bias"]


def teacher_fn(p, batch):
  h, logits = mlp_apply(p, batch[0])
  return h, logits


def loss_fn(params, batch, teacher_out, step):
  x, y = batch
  t_hidden, t_logits = teacher_out
  h, logits = mlp_apply(params["net"], x)
  kd = distill.distillation_loss(logits, t_logits, y, alpha=0.5, temperature=2.0)
  feat = distill.feature_mse_loss(distill.apply_projection(params["proj"], h), t_hidden)
  return (kd + 0.1 * feat).mean()


@pytest.mark.slow
def test_sharded_step_equals_single_device():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 16)), jnp.float32)
  y = jnp.arange(32) % 8
  t_params = mlp(1, (16, 64, 8))
  s_params = {"net": mlp(2, (16, 32, 8)), "proj": distill.init_projection(jax.random.key(3), 32, 64)}
  teacher_spec = jc.Spec([jc.Rule(r".*kernel", [FakeInt8()])])
  spec = jc.Spec([jc.Rule(r"net/.*kernel", [jc.prune.magnitude(sparsity=jc.schedules.linear(0.0, 0.5, end_step=3))])])
  opt = jc.masked_optimizer(optax.adam(1e-2))

  single = jax.jit(lambda p: jc.init_train_state(spec, opt, p))(s_params)
  teacher = jax.jit(teacher_spec.init)(t_params)
  step = distill.make_distill_step(loss_fn, teacher_fn, spec, opt, teacher_spec=teacher_spec, donate=False)
  losses = []
  for _ in range(4):
    single, m = step(single, teacher, (x, y))
    losses.append(float(m["loss"]))

  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  ns = lambda s: NamedSharding(mesh, s)
  # Teacher: FSDP (first layer's input axis on "data") and tensor parallel ("model").
  t_sh = jax.tree_util.tree_map(ns, {"l0": {"kernel": P("data", "model"), "bias": P("model")},
                                     "l1": {"kernel": P("model", None), "bias": P()}})
  # Student: tensor parallel net, projection sharded on its output axis.
  s_sh = jax.tree_util.tree_map(ns, {
      "net": {"l0": {"kernel": P(None, "model"), "bias": P("model")}, "l1": {"kernel": P("model", None), "bias": P()}},
      "proj": {"kernel": P(None, "model"), "bias": P("model")},
  })
  teacher_shardings = teacher_spec.shardings(t_params, t_sh)
  ts_sh = jc.train_state_shardings(spec, opt, s_params, s_sh)
  batch_sh = (ns(P("data")), ns(P("data")))
  ts = jax.jit(lambda p: jc.init_train_state(spec, opt, p), out_shardings=ts_sh)(jax.device_put(s_params, s_sh))
  teacher_sharded = jax.jit(teacher_spec.init, out_shardings=teacher_shardings)(jax.device_put(t_params, t_sh))
  assert teacher_sharded[0]["l0"]["kernel"].sharding.spec == P("data", "model")
  sharded = distill.make_distill_step(
      loss_fn, teacher_fn, spec, opt, teacher_spec=teacher_spec,
      state_shardings=ts_sh, teacher_shardings=teacher_shardings, batch_sharding=batch_sh,
  )
  batch = jax.device_put((x, y), batch_sh)
  for i in range(4):
    ts, m = sharded(ts, teacher_sharded, batch)
    np.testing.assert_allclose(float(m["loss"]), losses[i], rtol=1e-5)
  assert sharded._cache_size() == 1
  for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(ts)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-4, atol=1e-6)
  assert ts.trainable["net"]["l0"]["kernel"].sharding.spec == P(None, "model")
  assert ts.trainable["proj"]["kernel"].sharding.spec == P(None, "model")
  mask = np.asarray(ts.spec_state["net"]["l0"]["kernel"].stages["prune"].mask)
  assert mask.mean() == 0.5 and np.all(np.asarray(ts.trainable["net"]["l0"]["kernel"])[~mask] == 0)


def test_aux_and_stats_reach_the_student_spec():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(16, 6)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)
  w = rng.normal(size=(6, 3)).astype(np.float32)
  spec = jc.Spec([jc.Rule("dense/kernel", [jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Wanda())])])
  opt = optax.sgd(0.0)  # weights fixed: the mask depends on the statistics alone

  def loss_fn(p, batch, teacher_logits, step):
    logits = batch @ p["dense"]["kernel"]
    return distill.soft_target_loss(logits, teacher_logits).mean(), {"dense": jnp.linalg.norm(batch, axis=0)}

  ts = jax.jit(lambda p: jc.init_train_state(spec, opt, p))({"dense": {"kernel": jnp.asarray(w)}})
  step = distill.make_distill_step(
      loss_fn, linear_teacher, spec, opt, has_aux=True, stats_fn=lambda aux: aux
  )
  ts, m = step(ts, {"w": jnp.asarray(w[:, ::-1].copy())}, jnp.asarray(x))
  norms = np.linalg.norm(x.astype(np.float64), axis=0)
  np.testing.assert_allclose(m["aux"]["dense"], norms, rtol=1e-5)
  score = np.abs(w) * norms[:, None]  # Wanda: |w| times the input feature's activation norm
  expect = score >= np.sort(score.ravel())[9]
  assert np.any(expect != (np.abs(w) >= np.sort(np.abs(w).ravel())[9]))  # not plain magnitude
  np.testing.assert_array_equal(ts.spec_state["dense"]["kernel"].stages["prune"].mask, expect)

"""Regression tests for traps a new user hits in the core and the train step."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc


def _loss(p, b):
  return jnp.mean((b[0] @ p["w"] - b[1]) ** 2)


def _data(seed=0, n=16, d=8, o=4):
  rng = np.random.default_rng(seed)
  return (
      rng.normal(size=(d, o)).astype(np.float32),
      (rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, o)).astype(np.float32)),
  )


def test_plain_optax_optimizer_keeps_pruned_weights_and_moments_at_zero():
  w0, batch = _data()
  # Pruned late, after Adam has built up moments for every weight.
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=jc.schedules.piecewise([2], [0.0, 0.5]))])])
  opt = optax.adam(0.1)  # not wrapped by the user
  ts = jc.init_train_state(spec, opt, {"w": jnp.asarray(w0)})
  step = jc.make_train_step(_loss, spec, opt)
  for _ in range(6):
    ts, _ = step(ts, batch)
  mask = np.asarray(ts.spec_state["w"].stages["prune"].mask)
  assert mask.sum() == 16
  assert np.all(np.asarray(ts.trainable["w"])[~mask] == 0)
  assert np.all(np.asarray(ts.opt_state[0].mu["w"])[~mask] == 0)
  assert np.all(np.asarray(ts.opt_state[0].nu["w"])[~mask] == 0)


def test_masked_optimizer_twice_is_once():
  tx = jc.masked_optimizer(optax.sgd(0.1))
  assert jc.masked_optimizer(tx) is tx


@pytest.mark.parametrize("donate", [True, False])
def test_step_never_deletes_the_callers_params_or_key(donate):
  w0, batch = _data()
  params = {"w": jnp.asarray(w0)}
  key = jax.random.key(3)
  spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=8)])])  # trainable == params
  ts = jc.init_train_state(spec, optax.sgd(0.1), params, key=key)
  step = jc.make_train_step(_loss, spec, optax.sgd(0.1), donate=donate)
  ts, _ = step(ts, batch)
  ts, _ = step(ts, batch)
  np.testing.assert_array_equal(np.asarray(params["w"]), w0)  # still alive, unchanged
  jax.random.normal(key, (2,))  # the key too


def test_step_never_deletes_an_nnx_models_state():
  from flax import nnx

  model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
  _, params = nnx.split(model, nnx.Param)
  before = np.asarray(model.kernel[...])
  spec = jc.Spec([jc.Rule(".*kernel", [jc.quant.FakeQuant(bits=8)])])  # trainable == params
  ts = jc.init_train_state(spec, optax.sgd(0.1), params)

  def loss(p, b):
    return jnp.mean((b[0] @ p["kernel"] + p["bias"] - b[1]) ** 2)

  step = jc.make_train_step(loss, spec, optax.sgd(0.1))
  _, batch = _data()
  ts, _ = step(ts, batch)
  np.testing.assert_array_equal(np.asarray(model.kernel[...]), before)


def test_train_state_key_is_raw_data_and_checkpoints(tmp_path):
  import orbax.checkpoint as ocp

  spec = jc.Spec([jc.Rule("w", [jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Random())])])
  ts = jc.init_train_state(spec, optax.sgd(0.1), {"w": jnp.ones((4, 4))}, key=jax.random.key(0))
  assert ts.key.dtype == jnp.uint32
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ts", ts._asdict())
  with ocp.StandardCheckpointer() as ckpt:
    back = ckpt.restore(tmp_path / "ts", jax.tree_util.tree_map(np.zeros_like, ts._asdict()))
  np.testing.assert_array_equal(back["key"], ts.key)
  step = jc.make_train_step(lambda p, b: jnp.sum(p["w"] * b), spec, optax.sgd(0.1))
  ts, _ = step(ts, jnp.ones((4, 4)))
  assert int(ts.step) == 1


def test_stage_after_a_factorization_gets_its_factors_gradient():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(6, 5)).astype(np.float32)
  g = rng.normal(size=(6, 5)).astype(np.float32)
  spec = jc.Spec([
      jc.Rule("w", [jc.lowrank.svd(rank=2), jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Saliency())])
  ])
  t, s = spec.init({"w": jnp.asarray(w)})
  t, s = spec.update(t, s, 0, grads={"w": jnp.asarray(g)})
  f = t["w"].params["lowrank"]
  u, v = np.asarray(f.u, np.float64), np.asarray(f.v, np.float64)
  # Independent reference: W = U V, so dL/dU = G V^T and dL/dV = U^T G; the
  # saliency |x * dL/dx| keeps the larger half of each factor.
  for x, gx, mask in ((u, g @ v.T, s["w"].stages["prune"][0].mask), (v, u.T @ g, s["w"].stages["prune"][1].mask)):
    sal = np.abs(x * gx).ravel()
    keep = np.zeros(sal.size, bool)
    keep[np.argsort(-sal, kind="stable")[: sal.size - int(round(0.5 * sal.size))]] = True
    np.testing.assert_array_equal(np.asarray(mask).ravel(), keep)


def test_stage_without_a_name_is_refused_when_the_rule_is_built():
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Nameless(jc.Stage):
    pass

  with pytest.raises(TypeError, match=r"Nameless\) has no name.*name: ClassVar\[str\]"):
    jc.Rule("w", [Nameless()])


def test_bad_leaves_are_refused_with_their_path():
  spec = jc.Spec([jc.Rule(".*w", [jc.prune.magnitude(sparsity=0.5)])])
  with pytest.raises(TypeError, match=r"'a/w' of dtype complex64.*real floating-point"):
    spec.init({"a": {"w": jnp.ones((4, 4), jnp.complex64)}})
  with pytest.raises(ValueError, match=r"'a/w' of shape \(0, 4\), which has no elements"):
    spec.init({"a": {"w": jnp.ones((0, 4))}})
  with pytest.raises(ValueError, match=r"same path string 'a/w'.*rename one key"):
    spec.init({"a/w": jnp.ones((4, 4)), "a": {"w": jnp.ones((4, 4))}})


def test_float_step_is_refused():
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5)])])
  t, s = spec.init({"w": jnp.ones((4, 4))})
  with pytest.raises(TypeError, match=r"step must be an integer.*got 1.9"):
    spec.update(t, s, 1.9)
  with pytest.raises(TypeError, match=r"step must be an integer"):
    spec.update(t, s, jnp.float32(2.0))
  spec.update(t, s, np.int64(2))


def test_mismatched_trees_name_the_argument():
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5)])])
  t, s = spec.init({"w": jnp.ones((4, 4)), "b": jnp.ones(4)})
  _, s_other = spec.init({"w": jnp.ones((4, 4)), "c": jnp.ones(4)})
  with pytest.raises(ValueError, match=r"spec.apply: state does not have the structure of `trainable`"):
    spec.apply(t, s_other)
  with pytest.raises(ValueError, match=r"spec.update: grads does not have the structure"):
    spec.update(t, s, 0, grads={"w": jnp.ones((4, 4))})
  with pytest.raises(ValueError, match=r"grads\['w'\] has shape \(4, 1\), but the model param has shape \(4, 4\)"):
    spec.update(t, s, 0, grads={"w": jnp.ones((4, 1)), "b": jnp.ones(4)})


def test_train_state_key_of_another_prng_implementation_is_refused():
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5)])])
  with pytest.raises(ValueError, match=r"init_train_state: key: the key's PRNG implementation rbg"):
    jc.init_train_state(spec, optax.sgd(0.1), {"w": jnp.ones((4, 4))}, key=jax.random.key(0, impl="rbg"))


def test_partitioned_optimizers_work_in_the_train_step():
  """optax.multi_transform (MaskedNode in its state) with a frozen group and a pruned leaf."""
  params = {"a": {"kernel": jnp.arange(64.0).reshape(8, 8) - 31.5}, "b": {"kernel": jnp.ones((8, 4))}}
  spec = jc.Spec([jc.Rule("a/kernel", [jc.prune.magnitude(sparsity=0.5)])])
  labels = {"a": {"kernel": "train"}, "b": {"kernel": "freeze"}}
  opt = optax.multi_transform({"train": optax.adam(1e-2), "freeze": optax.set_to_zero()}, labels)

  def loss(p, batch):
    return jnp.sum((batch @ p["a"]["kernel"] @ p["b"]["kernel"]) ** 2)

  ts = jc.init_train_state(spec, opt, params)
  step = jc.make_train_step(loss, spec, opt)
  for _ in range(2):
    ts, _ = step(ts, jnp.ones((2, 8)))
  weights = spec.apply(ts.trainable, ts.spec_state)
  np.testing.assert_array_equal(np.asarray(weights["b"]["kernel"]), np.ones((8, 4)))  # frozen
  pruned = np.asarray(weights["a"]["kernel"]) == 0
  assert pruned.sum() == 32
  mu = ts.opt_state.inner_states["train"].inner_state[0].mu["a"]["kernel"]
  np.testing.assert_array_equal(np.asarray(mu)[pruned], 0.0)

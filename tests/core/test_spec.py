import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcompress as jc
from jaxcompress.core.stage import Stage


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scale(Stage):
  """Test stage with a trainable scalar: apply = value * scale."""

  name: ClassVar[str] = "scale"
  init_value: float = 2.0

  def init(self, value, *, path, key):
    return jnp.asarray(self.init_value, value.dtype), None

  def apply(self, value, params, state):
    return value * params


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Pair:
  u: jax.Array
  v: jax.Array

  def materialize(self):
    return self.u @ self.v


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rank1(Stage):
  """Test stage that replaces the weight by two factors (first column / row)."""

  name: ClassVar[str] = "rank1"
  replaces_weight: ClassVar[bool] = True

  def init(self, value, *, path, key):
    return Pair(value[:, :1], jnp.ones((1, value.shape[1]), value.dtype)), None

  def apply(self, value, params, state):
    assert value is None
    return params


def params():
  return {
      "a": {"kernel": jnp.arange(12.0).reshape(3, 4) - 5, "bias": jnp.ones(4)},
      "b": {"kernel": jnp.arange(8.0).reshape(4, 2), "bias": jnp.zeros(2)},
  }


def test_unselected_leaves_pass_through_and_first_rule_wins():
  spec = jc.Spec([
      jc.Rule("a/kernel", [Scale(init_value=3.0)]),
      jc.Rule(".*kernel", [Scale(init_value=5.0)]),
  ])
  p = params()
  t, s = spec.init(p)
  out = spec.apply(t, s)
  np.testing.assert_array_equal(out["a"]["kernel"], np.asarray(p["a"]["kernel"]) * 3)
  np.testing.assert_array_equal(out["b"]["kernel"], np.asarray(p["b"]["kernel"]) * 5)
  assert out["a"]["bias"] is p["a"]["bias"]
  assert t["a"]["bias"] is p["a"]["bias"]
  assert isinstance(t["a"]["kernel"], jc.Compressed)


def test_rule_matching_nothing_names_pattern_and_paths():
  spec = jc.Spec([jc.Rule("c/kernel", [Scale()])])
  with pytest.raises(ValueError, match=r"Rule 'c/kernel' matches no leaf.*'a/bias', 'a/kernel'"):
    spec.init(params())


def test_shadowed_rule_says_which_rule_owns_its_leaves():
  spec = jc.Spec([jc.Rule(".*kernel", [Scale()]), jc.Rule("a/kernel", [Scale()])])
  with pytest.raises(ValueError, match=r"already owned by the earlier rule '\.\*kernel'"):
    spec.init(params())


def test_bad_rules():
  with pytest.raises(ValueError, match="not a valid regular expression"):
    jc.Rule("(", [Scale()])
  with pytest.raises(ValueError, match="has no stages"):
    jc.Rule("a", [])
  with pytest.raises(TypeError, match="not a jaxcompress stage"):
    jc.Rule("a", [lambda w: w])
  with pytest.raises(ValueError, match="must come first in its rule"):
    jc.Rule("a", [Scale(), Rank1()])


def test_integer_leaf_is_rejected_with_its_path():
  spec = jc.Spec([jc.Rule("steps", [Scale()])])
  with pytest.raises(TypeError, match=r"leaf 'steps' of dtype int32"):
    spec.init({"steps": jnp.zeros((2,), jnp.int32)})


def test_trainable_params_are_differentiable():
  spec = jc.Spec([jc.Rule(".*kernel", [Scale(init_value=2.0)])])
  t, s = spec.init(params())
  g = jax.grad(lambda t: jnp.sum(spec.apply(t, s)["a"]["kernel"]))(t)
  # d/d scale of sum(scale * W) = sum(W); d/dW = scale.
  np.testing.assert_allclose(g["a"]["kernel"].params["scale"], np.sum(np.arange(12.0) - 5))
  np.testing.assert_allclose(g["a"]["kernel"].weight, np.full((3, 4), 2.0))


def test_replacing_stage_then_per_factor_stage():
  spec = jc.Spec([jc.Rule("a/kernel", [Rank1(), Scale(init_value=2.0)])])
  p = params()
  t, s = spec.init(p)
  assert t["a"]["kernel"].weight is None
  out = spec.apply(t, s)["a"]["kernel"]
  w = np.asarray(p["a"]["kernel"])
  # Each factor scaled by 2: (2u)(2v) = 4 u v.
  np.testing.assert_allclose(out, 4 * w[:, :1] @ np.ones((1, 4)))
  assert len(t["a"]["kernel"].params["scale"]) == 2


def test_prune_zeroes_trainable_weight_on_update():
  w = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=jc.schedules.linear(0.0, 0.5, end_step=1))])])
  t, s = spec.init({"w": jnp.asarray(w)})
  assert np.array_equal(t["w"], w)  # sparsity 0 at step 0
  t, s = spec.update(t, s, 1)
  keep = np.abs(w) >= np.sort(np.abs(w).ravel())[-6]
  np.testing.assert_array_equal(np.asarray(t["w"]), np.where(keep, w, 0))


def test_linen_nnx_and_list_pytrees():
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))

  model = MLP()
  lp = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  spec = jc.Spec([jc.Rule(r"Dense_\d/kernel", [jc.prune.magnitude(sparsity=0.5)])])
  t, s = spec.init(lp)
  y = model.apply({"params": spec.apply(t, s)}, jnp.ones((2, 4)))
  assert y.shape == (2, 3)

  graphdef, state = nnx.split(nnx.Linear(4, 6, rngs=nnx.Rngs(0)))
  spec = jc.Spec([jc.Rule("kernel", [jc.prune.magnitude(sparsity=0.5)])])
  t, s = spec.init(state)
  m = nnx.merge(graphdef, spec.apply(t, s))
  assert float(jnp.mean(m.kernel[...] == 0)) == 0.5

  spec = jc.Spec([jc.Rule(r"1", [Scale()])])
  t, s = spec.init([jnp.ones(2), jnp.ones(3)])
  out = spec.apply(t, s)
  assert out[0].tolist() == [1, 1] and out[1].tolist() == [2, 2, 2]


def test_state_from_another_spec_is_rejected():
  spec_a = jc.Spec([jc.Rule(".*kernel", [Scale()])])
  spec_b = jc.Spec([jc.Rule(".*kernel", [jc.prune.magnitude(sparsity=0.5)])])
  t, s = spec_a.init(params())
  with pytest.raises(ValueError, match="comes from a different spec"):
    spec_b.apply(t, s)


def test_describe_lists_every_leaf():
  spec = jc.Spec([jc.Rule(".*kernel", [jc.prune.magnitude(sparsity=0.9)])])
  text = spec.describe(params())
  lines = text.splitlines()
  assert len(lines) == 5
  assert "a/kernel" in text and "(3, 4)" in text and "Prune(sparsity=0.9)" in text


def test_keys_are_per_leaf_and_deterministic():
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Noise(Stage):
    name: ClassVar[str] = "noise"

    def init(self, value, *, path, key):
      return None, jax.random.normal(key, value.shape, value.dtype)

    def apply(self, value, params, state):
      return value + state

  spec = jc.Spec([jc.Rule(".*kernel", [Noise()])])
  _, s1 = spec.init(params(), key=jax.random.key(0))
  _, s2 = spec.init(params(), key=jax.random.key(0))
  n1 = s1["a"]["kernel"].stages["noise"]
  assert np.array_equal(n1, s2["a"]["kernel"].stages["noise"])
  assert not np.allclose(n1[:2, :2], s1["b"]["kernel"].stages["noise"][:2, :2])


def test_update_masks_structure():
  spec = jc.Spec([jc.Rule("a/kernel", [jc.prune.magnitude(sparsity=0.5)]),
                  jc.Rule("b/kernel", [Scale()])])
  t, s = spec.init(params())
  m = spec.update_masks(t, s)
  assert m["a"]["kernel"].dtype == jnp.bool_ and m["a"]["bias"] is None
  assert m["b"]["kernel"].weight is None


def test_state_after_jit_is_accepted_whatever_the_stage_order():
  # dicts come back from jit with sorted keys; "scale" sorts after "prune" but
  # "aaa" would sort first: both orders must work.
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Aaa(Scale):
    name: ClassVar[str] = "aaa"

  spec = jc.Spec([jc.Rule(".*kernel", [jc.prune.magnitude(sparsity=0.5), Aaa()])])
  t, s = jax.jit(spec.init)(params())
  t, s = jax.jit(spec.update)(t, s, 1)
  out = jax.jit(spec.apply)(t, s)
  assert float(jnp.mean(out["a"]["kernel"] == 0)) >= 0.5


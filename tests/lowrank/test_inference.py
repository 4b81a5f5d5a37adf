"""Factorized inference: Dense layers run as x @ U @ V and match the dense model."""

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxcompress as jc
from jaxcompress import lowrank
from jaxcompress.core.stage import Stage


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(48)(x))
    x = nn.relu(nn.Dense(40, use_bias=False)(x))
    return nn.Dense(10)(x)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Halve(Stage):
  """A per-array stage: halves each array it gets (so each factor, after SVD)."""

  name: ClassVar[str] = "halve"

  def apply(self, value, params, state):
    return value * 0.5


def _dot_shapes(fn, *args):
  """The (lhs, rhs) shapes of every dot_general in fn's jaxpr."""
  shapes = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        shapes.append(tuple(tuple(v.aval.shape) for v in eqn.invars))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return shapes


def test_linen_factorized_dense_matches_the_dense_model_and_skips_w():
  model = _MLP()
  x = jax.random.normal(jax.random.key(0), (5, 32))
  params = model.init(jax.random.key(1), x)["params"]
  spec = jc.Spec([
      jc.Rule(r"Dense_[01]/kernel", [lowrank.svd(rank=6), _Halve()]),
  ])
  t, s = spec.init(params)
  dense_out = model.apply({"params": spec.apply(t, s)}, x)
  fparams = lowrank.factorized_params(spec, t, s)
  assert sorted(fparams["Dense_0"]) == ["bias", "kernel_u", "kernel_v"]
  assert sorted(fparams["Dense_1"]) == ["kernel_u", "kernel_v"]
  assert sorted(fparams["Dense_2"]) == ["bias", "kernel"]
  u0 = t["Dense_0"]["kernel"].params["lowrank"].u
  np.testing.assert_allclose(np.asarray(fparams["Dense_0"]["kernel_u"]), 0.5 * np.asarray(u0))

  def run(p, x):
    with lowrank.factorized_dense():
      return model.apply({"params": p}, x)

  out = jax.jit(run)(fparams, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(dense_out), rtol=1e-4, atol=1e-5)
  shapes = _dot_shapes(run, fparams, x)
  assert ((5, 32), (32, 6)) in shapes and ((5, 6), (6, 48)) in shapes
  assert not any(rhs in [(32, 48), (48, 40)] for _, rhs in shapes)
  assert not any(lhs == (32, 6) for lhs, _ in shapes)  # U @ V is never formed


def test_linen_dense_without_factors_is_untouched_inside_the_context():
  model = nn.Dense(4)
  x = jnp.ones((2, 3))
  params = model.init(jax.random.key(0), x)["params"]
  with lowrank.factorized_dense():
    y = model.apply({"params": params}, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x @ params["kernel"] + params["bias"]), rtol=1e-6)


class _NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(32, 48, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(48, 40, use_bias=False, rngs=rngs)])
    self.out = nnx.Linear(40, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.l1(x))
    x = nnx.relu(self.blocks[0](x))
    return self.out(x)


def test_nnx_factorize_swaps_linear_layers_and_matches():
  model = _NNXMLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (5, 32))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  spec = jc.Spec([jc.Rule(r"(l1|blocks/0)/kernel", [lowrank.svd(rank=5)])])
  t, s = spec.init(params)
  reference = nnx.merge(graphdef, spec.apply(t, s), rest)(x)
  fast = lowrank.factorize_nnx(model, spec, t, s)
  assert isinstance(fast.l1, lowrank.LowRankLinear)
  assert isinstance(fast.blocks[0], lowrank.LowRankLinear)
  assert isinstance(fast.out, nnx.Linear)
  assert isinstance(model.l1, nnx.Linear)  # the original is not changed
  assert fast.l1.kernel_u.shape == (32, 5) and fast.blocks[0].kernel_v.shape == (5, 40)
  np.testing.assert_allclose(np.asarray(fast(x)), np.asarray(reference), rtol=1e-4, atol=1e-5)
  shapes = _dot_shapes(lambda x: fast(x), x)
  assert not any(rhs in [(32, 48), (48, 40)] for _, rhs in shapes)

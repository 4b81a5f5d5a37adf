"""SVD stage: optimal reconstruction, the factor split, gradients, composition."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc
from jaxcompress import lowrank
from jaxcompress.core.stage import Stage


def _random(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _numpy_singular_values(w):
  m = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
  return np.linalg.svd(m, compute_uv=False)


@pytest.mark.parametrize("shape", [(24, 16), (12, 20), (3, 3, 4, 8)])
@pytest.mark.parametrize("rank", [2, 7])
def test_reconstruction_error_is_eckart_young_optimum(shape, rank):
  w = _random(shape, seed=sum(shape) + rank)
  spec = jc.Spec([jc.Rule("w", [lowrank.svd(rank=rank)])])
  t, s = spec.init({"w": jnp.asarray(w)})
  approx = np.asarray(spec.apply(t, s)["w"], np.float64)
  sv = _numpy_singular_values(w)
  err2 = np.sum((approx - w) ** 2)
  np.testing.assert_allclose(err2, np.sum(sv[rank:] ** 2), rtol=1e-4, atol=1e-6)
  assert approx.shape == shape


def test_jitted_init_gives_the_same_approximation():
  w = jnp.asarray(_random((24, 16), seed=3))
  spec = jc.Spec([jc.Rule("w", [lowrank.svd(rank=6)])])
  eager = spec.apply(*spec.init({"w": w}))["w"]
  jitted = jax.jit(spec.apply)(*jax.jit(spec.init)({"w": w}))["w"]
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-5, atol=1e-5)


def test_singular_values_are_split_evenly_between_factors():
  w = _random((20, 12), seed=4)
  spec = jc.Spec([jc.Rule("w", [lowrank.svd(rank=5)])])
  t, _ = spec.init({"w": jnp.asarray(w)})
  f = t["w"].params["lowrank"]
  u, v = np.asarray(f.u, np.float64), np.asarray(f.v, np.float64)
  sv = _numpy_singular_values(w)[:5]
  # U = U_r sqrt(S), V = sqrt(S) V_r^T: U^T U = S and V V^T = S.
  np.testing.assert_allclose(u.T @ u, np.diag(sv), atol=1e-4)
  np.testing.assert_allclose(v @ v.T, np.diag(sv), atol=1e-4)


def test_factors_are_trainable_leaves_with_chain_rule_gradients():
  w = jnp.asarray(_random((10, 6), seed=5))
  g = _random((10, 6), seed=6)
  spec = jc.Spec([jc.Rule("w", [lowrank.svd(rank=3)])])
  t, s = spec.init({"w": w})
  grads = jax.grad(lambda t: jnp.sum(spec.apply(t, s)["w"] * g))(t)
  f = t["w"].params["lowrank"]
  gf = grads["w"].params["lowrank"]
  u, v = np.asarray(f.u), np.asarray(f.v)
  # d/dU sum(G * UV) = G V^T, d/dV = U^T G.
  np.testing.assert_allclose(np.asarray(gf.u), g @ v.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gf.v), u.T @ g, rtol=1e-5, atol=1e-5)


def test_bf16_kernel_gives_bf16_factors_and_output():
  w = jnp.asarray(_random((16, 8), seed=7)).astype(jnp.bfloat16)
  spec = jc.Spec([jc.Rule("w", [lowrank.svd(rank=8)])])
  t, s = spec.init({"w": w})
  f = t["w"].params["lowrank"]
  assert f.u.dtype == jnp.bfloat16 and f.v.dtype == jnp.bfloat16
  out = spec.apply(t, s)["w"]
  assert out.dtype == jnp.bfloat16
  # Full rank: the kernel back, up to bf16 rounding of the factors.
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(w, np.float32), atol=0.1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _RoundToQuarter(Stage):
  """A per-array stage for the composition test: rounds to multiples of 1/4."""

  name: ClassVar[str] = "round"

  def apply(self, value, params, state):
    return jnp.round(value * 4.0) / 4.0


def test_later_stages_apply_to_each_factor():
  w = _random((12, 9), seed=8)
  spec = jc.Spec([jc.Rule("w", [lowrank.svd(rank=4), _RoundToQuarter()])])
  t, s = spec.init({"w": jnp.asarray(w)})
  f = t["w"].params["lowrank"]
  ru = np.round(np.asarray(f.u, np.float64) * 4.0) / 4.0
  rv = np.round(np.asarray(f.v, np.float64) * 4.0) / 4.0
  np.testing.assert_allclose(np.asarray(spec.apply(t, s)["w"]), ru @ rv, rtol=1e-5, atol=1e-5)


def test_update_keeps_factors():
  w = jnp.asarray(_random((8, 8), seed=9))
  spec = jc.Spec([jc.Rule("w", [lowrank.svd(rank=2)])])
  t, s = spec.init({"w": w})
  t2, s2 = jax.jit(spec.update)(t, s, 3)
  np.testing.assert_array_equal(np.asarray(t2["w"].params["lowrank"].u), np.asarray(t["w"].params["lowrank"].u))
  assert jax.tree_util.tree_structure((t2, s2)) == jax.tree_util.tree_structure((t, s))


def test_factor_value_counts_and_dot():
  w = _random((16, 12), seed=10)
  x = _random((5, 16), seed=11)
  spec = jc.Spec([jc.Rule("w", [lowrank.svd(rank=3)])])
  f = spec.init({"w": jnp.asarray(w)})[0]["w"].params["lowrank"]
  assert (f.rank, f.num_params, f.shape) == (3, 3 * (16 + 12), (16, 12))
  np.testing.assert_allclose(
      np.asarray(f.dot(jnp.asarray(x))), x @ np.asarray(f.materialize()), rtol=1e-4, atol=1e-4
  )


def test_training_the_factors_with_the_train_step():
  rng = np.random.default_rng(12)
  w_true = (rng.standard_normal((16, 3)) @ rng.standard_normal((3, 12))).astype(np.float32)
  w0 = w_true + 0.5 * rng.standard_normal((16, 12)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
  y = x @ jnp.asarray(w_true)
  loss = lambda p, batch: jnp.mean((batch[0] @ p["w"] - batch[1]) ** 2)
  spec = jc.Spec([jc.Rule("w", [lowrank.svd(rank=3)])])
  opt = jc.masked_optimizer(optax.adam(0.02))
  ts = jc.init_train_state(spec, opt, {"w": jnp.asarray(w0)})
  step = jc.make_train_step(loss, spec, opt)
  first = None
  for _ in range(150):
    ts, m = step(ts, (x, y))
    first = float(m["loss"]) if first is None else first
  assert float(m["loss"]) < 0.02 * first
  assert ts.trainable["w"].params["lowrank"].u.shape == (16, 3)

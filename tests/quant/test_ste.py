import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.quant import numerics as qn
from jaxcompress.quant import ste
from tests.quant import reference as ref

RNG = np.random.default_rng(1)
X = RNG.normal(size=(16, 6)).astype(np.float32)
UP = RNG.normal(size=(16, 6)).astype(np.float32)  # upstream gradient


def test_round_ste_value_exact_and_gradient_identity():
  x = jnp.asarray(RNG.normal(size=1000).astype(np.float32) * 50)
  np.testing.assert_array_equal(np.asarray(ste.round_ste(x)), np.round(np.asarray(x)))
  g = jax.grad(lambda x: jnp.sum(ste.round_ste(x) * UP.ravel()[0]))(x)
  np.testing.assert_array_equal(np.asarray(g), np.full(1000, UP.ravel()[0]))


@pytest.mark.parametrize("fmt", [qn.Format(bits=4), qn.Format(bits=8, symmetric=False),
                                 qn.Format(dtype="float8_e4m3fn")], ids=["int4", "int8_asym", "fp8"])
def test_fake_quant_ste_forward_is_fake_quant_and_identity_backward(fmt):
  x = jnp.asarray(X)
  out = ste.fake_quant_ste(x, fmt, qn.PerGroup(size=4))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(qn.fake_quant(x, fmt, qn.PerGroup(size=4))))
  g = jax.grad(lambda x: jnp.sum(ste.fake_quant_ste(x, fmt, qn.PerGroup(size=4)) * UP))(x)
  np.testing.assert_array_equal(np.asarray(g), UP)


def test_fake_quant_ste_clipped_zeroes_gradient_outside_range():
  scale = jnp.full((1, 6), 0.1, jnp.float32)  # int4 grid [-0.8, 0.7], rounds from [-0.85, 0.75]
  fmt = qn.Format(bits=4)
  f = lambda x: jnp.sum(ste.fake_quant_ste(x, fmt, qn.PerChannel(), scale=scale, estimator="clipped") * UP)
  g, gs = jax.grad(
      lambda x, s: jnp.sum(ste.fake_quant_ste(x, fmt, qn.PerChannel(), scale=s, estimator="clipped") * UP),
      argnums=(0, 1),
  )(jnp.asarray(X), scale)
  y = X / np.float32(0.1)
  np.testing.assert_array_equal(np.asarray(g), np.where((y >= -8.5) & (y <= 7.5), UP, 0.0))
  np.testing.assert_array_equal(np.asarray(gs), 0.0)
  assert float(jax.jit(f)(jnp.asarray(X))) == pytest.approx(float(f(jnp.asarray(X))), rel=1e-5)


def test_fake_quant_ste_keeps_bf16():
  x = jnp.asarray(X, jnp.bfloat16)
  out, g = jax.value_and_grad(lambda x: jnp.sum(ste.fake_quant_ste(x).astype(jnp.float32)))(x)
  assert g.dtype == jnp.bfloat16
  assert ste.fake_quant_ste(x).dtype == jnp.bfloat16


def test_lsq_forward_and_gradients_match_paper_formula():
  bits = 3
  step = jnp.full((1, 1), 0.4, jnp.float32)
  fmt = qn.Format(bits=bits)
  f = lambda x, s: jnp.sum(ste.lsq_fake_quant(x, s, fmt, qn.PerTensor()) * UP)
  out = ste.lsq_fake_quant(jnp.asarray(X), step, fmt, qn.PerTensor())
  qmin, qmax = ref.grid(bits)
  expect = np.clip(np.round(X / np.float32(0.4)), qmin, qmax) * np.float32(0.4)
  np.testing.assert_array_equal(np.asarray(out), expect)
  gx, gs = jax.grad(f, argnums=(0, 1))(jnp.asarray(X), step)
  y = X / np.float32(0.4)
  np.testing.assert_allclose(np.asarray(gx), np.where((y > qmin) & (y < qmax), UP, 0.0), rtol=1e-6)
  g = 1.0 / math.sqrt(X.size * qmax)
  np.testing.assert_allclose(float(gs[0, 0]), ref.lsq_step_grad(X, 0.4, bits, UP, g), rtol=1e-5)


def test_lsq_per_channel_gradient_scale_uses_elements_per_step():
  fmt = qn.Format(bits=4)
  step = jnp.full((1, 6), 0.3, jnp.float32)
  gs = jax.grad(lambda s: jnp.sum(ste.lsq_fake_quant(jnp.asarray(X), s, fmt, qn.PerChannel()) * UP))(step)
  g = 1.0 / math.sqrt(16 * 7)
  expect = [ref.lsq_step_grad(X[:, c], 0.3, 4, UP[:, c], g) for c in range(6)]
  np.testing.assert_allclose(np.asarray(gs)[0], expect, rtol=1e-5, atol=1e-7)
  assert ste.lsq_grad_scale(16, fmt) == pytest.approx(g)


def test_lsq_init_step_is_two_mean_abs_over_sqrt_qp():
  s = ste.lsq_init_step(jnp.asarray(X), qn.Format(bits=4), qn.PerChannel())
  np.testing.assert_allclose(np.asarray(s)[0], 2 * np.abs(X).mean(0) / np.sqrt(7), rtol=1e-6)
  z = ste.lsq_init_step(jnp.zeros((4, 2)), qn.Format(bits=4), qn.PerChannel())
  assert np.all(np.asarray(z) > 0)


def test_lsq_rejects_asymmetric_and_float():
  with pytest.raises(ValueError, match="LSQ needs a symmetric integer format"):
    ste.lsq_fake_quant(jnp.ones(3), jnp.ones((1,)), qn.Format(symmetric=False), qn.PerTensor())


@pytest.mark.parametrize("signed", [False, True])
def test_pact_forward_and_alpha_gradient(signed):
  bits, alpha = 4, np.float32(1.3)
  x = X * 2
  out, ga = jax.value_and_grad(
      lambda a: jnp.sum(ste.pact_quant(jnp.asarray(x), a, bits=bits, signed=signed) * UP)
  )(jnp.float32(alpha))
  gx = jax.grad(lambda x: jnp.sum(ste.pact_quant(x, jnp.float32(alpha), bits=bits, signed=signed) * UP))(
      jnp.asarray(x)
  )
  levels = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
  lo = -alpha if signed else np.float32(0)
  step = np.float32(alpha / np.float32(levels))
  y = np.clip(x, lo, alpha)
  np.testing.assert_array_equal(
      np.asarray(ste.pact_quant(jnp.asarray(x), jnp.float32(alpha), bits=bits, signed=signed)),
      np.round(y / step) * step,
  )
  expect_ga = np.sum(UP * (x > alpha)) - (np.sum(UP * (x < -alpha)) if signed else 0.0)
  np.testing.assert_allclose(float(ga), expect_ga, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gx), np.where((x > lo) & (x < alpha), UP, 0.0), rtol=1e-6)


def test_pact_bits_checked():
  with pytest.raises(ValueError, match=r"pact_quant: bits must be an integer in \[2, 8\], got 1"):
    ste.pact_quant(jnp.ones(3), jnp.float32(1.0), bits=1)

"""Low-precision dot_general: numerics against numpy, STE gradients, use in Flax layers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxcompress.quant.dot_general import (
    QuantizedDotGeneral,
    _round_to_fp8_grid,
    fp8_dot_general,
    int8_dot_general,
)

DENSE = (((1,), (0,)), ((), ()))


def np_quantize(x, axes, qmax):
  """Symmetric round-to-nearest-even integers and scales (independent reference)."""
  x = np.asarray(x, np.float64)
  amax = np.abs(x).max(axis=axes, keepdims=True)
  scale = np.where(amax > 0, amax / qmax, 1.0)
  return np.clip(np.round(x / scale), -qmax, qmax).astype(np.int32), scale


def np_int8_matmul(x, w, bits=8):
  """x[..., k] @ w[k, n] with per-token / per-channel int quantization."""
  qmax = 2 ** (bits - 1) - 1
  qx, sx = np_quantize(x, (-1,), qmax)
  qw, sw = np_quantize(w, (0,), qmax)
  acc = np.einsum("...k,kn->...n", qx, qw)  # int32 product
  return acc, sx, sw


def rand(shape, seed, dtype=np.float32):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


@functools.partial(jax.jit, static_argnums=(2, 3))
def dot(x, w, dg, dn=DENSE):
  return dg(x, w, dn)


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_dense_product_is_the_integer_matmul_times_scales(bits):
  x, w = rand((6, 40), 0), rand((40, 5), 1)
  out = np.asarray(dot(x, w, int8_dot_general(bits=bits)))
  acc, sx, sw = np_int8_matmul(x, w, bits)
  # The integer product is recovered exactly from the output...
  np.testing.assert_array_equal(np.round(out / (sx * sw)).astype(np.int64), acc)
  # ...and the output is that product times the scales.
  np.testing.assert_allclose(out, acc * sx * sw, rtol=1e-6, atol=1e-6)


def test_int8_general_dimension_numbers():
  # Batch dim 0 on both, lhs contracts dims (1, 3), rhs contracts (2, 1); free dims in between.
  x, w = rand((2, 3, 4, 5), 2), rand((2, 5, 3, 6), 3)
  dn = (((1, 3), (2, 1)), ((0,), (0,)))
  out = np.asarray(dot(x, w, int8_dot_general(), dn))
  qx, sx = np_quantize(x, (1, 3), 127)  # one scale per (batch, token)
  qw, sw = np_quantize(w, (2, 1), 127)  # one scale per (batch, output channel)
  acc = np.einsum("bitk,bkiz->btz", qx, qw)
  ref = acc * sx[:, 0, :, 0][:, :, None] * sw[:, 0, 0, :][:, None, :]
  assert out.shape == (2, 4, 6)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_per_tensor_granularities_and_zero_rows():
  x, w = rand((6, 40), 4), rand((40, 5), 5)
  dg = int8_dot_general(lhs_granularity="per_tensor", rhs_granularity="per_tensor")
  out = np.asarray(dot(x, w, dg))
  qx, sx = np_quantize(x, None, 127)
  qw, sw = np_quantize(w, None, 127)
  np.testing.assert_allclose(out, (qx @ qw) * sx * sw, rtol=1e-6, atol=1e-6)
  # An all-zero row or column gets a finite scale and an exactly zero output.
  x[1] = 0.0
  w[:, 2] = 0.0
  for dg in (int8_dot_general(), fp8_dot_general()):
    out = np.asarray(dot(x, w, dg))
    assert np.isfinite(out).all()
    assert (out[1] == 0).all() and (out[:, 2] == 0).all()


@pytest.mark.parametrize(
    "fmt, operand_dtype", [("float8_e4m3fn", None), ("float8_e5m2", "bfloat16")]
)
def test_fp8_product_against_numpy_fp8(fmt, operand_dtype):
  x, w = rand((6, 40), 8), rand((40, 5), 9)
  out = np.asarray(dot(x, w, fp8_dot_general(dtype=fmt, operand_dtype=operand_dtype)))
  np_fmt = getattr(ml_dtypes, fmt)
  fmax = float(ml_dtypes.finfo(np_fmt).max)
  sx = np.abs(x).max(-1, keepdims=True) / fmax
  sw = np.abs(w).max(0, keepdims=True) / fmax
  qx = (x / sx).astype(np_fmt).astype(np.float64)
  qw = (w / sw).astype(np_fmt).astype(np.float64)
  np.testing.assert_allclose(out, (qx @ qw) * sx * sw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_fp8_grid_rounding_is_bit_exact(fmt):
  info = ml_dtypes.finfo(fmt)
  values = np.arange(256, dtype=np.uint8).view(fmt).astype(np.float32)
  values = np.sort(values[np.isfinite(values)])
  midpoints = ((values[1:].astype(np.float64) + values[:-1]) / 2).astype(np.float32)
  rng = np.random.default_rng(0)
  random = np.concatenate([
      rng.normal(size=4000) * float(info.max) / 4,
      rng.normal(size=4000) * float(info.smallest_normal) * 3,
  ]).astype(np.float32)
  y = np.clip(np.concatenate([values, midpoints, random]), -float(info.max), float(info.max))
  got = np.asarray(jax.jit(_round_to_fp8_grid, static_argnums=1)(y, fmt))
  np.testing.assert_array_equal(got.view(np.uint32), y.astype(fmt).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("make", [int8_dot_general, fp8_dot_general], ids=["int8", "fp8"])
def test_gradients_are_the_float_dot_generals(make):
  x, w = jnp.asarray(rand((2, 5, 12), 10)), jnp.asarray(rand((12, 7), 11))
  g = jnp.asarray(rand((2, 5, 7), 12))
  dn = (((2,), (0,)), ((), ()))
  vjp_q = jax.jit(lambda a, b, c: jax.vjp(lambda a, b: make()(a, b, dn), a, b)[1](c))
  vjp_f = jax.jit(lambda a, b, c: jax.vjp(lambda a, b: lax.dot_general(a, b, dn), a, b)[1](c))
  for got, want in zip(vjp_q(x, w, g), vjp_f(x, w, g)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_dtypes_follow_lax_dot_general():
  x = jnp.asarray(rand((4, 16), 13), jnp.bfloat16)
  w = jnp.asarray(rand((16, 8), 14), jnp.bfloat16)
  dg = int8_dot_general()

  @jax.jit
  def f(a, b):
    grads = jax.grad(lambda a, b: dg(a, b, DENSE).astype(jnp.float32).sum(), argnums=(0, 1))(a, b)
    return dg(a, b, DENSE), dg(a, b, DENSE, preferred_element_type=jnp.float32), grads

  out, out_f32, (gx, gw) = f(x, w)
  assert out.dtype == jnp.bfloat16 and out_f32.dtype == jnp.float32
  assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16


def test_in_linen_dense_under_jit():
  x = rand((8, 20), 15)
  model = nn.Dense(6, dot_general=int8_dot_general())
  params = model.init(jax.random.key(0), x)
  loss = lambda p: jnp.sum(model.apply(p, x) ** 2)
  out, g = jax.jit(lambda p: (model.apply(p, x), jax.grad(loss)(p)))(params)
  kernel = np.asarray(params["params"]["kernel"])
  acc, sx, sw = np_int8_matmul(x, kernel)
  np.testing.assert_allclose(out, acc * sx * sw + np.asarray(params["params"]["bias"]), rtol=1e-5, atol=1e-5)
  # Training through it: the straight-through gradient is the float Dense's at the
  # quantized forward output: dL/dW = x^T (2 y), dL/db = sum(2 y).
  y = np.asarray(out, np.float64)
  np.testing.assert_allclose(g["params"]["bias"], 2 * y.sum(0), rtol=1e-5)
  np.testing.assert_allclose(g["params"]["kernel"], 2 * x.T @ y, rtol=1e-4, atol=1e-4)


def test_in_nnx_linear_and_einsum():
  x = rand((2, 3, 12), 16)
  linear = nnx.Linear(12, 4, dot_general=fp8_dot_general(operand_dtype="bfloat16"), rngs=nnx.Rngs(0))
  einsum = nnx.Einsum("btk,kn->btn", (12, 4), (4,), einsum_op=int8_dot_general().einsum, rngs=nnx.Rngs(1))
  out_l, out_e = nnx.jit(lambda a, b, v: (a(v), b(v)))(linear, einsum, x)
  fmax = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
  kernel = np.asarray(linear.kernel[...])
  sx = np.abs(x).max(-1, keepdims=True) / fmax
  sw = np.abs(kernel).max(0, keepdims=True) / fmax
  qx = (x / sx).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  qw = (kernel / sw).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  want = (qx @ qw) * sx * sw + np.asarray(linear.bias[...])
  np.testing.assert_allclose(out_l, want, rtol=1e-5, atol=1e-5)
  acc, sx, sw = np_int8_matmul(x, np.asarray(einsum.kernel[...]))
  np.testing.assert_allclose(out_e, acc * sx * sw + np.asarray(einsum.bias[...]), rtol=1e-5, atol=1e-5)


def test_hashable_static_config():
  assert hash(int8_dot_general()) == hash(int8_dot_general())
  assert fp8_dot_general(operand_dtype=jnp.bfloat16) == fp8_dot_general(operand_dtype="bfloat16")
  assert int8_dot_general() != int8_dot_general(bits=4)


def test_sharded_matches_single_device():
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
  x, w = jnp.asarray(rand((16, 24), 17)), jnp.asarray(rand((24, 6), 18))
  xs = jax.device_put(x, NamedSharding(mesh, P("data", "model")))  # contraction axis sharded too
  ws = jax.device_put(w, NamedSharding(mesh, P("model", None)))
  f = jax.jit(lambda a, b: int8_dot_general()(a, b, DENSE))
  np.testing.assert_allclose(f(xs, ws), f(x, w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=9), "bits must be an int from 2 to 8"),
        (dict(bits=1), "bits must be an int from 2 to 8"),
        (dict(lhs_granularity="per_channel"), "lhs_granularity must be one of"),
        (dict(rhs_granularity="per_token"), "rhs_granularity must be one of"),
        (dict(dtype="int4"), "dtype must be 'int8'"),
        (dict(dtype="float8_e4m3fn", bits=4), "bits applies to int8 only"),
        (dict(operand_dtype="bfloat16"), "operand_dtype applies to fp8 only"),
        (dict(dtype="float8_e4m3fn", operand_dtype="int32"), "operand_dtype must be one of"),
        (dict(dtype="float8_e4m3fn", operand_dtype="float8_e5m2"), "operand_dtype must be one of"),
    ],
)
def test_bad_configs(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantizedDotGeneral(**kwargs)

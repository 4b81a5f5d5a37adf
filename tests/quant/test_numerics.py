import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxcompress.quant import numerics as qn
from tests.quant import reference as ref

RNG = np.random.default_rng(0)
X = (RNG.normal(size=(32, 12)) * RNG.uniform(0.1, 3.0, size=(1, 12))).astype(np.float32)

GRANS = [
    (qn.PerTensor(), dict(kind="tensor")),
    (qn.PerChannel(), dict(kind="channel", axis=-1)),
    (qn.PerChannel(axis=0), dict(kind="channel", axis=0)),
    (qn.PerGroup(size=8), dict(kind="group", axis=0, size=8)),
    (qn.PerGroup(size=4, axis=1), dict(kind="group", axis=1, size=4)),
]
GRAN_IDS = ["tensor", "channel_last", "channel_0", "group8_axis0", "group4_axis1"]


@pytest.mark.parametrize("gran,kw", GRANS, ids=GRAN_IDS)
@pytest.mark.parametrize(
    "bits,symmetric,narrow",
    [(8, True, False), (4, True, False), (3, False, False), (2, True, True)],
)
def test_int_quantize_bit_exact_vs_numpy(gran, kw, bits, symmetric, narrow):
  fmt = qn.Format(bits=bits, symmetric=symmetric, narrow_range=narrow)
  q = jax.jit(lambda x: qn.quantize(x, fmt, gran))(jnp.asarray(X))
  s, zp = ref.scale_zp(X, bits, symmetric, narrow, **kw)
  values = ref.quantize_int(X, s, zp, bits, narrow, **kw)
  assert q.values.dtype == (jnp.int4 if bits <= 4 else jnp.int8)
  np.testing.assert_array_equal(np.asarray(q.scale), s)
  np.testing.assert_array_equal(np.asarray(q.values, np.float32), values)
  if symmetric:
    assert q.zero_point is None
  else:
    np.testing.assert_array_equal(np.asarray(q.zero_point, np.float32), zp)
  np.testing.assert_array_equal(
      np.asarray(qn.dequantize(q)), ref.dequantize_int(values, s, zp, **kw)
  )


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("gran,kw", GRANS[:2] + GRANS[3:4], ids=["tensor", "channel", "group"])
def test_fp8_quantize_bit_exact_vs_ml_dtypes(dtype, gran, kw):
  fmt = qn.Format(dtype=dtype)
  q = qn.quantize(jnp.asarray(X), fmt, gran)
  values, s = ref.quantize_fp8(X, dtype, **kw)
  assert q.values.dtype == np.dtype(ref.FP8[dtype])
  np.testing.assert_array_equal(np.asarray(q.scale), s)
  np.testing.assert_array_equal(
      np.asarray(q.values).view(np.uint8), values.view(np.uint8)
  )
  deq = values.astype(np.float32) * ref.expand(s, X.shape, **kw)
  np.testing.assert_array_equal(np.asarray(qn.dequantize(q)), deq)


@pytest.mark.parametrize(
    "fmt",
    [qn.Format(bits=8), qn.Format(bits=4, symmetric=False), qn.Format(dtype="float8_e4m3fn")],
    ids=["int8", "int4_asym", "fp8"],
)
@pytest.mark.parametrize("gran", [qn.PerTensor(), qn.PerChannel(), qn.PerGroup(size=4)],
                         ids=["tensor", "channel", "group"])
def test_all_zero_blocks_give_positive_finite_scales(fmt, gran):
  x = jnp.zeros((8, 3)).at[:4, 0].set(jnp.array([1.0, -2.0, 0.5, 0.0]))
  q = qn.quantize(x, fmt, gran)
  s = np.asarray(q.scale)
  assert np.all(np.isfinite(s)) and np.all(s > 0)
  out = np.asarray(qn.dequantize(q))
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[:, 1:], 0.0)
  np.testing.assert_array_equal(out[4:], 0.0)


def test_zero_is_exact_on_every_grid():
  x = jnp.asarray(np.where(RNG.uniform(size=X.shape) < 0.4, 0.0, X + 0.7))
  for fmt in [qn.Format(bits=b, symmetric=sym) for b in (2, 3, 4, 8) for sym in (True, False)] + [
      qn.Format(dtype="float8_e5m2")
  ]:
    out = np.asarray(qn.fake_quant(x, fmt, qn.PerGroup(size=8)))
    np.testing.assert_array_equal(out[np.asarray(x) == 0], 0.0)


def test_stochastic_rounding_matches_reference_noise():
  key = jax.random.key(7)
  fmt = qn.Format(bits=4, symmetric=False)
  q = qn.quantize(jnp.asarray(X), fmt, qn.PerChannel(), rounding="stochastic", key=key)
  s, zp = ref.scale_zp(X, 4, False)
  u = np.asarray(jax.random.uniform(key, X.shape, jnp.float32))
  expect = np.clip(np.floor(X / s + zp + u), -8, 7)
  np.testing.assert_array_equal(np.asarray(q.values, np.float32), expect)


@pytest.mark.parametrize("fmt", [qn.Format(bits=3), qn.Format(dtype="float8_e4m3fn")], ids=["int3", "fp8"])
def test_stochastic_rounding_is_unbiased_and_picks_neighbours(fmt):
  x = jnp.asarray(X[:8, :4])
  keys = jax.random.split(jax.random.key(0), 2000)
  outs = jax.vmap(lambda k: qn.fake_quant(x, fmt, qn.PerTensor(), rounding="stochastic", key=k))(keys)
  outs = np.asarray(outs)
  s = float(np.abs(X[:8, :4]).max()) / fmt.qmax
  y = np.asarray(x) / s
  if fmt.is_float:
    down = np.array([_fp8_floor(v, ml_dtypes.float8_e4m3fn) for v in y.ravel()]).reshape(y.shape)
    up = np.array([_fp8_ceil(v, ml_dtypes.float8_e4m3fn) for v in y.ravel()]).reshape(y.shape)
  else:
    down, up = np.floor(y), np.ceil(y)
  # Unbiased: the sample mean is within 5 standard errors of x (a draw's standard
  # deviation is at most half the gap between the two neighbours).
  se = (up - down) * s / 2 / np.sqrt(len(keys))
  assert np.all(np.abs(outs.mean(0) - np.asarray(x)) <= 5 * se + 1e-4 * np.abs(np.asarray(x)))
  # Each draw is one of the two grid neighbours of x.
  draws = outs / s
  ok = np.isclose(draws, down, rtol=1e-6, atol=1e-6) | np.isclose(draws, up, rtol=1e-6, atol=1e-6)
  assert ok.all()


def _fp8_values(dtype):
  vals = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float64)
  return np.unique(vals[np.isfinite(vals)])


def _fp8_floor(v, dtype):
  vals = _fp8_values(dtype)
  return vals[vals <= v].max()


def _fp8_ceil(v, dtype):
  vals = _fp8_values(dtype)
  return vals[vals >= v].min()


def test_qarray_is_a_pytree_through_jit_and_keeps_bf16():
  x = jnp.asarray(X, jnp.bfloat16)
  q = qn.quantize(x, qn.Format(bits=4, symmetric=False), qn.PerGroup(size=8))
  leaves, treedef = jax.tree_util.tree_flatten(q)
  assert len(leaves) == 3
  q2 = jax.jit(lambda q: q)(q)
  assert isinstance(q2, qn.QArray) and q2.fmt == q.fmt and q2.granularity == q.granularity
  out = jax.jit(qn.dequantize)(q2)
  assert out.dtype == jnp.bfloat16 and out.shape == x.shape
  assert qn.dequantize(q, jnp.float32).dtype == jnp.float32
  assert q.scale.shape == (4, 12) and q.shape == (32, 12)


def test_given_scale_is_used():
  scale = jnp.full((1, 12), 0.5, jnp.float32)
  q = qn.quantize(jnp.asarray(X), qn.Format(bits=8), qn.PerChannel(), scale=scale)
  np.testing.assert_array_equal(np.asarray(q.values, np.float32), np.clip(np.round(X / 0.5), -128, 127))
  with pytest.raises(ValueError, match=r"expected shape \(1, 12\)"):
    qn.quantize(jnp.asarray(X), qn.Format(), qn.PerChannel(), scale=jnp.ones((12,)))


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bits_out_of_range_rejected_when_the_format_is_built(bits):
  with pytest.raises(ValueError, match=rf"Format: bits={bits} .* from 2 to 8"):
    qn.Format(bits=bits)


def test_bad_inputs_name_path_value_and_fix():
  with pytest.raises(ValueError, match=r"Dense_1/kernel: unknown granularity 'per_channel'.*PerChannel"):
    qn.check(qn.Format(), "per_channel", (4, 4), "Dense_1/kernel")
  with pytest.raises(ValueError, match=r"w: PerGroup\(size=48\) does not divide axis -2 of size 128.*divides 128"):
    qn.check(qn.Format(), qn.PerGroup(size=48), (128, 8), "w")
  with pytest.raises(ValueError, match=r"w: PerChannel\(axis=2\) does not fit .* shape \(4, 4\)"):
    qn.check(qn.Format(), qn.PerChannel(axis=2), (4, 4), "w")
  with pytest.raises(ValueError, match=r"Format: unknown quantization dtype 'int16'"):
    qn.Format(dtype="int16")
  with pytest.raises(ValueError, match=r"Format: .*float8 quantization is symmetric only"):
    qn.Format(dtype="float8_e5m2", symmetric=False)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    qn.quantize(jnp.ones(3), rounding="stochastic", granularity=qn.PerTensor())
  with pytest.raises(ValueError, match="unknown rounding 'up'"):
    qn.quantize(jnp.ones(3), rounding="up", granularity=qn.PerTensor())


def test_narrow_range_never_uses_most_negative():
  q = qn.quantize(jnp.asarray(-np.abs(X)), qn.Format(bits=8, narrow_range=True), qn.PerTensor())
  assert int(np.asarray(q.values).min()) == -127

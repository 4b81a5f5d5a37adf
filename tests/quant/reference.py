"""Independent numpy references for the quantization tests.

Written from the formulas (symmetric/asymmetric uniform quantization, LSQ,
PACT, GPTQ), in numpy and ml_dtypes, without calling the library.
"""

import ml_dtypes
import numpy as np

FP8 = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}


def grid(bits, narrow=False):
  """(qmin, qmax) of a signed integer grid."""
  return -(2 ** (bits - 1)) + (1 if narrow else 0), 2 ** (bits - 1) - 1


def blocks(x, kind, axis=-1, size=None):
  """x viewed so that one scale is shared over the returned reduce axes."""
  x = np.asarray(x)
  if kind == "tensor":
    return x, tuple(range(x.ndim))
  if kind == "channel":
    a = axis % x.ndim
    return x, tuple(i for i in range(x.ndim) if i != a)
  a = axis % x.ndim
  shape = x.shape[:a] + (x.shape[a] // size, size) + x.shape[a + 1 :]
  return x.reshape(shape), (a + 1,)


def reduce(x, kind, fn, axis=-1, size=None):
  """Reduce over scale blocks; returns the scale-shaped array (same rank as x)."""
  x = np.asarray(x)
  v, axes = blocks(x, kind, axis, size)
  r = fn(v, axis=axes, keepdims=True)
  if kind == "group":
    a = axis % x.ndim
    r = r.reshape(x.shape[:a] + (x.shape[a] // size,) + x.shape[a + 1 :])
  return r


def expand(s, shape, kind, axis=-1, size=None):
  if kind == "group":
    return np.repeat(s, size, axis=axis % len(shape))
  return s


def scale_zp(x, bits=8, symmetric=True, narrow=False, kind="channel", axis=-1, size=None):
  """Absmax (symmetric) or min/max (asymmetric) scale and zero point, float32.

  The scale is the range times the float32 reciprocal of the grid width.
  """
  x = np.asarray(x, np.float32)
  qmin, qmax = grid(bits, narrow)
  if symmetric:
    r = reduce(np.abs(x), kind, np.max, axis, size)
    r = np.where(r > 0, r, np.float32(1)).astype(np.float32)
    return (r * np.float32(1.0 / qmax)).astype(np.float32), None
  lo = np.minimum(reduce(x, kind, np.min, axis, size), 0).astype(np.float32)
  hi = np.maximum(reduce(x, kind, np.max, axis, size), 0).astype(np.float32)
  r = (hi - lo).astype(np.float32)
  r = np.where(r > 0, r, np.float32(1)).astype(np.float32)
  s = (r * np.float32(1.0 / (qmax - qmin))).astype(np.float32)
  zp = np.clip(np.round(np.float32(qmin) - lo / s), qmin, qmax).astype(np.float32)
  return s, zp


def quantize_int(x, s, zp, bits, narrow=False, kind="channel", axis=-1, size=None):
  """Integer grid values (float32) of x with scale s and zero point zp."""
  qmin, qmax = grid(bits, narrow)
  x = np.asarray(x, np.float32)
  y = x / expand(s, x.shape, kind, axis, size)
  if zp is not None:
    y = y + expand(zp, x.shape, kind, axis, size)
  return np.clip(np.round(y), qmin, qmax).astype(np.float32)


def dequantize_int(q, s, zp, kind="channel", axis=-1, size=None):
  q = np.asarray(q, np.float32)
  if zp is not None:
    q = q - expand(zp, q.shape, kind, axis, size)
  return (q * expand(s, q.shape, kind, axis, size)).astype(np.float32)


def fake_quant_int(x, bits=8, symmetric=True, narrow=False, kind="channel", axis=-1, size=None):
  s, zp = scale_zp(x, bits, symmetric, narrow, kind, axis, size)
  q = quantize_int(x, s, zp, bits, narrow, kind, axis, size)
  return dequantize_int(q, s, zp, kind, axis, size)


def quantize_fp8(x, dtype, kind="channel", axis=-1, size=None):
  """(values in float8, float32 scale) with the absmax mapped to the largest finite float8."""
  x = np.asarray(x, np.float32)
  fmax = np.float32(float(ml_dtypes.finfo(FP8[dtype]).max))
  r = reduce(np.abs(x), kind, np.max, axis, size)
  r = np.where(r > 0, r, np.float32(1)).astype(np.float32)
  s = (r * np.float32(1.0 / float(fmax))).astype(np.float32)
  y = np.clip(x / expand(s, x.shape, kind, axis, size), -fmax, fmax)
  return y.astype(FP8[dtype]), s


def lsq_step_grad(x, s, bits, upstream, g):
  """LSQ (Esser et al. 2020, eq. 3) gradient of sum(upstream * xq) w.r.t. a per-tensor step."""
  qmin, qmax = grid(bits)
  y = np.asarray(x, np.float64) / s
  d = np.where(y <= qmin, qmin, np.where(y >= qmax, qmax, np.round(y) - y))
  return g * np.sum(upstream * d)


def gptq(w, x, bits, damp=0.01, group=None):
  """Unblocked GPTQ (Frantar et al. 2023, Algorithm 1) in float64, symmetric absmax.

  w: (in, out) kernel; x: (n, in). Returns the integer grid values (in, out) and the
  scales (per output channel, or (in // group, out)).
  """
  w = np.array(w, np.float64)
  x = np.asarray(x, np.float64)
  n_in, n_out = w.shape
  _, qmax = grid(bits)
  h = 2.0 * x.T @ x / x.shape[0]
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[dead, :] = 0.0
  h = h + damp * np.mean(np.diag(h)) * np.eye(n_in)
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  q = np.zeros_like(w)
  scales = []
  s = None
  if group is None:
    s = np.maximum(np.abs(w).max(axis=0), 1e-30) / qmax
    scales = s[None]
  for i in range(n_in):
    if group is not None and i % group == 0:
      r = np.abs(w[i : i + group]).max(axis=0)
      s = np.where(r > 0, r, 1.0) / qmax
      scales.append(s)
    q[i] = np.clip(np.round(w[i] / s), -qmax - 1, qmax)
    err = (w[i] - q[i] * s) / u[i, i]
    w[i + 1 :] -= np.outer(u[i, i + 1 :], err)
  return q, np.array(scales)

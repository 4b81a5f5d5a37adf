"""Block-scaled floating-point formats: MXFP8, MXFP4 (OCP MX v1.0) and NVFP4.

A block-scaled tensor stores small floating-point *elements* and one *scale*
per block of consecutive elements along the reduction axis (``in`` of a Dense
kernel ``(in, out)``; ``jc.quant.PerGroup(size=block, axis=-2)``)::

    x ~= element * scale                      (MX formats)
    x ~= element * (block_scale * tensor_scale)   (NVFP4)

================  ==================  =====  ==========================  =============
``Format.dtype``  element             block  block scale                 tensor scale
================  ==================  =====  ==========================  =============
``mxfp8_e4m3``    ``float8_e4m3fn``   32     ``float8_e8m0fnu`` (2**e)   --
``mxfp8_e5m2``    ``float8_e5m2``     32     ``float8_e8m0fnu``          --
``mxfp4``         ``float4_e2m1fn``   32     ``float8_e8m0fnu``          --
``nvfp4``         ``float4_e2m1fn``   16     ``float8_e4m3fn``           float32
================  ==================  =====  ==========================  =============

MX scales follow the conversion that the OCP Microscaling Formats (MX)
Specification v1.0 recommends in section 6.3 for a block of scalar floats: the
shared scale is the power of two ``2**e`` with ``e = floor(log2(amax)) -
emax_elem``, where ``amax`` is the block's largest magnitude and ``emax_elem``
the exponent of the element format's largest normal number (8 for e4m3, 15 for
e5m2, 2 for e2m1), i.e. the largest power of two not above ``amax``, shifted
down by the element's range. Each element is ``x / 2**e`` converted to the
element format, and a normal value beyond the largest finite element is
clamped to it (448 for e4m3, 57344 for e5m2, 6 for e2m1): the block maximum
can reach just under ``2**(emax_elem + 1)``, so the top of a block may
saturate. The conversion rounds to nearest, ties to even (the IEEE default, and
what the ``ml_dtypes`` casts do). The scale is stored as one
``float8_e8m0fnu`` byte (the biased exponent ``e + 127``). Section 6.3 is a
recommendation, not a requirement: other producers (NVIDIA's, for one) round
the scale up instead, which avoids saturation and gives other bits.

NVFP4 scales (NVIDIA's two-level scheme): a float32 tensor scale
``g = amax_tensor * float32(1 / (6 * 448))`` makes the block scales use the
range of e4m3; each block scale is ``amax_block / (g * 6)`` rounded to
``float8_e4m3fn`` (nearest, ties to even, clamped to 448); an element is
``x / d`` with the float32 decode scale ``d = block_scale * g``, converted to
e2m1 as above, and decodes to ``element * d``.

Ranges and special values, so that results are the same on every backend:

- float32 subnormals (magnitude below ``2**-126``) are flushed to zero, in the
  inputs and in the decoded results (XLA's CPU backend flushes them in all its
  float32 arithmetic; doing it explicitly makes GPUs agree);
- the MX exponent is limited to ``[-126, 127]``: an all-zero block (``amax =
  0``) gets ``2**-126``, and so does a block below ``2**(emax_elem - 125)``
  (about ``1e-37``), whose decoded scale would otherwise be a subnormal; raising
  a scale never saturates an element;
- the NVFP4 tensor scale is at least ``2**-117`` (``1`` would do for an
  all-zero tensor; ``2**-117`` keeps tiny tensors exact too), and every block
  scale at least ``2**-9``, the smallest positive e4m3 value (a block whose
  scale would round to zero keeps its small values instead of dividing by
  zero), so every decode scale ``d`` is a normal float32;
- non-finite values never set a scale (``amax`` is over the finite values of
  a block; ``jaxcompress.quant.numerics`` passes them through in fake
  quantization, and refuses in a real encoding those that the element type
  cannot hold: e2m1 holds neither NaN nor inf, e4m3 holds NaN).

This module holds the scale rules as functions of the per-block maxima (each
jitted: one compilation per shape when called eagerly); the ``Format``,
``quantize``, ``dequantize`` and ``fake_quant`` of
``jaxcompress.quant.numerics`` use them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

Array = jax.Array

TINY = 2.0**-126
"""The smallest normal float32: magnitudes below it are flushed to zero."""
MIN_EXPONENT = -126
"""The smallest MX scale exponent used (e8m0 reaches ``-127``, a float32 subnormal)."""
MAX_EXPONENT = 127
NVFP4_TENSOR_SCALE_MIN = 2.0**-117
NVFP4_BLOCK_SCALE_MIN = 2.0**-9


@dataclasses.dataclass(frozen=True)
class BlockFormat:
  """A block-scaled format: its element type, block size and scale types.

  Attributes:
    name: the ``Format.dtype`` string (``"mxfp4"``).
    element: the element dtype (``float4_e2m1fn``, ``float8_e4m3fn``, ``float8_e5m2``).
    block_size: elements per scale, along the reduction axis.
    scale: the block scales' dtype (``float8_e8m0fnu`` or ``float8_e4m3fn``).
    tensor_scale: whether a float32 per-tensor scale multiplies the block scales.

  Example:
    >>> from jaxcompress.quant.blockscaled import FORMATS
    >>> f = FORMATS["mxfp4"]
    >>> f.block_size, f.scale.name, f.emax
    (32, 'float8_e8m0fnu', 2)
  """

  name: str
  element: np.dtype
  block_size: int
  scale: np.dtype
  tensor_scale: bool = False

  @property
  def emax(self) -> int:
    """The exponent of the element type's largest normal number."""
    return int(np.floor(np.log2(float(ml_dtypes.finfo(self.element).max))))

  @property
  def element_max(self) -> float:
    """The element type's largest finite value."""
    return float(ml_dtypes.finfo(self.element).max)


_E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
FORMATS: dict[str, BlockFormat] = {
    "mxfp8_e4m3": BlockFormat("mxfp8_e4m3", _E4M3, 32, _E8M0),
    "mxfp8_e5m2": BlockFormat("mxfp8_e5m2", np.dtype(ml_dtypes.float8_e5m2), 32, _E8M0),
    "mxfp4": BlockFormat("mxfp4", np.dtype(ml_dtypes.float4_e2m1fn), 32, _E8M0),
    "nvfp4": BlockFormat("nvfp4", np.dtype(ml_dtypes.float4_e2m1fn), 16, _E4M3, tensor_scale=True),
}


@jax.jit
def flush_subnormals(x: Array) -> Array:
  """``x`` (float32) with magnitudes below ``2**-126`` replaced by zeros of their sign.

  NaN and +-inf are kept.

  Args:
    x: a float32 array.

  Returns:
    An array like ``x``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.quant.blockscaled import flush_subnormals
    >>> flush_subnormals(jnp.array([1e-40, -1e-40, 1.0, jnp.inf])).tolist()
    [0.0, -0.0, 1.0, inf]
  """
  return jnp.where(jnp.abs(x) < jnp.float32(TINY), jnp.copysign(jnp.zeros_like(x), x), x)


def _pow2(e: Array) -> Array:
  """``2.0**e`` as float32 for integer ``e`` in ``[-126, 127]`` (exact, from the bits)."""
  return jax.lax.bitcast_convert_type((e.astype(jnp.int32) + 127) << 23, jnp.float32)


@functools.partial(jax.jit, static_argnums=1)
def mx_scale(amax: Array, fmt: BlockFormat) -> Array:
  """The MX block scales ``2**(floor(log2(amax)) - emax_elem)`` as ``float8_e8m0fnu``.

  Args:
    amax: float32, the largest finite magnitude of each block (flushed: zero or
      at least ``2**-126``).
    fmt: an MX ``BlockFormat``.

  Returns:
    The scales, shaped like ``amax``; exponents limited to ``[-126, 127]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.quant.blockscaled import FORMATS, mx_scale
    >>> mx_scale(jnp.array([6.0, 7.9, 8.0, 0.0]), FORMATS["mxfp4"]).astype(jnp.float32).tolist()
    [1.0, 1.0, 2.0, 1.1754943508222875e-38]
  """
  bits = jax.lax.bitcast_convert_type(amax.astype(jnp.float32), jnp.int32)
  floor_log2 = ((bits >> 23) & 0xFF) - 127  # exact for normal amax; -127 for zero
  e = jnp.clip(floor_log2 - fmt.emax, MIN_EXPONENT, MAX_EXPONENT)
  return _pow2(e).astype(fmt.scale)


@jax.jit
def nvfp4_tensor_scale(amax: Array) -> Array:
  """NVFP4's float32 tensor scale ``max(amax * float32(1 / 2688), 2**-117)``.

  Args:
    amax: float32 scalar, the tensor's largest finite magnitude.

  Returns:
    A float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.quant.blockscaled import nvfp4_tensor_scale
    >>> float(nvfp4_tensor_scale(jnp.float32(2688.0)))
    1.0
  """
  g = jnp.asarray(amax, jnp.float32) * jnp.float32(1.0 / (6.0 * 448.0))
  return jnp.maximum(g, jnp.float32(NVFP4_TENSOR_SCALE_MIN))


@jax.jit
def nvfp4_block_scale(amax: Array, tensor_scale: Array) -> Array:
  """NVFP4 block scales: ``amax / (tensor_scale * 6)`` rounded to ``float8_e4m3fn``.

  Rounded to nearest (ties to even), clamped to ``[2**-9, 448]``.

  Args:
    amax: float32, the largest finite magnitude of each block.
    tensor_scale: the float32 tensor scale (``nvfp4_tensor_scale``).

  Returns:
    ``float8_e4m3fn`` scales shaped like ``amax``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.quant.blockscaled import nvfp4_block_scale
    >>> nvfp4_block_scale(jnp.array([6.0, 2688.0, 0.0]), jnp.float32(1.0)).astype(jnp.float32).tolist()
    [1.0, 448.0, 0.001953125]
  """
  s = amax.astype(jnp.float32) / (jnp.asarray(tensor_scale, jnp.float32) * jnp.float32(6.0))
  s = jnp.clip(s, 0.0, float(ml_dtypes.finfo(_E4M3).max)).astype(_E4M3).astype(jnp.float32)
  return jnp.maximum(s, jnp.float32(NVFP4_BLOCK_SCALE_MIN)).astype(_E4M3)


@jax.jit
def decode_scale(scale: Array, tensor_scale: Array | None) -> Array:
  """The float32 decode scale of each block: ``scale`` (times ``tensor_scale`` for NVFP4).

  Args:
    scale: the stored block scales (``float8_e8m0fnu`` or ``float8_e4m3fn``).
    tensor_scale: NVFP4's float32 tensor scale, or ``None``.

  Returns:
    float32, shaped like ``scale``; every entry a normal float32.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.quant.blockscaled import decode_scale
    >>> decode_scale(jnp.array([0.5, 3.0], jnp.float8_e4m3fn), jnp.float32(0.25)).tolist()
    [0.125, 0.75]
  """
  d = scale.astype(jnp.float32)
  if tensor_scale is not None:
    d = d * jnp.asarray(tensor_scale, jnp.float32)
  return d


__all__ = [
    "FORMATS",
    "BlockFormat",
    "decode_scale",
    "flush_subnormals",
    "mx_scale",
    "nvfp4_block_scale",
    "nvfp4_tensor_scale",
]

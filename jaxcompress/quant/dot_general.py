"""Low-precision training matmuls: a drop-in ``dot_general`` with an STE backward.

The forward product runs on quantized operands: int8 with int32 accumulation,
or fp8 with f32 accumulation. The left operand (the activations) gets one scale
per row along the contraction ("per token") and the right operand (the weight)
one scale per output channel, so the integer product factors exactly:

    out[t, c] = (sum_k q_lhs[t, k] * q_rhs[k, c]) * s_lhs[t] * s_rhs[c]

The backward pass is the gradient of the ordinary float ``dot_general`` at the
unquantized operands (the straight-through estimator), so training sees
low-precision values forward and full-precision gradients backward.

    dense = flax.linen.Dense(1024, dot_general=int8_dot_general())
    linear = flax.nnx.Linear(784, 1024, dot_general=fp8_dot_general(), rngs=rngs)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxcompress.core.checks import is_int
from jaxcompress.quant import numerics

Array = jax.Array

_LHS_GRANULARITIES = ("per_token", "per_tensor")
_RHS_GRANULARITIES = ("per_channel", "per_tensor")
_FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
_WIDER_FLOATS = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedDotGeneral:
  """A ``jax.lax.dot_general`` whose forward product runs in int8 or fp8.

  Build it with ``int8_dot_general`` or ``fp8_dot_general``. It is hashable (a
  static argument under ``jax.jit``) and has the call signature of
  ``jax.lax.dot_general``.

  Attributes:
    dtype: name of the operand dtype: ``"int8"``, ``"float8_e4m3fn"`` or
      ``"float8_e5m2"``.
    bits: integer width (2 to 8; int8 only): values are stored in int8 and
      clipped to ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``.
    lhs_granularity: ``"per_token"`` (one scale per row of the left operand,
      taken over the contracting dimensions) or ``"per_tensor"``.
    rhs_granularity: ``"per_channel"`` (one scale per output column of the
      right operand, taken over the contracting dimensions) or ``"per_tensor"``.
    operand_dtype: fp8 only. ``None`` feeds the fp8 arrays to ``dot_general``
      (native fp8 matmuls on GPUs that have them). ``"bfloat16"``,
      ``"float16"`` or ``"float32"`` gives it the fp8 values in that dtype
      instead (exact: every fp8 value is a value of these), for backends
      without fp8 matmuls such as XLA on CPU; the product is the same.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> dg = jc.quant.QuantizedDotGeneral(dtype="int8", bits=4)
    >>> dg.fmt.qmin, dg.fmt.qmax
    (-7, 7)
    >>> y = dg(jnp.array([[7.0, -3.5]]), jnp.array([[1.0], [1.0]]), (((1,), (0,)), ((), ())))
    >>> round(float(y[0, 0]), 4)  # -3.5 rounds to -4 (half to even): 7 - 4
    3.0
  """

  dtype: str = "int8"
  bits: int = 8
  lhs_granularity: str = "per_token"
  rhs_granularity: str = "per_channel"
  operand_dtype: str | None = None

  def __post_init__(self):
    if self.dtype != "int8" and self.dtype not in _FP8_DTYPES:
      raise ValueError(
          f"dtype must be 'int8', 'float8_e4m3fn' or 'float8_e5m2', got {self.dtype!r}."
      )
    if not is_int(self.bits) or not 2 <= self.bits <= 8:
      raise ValueError(
          f"bits must be an int from 2 to 8 (values are held in int8), got {self.bits!r}."
      )
    if self.dtype != "int8" and self.bits != 8:
      raise ValueError(f"bits applies to int8 only; {self.dtype} has a fixed width. Leave bits=8.")
    if self.lhs_granularity not in _LHS_GRANULARITIES:
      raise ValueError(
          f"lhs_granularity must be one of {_LHS_GRANULARITIES}, got {self.lhs_granularity!r}."
      )
    if self.rhs_granularity not in _RHS_GRANULARITIES:
      raise ValueError(
          f"rhs_granularity must be one of {_RHS_GRANULARITIES}, got {self.rhs_granularity!r}."
      )
    if self.operand_dtype is not None:
      if self.dtype == "int8":
        raise ValueError(
            "operand_dtype applies to fp8 only: int8 operands always go to dot_general as int8."
        )
      try:
        name = jnp.dtype(self.operand_dtype).name
      except TypeError:
        name = None
      if name not in _WIDER_FLOATS:
        raise ValueError(
            f"operand_dtype must be one of {_WIDER_FLOATS} (formats that hold every fp8 value "
            f"exactly), got {self.operand_dtype!r}."
        )
      object.__setattr__(self, "operand_dtype", name)

  @property
  def fmt(self) -> numerics.Format:
    """The grid of both operands: symmetric narrow-range ints, or the fp8 format."""
    if self.dtype == "int8":
      return numerics.Format(bits=self.bits, narrow_range=True)
    return numerics.Format(dtype=self.dtype)

  def __call__(
      self,
      lhs: Array,
      rhs: Array,
      dimension_numbers: Any,
      precision: Any = None,
      preferred_element_type: Any = None,
      *,
      out_sharding: Any = None,
  ) -> Array:
    """Computes ``lax.dot_general(lhs, rhs, ...)`` on quantized operands.

    Args:
      lhs, rhs, dimension_numbers, precision, preferred_element_type,
        out_sharding: as for ``jax.lax.dot_general``. ``precision`` applies to
        the backward (float) products; ``preferred_element_type`` sets the
        output dtype.

    Returns:
      The product, with the dtype ``jax.lax.dot_general`` would give.

    Example:
      >>> import jax, jax.numpy as jnp, jaxcompress as jc
      >>> x = jax.random.normal(jax.random.key(0), (4, 64))
      >>> w = jax.random.normal(jax.random.key(1), (64, 8))
      >>> y = jc.quant.int8_dot_general()(x, w, (((1,), (0,)), ((), ())))
      >>> y.dtype, bool(jnp.abs(y - x @ w).max() < 0.05 * jnp.abs(x @ w).max())
      (dtype('float32'), True)
    """
    (lc, rc), (lb, rb) = dimension_numbers
    dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    static = _Static(self, dn, _hashable(precision), preferred_element_type, out_sharding)
    return _quantized_dot(lhs, rhs, static)

  def einsum(self, subscripts: str, *operands: Array, **kwargs: Any) -> Array:
    """``jnp.einsum`` with its products run by this ``dot_general``.

    Pass it as ``einsum_op=`` to ``flax.nnx.Einsum``.

    Args:
      subscripts: the einsum equation.
      *operands: the arrays.
      **kwargs: other ``jnp.einsum`` arguments (``precision``,
        ``preferred_element_type``, ...).

    Returns:
      The einsum, with quantized products.

    Example:
      >>> import jax.numpy as jnp, jaxcompress as jc
      >>> x, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
      >>> jc.quant.int8_dot_general().einsum("btk,kn->btn", x, w)[0, 0, 0].tolist()
      4.0
    """
    return jnp.einsum(subscripts, *operands, _dot_general=self, **kwargs)


def int8_dot_general(
    *,
    bits: int = 8,
    lhs_granularity: str = "per_token",
    rhs_granularity: str = "per_channel",
) -> QuantizedDotGeneral:
  """A ``dot_general`` whose forward product runs in int8 with int32 accumulation.

  Both operands are quantized symmetrically with round-to-nearest (ties to even)
  to ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``, multiplied with
  ``preferred_element_type=jnp.int32``, and the int32 result is rescaled to the
  output dtype. The backward pass is the float ``dot_general``'s gradient at the
  unquantized operands (straight-through). The int32 sum cannot overflow for
  contractions shorter than 133,000 elements.

  Args:
    bits: integer width, 2 to 8 (held in int8 arrays).
    lhs_granularity: ``"per_token"`` or ``"per_tensor"`` scales for the left
      operand (activations).
    rhs_granularity: ``"per_channel"`` or ``"per_tensor"`` scales for the right
      operand (weight).

  Returns:
    A ``QuantizedDotGeneral``: pass it as ``dot_general=`` to
    ``flax.linen.Dense``/``DenseGeneral`` or ``flax.nnx.Linear``/``LinearGeneral``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxcompress as jc
    >>> layer = nn.Dense(3, dot_general=jc.quant.int8_dot_general())
    >>> x = jnp.ones((2, 4))
    >>> params = layer.init(jax.random.key(0), x)
    >>> layer.apply(params, x).shape
    (2, 3)
  """
  return QuantizedDotGeneral(
      dtype="int8", bits=bits, lhs_granularity=lhs_granularity, rhs_granularity=rhs_granularity
  )


def fp8_dot_general(
    *,
    dtype: str = "float8_e4m3fn",
    lhs_granularity: str = "per_token",
    rhs_granularity: str = "per_channel",
    operand_dtype: str | None = None,
) -> QuantizedDotGeneral:
  """A ``dot_general`` whose forward product runs on fp8 operands, f32 accumulation.

  Each operand is scaled so that its absolute maximum (per row / per channel)
  maps to the fp8 format's largest value, cast to fp8 (round to nearest even),
  multiplied with ``preferred_element_type=jnp.float32`` and rescaled. The
  backward pass is the float ``dot_general``'s gradient (straight-through).

  Args:
    dtype: ``"float8_e4m3fn"`` (largest value 448) or ``"float8_e5m2"`` (57344).
    lhs_granularity: ``"per_token"`` or ``"per_tensor"``.
    rhs_granularity: ``"per_channel"`` or ``"per_tensor"``.
    operand_dtype: ``None`` gives the fp8 arrays to ``dot_general`` (GPUs with
      fp8 matmuls); ``"bfloat16"`` casts the fp8 values to bfloat16 first, which
      is exact and fast on backends without fp8 matmuls (XLA on CPU).

  Returns:
    A ``QuantizedDotGeneral``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> x = jnp.array([[448.0, 1.0]])
    >>> w = jnp.array([[1.0], [1.0]])
    >>> y = jc.quant.fp8_dot_general()(x, w, (((1,), (0,)), ((), ())))
    >>> round(float(y[0, 0]), 3)
    449.0
  """
  return QuantizedDotGeneral(
      dtype=dtype,
      lhs_granularity=lhs_granularity,
      rhs_granularity=rhs_granularity,
      operand_dtype=operand_dtype,
  )


# --------------------------------------------------------------------------
# Implementation.
# --------------------------------------------------------------------------


def _hashable(x: Any) -> Any:
  if isinstance(x, list):
    return tuple(x)
  return x


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything about one call that is not an array (a static custom_vjp argument)."""

  config: QuantizedDotGeneral
  dimension_numbers: Any
  precision: Any
  preferred_element_type: Any
  out_sharding: Any


def _operand_scale(x: Array, contract: Sequence[int], per_row: bool, fmt: numerics.Format) -> Array:
  """Scales of an operand (the rank of ``x``, size 1 on shared axes), from its absmax.

  ``per_row``: one scale per index of the axes not contracted; else one scale.
  """
  kept = tuple(_kept(x.ndim, contract))
  granularity = numerics.PerChannel(axis=kept) if per_row and kept else numerics.PerTensor()
  scale, _ = numerics.compute_scale(x, fmt, granularity)
  return scale


def _quantize(x: Array, scale: Array, config: QuantizedDotGeneral) -> Array:
  """``x / scale`` on the grid of ``config`` (``scale`` broadcast against ``x``)."""
  y = x.astype(jnp.float32) / scale
  fmt = config.fmt
  if config.dtype == "int8":
    return numerics.to_grid(y, fmt).astype(jnp.int8)
  y = jnp.clip(y, fmt.qmin, fmt.qmax)
  if config.operand_dtype is None:
    return y.astype(fmt.storage_dtype)
  return _round_to_fp8_grid(y, fmt.storage_dtype).astype(config.operand_dtype)


def _round_to_fp8_grid(y: Array, fp8_dtype: Any) -> Array:
  """Rounds f32 values within the fp8 range to the nearest fp8 value (ties to even).

  Bit-identical to ``y.astype(fp8_dtype).astype(jnp.float32)`` for finite ``y``
  with ``|y| <= finfo(fp8_dtype).max``, but made of f32 integer ops that every
  backend vectorizes (XLA on CPU converts to fp8 element by element).
  """
  info = jnp.finfo(fp8_dtype)
  drop = 23 - info.nmant  # f32 mantissa bits that fp8 does not have
  bits = lax.bitcast_convert_type(y, jnp.uint32)
  odd = (bits >> drop) & jnp.uint32(1)
  half = jnp.uint32((1 << (drop - 1)) - 1)
  keep = jnp.uint32((0xFFFFFFFF >> drop) << drop)
  normal = lax.bitcast_convert_type((bits + half + odd) & keep, jnp.float32)
  # Below the smallest normal, fp8 values are evenly spaced (subnormals).
  spacing = float(info.smallest_subnormal)
  subnormal = jnp.round(y / spacing) * spacing
  return jnp.where(jnp.abs(y) < float(info.smallest_normal), subnormal, normal)


def _kept(ndim: int, contract: Sequence[int]) -> list[int]:
  return [d for d in range(ndim) if d not in contract]


def _to_output_layout(
    scale: Array, contract: Sequence[int], batch: Sequence[int], n_before: int, n_after: int
) -> Array:
  """Moves an operand's scale (its rank, size 1 on contracted axes) to the output's layout.

  ``dot_general`` orders its output as (batch dims, lhs free dims, rhs free
  dims). ``n_before``/``n_after`` are the size-1 axes to insert for the other
  operand's free dims before/after this operand's free dims.
  """
  kept = _kept(scale.ndim, contract)
  free = [d for d in kept if d not in batch]
  s = jnp.transpose(jnp.squeeze(scale, tuple(contract)), [kept.index(d) for d in (*batch, *free)])
  nb = len(batch)
  shape = s.shape[:nb] + (1,) * n_before + s.shape[nb:] + (1,) * n_after
  return s.reshape(shape)


def _forward(lhs: Array, rhs: Array, static: _Static) -> Array:
  cfg = static.config
  (lc, rc), (lb, rb) = static.dimension_numbers
  lfree = len(_kept(lhs.ndim, lc)) - len(lb)
  rfree = len(_kept(rhs.ndim, rc)) - len(rb)
  out_dtype = jax.eval_shape(
      lambda a, b: lax.dot_general(
          a, b, static.dimension_numbers, preferred_element_type=static.preferred_element_type
      ),
      lhs,
      rhs,
  ).dtype

  fmt = cfg.fmt
  ls = _operand_scale(lhs, lc, cfg.lhs_granularity == "per_token", fmt)
  rs = _operand_scale(rhs, rc, cfg.rhs_granularity == "per_channel", fmt)
  ql = _quantize(lhs, ls, cfg)
  qr = _quantize(rhs, rs, cfg)
  acc_dtype = jnp.int32 if cfg.dtype == "int8" else jnp.float32
  acc = lax.dot_general(
      ql,
      qr,
      static.dimension_numbers,
      preferred_element_type=acc_dtype,
      out_sharding=static.out_sharding,
  )
  ls_out = _to_output_layout(ls, lc, lb, 0, rfree)
  rs_out = _to_output_layout(rs, rc, rb, lfree, 0)
  out = acc.astype(jnp.float32) * ls_out * rs_out
  return out.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _quantized_dot(lhs: Array, rhs: Array, static: _Static) -> Array:
  return _forward(lhs, rhs, static)


def _quantized_dot_fwd(lhs, rhs, static):
  return _forward(lhs, rhs, static), (lhs, rhs)


def _quantized_dot_bwd(static, res, g):
  lhs, rhs = res

  def float_dot(a, b):
    return lax.dot_general(
        a,
        b,
        static.dimension_numbers,
        precision=static.precision,
        preferred_element_type=static.preferred_element_type,
        out_sharding=static.out_sharding,
    )

  (d_lhs,) = jax.linear_transpose(lambda a: float_dot(a, rhs), lhs)(g)
  (d_rhs,) = jax.linear_transpose(lambda b: float_dot(lhs, b), rhs)(g)
  return d_lhs, d_rhs


_quantized_dot.defvjp(_quantized_dot_fwd, _quantized_dot_bwd)

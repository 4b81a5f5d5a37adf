"""Quantization numerics: formats, granularities, quantize and dequantize.

A quantized tensor is a ``QArray``: the low-precision values (a real ``int8``,
``int4`` or ``float8`` array) plus a float32 ``scale`` and, for asymmetric
integer formats, an integer ``zero_point``::

    x ~= (values - zero_point) * scale

- ``Format`` says what the values are: integers of 2 to 8 bits (symmetric or
  with a zero point, optionally narrow range), ``float8_e4m3fn`` /
  ``float8_e5m2``, or a block-scaled format (``mxfp8_e4m3``, ``mxfp8_e5m2``,
  ``mxfp4``, ``nvfp4``: small float elements with one low-precision scale per
  block of 32 or 16 elements along the reduction axis, see ``blockscaled``).
- A granularity says which elements share a scale: ``PerTensor()``,
  ``PerChannel(axis=-1)`` (one scale per index of ``axis``), or
  ``PerGroup(size=128, axis=-2)`` (groups of ``size`` consecutive elements
  along the reduction axis ``axis``, one scale per group and per index of every
  other axis).

A scale always has the rank of the tensor it belongs to: size 1 on the axes it
is shared over, the full size on the axes it follows, and the number of groups
on a ``PerGroup`` axis (``(in, out)`` kernel, ``PerGroup(128, axis=0)``:
scale ``(in // 128, out)``). ``expand_scale`` broadcasts it back.

Block-scaled formats use ``PerGroup(size=block, axis=...)`` (the default for
them: the block size along axis ``-2``). Their scales are not calibrated: the
format's rule sets each from its block's largest finite magnitude
(``blockscaled``); a ``QArray`` keeps them in their storage dtype
(``float8_e8m0fnu`` or ``float8_e4m3fn``) with NVFP4's float32
``tensor_scale``, and ``compute_scale`` gives the float32 decode scale of each
block.

Integer rounding is round-half-to-even (``jnp.round``) or stochastic
(``floor(y + u)``, ``u ~ U[0, 1)`` drawn by ``jax.random.uniform(key, x.shape)``).
Float rounding (float8, and the elements of the block-scaled formats) is the
round-to-nearest-even cast, or stochastic rounding to one of the two
neighbouring values of the element type.

Non-finite values (NaN, +-inf) never set a scale and never harm their
neighbours:

- ranges and scales are computed from the finite values of each block only
  (``compute_scale`` and every calibrator); a block with no finite value gets
  the scale of an all-zero block;
- fake quantization (``fake_quant``, the estimators in ``ste`` and the
  ``FakeQuant``/``LSQ`` stages) passes them through: NaN stays NaN, +-inf stays
  +-inf, so a diverging weight stays visible, while the other values of its
  block are quantized as if it were absent. This check-free rule is what the
  training hot path uses (no host callback, no extra pass);
- a real encoding (``quantize``, ``quantize_params``, ``gptq``) keeps what its
  storage dtype holds (NaN in both float8 formats, +-inf in ``float8_e5m2``)
  and refuses the rest (any non-finite value in an integer format or with
  ``float4_e2m1fn`` elements, +-inf in ``float8_e4m3fn``): a ``ValueError``
  naming the leaf path at once when the values are concrete, or the same error
  at run time (``core.checks.error_if``) when they are traced.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxcompress.core import sharding as _sharding
from jaxcompress.core.checks import check_int, error_if, is_concrete, is_int
from jaxcompress.quant import blockscaled

Array = jax.Array
Rounding = Literal["nearest", "stochastic"]

_FLOAT8 = {"float8_e4m3fn": jnp.float8_e4m3fn, "float8_e5m2": jnp.float8_e5m2}
_BLOCK = blockscaled.FORMATS
_DTYPES = ("int",) + tuple(_FLOAT8) + tuple(_BLOCK)
_ROUNDINGS = ("nearest", "stochastic")


# --------------------------------------------------------------------------
# Formats.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Format:
  """What quantized values are: integers of ``bits`` bits, float8, or block-scaled floats.

  Integer grids (``qmin``/``qmax``):

  - symmetric: ``[-2**(bits-1), 2**(bits-1) - 1]``, the scale maps the
    absolute maximum to ``2**(bits-1) - 1``; narrow range drops ``-2**(bits-1)``;
  - asymmetric: the same grid, shifted by an integer zero point so that the
    range ``[min(x, 0), max(x, 0)]`` covers it; zero is always exactly
    representable (it maps to the zero point).

  Values of 2 to 4 bits are stored as ``jnp.int4``, 5 to 8 bits as ``jnp.int8``.
  Float8 formats are symmetric; the scale maps the absolute maximum to the
  largest finite float8 value.

  Block-scaled formats (``jaxcompress.quant.blockscaled``) store float elements
  with one scale per block of ``block_size`` elements along the reduction axis:
  ``"mxfp8_e4m3"``, ``"mxfp8_e5m2"`` and ``"mxfp4"`` (OCP MX: 32-element blocks,
  power-of-two ``float8_e8m0fnu`` scales) and ``"nvfp4"`` (16-element blocks,
  ``float8_e4m3fn`` scales and a float32 tensor scale). They are symmetric and
  take their scales from the format's rule, not from a calibrator.

  Fields are checked when the format is built (``Format(bits=9)`` raises).

  Args:
    dtype: ``"int"``, ``"float8_e4m3fn"``, ``"float8_e5m2"``, ``"mxfp8_e4m3"``,
      ``"mxfp8_e5m2"``, ``"mxfp4"`` or ``"nvfp4"``.
    bits: integer width, 2 to 8 (ignored for the float formats).
    symmetric: no zero point (integers; float8 is always symmetric).
    narrow_range: drop the most negative integer so the grid is symmetric
      around zero (``[-127, 127]`` for 8 bits).

  Example:
    >>> import jaxcompress as jc
    >>> f = jc.quant.Format(bits=4)
    >>> f.qmin, f.qmax, f.storage_dtype
    (-8, 7, dtype(int4))
    >>> jc.quant.Format(bits=8, narrow_range=True).qmin
    -127
    >>> f = jc.quant.Format(dtype="mxfp4")
    >>> f.storage_dtype, f.block_size, f.scale_dtype, f.qmax
    (dtype(float4_e2m1fn), 32, dtype(float8_e8m0fnu), 6.0)
  """

  dtype: str = "int"
  bits: int = 8
  symmetric: bool = True
  narrow_range: bool = False

  @property
  def is_float(self) -> bool:
    """True when the values are floats: the float8 and the block-scaled formats."""
    return self.dtype in _FLOAT8 or self.dtype in _BLOCK

  @property
  def is_block_scaled(self) -> bool:
    """True for the block-scaled formats (``mxfp8_e4m3``, ``mxfp8_e5m2``, ``mxfp4``, ``nvfp4``)."""
    return self.dtype in _BLOCK

  @property
  def block(self) -> blockscaled.BlockFormat | None:
    """The ``blockscaled.BlockFormat`` of a block-scaled format, else ``None``."""
    return _BLOCK.get(self.dtype)

  @property
  def block_size(self) -> int | None:
    """Elements per scale of a block-scaled format (32 for MX, 16 for NVFP4), else ``None``."""
    return None if self.block is None else self.block.block_size

  @property
  def scale_dtype(self) -> np.dtype:
    """The dtype ``QArray.scale`` is stored in: float32, or a block-scaled format's scale type."""
    return np.dtype(np.float32) if self.block is None else self.block.scale

  @property
  def storage_dtype(self) -> np.dtype:
    """The dtype ``QArray.values`` are stored in."""
    if self.block is not None:
      return self.block.element
    if self.is_float:
      return np.dtype(_FLOAT8[self.dtype])
    return np.dtype(jnp.int4 if self.bits <= 4 else jnp.int8)

  @property
  def qmin(self) -> int | float:
    """The smallest grid value (``-max finite`` for the float formats)."""
    if self.is_float:
      return -float(jnp.finfo(self.storage_dtype).max)
    return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

  @property
  def qmax(self) -> int | float:
    """The largest grid value (the largest finite value for the float formats)."""
    if self.is_float:
      return float(jnp.finfo(self.storage_dtype).max)
    return 2 ** (self.bits - 1) - 1

  def __post_init__(self):
    self.check("Format")

  @property
  def rounding_range(self) -> tuple[float, float]:
    """The scaled values that round onto the grid without clipping.

    ``(qmin - 1/2, qmax + 1/2)`` for integers; for the float formats, the largest
    finite value plus half its spacing (``+-464`` for ``float8_e4m3fn``, ``+-7``
    for ``float4_e2m1fn`` elements). The clipped
    straight-through estimator passes the gradient inside this range.

    Example:
      >>> import jaxcompress as jc
      >>> jc.quant.Format(bits=4).rounding_range, jc.quant.Format(dtype="float8_e4m3fn").rounding_range
      ((-8.5, 7.5), (-464.0, 464.0))
    """
    if self.is_float:
      info = jnp.finfo(self.storage_dtype)
      top = float(info.max)
      half_ulp = 2.0 ** (int(np.floor(np.log2(top))) - int(info.nmant) - 1)
      return -(top + half_ulp), top + half_ulp
    return self.qmin - 0.5, self.qmax + 0.5

  def holds(self, value: float) -> bool:
    """True when the storage dtype can hold the non-finite ``value`` (NaN or +-inf).

    Integers and ``float4_e2m1fn`` hold neither; ``float8_e4m3fn`` holds NaN;
    ``float8_e5m2`` holds both.

    Example:
      >>> import jaxcompress as jc
      >>> jc.quant.Format().holds(float("nan")), jc.quant.Format(dtype="float8_e5m2").holds(float("inf"))
      (False, True)
      >>> jc.quant.Format(dtype="mxfp4").holds(float("nan"))
      False
    """
    if not self.is_float:
      return False
    element = self.storage_dtype
    if np.isnan(value):
      return element in (np.dtype(jnp.float8_e4m3fn), np.dtype(jnp.float8_e5m2))
    return element == np.dtype(jnp.float8_e5m2)

  def check(self, path: str = "<array>") -> None:
    """Raises ``ValueError``/``TypeError`` naming ``path`` if a field is invalid.

    ``Format`` checks itself when built (``path`` is then ``"Format"``); the
    stages check their own fields the same way, named by the stage.

    Args:
      path: what to name in the message (a stage name or a leaf path).

    Returns:
      None.

    Example:
      >>> import jaxcompress as jc
      >>> jc.quant.Format(bits=9)
      Traceback (most recent call last):
      ...
      ValueError: Format: bits=9 is not supported; integer quantization takes bits from 2 to 8 ...
    """
    check_format_fields(path, dtype=self.dtype, bits=self.bits, symmetric=self.symmetric,
                        narrow_range=self.narrow_range)


def check_format_fields(where: str, *, dtype: Any, bits: Any, symmetric: Any, narrow_range: Any) -> None:
  """Checks the fields of a ``Format``; the message names ``where``, the value and the fix.

  Args:
    where: the stage, function or leaf path to name.
    dtype, bits, symmetric, narrow_range: as for ``Format``.

  Returns:
    None; raises ``ValueError``/``TypeError``.

  Example:
    >>> from jaxcompress.quant.numerics import check_format_fields
    >>> check_format_fields("LSQ", dtype="int", bits=1, symmetric=True, narrow_range=False)
    Traceback (most recent call last):
    ...
    ValueError: LSQ: bits=1 is not supported; integer quantization takes bits from 2 to 8 ...
  """
  if not isinstance(dtype, str) or dtype not in _DTYPES:
    raise ValueError(
        f"{where}: unknown quantization dtype {dtype!r}; use one of {list(_DTYPES)} "
        "(integers take their width from `bits`)."
    )
  for name, flag in (("symmetric", symmetric), ("narrow_range", narrow_range)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"{where}: {name} must be True or False, got {flag!r}.")
  if dtype in _FLOAT8 or dtype in _BLOCK:
    if not symmetric:
      raise ValueError(
          f"{where}: dtype={dtype!r} with symmetric=False; "
          f"{'float8' if dtype in _FLOAT8 else 'block-scaled'} quantization is "
          "symmetric only: pass symmetric=True, or use dtype='int' for a zero point."
      )
    return
  if is_int(bits) and not 2 <= bits <= 8:
    raise ValueError(
        f"{where}: bits={bits} is not supported; integer quantization takes bits "
        "from 2 to 8 (use dtype='float8_e4m3fn' or 'float8_e5m2' for 8-bit floats, or "
        "leave the leaf unquantized for wider formats)."
    )
  check_int(where, "bits", bits, low=2, high=8)  # the type


# --------------------------------------------------------------------------
# Granularities.
# --------------------------------------------------------------------------


def _norm_axis(axis: int, ndim: int) -> int:
  return axis + ndim if axis < 0 else axis


@dataclasses.dataclass(frozen=True, kw_only=True)
class Granularity:
  """Base class of the granularities: which elements share one scale."""

  def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the scale of a tensor of ``shape``.

    Args:
      shape: the tensor's shape.

    Returns:
      A shape of the same rank (see each granularity's example).
    """
    raise NotImplementedError

  def check(self, shape: tuple[int, ...], path: str = "<array>") -> None:
    """Raises ``ValueError`` naming ``path``, the value and the fix if ``shape`` does not fit.

    Args:
      shape: the tensor's shape.
      path: the leaf path, for the message.

    Returns:
      None.

    Example:
      >>> import jaxcompress as jc
      >>> jc.quant.PerGroup(size=3).check((8, 4), "Dense_0/kernel")
      Traceback (most recent call last):
      ...
      ValueError: Dense_0/kernel: PerGroup(size=3) does not divide axis -2 of size 8 ...
    """
    del shape, path

  def _blocks(self, x: Array) -> tuple[Array, tuple[int, ...]]:
    """A view of ``x`` and the axes of it that one scale is shared over."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerTensor(Granularity):
  """One scale for the whole tensor.

  Example:
    >>> import jaxcompress as jc
    >>> jc.quant.PerTensor().scale_shape((16, 32))
    (1, 1)
  """

  def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1,) * len(shape)

  def _blocks(self, x: Array) -> tuple[Array, tuple[int, ...]]:
    return x, tuple(range(x.ndim))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerChannel(Granularity):
  """One scale per index of ``axis`` (the output channels), shared over the rest.

  Args:
    axis: the channel axis, or a tuple of axes (one scale per combination).
      Flax kernels keep output features last: the default ``-1``.

  Example:
    >>> import jaxcompress as jc
    >>> jc.quant.PerChannel().scale_shape((16, 32))
    (1, 32)
    >>> jc.quant.PerChannel(axis=0).scale_shape((16, 32))
    (16, 1)
  """

  axis: int | tuple[int, ...] = -1

  def __post_init__(self):
    axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
    if not axes or any(not is_int(a) for a in axes):
      raise TypeError(
          f"PerChannel: axis must be an int or a non-empty tuple of ints, got {self.axis!r}; "
          "e.g. PerChannel(axis=-1) for the output features of a Flax kernel."
      )

  def _axes(self, ndim: int) -> tuple[int, ...]:
    axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
    return tuple(_norm_axis(a, ndim) for a in axes)

  def check(self, shape: tuple[int, ...], path: str = "<array>") -> None:
    axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
    for a in axes:
      if not is_int(a) or not -len(shape) <= a < len(shape):
        raise ValueError(
            f"{path}: PerChannel(axis={self.axis!r}) does not fit a tensor of shape "
            f"{tuple(shape)}; pass an axis in [-{len(shape)}, {len(shape) - 1}] "
            "(or PerTensor() for scalars)."
        )

  def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    keep = self._axes(len(shape))
    return tuple(s if i in keep else 1 for i, s in enumerate(shape))

  def _blocks(self, x: Array) -> tuple[Array, tuple[int, ...]]:
    keep = self._axes(x.ndim)
    return x, tuple(i for i in range(x.ndim) if i not in keep)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerGroup(Granularity):
  """One scale per group of ``size`` consecutive elements along ``axis``.

  Groups run along the reduction axis (``in`` of a ``(in, out)`` Dense kernel or
  of a ``(h, w, in, out)`` Conv kernel: the default ``-2``); every index of
  the other axes has its own scales.

  Args:
    size: elements per group; must divide the size of ``axis``.
    axis: the axis split into groups.

  Example:
    >>> import jaxcompress as jc
    >>> jc.quant.PerGroup(size=4).scale_shape((16, 32))
    (4, 32)
  """

  size: int
  axis: int = -2

  def __post_init__(self):
    check_int("PerGroup", "size", self.size, low=1)
    check_int("PerGroup", "axis", self.axis)

  def check(self, shape: tuple[int, ...], path: str = "<array>") -> None:
    if not is_int(self.size) or self.size < 1:
      raise ValueError(f"{path}: PerGroup(size={self.size!r}) needs a positive integer size.")
    if not is_int(self.axis) or not (
        -len(shape) <= self.axis < len(shape)
    ):
      raise ValueError(
          f"{path}: PerGroup(axis={self.axis!r}) does not fit a tensor of shape "
          f"{tuple(shape)}; pass the reduction axis, in [-{len(shape)}, {len(shape) - 1}] "
          "(or use PerTensor()/PerChannel() for this leaf)."
      )
    n = shape[self.axis]
    if n % self.size:
      divisors = [d for d in range(1, n + 1) if n % d == 0 and d <= 512]
      raise ValueError(
          f"{path}: PerGroup(size={self.size}) does not divide axis {self.axis} of size {n} "
          f"(shape {tuple(shape)}); pick a group size that divides {n}, e.g. one of "
          f"{divisors[-4:]}, or use PerChannel() for this leaf."
      )

  def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    a = _norm_axis(self.axis, len(shape))
    return tuple(s // self.size if i == a else s for i, s in enumerate(shape))

  def _blocks(self, x: Array) -> tuple[Array, tuple[int, ...]]:
    a = _norm_axis(self.axis, x.ndim)
    # An Explicit mesh refuses to split a sharded axis into groups that can span
    # shards: that axis (the reduction axis, rarely sharded) is replicated first.
    x = _sharding.unshard_axes(x, (a,))
    shape = x.shape[:a] + (x.shape[a] // self.size, self.size) + x.shape[a + 1 :]
    return x.reshape(shape), (a + 1,)


def check(fmt: Format, granularity: Granularity, shape: tuple[int, ...], path: str = "<array>") -> None:
  """Checks a format and a granularity against a tensor shape.

  Args:
    fmt: the quantization format.
    granularity: a ``PerTensor``, ``PerChannel`` or ``PerGroup``.
    shape: the tensor's shape.
    path: the leaf path, named in error messages.

  Returns:
    None; raises ``ValueError``/``TypeError`` naming ``path``, the bad value and
    the fix.

  Block-scaled formats take ``PerGroup(size=fmt.block_size)`` only, and the
  size of its axis must be a multiple of the block size.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.quant.numerics import check
    >>> check(jc.quant.Format(bits=4), jc.quant.PerGroup(size=48), (128, 8), "Dense_0/kernel")
    Traceback (most recent call last):
    ...
    ValueError: Dense_0/kernel: PerGroup(size=48) does not divide axis -2 of size 128 ...
    >>> check(jc.quant.Format(dtype="mxfp4"), jc.quant.PerGroup(size=32), (48, 8), "Dense_0/kernel")
    Traceback (most recent call last):
    ...
    ValueError: Dense_0/kernel: mxfp4 takes blocks of 32 elements along axis -2, whose size 48 ...
  """
  if not isinstance(fmt, Format):
    raise TypeError(f"{path}: expected a quant Format, got {fmt!r}; e.g. Format(bits=8).")
  fmt.check(path)
  if not isinstance(granularity, Granularity) or type(granularity) is Granularity:
    raise ValueError(
        f"{path}: unknown granularity {granularity!r}; use PerTensor(), "
        "PerChannel(axis=...) or PerGroup(size=..., axis=...)."
    )
  if fmt.is_block_scaled:
    check_block_granularity(fmt, granularity, path)
    axis = granularity.axis
    if -len(shape) <= axis < len(shape) and shape[axis] % fmt.block_size:
      n = shape[axis]
      fits = [f"{name} ({b.block_size})" for name, b in _BLOCK.items() if n % b.block_size == 0]
      fix = (f"block-scaled formats whose block divides {n}: {', '.join(fits)}" if fits else
             f"no block-scaled format fits (their block sizes are "
             f"{sorted({b.block_size for b in _BLOCK.values()})}): leave this leaf unquantized, "
             "or use an integer or float8 format")
      raise ValueError(
          f"{path}: {fmt.dtype} takes blocks of {fmt.block_size} elements along axis {axis}, "
          f"whose size {n} (shape {tuple(shape)}) is not a multiple of {fmt.block_size}; {fix}."
      )
  granularity.check(tuple(shape), path)


def default_granularity(fmt: Format) -> Granularity:
  """The granularity a format gets when none is given.

  ``PerChannel()`` (one scale per output channel), or for a block-scaled
  format ``PerGroup(size=fmt.block_size)`` (blocks along the reduction axis ``-2``).

  Args:
    fmt: the format.

  Returns:
    A granularity.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.quant.numerics import default_granularity
    >>> default_granularity(jc.quant.Format()), default_granularity(jc.quant.Format(dtype="nvfp4"))
    (PerChannel(axis=-1), PerGroup(size=16, axis=-2))
  """
  if fmt.is_block_scaled:
    return PerGroup(size=fmt.block_size)
  return PerChannel()


def check_block_granularity(fmt: Format, granularity: Any, where: str) -> None:
  """Refuses a granularity other than ``PerGroup(size=fmt.block_size)`` for a block-scaled format.

  Args:
    fmt: the format (nothing is checked unless it is block-scaled).
    granularity: the granularity given.
    where: the stage, function or leaf path to name.

  Returns:
    None; raises ``ValueError``.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.quant.numerics import check_block_granularity
    >>> check_block_granularity(jc.quant.Format(dtype="mxfp4"), jc.quant.PerChannel(), "FakeQuant")
    Traceback (most recent call last):
    ...
    ValueError: FakeQuant: mxfp4 shares one scale per block of 32 consecutive elements ...
  """
  if not fmt.is_block_scaled:
    return
  if not (isinstance(granularity, PerGroup) and granularity.size == fmt.block_size):
    raise ValueError(
        f"{where}: {fmt.dtype} shares one scale per block of {fmt.block_size} consecutive "
        f"elements along the reduction axis, got granularity={granularity!r}; leave granularity "
        f"unset (PerGroup(size={fmt.block_size}, axis=-2)) or pass "
        f"PerGroup(size={fmt.block_size}, axis=<the reduction axis>)."
    )


# --------------------------------------------------------------------------
# Scales.
# --------------------------------------------------------------------------


def reduce_blocks(x: Array, granularity: Granularity, fn: Callable[..., Array]) -> Array:
  """Reduces ``x`` over the elements that share a scale.

  Args:
    x: the tensor.
    granularity: which elements share a scale.
    fn: a reduction called as ``fn(view, axis=axes, keepdims=True)`` (``jnp.max``,
      ``jnp.sum``, ``functools.partial(jnp.quantile, q=0.99)``...).

  Returns:
    An array of shape ``granularity.scale_shape(x.shape)``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> from jaxcompress.quant.numerics import reduce_blocks
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> reduce_blocks(x, jc.quant.PerGroup(size=2, axis=0), jnp.max).tolist()
    [[2.0, 3.0], [6.0, 7.0]]
  """
  view, axes = granularity._blocks(x)
  out = fn(view, axis=axes, keepdims=True)
  return out.reshape(granularity.scale_shape(x.shape))


def expand_scale(scale: Array, shape: tuple[int, ...], granularity: Granularity) -> Array:
  """Broadcasts a scale (or zero point) to be elementwise-compatible with ``shape``.

  Args:
    scale: an array of shape ``granularity.scale_shape(shape)``.
    shape: the tensor's shape.
    granularity: the granularity the scale was made for.

  Returns:
    ``scale`` repeated along a ``PerGroup`` axis, else ``scale`` itself (it
    already broadcasts).

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> from jaxcompress.quant.numerics import expand_scale
    >>> s = expand_scale(jnp.array([[1.0], [2.0]]), (4, 1), jc.quant.PerGroup(size=2, axis=0))
    >>> s.ravel().tolist()
    [1.0, 1.0, 2.0, 2.0]
  """
  if isinstance(granularity, PerGroup):
    a = _norm_axis(granularity.axis, len(shape))
    s = jnp.expand_dims(_sharding.unshard_axes(scale, (a,)), a + 1)
    s = jnp.broadcast_to(s, s.shape[: a + 1] + (granularity.size,) + s.shape[a + 2 :])
    return s.reshape(s.shape[:a] + (s.shape[a] * granularity.size,) + s.shape[a + 2 :])
  return scale


def _safe(r: Array) -> Array:
  # A zero (or non-finite) range gives scale 1 / qmax instead of 0 or NaN.
  return jnp.where((r > 0) & jnp.isfinite(r), r, jnp.ones_like(r))


def scale_from_range(lo: Array, hi: Array, fmt: Format) -> tuple[Array, Array | None]:
  """The scale (and zero point) that maps the range ``[lo, hi]`` onto the grid.

  Symmetric: ``scale = max(|lo|, |hi|) * (1 / qmax)``. Asymmetric: the range is
  first widened to include zero, then ``scale = (hi - lo) * (1 / (qmax - qmin))`` and
  ``zero_point = clip(round(qmin - lo / scale), qmin, qmax)``, so that zero is
  exactly representable. The reciprocal is a float32 constant (compilers turn a
  division by a constant into that product anyway; this makes it the definition).
  An empty range (all zeros) gives ``scale = 1 / qmax`` (or ``1 / (qmax - qmin)``),
  never zero or NaN.

  Args:
    lo: lower ends of the ranges (any shape; for symmetric formats only
      ``max(|lo|, |hi|)`` matters).
    hi: upper ends, same shape.
    fmt: the format.

  Returns:
    ``(scale, zero_point)``: float32 arrays of ``lo``'s shape; ``zero_point`` is
    ``None`` for symmetric formats, else integer-valued in the storage dtype.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> s, z = jc.quant.scale_from_range(jnp.array(-1.0), jnp.array(3.0),
    ...                                  jc.quant.Format(bits=8, symmetric=False))
    >>> round(float(s) * 255, 4), int(z)
    (4.0, -64)
  """
  if fmt.is_block_scaled:
    raise ValueError(
        f"scale_from_range: {fmt.dtype} takes its scales from each block's largest magnitude "
        "(the format's rule), not from a calibrated range; use compute_scale or block_scales."
    )
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  if fmt.symmetric:
    r = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return _safe(r) * jnp.float32(1.0 / fmt.qmax), None
  lo = jnp.minimum(lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  scale = _safe(hi - lo) * jnp.float32(1.0 / (fmt.qmax - fmt.qmin))
  zp = jnp.clip(jnp.round(jnp.float32(fmt.qmin) - lo / scale), fmt.qmin, fmt.qmax)
  return scale, zp.astype(fmt.storage_dtype)


def compute_scale(
    x: Array, fmt: Format, granularity: Granularity
) -> tuple[Array, Array | None]:
  """The dynamic scale (and zero point) of ``x``: its absmax, or its min/max.

  For a block-scaled format, the float32 decode scale of each block (what the
  elements are multiplied by): the stored scales of ``block_scales``, decoded.

  Args:
    x: the tensor.
    fmt: the format.
    granularity: which elements share a scale.

  Returns:
    ``(scale, zero_point)`` of shape ``granularity.scale_shape(x.shape)``, as
    ``scale_from_range`` gives them (``zero_point`` is ``None`` for
    block-scaled formats).

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> s, z = jc.quant.compute_scale(jnp.array([[1.0, -2.0], [-0.5, 0.0]]), jc.quant.Format(bits=8),
    ...                               jc.quant.PerChannel())
    >>> (s * 127).tolist(), z
    ([[1.0, 2.0]], None)
  """
  if fmt.is_block_scaled:
    return blockscaled.decode_scale(*block_scales(x, fmt, granularity)), None
  # Non-finite values count as zeros: the range is widened to include zero
  # anyway, so the scale is that of the finite values alone.
  xf = finite_or_zero(x.astype(jnp.float32))
  if fmt.symmetric:
    r = reduce_blocks(jnp.abs(xf), granularity, jnp.max)
    return scale_from_range(-r, r, fmt)
  lo = reduce_blocks(xf, granularity, jnp.min)
  hi = reduce_blocks(xf, granularity, jnp.max)
  return scale_from_range(lo, hi, fmt)


def block_scales(
    x: Array, fmt: Format, granularity: Granularity, *, tensor_scale: Array | None = None
) -> tuple[Array, Array | None]:
  """The stored scales of a block-scaled format: ``(scale, tensor_scale)``.

  From the largest finite magnitude of each block (after flushing float32
  subnormals), by the format's rule (``blockscaled``): MX formats give
  ``float8_e8m0fnu`` powers of two and ``tensor_scale=None``; NVFP4 gives
  ``float8_e4m3fn`` block scales and its float32 tensor scale.

  Args:
    x: the tensor.
    fmt: a block-scaled format.
    granularity: ``PerGroup(size=fmt.block_size, axis=...)``.
    tensor_scale: NVFP4 only: a given tensor scale (GPTQ fixes it from the
      whole kernel before quantizing its blocks one by one); by default the
      one of ``x``.

  Returns:
    ``(scale, tensor_scale)``: ``scale`` of shape
    ``granularity.scale_shape(x.shape)`` in ``fmt.scale_dtype``;
    ``tensor_scale`` a float32 scalar for NVFP4, else ``None``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> from jaxcompress.quant.numerics import block_scales
    >>> x = jnp.array([[3.0], [-0.7]] * 16)  # one block of 32 along axis -2
    >>> s, t = block_scales(x, jc.quant.Format(dtype="mxfp4"), jc.quant.PerGroup(size=32))
    >>> s.dtype, s.astype(jnp.float32).tolist(), t
    (dtype(float8_e8m0fnu), [[0.5]], None)
  """
  if fmt.block is None:
    raise ValueError(f"block_scales: {fmt!r} is not block-scaled; use compute_scale.")
  return _block_scales(x, fmt, granularity, tensor_scale)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _block_scales(x, fmt, granularity, tensor_scale):
  block = fmt.block
  xf = blockscaled.flush_subnormals(finite_or_zero(x.astype(jnp.float32)))
  amax = reduce_blocks(jnp.abs(xf), granularity, jnp.max)
  if not block.tensor_scale:
    return blockscaled.mx_scale(amax, block), None
  if tensor_scale is None:
    tensor_scale = blockscaled.nvfp4_tensor_scale(jnp.max(amax))
  tensor_scale = jnp.asarray(tensor_scale, jnp.float32).reshape(())
  return blockscaled.nvfp4_block_scale(amax, tensor_scale), tensor_scale


def finite_or_zero(x: Array) -> Array:
  """``x`` with its NaN and +-inf replaced by zeros (the neutral value of ranges).

  Args:
    x: any float array.

  Returns:
    An array like ``x``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.quant.numerics import finite_or_zero
    >>> finite_or_zero(jnp.array([1.0, jnp.nan, -jnp.inf])).tolist()
    [1.0, 0.0, 0.0]
  """
  return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def check_finite(
    x: Array,
    fmt: Format | None,
    path: str = "<array>",
    *,
    what: str = "value",
    why: str | None = None,
    fix: str | None = None,
) -> None:
  """Refuses the non-finite values of ``x`` that ``fmt`` cannot hold (see the module docstring).

  Integer formats and ``float4_e2m1fn`` elements hold no NaN or +-inf;
  ``float8_e4m3fn`` holds NaN but not +-inf; ``float8_e5m2`` holds both; ``fmt=None`` refuses every non-finite
  value. On concrete values it raises at once (the message counts the bad
  values and gives the first one's index); on traced values the check runs
  with the computation (``core.checks.error_if``): keep it off the training hot
  path.

  Args:
    x: the tensor.
    fmt: the format it is about to be encoded in, or ``None``.
    path: the leaf path, named in the message.
    what: what the values are, for the message (``"calibration input"``).
    why: why they are refused; default: they cannot be encoded in ``fmt``.
    fix: what to do; default: clean them or leave the leaf unquantized.

  Returns:
    None; raises ``ValueError``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> from jaxcompress.quant.numerics import check_finite
    >>> check_finite(jnp.array([1.0, jnp.nan]), jc.quant.Format(dtype="float8_e5m2"), "w")
    >>> check_finite(jnp.array([1.0, jnp.nan]), jc.quant.Format(bits=8), "w")
    Traceback (most recent call last):
    ...
    ValueError: w: 1 non-finite value(s) (first nan at index (1,)) cannot be encoded in int8; ...
  """
  if fmt is not None and fmt.holds(np.inf):
    return
  bad = jnp.isinf(x) if fmt is not None and fmt.holds(np.nan) else ~jnp.isfinite(x)
  if why is None:
    why = ("are not accepted" if fmt is None else
           f"cannot be encoded in {fmt.dtype if fmt.is_float else f'int{fmt.bits}'}")
  if fix is None:
    fix = ("replace or mask them before encoding (e.g. jnp.nan_to_num), or leave this leaf "
           "unquantized; fake quantization (FakeQuant, fake_quant) passes them through instead.")
  if is_concrete(x):
    if bool(jnp.any(bad)):  # one scalar to the host; the details only on failure
      bad = np.asarray(bad)
      first = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
          f"{path}: {int(bad.sum())} non-finite {what}(s) (first {float(np.asarray(x)[first])} "
          f"at index {first}) {why}; {fix}"
      )
  else:
    error_if(jnp.any(bad), f"{path}: non-finite {what}s {why}; {fix}")


# --------------------------------------------------------------------------
# Rounding onto the grid.
# --------------------------------------------------------------------------


def _float_stochastic(y: Array, dtype: Any, u: Array) -> Array:
  info = jnp.finfo(dtype)
  _, e = jnp.frexp(y)  # |y| in [2**(e-1), 2**e)
  exp = jnp.maximum(e - 1, int(info.minexp)) - int(info.nmant)
  ulp = jnp.ldexp(jnp.ones_like(y), exp)
  return jnp.floor(y / ulp + u) * ulp


def to_grid(
    y: Array,
    fmt: Format,
    *,
    rounding: Rounding = "nearest",
    key: Array | None = None,
) -> Array:
  """Rounds scaled values ``y = x / scale (+ zero_point)`` onto the format's grid.

  Args:
    y: float32 scaled values.
    fmt: the format.
    rounding: ``"nearest"`` (half to even) or ``"stochastic"`` (unbiased:
      ``floor(y / ulp + u) * ulp`` with ``u = jax.random.uniform(key, y.shape)``;
      ``ulp = 1`` for integers).
    key: PRNG key, required for stochastic rounding.

  Returns:
    float32 values on the grid, clipped to ``[qmin, qmax]`` (exactly
    representable in ``fmt.storage_dtype``).

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> from jaxcompress.quant.numerics import to_grid
    >>> to_grid(jnp.array([0.5, 1.5, -9.0, 2.4]), jc.quant.Format(bits=4)).tolist()
    [0.0, 2.0, -8.0, 2.0]
  """
  if rounding not in _ROUNDINGS:
    raise ValueError(f"unknown rounding {rounding!r}; use 'nearest' or 'stochastic'.")
  y = y.astype(jnp.float32)
  if rounding == "stochastic":
    if key is None:
      raise ValueError("rounding='stochastic' needs a PRNG key: pass key=jax.random.key(...).")
    u = jax.random.uniform(key, y.shape, jnp.float32)
    if fmt.is_float:
      y = _float_stochastic(y, fmt.storage_dtype, u)
    else:
      y = jnp.floor(y + u)
  elif fmt.is_float:
    y = jnp.clip(y, fmt.qmin, fmt.qmax).astype(fmt.storage_dtype).astype(jnp.float32)
  else:
    y = jnp.round(y)
  return jnp.clip(y, fmt.qmin, fmt.qmax)


# --------------------------------------------------------------------------
# The quantized array.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized tensor: ``x ~= (values - zero_point) * expand(scale)``.

  A registered pytree: ``values``, ``scale``, ``zero_point`` and
  ``tensor_scale`` are its children (so it passes through ``jax.jit`` and can
  be sharded), ``fmt``, ``granularity`` and ``dtype`` are static.

  Attributes:
    values: the quantized values, in ``fmt.storage_dtype`` (``int8``, ``int4``,
      ``float8_e4m3fn``, ``float8_e5m2``, ``float4_e2m1fn``), shape of the
      original tensor.
    scale: shape ``granularity.scale_shape(values.shape)``, in
      ``fmt.scale_dtype``: float32, or for a block-scaled format its stored
      block scales (``float8_e8m0fnu`` or ``float8_e4m3fn``).
    zero_point: ``None`` for symmetric formats, else an integer array like
      ``scale`` in the storage dtype.
    fmt: the ``Format``.
    granularity: the granularity.
    dtype: the dtype of the original tensor (what ``dequantize`` returns).
    tensor_scale: NVFP4's float32 scalar tensor scale (the block scales are
      multiplied by it); ``None`` otherwise.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> q = jc.quant.quantize(jnp.array([[1.0, -2.0], [0.5, 4.0]]))
    >>> q.values.dtype, q.scale.shape, q.shape
    (dtype('int8'), (1, 2), (2, 2))
  """

  values: Array
  scale: Array
  zero_point: Array | None
  fmt: Format = dataclasses.field(default_factory=Format)
  granularity: Granularity = dataclasses.field(default_factory=lambda: PerChannel())
  dtype: Any = np.dtype(np.float32)
  tensor_scale: Array | None = None

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the original tensor."""
    return tuple(self.values.shape)

  @property
  def ndim(self) -> int:
    """Rank of the original tensor."""
    return len(self.values.shape)

  def dequantize(self, dtype: Any = None) -> Array:
    """``(values - zero_point) * scale``; see the function ``dequantize``.

    Args:
      dtype: output dtype; default ``self.dtype``.

    Returns:
      The float array.
    """
    return dequantize(self, dtype)


jax.tree_util.register_dataclass(
    QArray,
    data_fields=["values", "scale", "zero_point", "tensor_scale"],
    meta_fields=["fmt", "granularity", "dtype"],
)


def quantize(
    x: Array,
    fmt: Format | None = None,
    granularity: Granularity | None = None,
    *,
    scale: Array | None = None,
    zero_point: Array | None = None,
    rounding: Rounding = "nearest",
    key: Array | None = None,
    path: str = "<array>",
) -> QArray:
  """Quantizes ``x`` to real low-precision values plus scales.

  ``values = clip(round(x / scale + zero_point), qmin, qmax)`` in
  ``fmt.storage_dtype``, computed in float32. Scales come from the finite
  values; NaN/inf are kept where the storage dtype holds them, else refused
  (``check_finite``: a ``ValueError`` naming ``path``).

  Block-scaled formats: the stored block scales (and NVFP4's tensor scale)
  come from ``block_scales``; each element is ``x`` divided by its block's
  decode scale, rounded to nearest (ties to even) in the element type and
  clamped to its largest finite value (``blockscaled`` has the rules).

  Args:
    x: the tensor (any float dtype).
    fmt: the format; default ``Format()`` (int8 symmetric).
    granularity: default ``PerChannel()`` (one scale per last-axis index);
      ``PerGroup(size=fmt.block_size)`` for block-scaled formats.
    scale: a fixed scale of shape ``granularity.scale_shape(x.shape)`` (from
      calibration or learned); by default computed from ``x``
      (``compute_scale``). Not for block-scaled formats, whose scales come
      from the blocks.
    zero_point: the zero point with a given asymmetric ``scale``.
    rounding: ``"nearest"`` or ``"stochastic"`` (see ``to_grid``).
    key: PRNG key for stochastic rounding.
    path: the leaf path, named in error messages.

  Returns:
    A ``QArray``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> q = jc.quant.quantize(jnp.array([0.0, 1.0, -0.6, 3.5]), jc.quant.Format(bits=4),
    ...                       jc.quant.PerTensor())
    >>> q.values.tolist(), q.scale.tolist()
    ([0, 2, -1, 7], [0.5])
    >>> q.dequantize().tolist()
    [0.0, 1.0, -0.5, 3.5]
  """
  fmt = Format() if fmt is None else fmt
  granularity = default_granularity(fmt) if granularity is None else granularity
  check(fmt, granularity, tuple(x.shape), path)
  check_finite(x, fmt, path)
  tensor_scale = None
  if fmt.is_block_scaled:
    if scale is not None or zero_point is not None:
      raise ValueError(
          f"{path}: {fmt.dtype} takes its scales from each block's largest magnitude (the "
          "format's rule); drop scale= and zero_point=."
      )
    scale, tensor_scale = block_scales(x, fmt, granularity)
    y, _, zp = _to_grid_values(x, fmt, granularity, blockscaled.decode_scale(scale, tensor_scale),
                               None, rounding, key, path)
  else:
    y, scale, zp = _to_grid_values(x, fmt, granularity, scale, zero_point, rounding, key, path)
  xf = x.astype(jnp.float32)
  # What the storage dtype holds passes through (float8 NaN/inf); what it
  # cannot hold was refused above, and gets 0 under a traced check.
  y = jnp.where(jnp.isfinite(xf), y, xf if fmt.holds(np.nan) else jnp.zeros_like(y))
  values = y.astype(fmt.storage_dtype)
  if zp is not None:
    zp = jnp.asarray(zp).astype(fmt.storage_dtype)
  return QArray(values, scale, zp, fmt, granularity, np.dtype(x.dtype), tensor_scale)


def _to_grid_values(x, fmt, granularity, scale, zero_point, rounding, key, path):
  """Grid values of ``x`` (float32, unchecked), its scale and zero point."""
  if scale is None:
    scale, zp = compute_scale(x, fmt, granularity)
  else:
    scale = jnp.asarray(scale, jnp.float32)
    zp = zero_point
    if not fmt.symmetric and zp is None:
      raise ValueError(
          f"{path}: an asymmetric format with a given scale needs its zero_point as well; "
          "pass zero_point= (scale_from_range gives both)."
      )
    if fmt.symmetric:
      zp = None
  want = granularity.scale_shape(tuple(x.shape))
  if tuple(scale.shape) != want:
    raise ValueError(
        f"{path}: scale of shape {tuple(scale.shape)} does not fit {granularity!r} on a tensor "
        f"of shape {tuple(x.shape)}; expected shape {want}."
    )
  xf = x.astype(jnp.float32)
  if fmt.is_block_scaled:
    xf = blockscaled.flush_subnormals(xf)
  y = xf / expand_scale(scale, x.shape, granularity)
  if zp is not None:
    y = y + expand_scale(zp, x.shape, granularity).astype(jnp.float32)
  return to_grid(y, fmt, rounding=rounding, key=key), scale, zp


def dequantize(q: QArray, dtype: Any = None) -> Array:
  """The float tensor a ``QArray`` stands for: ``(values - zero_point) * scale``.

  Computed in float32, then cast to ``dtype``. For a block-scaled format the
  scale is the decode scale of each block (``blockscaled.decode_scale``: the
  stored scale, times NVFP4's tensor scale), and float32 subnormal results are
  flushed to zero.

  Args:
    q: the quantized array.
    dtype: output dtype; default the dtype of the tensor that was quantized.

  Returns:
    An array of ``q.shape``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> x = jnp.array([[0.5, -1.0], [1.0, 2.0]], jnp.bfloat16)
    >>> y = jc.quant.dequantize(jc.quant.quantize(x))
    >>> y.dtype, bool(jnp.abs(y - x).max() < 0.02)
    (dtype(bfloat16), True)
  """
  scale = q.scale
  if q.fmt.is_block_scaled:
    scale = blockscaled.decode_scale(scale, q.tensor_scale)
  return _dequantize_values(q.values, scale, q.zero_point, q.fmt, q.granularity,
                            q.dtype if dtype is None else dtype)


def _dequantize_values(values, scale, zero_point, fmt, granularity, dtype):
  """``(values - zero_point) * scale`` with a float32 (decode) scale: ``dequantize``'s arithmetic."""
  shape = tuple(values.shape)
  v = values.astype(jnp.float32)
  if zero_point is not None:
    v = v - expand_scale(zero_point, shape, granularity).astype(jnp.float32)
  out = v * expand_scale(scale, shape, granularity)
  if fmt.is_block_scaled:
    out = blockscaled.flush_subnormals(out)
  return out.astype(dtype)


def fake_quant(
    x: Array,
    fmt: Format | None = None,
    granularity: Granularity | None = None,
    *,
    scale: Array | None = None,
    zero_point: Array | None = None,
    rounding: Rounding = "nearest",
    key: Array | None = None,
) -> Array:
  """``dequantize(quantize(x, ...))`` in ``x.dtype``, without a gradient rule.

  Rounding has a zero derivative; for training use the estimators in
  ``jaxcompress.quant.ste``. Non-finite values pass through unchanged (NaN
  stays NaN, +-inf stays +-inf) and do not enter the scale: no check, no
  error, so it fits a training step.

  Args:
    x, fmt, granularity, zero_point, rounding, key: as for ``quantize``.
    scale: as for ``quantize``; for a block-scaled format, the float32 decode
      scale of each block (``compute_scale`` gives it; default).

  Returns:
    An array like ``x`` holding grid values times the scale.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> jc.quant.fake_quant(jnp.array([0.1, 1.0]), jc.quant.Format(bits=2), jc.quant.PerTensor()).tolist()
    [0.0, 1.0]
    >>> jc.quant.fake_quant(jnp.array([0.5, jnp.nan, -2.18, 3.61]), jc.quant.Format(bits=4),
    ...                     jc.quant.PerTensor()).tolist()
    [0.515..., nan, -2.062..., 3.61...]
    >>> jc.quant.fake_quant(jnp.array([[0.7], [-3.0]] * 16), jc.quant.Format(dtype="mxfp4"))[:2, 0].tolist()
    [0.75, -3.0]
  """
  fmt = Format() if fmt is None else fmt
  granularity = default_granularity(fmt) if granularity is None else granularity
  check(fmt, granularity, tuple(x.shape))
  y, scale, zp = _to_grid_values(x, fmt, granularity, scale, zero_point, rounding, key, "<array>")
  # The round trip through the storage dtype keeps the result bit-identical
  # to dequantize(quantize(x)) for finite x.
  zp = None if zp is None else jnp.asarray(zp).astype(fmt.storage_dtype)
  out = _dequantize_values(y.astype(fmt.storage_dtype), scale, zp, fmt, granularity, x.dtype)
  return jnp.where(jnp.isfinite(x), out, x)


def num_bits(fmt: Format) -> int:
  """Bits per stored value (8 for float8, 4 for ``float4_e2m1fn`` elements; scales not counted).

  Args:
    fmt: the format.

  Returns:
    ``fmt.bits`` for integers, the element width for the float formats.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.quant.numerics import num_bits
    >>> num_bits(jc.quant.Format(bits=3)), num_bits(jc.quant.Format(dtype="float8_e5m2"))
    (3, 8)
    >>> num_bits(jc.quant.Format(dtype="nvfp4"))
    4
  """
  if fmt.is_float:
    return int(ml_dtypes.finfo(fmt.storage_dtype).bits)
  return int(fmt.bits)


__all__ = [
    "Format",
    "Granularity",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QArray",
    "check",
    "block_scales",
    "check_block_granularity",
    "check_finite",
    "check_format_fields",
    "compute_scale",
    "default_granularity",
    "dequantize",
    "expand_scale",
    "fake_quant",
    "finite_or_zero",
    "num_bits",
    "quantize",
    "reduce_blocks",
    "scale_from_range",
    "to_grid",
]

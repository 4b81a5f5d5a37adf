"""Calibration: choosing quantization ranges from data.

A calibrator maps a tensor to ranges ``(lo, hi)``, one per block of elements
that share a scale (shape ``granularity.scale_shape(x.shape)``);
``numerics.scale_from_range`` turns them into scales:

- ``AbsMax()``: ``[-max |x|, max |x|]``;
- ``MinMax()``: ``[min x, max x]``;
- ``Percentile(q=99.9)``: the ``q``-th percentile of ``|x|`` (symmetric), or the
  ``100 - q`` and ``q`` percentiles of ``x`` (asymmetric);
- ``MSE(...)``: the clipping ratio ``r`` of the absmax/minmax range that
  minimizes the squared quantization error ``sum (fake_quant(x) - x)**2`` of
  each block, searched over a grid of ratios from 1 down to ``min_ratio``.

Every calibrator reads the finite values of a block only: NaN and +-inf
never widen a range (a block with no finite value gets the range ``[0, 0]``).

Ranges that change over time (weights during training, activations over
calibration batches) are smoothed by an exponential moving average:
``RangeEMA`` holds ``(lo, hi, count)`` and ``ema_update`` folds in a new
observation (the first one is taken as is).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core import sharding as _sharding
from jaxcompress.core.checks import check_int, check_number
from jaxcompress.quant import numerics
from jaxcompress.quant.numerics import Format, Granularity

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibrator:
  """Base class of calibrators: ``calibrator(x, fmt, granularity) -> (lo, hi)``."""

  def __call__(self, x: Array, fmt: Format, granularity: Granularity) -> tuple[Array, Array]:
    raise NotImplementedError

  def scale(
      self, x: Array, fmt: Format, granularity: Granularity
  ) -> tuple[Array, Array | None]:
    """The scale and zero point of the calibrated ranges.

    Args:
      x: the tensor.
      fmt: the format.
      granularity: which elements share a scale.

    Returns:
      ``numerics.scale_from_range(*self(x, fmt, granularity), fmt)``.

    Example:
      >>> import jax.numpy as jnp, jaxcompress as jc
      >>> s, z = jc.quant.AbsMax().scale(jnp.array([1.0, -7.0]), jc.quant.Format(bits=4),
      ...                                  jc.quant.PerTensor())
      >>> s.tolist(), z
      ([1.0], None)
    """
    lo, hi = self(x, fmt, granularity)
    return numerics.scale_from_range(lo, hi, fmt)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AbsMax(Calibrator):
  """Ranges ``[-max |x|, max |x|]`` per block.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> lo, hi = jc.quant.AbsMax()(jnp.array([[1.0, -2.0], [-3.0, 0.5]]), jc.quant.Format(),
    ...                            jc.quant.PerChannel())
    >>> lo.tolist(), hi.tolist()
    ([[-3.0, -2.0]], [[3.0, 2.0]])
  """

  def __call__(self, x: Array, fmt: Format, granularity: Granularity) -> tuple[Array, Array]:
    del fmt
    r = numerics.reduce_blocks(jnp.abs(numerics.finite_or_zero(x.astype(jnp.float32))), granularity, jnp.max)
    return -r, r


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinMax(Calibrator):
  """Ranges ``[min x, max x]`` per block.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> lo, hi = jc.quant.MinMax()(jnp.array([1.0, -2.0, 4.0]), jc.quant.Format(), jc.quant.PerTensor())
    >>> lo.tolist(), hi.tolist()
    ([-2.0], [4.0])
  """

  def __call__(self, x: Array, fmt: Format, granularity: Granularity) -> tuple[Array, Array]:
    del fmt
    xf = x.astype(jnp.float32)
    finite = jnp.isfinite(xf)
    lo = numerics.reduce_blocks(jnp.where(finite, xf, jnp.inf), granularity, jnp.min)
    hi = numerics.reduce_blocks(jnp.where(finite, xf, -jnp.inf), granularity, jnp.max)
    empty = lo > hi  # no finite value in the block
    return jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)


def _nanpercentile(view: Array, *, axis, keepdims: bool, q: float) -> Array:
  """``jnp.nanpercentile`` (a sort), partitioned by XLA where an Explicit mesh shards ``view``.

  ``jnp``'s quantiles are not written for explicit sharding; with the axes
  made Auto the sort runs per shard when the reduced axes are not split, and
  XLA gathers them when they are. The result keeps the kept axes' sharding.
  """
  fn = lambda v: jnp.nanpercentile(v, q, axis=axis, keepdims=True)
  derived = lambda out, sharding_of: _sharding.derive(sharding_of(view), view.shape, out.shape)
  r = _sharding.call_partitioned(fn, view, derived)[0]
  return r if keepdims else jnp.squeeze(r, axis)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Percentile(Calibrator):
  """Ranges at the ``q``-th percentile (linear interpolation, as ``np.percentile``).

  Symmetric formats use the percentile of ``|x|``; asymmetric ones the ``100 - q``
  and ``q`` percentiles of ``x``.

  Args:
    q: the percentile, in ``(0, 100]``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> lo, hi = jc.quant.Percentile(q=50.0)(jnp.arange(5.0), jc.quant.Format(), jc.quant.PerTensor())
    >>> hi.tolist()
    [2.0]
  """

  q: float = 99.9

  def __post_init__(self):
    check_number("Percentile", "q", self.q, low=0.0, high=100.0, low_open=True)

  def __call__(self, x: Array, fmt: Format, granularity: Granularity) -> tuple[Array, Array]:
    xf = x.astype(jnp.float32)
    xf = jnp.where(jnp.isfinite(xf), xf, jnp.nan)  # nanpercentile skips them

    def pct(v, q):
      r = numerics.reduce_blocks(v, granularity, functools.partial(_nanpercentile, q=q))
      return jnp.where(jnp.isnan(r), 0.0, r)  # a block with no finite value

    if fmt.symmetric:
      r = pct(jnp.abs(xf), self.q)
      return -r, r
    return pct(xf, 100.0 - self.q), pct(xf, self.q)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MSE(Calibrator):
  """The clipping ratio per block that minimizes the squared quantization error.

  Candidate ranges are ``ratio * (lo, hi)`` of the absmax (symmetric) or
  min/max (asymmetric) range, for ``ratios()`` from 1 down to ``min_ratio``;
  the first ratio with the smallest error wins (ties keep the wider range).
  The search costs ``num`` fake quantizations of the tensor (about 1 s for a
  4096 x 4096 kernel on CPU): ``FakeQuant(ranges="static")`` runs it once, at
  ``init``, unless asked to re-calibrate (``update_every``).

  Args:
    num: number of candidate ratios.
    min_ratio: the smallest ratio, in ``(0, 1]``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> x = jnp.concatenate([jnp.linspace(-1.0, 1.0, 1001), jnp.array([3.0])])
    >>> lo, hi = jc.quant.MSE()(x, jc.quant.Format(bits=4), jc.quant.PerTensor())
    >>> bool(hi[0] < 2.0)
    True
  """

  num: int = 64
  min_ratio: float = 0.2

  def __post_init__(self):
    check_int("MSE", "num", self.num, low=1)
    check_number("MSE", "min_ratio", self.min_ratio, low=0.0, high=1.0, low_open=True)

  def ratios(self) -> np.ndarray:
    """The candidate ratios, float32, from 1 down to ``min_ratio``."""
    return np.linspace(1.0, self.min_ratio, self.num).astype(np.float32)

  def __call__(self, x: Array, fmt: Format, granularity: Granularity) -> tuple[Array, Array]:
    return _mse_search(x, self, fmt, granularity)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _mse_search(x: Array, mse: MSE, fmt: Format, granularity: Granularity) -> tuple[Array, Array]:
  base = AbsMax() if fmt.symmetric else MinMax()
  lo0, hi0 = base(x, fmt, granularity)
  xf = x.astype(jnp.float32)

  finite = jnp.isfinite(xf)

  def error(ratio):
    scale, zp = numerics.scale_from_range(lo0 * ratio, hi0 * ratio, fmt)
    d = numerics.fake_quant(xf, fmt, granularity, scale=scale, zero_point=zp) - xf
    d = jnp.where(finite, d, 0.0)  # non-finite values take no part
    return numerics.reduce_blocks(d * d, granularity, jnp.sum)

  def body(carry, ratio):
    best_err, best_ratio = carry
    err = error(ratio)
    better = err < best_err
    return (jnp.where(better, err, best_err), jnp.where(better, ratio, best_ratio)), None

  ratios = jnp.asarray(mse.ratios())
  init = (error(ratios[0]), jnp.full_like(lo0, ratios[0]))
  (_, best), _ = jax.lax.scan(body, init, ratios[1:])
  return lo0 * best, hi0 * best


def default_calibrator(fmt: Format) -> Calibrator:
  """``AbsMax()`` for symmetric formats, ``MinMax()`` for asymmetric ones.

  Args:
    fmt: the format.

  Returns:
    The calibrator used when none is given.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.quant.calibration import default_calibrator
    >>> default_calibrator(jc.quant.Format(symmetric=False))
    MinMax()
  """
  return AbsMax() if fmt.symmetric else MinMax()


# --------------------------------------------------------------------------
# Moving averages of ranges.
# --------------------------------------------------------------------------


class RangeEMA(NamedTuple):
  """An exponential moving average of ranges.

  Attributes:
    lo: float32 lower ends.
    hi: float32 upper ends.
    count: int32 number of observations folded in.
  """

  lo: Array
  hi: Array
  count: Array


def ema_init(shape: tuple[int, ...]) -> RangeEMA:
  """An empty moving average of ranges of ``shape``.

  Args:
    shape: the shape of the ranges (``granularity.scale_shape(x.shape)``).

  Returns:
    ``RangeEMA`` of zeros with ``count = 0``.

  Example:
    >>> import jaxcompress as jc
    >>> jc.quant.ema_init((1, 4)).lo.shape
    (1, 4)
  """
  zeros = jnp.zeros(shape, jnp.float32)
  return RangeEMA(zeros, zeros, jnp.zeros((), jnp.int32))


def ema_update(ema: RangeEMA, lo: Array, hi: Array, decay: float) -> RangeEMA:
  """Folds ranges ``(lo, hi)`` into ``ema``: ``r <- decay * r + (1 - decay) * new``.

  The first observation (``count == 0``) is taken as is.

  Args:
    ema: the moving average.
    lo: observed lower ends.
    hi: observed upper ends.
    decay: in ``[0, 1)``; 0 keeps only the last observation.

  Returns:
    The updated ``RangeEMA``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> e = jc.quant.ema_update(jc.quant.ema_init(()), jnp.float32(-2.0), jnp.float32(2.0), 0.5)
    >>> e = jc.quant.ema_update(e, jnp.float32(-4.0), jnp.float32(4.0), 0.5)
    >>> float(e.hi), int(e.count)
    (3.0, 2)
  """
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"decay={decay!r} must lie in [0, 1), e.g. 0.99.")
  first = ema.count == 0
  d = jnp.float32(decay)
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  new_lo = jnp.where(first, lo, d * ema.lo + (1 - d) * lo)
  new_hi = jnp.where(first, hi, d * ema.hi + (1 - d) * hi)
  count = jnp.minimum(ema.count, jnp.iinfo(jnp.int32).max - 1) + 1
  return RangeEMA(new_lo, new_hi, count)


__all__ = [
    "AbsMax",
    "Calibrator",
    "MSE",
    "MinMax",
    "Percentile",
    "RangeEMA",
    "default_calibrator",
    "ema_init",
    "ema_update",
]

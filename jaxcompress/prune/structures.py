"""Pruning structures: which weights are kept or removed together.

A structure maps the per-weight scores of a leaf to *unit* scores (``reduce``:
one score per block or channel), and a boolean keep-mask over the units back
to a mask over the weights (``expand``). The distribution decides how many
units each leaf keeps. ``NM`` is different: its density is fixed (``n`` of
every ``m``), and it selects within each group by itself (``select``), so it
takes no sparsity and no distribution.

Non-finite scores follow the criteria's rule (NaN lowest, ``+inf`` highest):
a block or channel whose reduced score is NaN is pruned first.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxcompress.core.checks import check_int, is_int


@dataclasses.dataclass(frozen=True)
class Structure:
  """Base class of pruning structures.

  Attributes:
    density: the fixed fraction of weights kept, for structures that decide it
      themselves (``NM``); ``None`` when the sparsity argument decides.

  Example:
    >>> import jaxcompress as jc
    >>> jc.prune.Unstructured().density is None
    True
  """

  @property
  def density(self) -> float | None:
    return None

  def check(self, shape: tuple[int, ...], path: str) -> None:
    """Raises ``ValueError`` naming ``path`` if the structure cannot apply to ``shape``."""
    del shape, path

  def reduce(self, score: jax.Array, path: str) -> jax.Array:
    """Unit scores from per-weight scores (float32)."""
    del path
    return score

  def expand(self, keep: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A bool mask of ``shape`` from a bool mask over the units."""
    del shape
    return keep

  def unit_mask(self, mask: jax.Array) -> jax.Array | None:
    """The unit keep-mask that ``expand`` turned into the weight ``mask``.

    None where a structure cannot say (then mask updates run a full select).
    """
    del mask
    return None

  def select(self, score: jax.Array, path: str) -> jax.Array:
    """The mask of a fixed-density structure (``NM``); others raise."""
    raise NotImplementedError(f"{type(self).__name__} has no fixed density.")


@dataclasses.dataclass(frozen=True)
class Unstructured(Structure):
  """Every weight is its own unit.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> stage = jc.prune.Prune(sparsity=0.9, structure=jc.prune.Unstructured())
  """

  def unit_mask(self, mask):
    return mask


def _reduction_axis(name: str, axis: int | None, shape: tuple[int, ...], path: str) -> int:
  ndim = len(shape)
  if axis is None:
    if ndim < 2:
      raise ValueError(
          f"{name} at {path!r}: the weight has shape {shape}; the default grouping axis is "
          "the input-feature axis of a kernel (ndim - 2), which a 1-D leaf lacks. Select "
          "kernels only, or give axis=0."
      )
    return ndim - 2
  if not -ndim <= axis < ndim:
    raise ValueError(f"{name} at {path!r}: axis={axis} is out of range for shape {shape}.")
  return axis % ndim


@dataclasses.dataclass(frozen=True)
class NM(Structure):
  """N:M sparsity: in every group of ``m`` consecutive weights along the
  reduction axis, the ``n`` highest scores are kept (2:4 keeps 2 of every 4).

  The reduction axis is the input-feature axis, ``ndim - 2``: axis 0 of a Flax
  ``(in, out)`` Dense kernel, axis 2 of a ``(h, w, in, out)`` conv kernel (give
  ``axis`` for other layouts). The density is fixed at ``n / m``, so a
  ``Prune`` with this structure takes ``sparsity=None`` (or exactly
  ``1 - n / m``, checked) and the default ``Uniform`` distribution.
  Selection ranks within each group by pairwise comparison (no sort); ties go
  to the lower index.

  Args:
    n: weights kept per group, ``1 <= n <= m``.
    m: group size.
    pad: when the axis size is not a multiple of ``m``: if False (default) a
      ``ValueError`` is raised; if True the last group is treated as padded
      with entries that are never kept, so it keeps ``min(n, r)`` of its ``r``
      weights.
    axis: the grouping axis; ``None`` means ``ndim - 2``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.prune.Prune(structure=jc.prune.NM(2, 4))])])
    >>> t, s = spec.init({"w": jnp.array([[1.0], [4.0], [3.0], [2.0]])})
    >>> spec.apply(t, s)["w"].ravel().tolist()
    [0.0, 4.0, 3.0, 0.0]
  """

  n: int
  m: int
  pad: bool = False
  axis: int | None = None

  def __post_init__(self):
    for k in ("n", "m"):
      object.__setattr__(self, k, check_int("NM", k, getattr(self, k), low=1))
    if self.n > self.m:
      raise ValueError(f"NM: n ({self.n}) must be at most m ({self.m}); N:M keeps n of every m.")
    if self.axis is not None:
      object.__setattr__(self, "axis", check_int("NM", "axis (or None: ndim - 2)", self.axis))

  @property
  def density(self) -> float:
    return self.n / self.m

  def check(self, shape, path):
    axis = _reduction_axis(f"NM({self.n}, {self.m})", self.axis, tuple(shape), path)
    size = shape[axis]
    if size % self.m and not self.pad:
      raise ValueError(
          f"NM({self.n}, {self.m}) at {path!r}: axis {axis} of shape {tuple(shape)} has size "
          f"{size}, not a multiple of m={self.m}. Give NM({self.n}, {self.m}, pad=True) to "
          f"treat the last group of {size % self.m} as padded, or choose an m that divides {size}."
      )

  def select(self, score, path):
    shape = tuple(score.shape)
    self.check(shape, path)
    axis = _reduction_axis("NM", self.axis, shape, path)
    m, size = self.m, shape[axis]
    s = jnp.moveaxis(score.astype(jnp.float32), axis, -1)
    nan = jnp.isnan(s)
    # Rank key: (class, value). Class 2: a number, 1: NaN, 0: padding.
    cls = jnp.where(nan, jnp.int8(1), jnp.int8(2))
    val = jnp.where(nan, 0.0, s)
    rem = (-size) % m
    if rem:
      widths = [(0, 0)] * (s.ndim - 1) + [(0, rem)]
      cls = jnp.pad(cls, widths, constant_values=0)
      val = jnp.pad(val, widths, constant_values=0.0)
    lead = cls.shape[:-1]
    groups = (size + rem) // m
    cls = cls.reshape(lead + (groups, m))
    val = val.reshape(lead + (groups, m))
    pos = jnp.arange(m)
    rank = jnp.zeros(cls.shape, jnp.int32)
    for j in range(m):  # how many entries of the group beat each entry
      cj, vj = cls[..., j : j + 1], val[..., j : j + 1]
      beats = (cj > cls) | ((cj == cls) & ((vj > val) | ((vj == val) & (j < pos))))
      rank = rank + beats.astype(jnp.int32)
    keep = (rank < self.n).reshape(lead + (groups * m,))[..., :size]
    return jnp.moveaxis(keep, -1, axis)


def _as_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
  try:
    out = tuple(shape)
  except TypeError:
    raise ValueError(f"{name}: shape must be a tuple of positive ints, got {shape!r}.") from None
  if not out or any(not is_int(b) or b < 1 for b in out):
    raise ValueError(f"{name}: shape must be a tuple of positive ints, got {shape!r}.")
  return out


@dataclasses.dataclass(frozen=True)
class Block(Structure):
  """Blocks of ``shape`` weights kept or removed together.

  A block's score is the sum of its weights' scores. The block shape has one
  entry per axis of the weight and must divide the weight's shape.

  Args:
    shape: the block shape, e.g. ``(4, 4)`` or ``(1, 8)`` for a 2-D kernel.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.prune.Prune(sparsity=0.5, structure=jc.prune.Block((1, 2)))])])
    >>> t, s = spec.init({"w": jnp.array([[1.0, 1.0, 3.0, -3.0]])})
    >>> spec.apply(t, s)["w"].tolist()
    [[0.0, 0.0, 3.0, -3.0]]
  """

  shape: tuple[int, ...]

  def __post_init__(self):
    object.__setattr__(self, "shape", _as_shape("Block", self.shape))

  def check(self, shape, path):
    shape = tuple(shape)
    if len(shape) != len(self.shape):
      raise ValueError(
          f"Block({self.shape}) at {path!r}: the weight has {len(shape)} axes {shape} but the "
          f"block shape has {len(self.shape)}; give one block size per axis."
      )
    for a, (d, b) in enumerate(zip(shape, self.shape)):
      if d % b:
        raise ValueError(
            f"Block({self.shape}) at {path!r}: axis {a} of shape {shape} has size {d}, not a "
            f"multiple of the block size {b}; choose a block shape that divides {shape}."
        )

  def _split(self, shape):
    return tuple(x for d, b in zip(shape, self.shape) for x in (d // b, b))

  def reduce(self, score, path):
    self.check(score.shape, path)
    split = score.reshape(self._split(score.shape))
    return jnp.sum(split, axis=tuple(range(1, split.ndim, 2)))

  def unit_mask(self, mask):  # the first weight of every block
    return mask[tuple(slice(None, None, b) for b in self.shape)]

  def expand(self, keep, shape):
    split = self._split(shape)
    ones = tuple(x for u in keep.shape for x in (u, 1))
    return jnp.broadcast_to(keep.reshape(ones), split).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Channel(Structure):
  """Whole output channels (the last axis) kept or removed together.

  A channel's score is the L2 norm of its weights' scores over the other
  axes: for a Flax ``(in, out)`` kernel and ``Magnitude``, the norm of each
  column. A 1-D leaf has one channel per entry. The norm treats negative
  scores like positive ones, so use it with non-negative criteria (magnitude,
  saliency, Wanda, random), not with Movement's signed scores.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.prune.Prune(sparsity=0.5, structure=jc.prune.Channel())])])
    >>> t, s = spec.init({"w": jnp.array([[1.0, 0.1], [1.0, 0.2]])})
    >>> spec.apply(t, s)["w"].tolist()
    [[1.0, 0.0], [1.0, 0.0]]
  """

  def check(self, shape, path):
    if len(shape) < 1:
      raise ValueError(f"Channel at {path!r}: a scalar leaf has no channel axis; select arrays.")

  def reduce(self, score, path):
    self.check(score.shape, path)
    return jnp.sqrt(jnp.sum(jnp.square(score), axis=tuple(range(score.ndim - 1))))

  def unit_mask(self, mask):  # the first row of every channel
    return mask[(0,) * (mask.ndim - 1)]

  def expand(self, keep, shape):
    return jnp.broadcast_to(keep, shape)


"""How a sparsity target is spread over the leaves a rule selects.

A distribution gets one score array per leaf (per weight, or per block or
channel after the structure's ``reduce``), the target sparsity (a traced
float32 scalar) and the leaves' weight shapes, and returns one bool keep-mask
per score array. Counts are exact: a leaf keeps ``round((1 - s) * units)``
units, chosen with ``jaxcompress.core.select.topk_masks`` (no sort; NaN scores
are dropped first, ties go to the lower index), and never fewer than
``min_kept`` (``Prune(min_kept=...)``, default 1; all units of a leaf with
fewer), so that rounding or a global threshold cannot empty a layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxcompress.core.checks import check_int, check_number
from jaxcompress.core.select import topk_masks, topk_rows


def _one(mask: jax.Array | None) -> list[jax.Array] | None:
  return None if mask is None else [mask]


def _n_keep(size: int, density: jax.Array, min_kept: int = 0) -> jax.Array:
  """``round(density * size)``, at least ``min(min_kept, size)``."""
  return jnp.maximum(jnp.round(density * size).astype(jnp.int32), min(min_kept, size))


@dataclasses.dataclass(frozen=True)
class Distribution:
  """Base class of sparsity distributions.

  Example:
    >>> import jaxcompress as jc
    >>> isinstance(jc.prune.Uniform(), jc.prune.Distribution)
    True
  """

  def masks(
      self,
      scores: Sequence[jax.Array],
      sparsity: jax.Array,
      *,
      shapes: Sequence[tuple[int, ...]],
      previous: Sequence[jax.Array] | None = None,
      min_kept: int = 0,
  ) -> list[jax.Array]:
    """One bool keep-mask per score array.

    Args:
      scores: float32 unit scores, one array per leaf.
      sparsity: the target fraction of units removed (a float32 scalar).
      shapes: the weight shape of each leaf (what ERK reads).
      previous: the unit masks of the last update, or None: a guess that
        ``topk_masks`` checks in one pass and returns when it is still exact.
      min_kept: the fewest units each leaf keeps (all of a smaller leaf).

    Returns:
      Bool masks of the shapes of ``scores``.
    """
    raise NotImplementedError(f"{type(self).__name__} does not define masks().")

  def check(self, shape: tuple[int, ...], path: str) -> None:
    """Raises ``ValueError`` naming ``path`` if the distribution cannot prune ``shape``."""
    del shape, path


@dataclasses.dataclass(frozen=True)
class Uniform(Distribution):
  """Every leaf pruned to the same sparsity.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("a|b", [jc.prune.magnitude(sparsity=0.5, distribution=jc.prune.Uniform())])])
    >>> t, s = spec.init({"a": jnp.array([1.0, 3.0]), "b": jnp.array([5.0, 6.0])})
    >>> [s[k].stages["prune"].mask.tolist() for k in "ab"]
    [[False, True], [False, True]]
  """

  def masks(self, scores, sparsity, *, shapes=(), previous=None, min_kept=0):
    del shapes
    prev = previous if previous is not None else [None] * len(scores)
    return [
        topk_masks([s], _n_keep(s.size, 1.0 - sparsity, min_kept), previous=_one(p))[0]
        for s, p in zip(scores, prev)
    ]


@dataclasses.dataclass(frozen=True)
class Global(Distribution):
  """One threshold across all leaves: the total sparsity meets the target.

  With a block or channel structure the units of every leaf compete, and the
  target counts units, not weights. A leaf the threshold leaves with fewer
  than ``min_kept`` units (``Prune(min_kept=...)``) keeps its ``min_kept``
  best instead, so the total can keep a few more units than the target.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> params = {"a": jnp.array([1.0, 3.0]), "b": jnp.array([5.0, 6.0])}
    >>> for min_kept in (0, 1):  # 1, the default: the threshold alone would empty a
    ...   stage = jc.prune.magnitude(sparsity=0.5, distribution=jc.prune.Global(), min_kept=min_kept)
    ...   t, s = jc.Spec([jc.Rule("a|b", [stage])]).init(params)
    ...   print([s[k].stages["prune"].mask.tolist() for k in "ab"])
    [[False, False], [True, True]]
    [[False, True], [True, True]]
  """

  def masks(self, scores, sparsity, *, shapes=(), previous=None, min_kept=0):
    del shapes
    k = _n_keep(sum(s.size for s in scores), 1.0 - sparsity)
    out = topk_masks(list(scores), k, previous=previous)
    if min_kept <= 0:
      return out

    def at_least(s, m):  # a leaf the threshold left short keeps its best min_kept
      need = min(min_kept, s.size)
      return jax.lax.cond(
          jnp.sum(m, dtype=jnp.int32) < need,
          lambda: topk_masks([s], jnp.int32(need))[0],
          lambda: m,
      )

    return [at_least(s, m) for s, m in zip(scores, out)]


@dataclasses.dataclass(frozen=True)
class ERK(Distribution):
  """Erdos-Renyi-Kernel densities (Evci et al. 2020, RigL).

  A leaf of shape ``(d_1, ..., d_k)`` gets density ``eps * p`` with
  ``p = (sum d_i / prod d_i) ** power``, where ``eps`` is chosen so that the
  total number of kept weights is ``(1 - sparsity) * total``. Leaves whose
  density would exceed 1 are kept dense (the largest ``p`` first, as in the
  paper's implementation) and ``eps`` is solved again over the rest. Small
  layers are thus pruned less than large ones. The densities are computed from
  the static shapes and the traced sparsity, so a sparsity schedule works.

  Args:
    power: exponent on ``p`` (RigL's ``erk_power_scale``; 1.0 is ERK, 0.0 is
      uniform).

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> d = jc.prune.ERK().densities([(4, 4), (64, 64)], jnp.float32(0.9))
    >>> [round(x, 4) for x in d.tolist()]
    [1.0, 0.0965]
  """

  power: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "power", check_number("ERK", "power", self.power, low=0.0, high=math.inf, high_open=True))

  def densities(self, shapes: Sequence[tuple[int, ...]], sparsity: jax.Array) -> jax.Array:
    """The density (kept fraction) of each leaf, float32 of shape ``(len(shapes),)``.

    Args:
      shapes: the weight shape of each leaf.
      sparsity: the target total sparsity.

    Returns:
      Densities in ``[0, 1]`` whose size-weighted mean is ``1 - sparsity``.
    """
    sizes = [math.prod(s) for s in shapes]
    raw = [(sum(s) / max(math.prod(s), 1)) ** self.power for s in shapes]
    levels = sorted(set(raw), reverse=True)
    sparsity = jnp.asarray(sparsity, jnp.float32)
    # Candidate j: the leaves at the j highest levels of p are dense. The
    # iterative algorithm stops at the first candidate whose largest density is
    # at most 1; with every leaf dense (j = len(levels)) the densities are all 1.
    valid, eps = [], []
    for j in range(len(levels) + 1):
      dense = [r >= levels[j - 1] if j else False for r in raw]
      ones = sum(n for n, d in zip(sizes, dense) if not d)
      zeros_dense = sum(n for n, d in zip(sizes, dense) if d)
      divisor = sum(r * n for r, n, d in zip(raw, sizes, dense) if not d)
      if j == len(levels) or divisor == 0:
        eps.append(jnp.float32(0.0))
        valid.append(jnp.bool_(True))
        continue
      e = ((1.0 - sparsity) * ones - sparsity * zeros_dense) / divisor
      eps.append(e)
      valid.append(levels[j] * e <= 1.0)
    pick = jnp.argmax(jnp.stack(valid))  # the first valid candidate
    e = jnp.stack(eps)[pick]
    out = []
    for r in raw:
      rank = sum(1 for lv in levels if lv > r)  # dense when pick > rank
      out.append(jnp.where(pick > rank, 1.0, jnp.clip(e * r, 0.0, 1.0)))
    return jnp.stack(out).astype(jnp.float32)

  def masks(self, scores, sparsity, *, shapes, previous=None, min_kept=0):
    d = self.densities(shapes, sparsity)
    prev = previous if previous is not None else [None] * len(scores)
    return [
        topk_masks([s], _n_keep(s.size, d[i], min_kept), previous=_one(prev[i]))[0]
        for i, s in enumerate(scores)
    ]


@dataclasses.dataclass(frozen=True)
class PerOutput(Distribution):
  """Every output channel pruned to the same sparsity (Wanda's per-output comparison).

  Weights compete only with the weights of their own output channel, the
  slices along ``axis``: each keeps ``round((1 - sparsity) * fan)`` of its
  ``fan`` weights (``fan`` the number of weights per output channel), but at
  least ``min(min_kept, fan)`` (``Prune(min_kept=...)``), the highest scores
  of that channel, so no output is pruned more than another.
  With ``Wanda()`` this is the paper's rule (Sun et al. 2024). Selection is
  exact and sort-free (``jaxcompress.core.select.topk_rows``); NaN scores
  are dropped first and ties go to the lower index within the channel.

  Only unstructured pruning (``structure=Unstructured()``, the default) of
  kernels: a 1-D leaf (a bias) has no per-output group to compare in.

  Args:
    axis: the output-feature axis: ``-1`` (default) for a Flax ``(in, out)``
      Dense kernel or a ``(h, w, in, out)`` conv kernel.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> stage = jc.prune.magnitude(sparsity=0.5, distribution=jc.prune.PerOutput())
    >>> spec = jc.Spec([jc.Rule("w", [stage])])
    >>> w = jnp.array([[1.0, 10.0], [2.0, 30.0], [3.0, 20.0], [4.0, 40.0]])  # (in, out)
    >>> _, s = spec.init({"w": w})
    >>> s["w"].stages["prune"].mask.tolist()  # two of four weights kept in each column
    [[False, False], [False, True], [True, False], [True, True]]
  """

  axis: int = -1

  def __post_init__(self):
    object.__setattr__(self, "axis", check_int("PerOutput", "axis", self.axis))

  def check(self, shape, path):
    self._rows_axis(tuple(shape), path)

  def _rows_axis(self, shape: tuple[int, ...], path: str | None = None) -> int:
    ndim = len(shape)
    where = f"PerOutput at {path!r}" if path is not None else "PerOutput"
    if ndim < 2:
      raise ValueError(
          f"{where}: a leaf of shape {shape} has no output-channel groups to compare in "
          "(a 1-D leaf such as a bias); select kernels only, e.g. jc.Rule(r\".*kernel\", ...)."
      )
    if not -ndim <= self.axis < ndim:
      raise ValueError(
          f"{where}: axis={self.axis} is out of range for a leaf of shape {shape}; give the "
          f"output-feature axis, in [-{ndim}, {ndim - 1}] (-1 for (in, out) kernels)."
      )
    return self.axis % ndim

  def masks(self, scores, sparsity, *, shapes=(), previous=None, min_kept=0):
    del shapes
    prev = previous if previous is not None else [None] * len(scores)
    out = []
    for s, p in zip(scores, prev):
      shape = tuple(s.shape)
      axis = self._rows_axis(shape)
      rows = jnp.moveaxis(s, axis, -1).reshape(-1, shape[axis]).T  # (channels, fan)
      fan = rows.shape[1]
      guess = None if p is None else jnp.moveaxis(p, axis, -1).reshape(-1, shape[axis]).T
      keep = topk_rows(rows, _n_keep(fan, 1.0 - sparsity, min_kept), previous=guess)
      moved = tuple(d for i, d in enumerate(shape) if i != axis) + (shape[axis],)
      out.append(jnp.moveaxis(keep.T.reshape(moved), -1, axis))
    return out

"""Rank rules: how many singular directions each factorized leaf keeps.

A rank is a static shape, so it is decided once, at ``spec.init``:

- ``Fixed(rank)``: a given rank (one for every leaf, or one per leaf path);
- ``Fraction(fraction)``: a fraction of each leaf's full rank;
- ``Energy(threshold)``: the smallest rank whose retained energy
  ``sum(s[:r]**2) / sum(s**2)`` reaches ``threshold``;
- ``Budget(params)``: one parameter budget for all the leaves a rule selects,
  spent greedily on the singular values with the largest share of their leaf's
  energy per parameter.

``Fixed`` and ``Fraction`` read shapes only, so they work under ``jax.jit`` and
``jax.eval_shape``. ``Energy`` and ``Budget`` read singular values, so they need
concrete params; ``jaxcompress.lowrank.freeze_ranks`` turns them into ``Fixed``
ranks for use under tracing (``spec.shardings``, ``jax.jit(spec.init)``).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from jaxcompress.core.checks import is_int, is_number

RankValue = Any  # an int, or (r_in, r_out) for Tucker-2


def _check_rank_value(r: Any, where: str) -> RankValue:
  if is_int(r):
    if r < 1:
      raise ValueError(f"{where}: rank must be a positive int, got {r!r}.")
    return int(r)
  if isinstance(r, (tuple, list)) and len(r) == 2 and all(is_int(x) for x in r):
    if min(r) < 1:
      raise ValueError(f"{where}: ranks must be positive ints, got {tuple(r)!r}.")
    return (int(r[0]), int(r[1]))
  raise TypeError(
      f"{where}: rank must be a positive int (or a pair (r_in, r_out) for Tucker-2), "
      f"got {r!r}."
  )


class RankRule:
  """Base class of the rank rules.

  A rule turns, for each leaf a stage owns, the leaf's full rank (and, when
  ``needs_values``, its singular values) into a rank. Subclasses override
  ``select``.

  Example:
    >>> import jaxcompress as jc
    >>> isinstance(jc.lowrank.Energy(0.9), jc.lowrank.RankRule), jc.lowrank.Energy.needs_values
    (True, True)
  """

  #: True when the rule reads singular values (so init needs concrete params).
  needs_values: ClassVar[bool] = False

  def select(
      self,
      full: Sequence[int],
      spectra: Sequence[np.ndarray | None],
      costs: Sequence[int],
      paths: Sequence[str],
  ) -> list[RankValue]:
    """The rank of each item.

    Args:
      full: the full rank of each item (the most it can keep).
      spectra: each item's singular values in decreasing order (``None`` when
        the rule does not need values).
      costs: parameters each unit of rank costs (``rows + cols`` for an SVD).
      paths: each item's leaf path, for error messages.

    Returns:
      One rank per item, in ``[1, full]`` unless the stage checks it later.
    """
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Fixed(RankRule):
  """A given rank: one for every leaf, or one per leaf path.

  Args:
    rank: a positive int, or a mapping ``{leaf path: rank}`` that names every
      leaf the stage owns. Tucker-2 also takes a pair ``(r_in, r_out)``.

  Example:
    >>> import jaxcompress as jc
    >>> jc.lowrank.Fixed({"Dense_0/kernel": 8, "Dense_1/kernel": 4}).rank
    (('Dense_0/kernel', 8), ('Dense_1/kernel', 4))
  """

  rank: RankValue | tuple[tuple[str, RankValue], ...]

  def __post_init__(self):
    r = self.rank
    if isinstance(r, Mapping):
      if not r:
        raise ValueError("Fixed: the mapping {leaf path: rank} is empty; name the leaves.")
      for p in r:
        if not isinstance(p, str):
          raise TypeError(f"Fixed: mapping keys must be leaf path strings, got {p!r}.")
      items = tuple(sorted((p, _check_rank_value(v, f"Fixed, leaf {p!r}")) for p, v in r.items()))
      object.__setattr__(self, "rank", items)
    elif (
        isinstance(r, tuple) and r and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in r)
    ):
      object.__setattr__(self, "rank", tuple(sorted((p, _check_rank_value(v, f"Fixed, leaf {p!r}")) for p, v in r)))
    else:
      object.__setattr__(self, "rank", _check_rank_value(r, "Fixed"))

  def for_path(self, path: str) -> RankValue:
    """The rank given for one leaf path.

    Args:
      path: the leaf path.

    Returns:
      The rank (an int, or a pair for Tucker-2).

    Example:
      >>> import jaxcompress as jc
      >>> jc.lowrank.Fixed(4).for_path("Dense_0/kernel")
      4
    """
    r = self.rank
    if not (isinstance(r, tuple) and r and isinstance(r[0], tuple) and isinstance(r[0][0], str)):
      return r
    table = dict(r)
    if path not in table:
      raise ValueError(
          f"Fixed: no rank given for leaf {path!r}; the mapping names {sorted(table)}. Add "
          "the leaf to the mapping or narrow the rule's pattern."
      )
    return table[path]

  def select(self, full, spectra, costs, paths):
    del full, spectra, costs
    return [self.for_path(p) for p in paths]


@dataclasses.dataclass(frozen=True)
class Fraction(RankRule):
  """A fraction of each leaf's full rank: the smallest ``r`` with ``r / full >= fraction``.

  Args:
    fraction: a number in ``(0, 1]``.

  Example:
    >>> import jaxcompress as jc
    >>> jc.lowrank.Fraction(0.25).select([16, 8], [None, None], [48, 40], ["a", "b"])
    [4, 2]
  """

  fraction: float

  def __post_init__(self):
    f = self.fraction
    if not is_number(f) or not 0.0 < f <= 1.0:
      raise ValueError(
          f"Fraction: fraction must be a number in (0, 1], got {f!r}; 0.25 keeps a quarter "
          "of each leaf's full rank."
      )

  def select(self, full, spectra, costs, paths):
    del spectra, costs, paths
    # The small slack keeps 0.3 * 10 (= 3.0000000000000004) at 3.
    return [min(n, max(1, math.ceil(self.fraction * n - 1e-9))) for n in full]


@dataclasses.dataclass(frozen=True)
class Energy(RankRule):
  """The smallest rank whose retained energy reaches ``threshold``.

  The retained energy of rank ``r`` is ``sum(s[:r]**2) / sum(s**2)`` over the
  leaf's singular values ``s`` (the fraction of ``||W||_F**2`` the rank-``r``
  truncation keeps). A zero leaf gets rank 1.

  Args:
    threshold: a number in ``(0, 1]``; 1 keeps every nonzero direction.

  Example:
    >>> import numpy as np, jaxcompress as jc
    >>> s = np.array([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    >>> jc.lowrank.Energy(0.9).select([3], [s], [6], ["w"])
    [2]
  """

  needs_values: ClassVar[bool] = True
  threshold: float

  def __post_init__(self):
    t = self.threshold
    if not is_number(t) or not 0.0 < t <= 1.0:
      raise ValueError(
          f"Energy: threshold must be a number in (0, 1], got {t!r}; 0.9 keeps the smallest "
          "rank that retains 90% of each leaf's squared Frobenius norm."
      )

  def select(self, full, spectra, costs, paths):
    del costs, paths
    out = []
    for n, s in zip(full, spectra):
      e = np.cumsum(np.square(np.asarray(s, np.float64)))
      if e.size == 0 or e[-1] <= 0.0:
        out.append(1)
        continue
      r = int(np.searchsorted(e / e[-1], self.threshold, side="left")) + 1
      out.append(min(r, n, e.size))
    return out


@dataclasses.dataclass(frozen=True)
class Budget(RankRule):
  """One parameter budget for all the leaves a rule selects.

  Every leaf starts at rank 1. Then, among all leaves, the next singular value
  with the largest share of its leaf's energy per parameter, ``s_r**2 /
  ||W||_F**2 / (rows + cols)``, is kept while its cost fits in what is left of
  the budget (a leaf whose next unit of rank no longer fits stops growing). The
  factors' parameter count, ``sum(r * (rows + cols))``, is therefore at most
  ``params``. Shares of energy, not raw energy, are compared, so a leaf's scale
  does not decide its rank.

  Args:
    params: the number of factor parameters (entries of all ``U`` and ``V``)
      for the leaves of the rule, a positive int.

  Example:
    >>> import numpy as np, jaxcompress as jc
    >>> spectra = [np.array([4.0, 2.0, 1.0]), np.array([1.0, 1.0, 1.0])]
    >>> jc.lowrank.Budget(30).select([3, 3], spectra, [6, 6], ["a", "b"])
    [2, 3]
  """

  needs_values: ClassVar[bool] = True
  params: int

  def __post_init__(self):
    if not is_int(self.params) or self.params < 1:
      raise ValueError(
          f"Budget: params must be a positive int (the factor parameters shared by the "
          f"rule's leaves), got {self.params!r}."
      )

  def select(self, full, spectra, costs, paths):
    minimum = sum(costs)
    if minimum > self.params:
      raise ValueError(
          f"Budget: params={self.params} is below the {minimum} parameters that rank 1 "
          f"already costs for the leaves {list(paths)}; raise the budget to at least "
          f"{minimum} or select fewer leaves."
      )
    ranks = [1] * len(full)
    left = self.params - minimum
    shares = []
    for s in spectra:
      e = np.square(np.asarray(s, np.float64))
      total = e.sum()
      shares.append(e / total if total > 0 else np.zeros_like(e))
    # Max-heap over the next singular value of each leaf; ties go to the lower leaf.
    heap = [(-shares[i][1] / costs[i], i) for i in range(len(full)) if full[i] > 1]
    heapq.heapify(heap)
    while heap:
      _, i = heapq.heappop(heap)
      if costs[i] > left:
        continue  # this leaf's next unit no longer fits; the others may.
      left -= costs[i]
      ranks[i] += 1
      if ranks[i] < full[i]:
        heapq.heappush(heap, (-shares[i][ranks[i]] / costs[i], i))
    return ranks

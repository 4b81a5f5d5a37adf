"""Pruning: bool masks over weights by criterion, structure and distribution.

``Prune`` composes a criterion (``Magnitude``, ``Random``, ``Saliency``,
``Movement``, ``Wanda``), a structure (``Unstructured``, ``NM``, ``Block``,
``Channel``) and a distribution (``Uniform``, ``Global``, ``ERK``,
``PerOutput``), on a sparsity schedule. ``RigL`` and ``SET`` rewire masks at a
fixed sparsity (dynamic sparse training). ``shrink_chain`` removes pruned
channels from Dense and convolution chains, ``shrink_heads`` pruned attention heads.

NaN scores rank lowest (pruned first), ``+inf`` highest (kept); counts of kept
weights are exact either way.
"""

from __future__ import annotations

from typing import Any

from jaxcompress.core.schedules import ScalarOrSchedule
from jaxcompress.prune.criteria import Criterion, Magnitude, Movement, Random, Saliency, Wanda
from jaxcompress.prune.distributions import ERK, Distribution, Global, PerOutput, Uniform
from jaxcompress.prune.dst import SET, DynamicSparse, RigL
from jaxcompress.prune.shrink import Shrunk, shrink_chain, shrink_dense_chain, shrink_heads
from jaxcompress.prune.stage import Prune, PruneState
from jaxcompress.prune.structures import NM, Block, Channel, Structure, Unstructured


def magnitude(sparsity: ScalarOrSchedule, **kwargs: Any) -> Prune:
  """Magnitude pruning: keeps the largest ``|w|``.

  Args:
    sparsity: fraction removed, a number in ``[0, 1)`` or a schedule.
    **kwargs: any other ``Prune`` argument (structure, distribution,
      begin_step, end_step, update_every, straight_through).

  Returns:
    ``Prune(sparsity=sparsity, criterion=Magnitude(), **kwargs)``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5)])])
    >>> t, s = spec.init({"w": jnp.array([1.0, -4.0, 3.0, 2.0])})
    >>> spec.apply(t, s)["w"].tolist()
    [0.0, -4.0, 3.0, 0.0]
  """
  return Prune(sparsity=sparsity, criterion=Magnitude(), **kwargs)


__all__ = [
    "Block",
    "Channel",
    "Criterion",
    "Distribution",
    "DynamicSparse",
    "ERK",
    "Global",
    "Magnitude",
    "Movement",
    "NM",
    "PerOutput",
    "Prune",
    "PruneState",
    "Random",
    "RigL",
    "SET",
    "Saliency",
    "Shrunk",
    "Structure",
    "Uniform",
    "Unstructured",
    "Wanda",
    "magnitude",
    "shrink_chain",
    "shrink_dense_chain",
    "shrink_heads",
]

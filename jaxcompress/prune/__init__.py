"""Pruning: masks over weights by criterion, structure and distribution."""

from jaxcompress.prune.criteria import Magnitude
from jaxcompress.prune.distributions import Global, Uniform
from jaxcompress.prune.stage import Prune, PruneState


def magnitude(sparsity, **kwargs) -> Prune:
  """Magnitude pruning: keeps the largest ``|w|``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> stage = jc.prune.magnitude(sparsity=0.5)
  """
  return Prune(sparsity=sparsity, criterion=Magnitude(), **kwargs)


__all__ = ["Global", "Magnitude", "Prune", "PruneState", "Uniform", "magnitude"]

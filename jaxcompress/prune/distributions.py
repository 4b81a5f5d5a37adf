"""How a sparsity target is spread over the leaves a rule selects."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxcompress.core.select import topk_masks


def _n_keep(size: int, sparsity: jax.Array) -> jax.Array:
  return jnp.round((1.0 - sparsity) * size).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Uniform:
  """Every leaf pruned to the same sparsity."""

  def masks(self, scores, sparsity):
    return [topk_masks([s], _n_keep(s.size, sparsity))[0] for s in scores]


@dataclasses.dataclass(frozen=True)
class Global:
  """One threshold across all leaves: the total sparsity meets the target."""

  def masks(self, scores, sparsity):
    return topk_masks(scores, _n_keep(sum(s.size for s in scores), sparsity))

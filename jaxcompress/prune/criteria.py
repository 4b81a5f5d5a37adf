"""Pruning criteria: a score per weight, higher means kept."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Magnitude:
  """Score ``|w|`` (NaN weights score lowest and are pruned first)."""

  def init_score(self, w):
    return None

  def accumulate(self, w, ctx, score):
    return score

  def score(self, w, *, ctx, state):
    return jnp.abs(w).astype(jnp.float32)

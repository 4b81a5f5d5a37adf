"""The pruning stage: a mask over the weight, recomputed on a schedule."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxcompress.core.schedules import ScalarOrSchedule, as_schedule
from jaxcompress.core.select import topk_masks
from jaxcompress.core.stage import Stage, UpdateContext
from jaxcompress.prune import criteria as _criteria
from jaxcompress.prune import distributions as _dist


class PruneState(NamedTuple):
  """State of one pruned leaf.

  Attributes:
    mask: bool, True where the weight is kept (same shape as the weight).
    score: running score for criteria that accumulate (movement); else None.
  """

  mask: jax.Array
  score: jax.Array | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prune(Stage):
  """Masks a weight: ``apply`` gives ``where(mask, w, 0)``.

  Args:
    sparsity: fraction of weights removed, a number or a schedule of the step.
    criterion: how weights are scored (higher = kept): ``Magnitude()`` etc.
    distribution: how sparsity is spread over the leaves the rule selects:
      ``Uniform()`` (each leaf at ``sparsity``) or ``Global()`` (one threshold).
    begin_step, end_step: masks are recomputed for steps in this range
      (``end_step=None``: no end). Outside it the mask is frozen.
    update_every: recompute the mask every this many steps.
    straight_through: if True the dense weight keeps training (gradients pass
      through the mask) and pruned weights are not zeroed in the trainable.
  """

  name: ClassVar[str] = "prune"

  sparsity: ScalarOrSchedule
  criterion: Any = dataclasses.field(default_factory=lambda: _criteria.Magnitude())
  distribution: Any = dataclasses.field(default_factory=lambda: _dist.Uniform())
  begin_step: int = 0
  end_step: int | None = None
  update_every: int = 1
  straight_through: bool = False

  def __post_init__(self):
    if not callable(self.sparsity):
      s = self.sparsity
      if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
        raise ValueError(
            f"sparsity must be a number in [0, 1) or a schedule, got {s!r}. Sparsity is the "
            "fraction of weights removed: 0.9 keeps one weight in ten."
        )
    if not isinstance(self.update_every, int) or self.update_every < 1:
      raise ValueError(f"update_every must be a positive int, got {self.update_every!r}.")
    if self.end_step is not None and self.end_step < self.begin_step:
      raise ValueError(f"end_step ({self.end_step}) is before begin_step ({self.begin_step}).")

  # -- masks -----------------------------------------------------------------
  def _masks(self, values, ctxs, states, step) -> list[jax.Array]:
    sparsity = as_schedule(self.sparsity, name="sparsity")(step)
    scores = [
        self.criterion.score(v, ctx=c, state=s) for v, c, s in zip(values, ctxs, states)
    ]
    return self.distribution.masks(scores, sparsity)

  def init_group(self, values, *, paths, keys):
    step = jnp.asarray(self.begin_step, jnp.int32)
    ctxs = [UpdateContext(p, step, None, None, k) for p, k in zip(paths, keys)]
    states = [self.criterion.init_score(v) for v in values]
    masks = self._masks(values, ctxs, [None] * len(values), step)
    return [(None, PruneState(m, s)) for m, s in zip(masks, states)]

  def apply(self, value, params, state):
    if self.straight_through:
      # Forward: masked weight; backward: identity to the dense weight.
      masked = jnp.where(state.mask, value, jnp.zeros_like(value))
      return value + jax.lax.stop_gradient(masked - value)
    return jnp.where(state.mask, value, jnp.zeros_like(value))

  def update_mask(self, state):
    return None if self.straight_through else state.mask

  def update_group(self, values, params, states, ctxs):
    step = ctxs[0].step
    accum = [self.criterion.accumulate(v, c, s.score) for v, c, s in zip(values, ctxs, states)]
    in_range = step >= self.begin_step
    if self.end_step is not None:
      in_range &= step <= self.end_step
    due = in_range & ((step - self.begin_step) % self.update_every == 0)

    def recompute(_):
      return self._masks(values, ctxs, accum, step)

    def keep(_):
      return [s.mask for s in states]

    masks = jax.lax.cond(due, recompute, keep, None)
    out = []
    for v, m, a in zip(values, masks, accum):
      if not self.straight_through:
        v = jnp.where(m, v, jnp.zeros_like(v))
      out.append((v, None, PruneState(m, a)))
    return out

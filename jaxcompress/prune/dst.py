"""Dynamic sparse training: the mask changes while its sparsity stays fixed.

RigL (Evci et al. 2020) and SET (Mocanu et al. 2018) start from a sparse mask
(built like ``Prune``: any criterion and distribution, ERK in the RigL paper)
and, every ``update_every`` steps in ``[begin_step, end_step)``, rewire each
leaf:

1. drop: of the ``k`` active weights, the ``round(f(t) * k)`` with the lowest
   ``|w|`` are removed;
2. grow: as many inactive weights are added, those with the highest ``|g|``
   (RigL, ``g`` the gradient passed to ``spec.update``) or chosen at random
   (SET); a grown weight that was inactive before the update starts at 0.

``f(t) = drop_fraction * 0.5 * (1 + cos(pi * t / T))`` with
``t = step - begin_step`` and ``T = end_step - begin_step``. Each leaf keeps
exactly ``k`` active weights. NaN weights are dropped first; NaN gradient
scores are grown last.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxcompress.core.checks import is_int, is_number
from jaxcompress.core.select import topk_masks
from jaxcompress.core.stage import Stage, UpdateContext
from jaxcompress.prune import criteria as _criteria
from jaxcompress.prune import distributions as _dist
from jaxcompress.prune.stage import (
    Prune,
    PruneState,
    _check_part,
    compiled_update_group,
)


def _nan_low(x: jax.Array) -> jax.Array:
  """NaN -> -inf: such entries rank above the NaN that marks excluded entries."""
  return jnp.where(jnp.isnan(x), -jnp.inf, x)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicSparse(Stage):
  """Base class of RigL and SET: drop by magnitude, grow by ``grow_score``.

  Args:
    sparsity: the fixed fraction of weights removed, in ``[0, 1)``.
    end_step: ``T``: the last mask update is before this step.
    update_every: ``delta T``: steps between mask updates.
    drop_fraction: ``alpha``, the fraction of active weights rewired at
      ``begin_step``; it decays to 0 at ``end_step`` on a cosine.
    begin_step: the first mask update.
    criterion: scores for the initial mask (default ``Magnitude()``; the
      RigL paper uses a random mask: ``Random()``, which needs ``key``).
    distribution: spreads ``sparsity`` over the leaves at init (``Uniform()``
      default, ``ERK()`` in the paper, ``Global()``); each leaf's count of
      active weights then stays fixed.

  Subclasses define ``grow_score(value, ctx)``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> class GrowLargestIndex(jc.prune.DynamicSparse):
    ...   def grow_score(self, value, ctx):
    ...     return jnp.arange(value.size, dtype=jnp.float32).reshape(value.shape)
    >>> stage = GrowLargestIndex(sparsity=0.5, end_step=4, update_every=1, drop_fraction=0.5)
    >>> spec = jc.Spec([jc.Rule("w", [stage])])
    >>> t, s = spec.init({"w": jnp.array([4.0, 3.0, 2.0, 1.0])})
    >>> t, s = spec.update(t, s, 0)
    >>> s["w"].stages["prune"].mask.tolist()
    [True, False, False, True]
  """

  name: ClassVar[str] = "prune"

  sparsity: float
  end_step: int
  update_every: int = 100
  drop_fraction: float = 0.3
  begin_step: int = 0
  criterion: _criteria.Criterion = dataclasses.field(default_factory=_criteria.Magnitude)
  distribution: _dist.Distribution = dataclasses.field(default_factory=_dist.Uniform)

  def __post_init__(self):
    kind = type(self).__name__
    s = self.sparsity
    if not is_number(s) or not 0.0 <= float(s) < 1.0:
      raise ValueError(
          f"{kind}: sparsity must be a number in [0, 1), got {s!r}; dynamic sparse training "
          "keeps a fixed sparsity (a schedule is not supported)."
      )
    a = self.drop_fraction
    if not is_number(a) or not 0.0 < float(a) <= 1.0:
      raise ValueError(f"{kind}: drop_fraction must be in (0, 1], got {a!r} (RigL uses 0.3).")
    for k, low, what in [("begin_step", 0, "non-negative"), ("end_step", 0, "non-negative"),
                         ("update_every", 1, "positive")]:
      v = getattr(self, k)
      if not is_int(v) or v < low:
        raise ValueError(f"{kind}: {k} must be a {what} int, got {v!r}.")
    if self.end_step <= self.begin_step:
      raise ValueError(
          f"{kind}: end_step ({self.end_step}) must be after begin_step ({self.begin_step}); "
          "masks are rewired for steps in [begin_step, end_step)."
      )
    _check_part("criterion", self.criterion, _criteria.Criterion, "jc.prune.Random()")
    _check_part("distribution", self.distribution, _dist.Distribution, "jc.prune.ERK()")

  def grow_score(self, value: jax.Array, ctx: UpdateContext) -> jax.Array:
    """float32 scores of the inactive weights to grow (highest first)."""
    raise NotImplementedError(f"{type(self).__name__} does not define grow_score().")

  def drop_fraction_at(self, step: jax.Array | int) -> jax.Array:
    """``f(t)``: the fraction of active weights rewired at ``step`` (float32).

    Example:
      >>> import jaxcompress as jc
      >>> rigl = jc.prune.RigL(sparsity=0.9, end_step=100, drop_fraction=0.3)
      >>> [round(float(rigl.drop_fraction_at(t)), 4) for t in (0, 50, 100)]
      [0.3, 0.15, 0.0]
    """
    t = jnp.asarray(step, jnp.float32) - self.begin_step
    t = jnp.clip(t / (self.end_step - self.begin_step), 0.0, 1.0)
    return self.drop_fraction * 0.5 * (1.0 + jnp.cos(math.pi * t))

  def init_group(self, values, *, paths, keys):
    initial = Prune(sparsity=self.sparsity, criterion=self.criterion, distribution=self.distribution)
    out = initial.init_group(values, paths=paths, keys=keys)
    return [(None, PruneState(st.mask, None)) for _, st in out]

  def update_group(self, values, params, states, ctxs):
    return compiled_update_group(self, values, states, ctxs)

  def _update_impl(self, values, states, ctxs):
    return [self.update(v, None, s, c) for v, s, c in zip(values, states, ctxs)]

  def apply(self, value, params, state):
    return jnp.where(state.mask, value, jnp.zeros_like(value))

  def update_mask(self, state):
    return state.mask

  def update(self, value, params, state, ctx):
    step = ctx.step
    mask = state.mask
    due = (step >= self.begin_step) & (step < self.end_step)
    due &= (step - self.begin_step) % self.update_every == 0

    def rewire(_):
      active = jnp.sum(mask, dtype=jnp.int32)
      n_drop = jnp.round(self.drop_fraction_at(step) * active).astype(jnp.int32)
      magnitude = _nan_low(jnp.abs(value.astype(jnp.float32)))
      kept = topk_masks([jnp.where(mask, magnitude, jnp.nan)], active - n_drop)[0]
      grow = _nan_low(self.grow_score(value, ctx))
      grown = topk_masks([jnp.where(kept, jnp.nan, grow)], n_drop)[0]
      return kept | grown

    new_mask = jax.lax.cond(due, rewire, lambda _: mask, None)
    # Dropped weights become 0; newly grown ones start at 0; the rest keep their value.
    value = jnp.where(new_mask & mask, value, jnp.zeros_like(value))
    return value, None, PruneState(new_mask, None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RigL(DynamicSparse):
  """RigL (Evci et al. 2020): grow the inactive weights with the largest ``|grad|``.

  Every ``spec.update`` call needs ``grads`` (the gradient with respect to
  the model params, which is dense: inactive weights have a gradient too), as
  ``jc.make_train_step`` passes. Arguments: see ``DynamicSparse``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> stage = jc.prune.RigL(sparsity=0.5, end_step=10, update_every=1, drop_fraction=0.5)
    >>> spec = jc.Spec([jc.Rule("w", [stage])])
    >>> t, s = spec.init({"w": jnp.array([4.0, 3.0, 2.0, 1.0])})
    >>> t, s = spec.update(t, s, 0, grads={"w": jnp.array([0.0, 0.0, 0.0, 9.0])})
    >>> s["w"].stages["prune"].mask.tolist(), spec.apply(t, s)["w"].tolist()
    ([True, False, False, True], [4.0, 0.0, 0.0, 0.0])
  """

  keeps_sharding: ClassVar[bool] = True  # drop and grow select on the shards (core.select)

  def grow_score(self, value, ctx):
    if ctx.grad is None:
      raise ValueError(
          f"RigL at {ctx.path!r} needs the gradient on every spec.update call to choose the "
          "weights to grow: pass grads= (the gradient of the loss with respect to "
          "spec.apply's output), as jc.make_train_step does."
      )
    return jnp.abs(ctx.grad.astype(jnp.float32))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SET(DynamicSparse):
  """SET (Mocanu et al. 2018): grow inactive weights chosen at random.

  Every ``spec.update`` call needs ``key`` (folded with the step and the leaf
  path by the spec, so each update draws anew). Arguments: see
  ``DynamicSparse``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> stage = jc.prune.SET(sparsity=0.5, end_step=10, update_every=1, drop_fraction=0.5)
    >>> spec = jc.Spec([jc.Rule("w", [stage])])
    >>> t, s = spec.init({"w": jnp.arange(1.0, 9.0)})
    >>> t, s = spec.update(t, s, 0, key=jax.random.key(0))
    >>> int(s["w"].stages["prune"].mask.sum()), s["w"].stages["prune"].mask[6:].tolist()
    (4, [True, True])
  """

  keeps_sharding: ClassVar[bool] = True  # drop and grow select on the shards (core.select)

  def grow_score(self, value, ctx):
    if ctx.key is None:
      raise ValueError(
          f"SET at {ctx.path!r} needs a PRNG key on every spec.update call to choose the "
          "weights to grow at random: pass key= to spec.update (jc.init_train_state(..., "
          "key=...) for jc.make_train_step)."
      )
    return jax.random.uniform(ctx.key, value.shape, jnp.float32)

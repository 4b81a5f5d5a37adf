"""The pruning stage: a bool mask over the weight, recomputed on a schedule.

``Prune`` composes three small parts:

- a criterion (``jaxcompress.prune.criteria``): a score per weight;
- a structure (``jaxcompress.prune.structures``): which weights go together
  (unstructured, N:M, blocks, output channels);
- a distribution (``jaxcompress.prune.distributions``): how the sparsity is
  spread over the leaves the rule selects (uniform, global, ERK).

A mask update computes ``scores -> units -> keep-masks -> weight masks``; the
count of kept units is exact and found without a sort.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxcompress.core.checks import check_int, is_number
from jaxcompress.core.schedules import ScalarOrSchedule, as_schedule, check_schedule
from jaxcompress.core.stage import Stage, UpdateContext
from jaxcompress.prune import criteria as _criteria
from jaxcompress.prune import distributions as _dist
from jaxcompress.prune import structures as _struct


class PruneState(NamedTuple):
  """State of one pruned leaf.

  Attributes:
    mask: bool, True where the weight is kept (same shape as the weight).
    score: the criterion's running state (Movement's accumulated score,
      Random's draw; float32, the weight's shape), or None.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5)])])
    >>> _, state = spec.init({"w": jnp.array([1.0, -2.0])})
    >>> st = state["w"].stages["prune"]
    >>> isinstance(st, jc.prune.PruneState), st.mask.tolist(), st.score
    (True, [False, True], None)
  """

  mask: jax.Array
  score: jax.Array | None


def _check_part(name: str, value: Any, base: type, examples: str) -> None:
  if not isinstance(value, base):
    raise TypeError(
        f"Prune: {name} must be a {base.__name__} instance such as {examples}, got {value!r}."
    )


def _check_steps(begin_step: Any, end_step: Any, update_every: Any) -> None:
  check_int("Prune", "begin_step", begin_step, low=0)
  if end_step is not None:
    check_int("Prune", "end_step (or None: no end)", end_step)
  check_int("Prune", "update_every", update_every, low=1)
  if end_step is not None and end_step < begin_step:
    raise ValueError(f"Prune: end_step ({end_step}) is before begin_step ({begin_step}).")


@jax.custom_jvp
def _straight_through(value: jax.Array, mask: jax.Array) -> jax.Array:
  """Forward ``where(mask, value, 0)``; derivative: the identity to ``value``."""
  return jnp.where(mask, value, jnp.zeros_like(value))


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
  value, mask = primals
  return _straight_through(value, mask), tangents[0]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prune(Stage):
  """Masks a weight: ``apply`` gives ``where(mask, w, 0)``; the mask is bool.

  At ``spec.init`` the mask is computed at ``sparsity(begin_step)``. On a
  ``spec.update`` at a step in ``[begin_step, end_step)`` with
  ``(step - begin_step) % update_every == 0`` it is recomputed; at other steps
  it is kept. Unless ``straight_through``, every update also writes the masked
  weight back to the trainable, so pruned weights are exact zeros.

  Args:
    sparsity: fraction of weights (or blocks/channels) removed, a number in
      ``[0, 1)`` or a schedule of the step (``jc.schedules``). Leave it
      ``None`` with ``NM``, whose density is fixed (or give exactly
      ``1 - n / m``).
    criterion: how weights are scored: ``Magnitude()`` (default), ``Random()``,
      ``Saliency()``, ``Movement()``, ``Wanda()``.
    structure: ``Unstructured()`` (default), ``NM(n, m)``, ``Block(shape)``,
      ``Channel()``.
    distribution: ``Uniform()`` (default: each leaf at ``sparsity``),
      ``Global()`` (one threshold over the rule's leaves), ``ERK()``, or
      ``PerOutput()`` (each output channel at ``sparsity``, as Wanda ranks).
    begin_step, end_step: masks are recomputed for steps in
      ``[begin_step, end_step)`` (``end_step=None``: no end). One-shot:
      ``end_step=begin_step`` keeps the mask made by ``spec.init``;
      ``end_step=begin_step + 1`` recomputes it once, at the first update (with
      the gradients or statistics that update gets). With a sparsity schedule
      ending at step ``E``, leave ``end_step=None`` or give at least ``E + 1``
      so that the final sparsity is reached.
    update_every: recompute every this many steps.
    straight_through: if True the dense weight keeps training (gradients pass
      through the mask to every weight) and pruned weights are not zeroed.
    min_kept: the fewest units a leaf keeps (weights; blocks or channels with
      a ``Block``/``Channel`` structure), default 1, so that rounding the kept
      count or a ``Global`` threshold never empties a layer. ``Uniform`` and
      ``ERK``: each leaf keeps at least ``min_kept`` units; ``Global``: the
      threshold is applied first, then a leaf left with fewer than
      ``min_kept`` units keeps its ``min_kept`` best (so the total sparsity can
      fall slightly below the target); ``PerOutput``: each output channel
      keeps at least ``min_kept`` weights. A leaf (or channel) with fewer
      units keeps them all. ``NM`` keeps ``n`` in every group and ignores it;
      ``min_kept=0`` turns it off.

  Sparsity schedules are checked when the stage is built: every value must
  lie in ``[0, 1)`` (``jc.schedules.check_schedule``: the library's schedules
  exactly, a user function at ``begin_step``, ``end_step`` and steps between).

  The model always sees exact zeros where the mask is False. Otherwise the
  trainable weight is zeroed where a recompute prunes it (at init it keeps its
  values, so a criterion that reads gradients can still revive them at its
  first update) and ``jc.masked_optimizer`` freezes it and keeps its moments
  at zero between recomputes.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> sched = jc.schedules.polynomial(0.0, 0.75, begin_step=0, end_step=2)
    >>> spec = jc.Spec([jc.Rule("w", [jc.prune.Prune(sparsity=sched)])])
    >>> t, s = spec.init({"w": jnp.arange(1.0, 9.0)})
    >>> for step in range(3):
    ...   t, s = spec.update(t, s, step)
    >>> t["w"].tolist()
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0, 8.0]
  """

  name: ClassVar[str] = "prune"

  @property
  def keeps_sharding(self) -> bool:  # type: ignore[override]
    """Unstructured and N:M masks are selected on the shards (``core.select``); blocks,
    channels and per-output ranking reshape or slice the leaf, so they take it whole."""
    return isinstance(self.structure, (_struct.Unstructured, _struct.NM)) and not isinstance(
        self.distribution, _dist.PerOutput
    )

  sparsity: ScalarOrSchedule | None = None
  criterion: _criteria.Criterion = dataclasses.field(default_factory=_criteria.Magnitude)
  structure: _struct.Structure = dataclasses.field(default_factory=_struct.Unstructured)
  distribution: _dist.Distribution = dataclasses.field(default_factory=_dist.Uniform)
  begin_step: int = 0
  end_step: int | None = None
  update_every: int = 1
  straight_through: bool = False
  min_kept: int = 1

  def __post_init__(self):
    _check_part("criterion", self.criterion, _criteria.Criterion, "jc.prune.Magnitude()")
    _check_part("structure", self.structure, _struct.Structure, "jc.prune.NM(2, 4)")
    _check_part("distribution", self.distribution, _dist.Distribution, "jc.prune.Global()")
    _check_steps(self.begin_step, self.end_step, self.update_every)
    object.__setattr__(self, "min_kept", check_int("Prune", "min_kept", self.min_kept, low=0))
    if isinstance(self.distribution, _dist.PerOutput) and not isinstance(
        self.structure, _struct.Unstructured
    ):
      raise ValueError(
          f"Prune: {self.distribution!r} ranks single weights within each output channel, so "
          f"it cannot take the structure {self.structure!r}; leave structure as the default "
          "Unstructured(), or use another distribution (Uniform, Global, ERK) with it."
      )
    fixed = self.structure.density
    s = self.sparsity
    if fixed is not None:
      if not isinstance(self.distribution, _dist.Uniform):
        raise ValueError(
            f"Prune: {self.structure!r} fixes its own density ({fixed:g} of the weights of "
            f"every group are kept), so it cannot take the distribution "
            f"{self.distribution!r}; leave distribution as the default Uniform()."
        )
      if s is not None and (callable(s) or not is_number(s) or abs(float(s) - (1.0 - fixed)) > 1e-9):
        raise ValueError(
            f"Prune: sparsity={s!r} does not match {self.structure!r}, whose sparsity is "
            f"fixed at {1.0 - fixed:g}; leave sparsity=None."
        )
      return
    if s is None:
      raise ValueError(
          "Prune: sparsity is required (a number in [0, 1) or a schedule), e.g. "
          "Prune(sparsity=0.9) removes nine weights in ten. Only NM(n, m) fixes its own."
      )
    if callable(s):
      check_schedule(
          "Prune", "sparsity", s, low=0.0, high=1.0, high_open=True,
          begin_step=self.begin_step, end_step=self.end_step,
      )
      return
    if not is_number(s):
      raise TypeError(
          f"Prune: sparsity must be a number in [0, 1) or a schedule (a function of the step), "
          f"got {s!r} of type {type(s).__name__}. Sparsity is the fraction of weights removed: "
          "0.9 keeps one weight in ten."
      )
    if not 0.0 <= float(s) < 1.0:  # also NaN
      raise ValueError(
          f"Prune: sparsity must be a number in [0, 1) or a schedule, got {s!r}. Sparsity is "
          "the fraction of weights removed: 0.9 keeps one weight in ten, 1.0 would remove all."
      )
    object.__setattr__(self, "sparsity", float(s))  # a numpy or 0-d jax scalar, kept hashable

  # -- masks -----------------------------------------------------------------
  def _lazy(self, values, scores, states, ctxs) -> list[Any]:
    """The criterion's ``lazy_score`` where the select takes it; else ``scores``.

    Unstructured units and the distributions that hand scores straight to
    ``core.select.topk_masks`` take them; the select then recomputes them in
    each counting pass instead of holding a copy of the leaf.
    """
    if type(self.structure) is not _struct.Unstructured or type(self.distribution) not in (
        _dist.Uniform, _dist.Global, _dist.ERK,
    ):
      return scores
    lazy = [self.criterion.lazy_score(v, st, c) for v, st, c in zip(values, states, ctxs)]
    return [s if z is None else z for s, z in zip(scores, lazy)]

  def _masks(self, values, scores, paths, step, previous=None) -> list[jax.Array]:
    if self.structure.density is not None:
      return [self.structure.select(s, p) for s, p in zip(scores, paths)]
    sparsity = jnp.asarray(as_schedule(self.sparsity, name="sparsity")(step), jnp.float32)
    units = [self.structure.reduce(s, p) for s, p in zip(scores, paths)]
    if previous is not None:  # last update's unit masks: checked, reused when still exact
      previous = [self.structure.unit_mask(m) for m in previous]
      if any(m is None for m in previous):
        previous = None
    keep = self.distribution.masks(
        units, sparsity, shapes=[tuple(v.shape) for v in values], previous=previous,
        min_kept=self.min_kept,
    )
    return [self.structure.expand(k, tuple(v.shape)) for k, v in zip(keep, values)]

  def init_group(self, values, *, paths, keys):
    for v, p in zip(values, paths):
      self.structure.check(tuple(v.shape), p)
      self.distribution.check(tuple(v.shape), p)
    return compiled_init_group(self, values, paths, keys)

  def _init_impl(self, values, paths, keys):
    step = jnp.asarray(self.begin_step, jnp.int32)
    ctxs = [UpdateContext(p, step, None, None, k) for p, k in zip(paths, keys)]
    states = [self.criterion.init_state(v, c) for v, c in zip(values, ctxs)]
    scores = [self.criterion.init_score(v, s, c) for v, s, c in zip(values, states, ctxs)]
    masks = self._masks(values, self._lazy(values, scores, states, ctxs), paths, step)
    return [(None, PruneState(m, s)) for m, s in zip(masks, states)]

  def apply(self, value, params, state):
    if self.straight_through:
      # Forward: the masked weight (a select: a pruned NaN or inf gives 0);
      # backward: the identity to the dense weight.
      return _straight_through(value, state.mask)
    return jnp.where(state.mask, value, jnp.zeros_like(value))

  def update_mask(self, state):
    return None if self.straight_through else state.mask

  def update_group(self, values, params, states, ctxs):
    for v, c in zip(values, ctxs):  # concrete inputs: checked here, at once
      self.criterion.check(v, c)
    return compiled_update_group(self, values, states, ctxs)

  def _update_impl(self, values, states, ctxs):
    step = ctxs[0].step
    paths = [c.path for c in ctxs]
    accum = [self.criterion.accumulate(v, s.score, c) for v, s, c in zip(values, states, ctxs)]
    due = step >= self.begin_step
    if self.end_step is not None:
      due &= step < self.end_step
    due &= (step - self.begin_step) % self.update_every == 0

    def recompute(_):
      scores = [self.criterion.score(v, a, c) for v, a, c in zip(values, accum, ctxs)]
      scores = self._lazy(values, scores, accum, ctxs)
      masks = self._masks(values, scores, paths, step, [s.mask for s in states])
      if self.straight_through:
        out = list(values)
      else:
        # Newly pruned weights are zeroed once, here; between recomputes the
        # masked optimizer keeps them at zero (and apply masks them regardless).
        out = [jnp.where(m, v, jnp.zeros_like(v)) for m, v in zip(masks, values)]
      # Traced invalid inputs (e.g. a negative Wanda statistic) cannot raise
      # here without a host sync: the leaf's weights become NaN, so the next
      # loss shows it instead of a silently wrong mask.
      bad = [self.criterion.check(v, c) for v, c in zip(values, ctxs)]
      out = [o if b is None else jnp.where(b, jnp.full_like(o, jnp.nan), o) for o, b in zip(out, bad)]
      return masks, out

    def keep(_):
      return [s.mask for s in states], list(values)

    if self.end_step is not None and self.end_step <= self.begin_step:
      masks, values = keep(None)  # a one-shot mask made at init: never recomputed
    else:
      masks, values = jax.lax.cond(due, recompute, keep, None)
    return [(v, None, PruneState(m, a)) for v, m, a in zip(values, masks, accum)]


# The group computations of a pruning stage run as one compiled function, so
# that eager calls (spec.init outside jit) compile once instead of op by op;
# under an outer jit they are inlined. The stage and the paths are static.


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_jit(stage, values, paths, keys):
  return stage._init_impl(values, paths, keys)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _update_jit(stage, values, states, paths, rest):
  ctxs = [UpdateContext(p, *r) for p, r in zip(paths, rest)]
  return stage._update_impl(values, states, ctxs)


def compiled_init_group(stage: Stage, values, paths, keys) -> list:
  """``stage._init_impl(values, paths, keys)``, compiled as one function."""
  return _init_jit(stage, list(values), tuple(paths), list(keys))


def compiled_update_group(stage: Stage, values, states, ctxs) -> list:
  """``stage._update_impl(values, states, ctxs)``, compiled as one function."""
  paths = tuple(c.path for c in ctxs)
  rest = [(c.step, c.grad, c.stat, c.key) for c in ctxs]
  return _update_jit(stage, list(values), list(states), paths, rest)

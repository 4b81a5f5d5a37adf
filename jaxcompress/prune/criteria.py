"""Pruning criteria: a float32 score per weight; higher scores are kept.

A criterion is a small frozen dataclass that ``Prune`` calls at three points:

- ``init_state(w, ctx)``: the running state kept in ``PruneState.score``
  (``None`` for criteria that keep none);
- ``accumulate(w, state, ctx)``: the state after one ``spec.update`` call
  (Movement adds ``-w * g`` here, on every call);
- ``score(w, state, ctx)``: the scores a mask update ranks. At ``spec.init``
  ``init_score`` is used instead: ``init`` sees no gradients and no statistics,
  so the criteria that need them (Saliency, Movement, Wanda) fall back to
  magnitude there.

Ranking of non-finite scores (the same everywhere in ``jaxcompress.prune``):
NaN ranks below every number and is pruned first; ``+inf`` ranks above every
number and is kept; ``-inf`` ranks just above NaN. So a NaN weight is pruned by
magnitude, an infinite one kept, and a product that is NaN (``inf * 0`` in
Saliency or Wanda) is pruned.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.checks import is_concrete
from jaxcompress.core.select import LazyScores
from jaxcompress.core.stage import UpdateContext


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Criterion:
  """Base class of pruning criteria. Subclasses override ``score``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> class Square(jc.prune.Criterion):
    ...   def score(self, w, state, ctx):
    ...     return (w * w).astype(jnp.float32)
    >>> stage = jc.prune.Prune(sparsity=0.5, criterion=Square())
  """

  def init_state(self, w: jax.Array, ctx: UpdateContext) -> jax.Array | None:
    """The running state of one leaf at ``spec.init`` (``None``: no state)."""
    del w, ctx
    return None

  def accumulate(self, w: jax.Array, state: Any, ctx: UpdateContext) -> Any:
    """The state after one ``spec.update`` call (``w`` is the trainable weight)."""
    del w, ctx
    return state

  def score(self, w: jax.Array, state: Any, ctx: UpdateContext) -> jax.Array:
    """float32 scores of the shape of ``w``; higher is kept."""
    raise NotImplementedError(f"{type(self).__name__} does not define score().")

  def init_score(self, w: jax.Array, state: Any, ctx: UpdateContext) -> jax.Array:
    """Scores for the mask made by ``spec.init`` (no gradients or stats there)."""
    return self.score(w, state, ctx)

  def lazy_score(self, w: jax.Array, state: Any, ctx: UpdateContext) -> LazyScores | None:
    """``score`` for the select to recompute in each counting pass, or None (the default).

    A criterion whose score is cheap and elementwise in ``w`` returns it as
    ``jaxcompress.core.select.LazyScores``: the unstructured select then holds
    neither the scores nor their uint32 image (a copy of the leaf each). The
    result must equal ``score``'s (init and updates use it alike).

    Example:
      >>> import jax.numpy as jnp, jaxcompress as jc
      >>> lazy = jc.prune.Magnitude().lazy_score(jnp.array([1.0, -2.0]), None, None)
      >>> lazy(jnp.uint32(0)).tolist(), jc.prune.Random().lazy_score(jnp.ones(2), None, None)
      ([1.0, 2.0], None)
    """
    del w, state, ctx
    return None

  def check(self, w: jax.Array, ctx: UpdateContext) -> jax.Array | None:
    """Checks the inputs of one ``spec.update`` (gradients, statistics).

    ``Prune`` calls it before its update with the inputs as given: concrete
    invalid inputs raise a ``ValueError`` naming the leaf. Inside its compiled
    update it calls it again; the inputs are then traced and it returns a
    bool scalar (True: invalid), and a mask recompute with invalid inputs
    makes the leaf's weights NaN (a host check there would cost every train
    step a sync). ``None``: nothing to check (the default).
    """
    del w, ctx
    return None


@dataclasses.dataclass(frozen=True)
class Magnitude(Criterion):
  """Score ``|w|``: the largest weights are kept.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Magnitude())])])
    >>> t, s = spec.init({"w": jnp.array([0.1, -3.0, 2.0, -0.2])})
    >>> spec.apply(t, s)["w"].tolist()
    [0.0, -3.0, 2.0, 0.0]
  """

  def score(self, w, state, ctx):
    del state, ctx
    return jnp.abs(_f32(w))

  def lazy_score(self, w, state, ctx):
    # The zero enters at w, so that XLA cannot hoist |w| out of the select's loop.
    return LazyScores(lambda zero: self.score(w + zero.astype(w.dtype), state, ctx), w.shape)


@dataclasses.dataclass(frozen=True)
class Random(Criterion):
  """Random scores: a uniform draw per weight, made once at ``spec.init``.

  The draw is kept in ``PruneState.score`` and reused by every mask update, so
  as a sparsity schedule grows the masks are nested (a pruned weight stays
  pruned) and the same key gives the same masks. ``spec.init`` needs a
  ``key``; ``spec.update`` does not.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.prune.Prune(sparsity=0.75, criterion=jc.prune.Random())])])
    >>> t, s = spec.init({"w": jnp.ones(8)}, key=jax.random.key(0))
    >>> int(s["w"].stages["prune"].mask.sum())
    2
  """

  def init_state(self, w, ctx):
    if ctx.key is None:
      raise ValueError(
          f"Random criterion at {ctx.path!r} needs a PRNG key to draw its scores: pass "
          "key= to spec.init, e.g. spec.init(params, key=jax.random.key(0))."
      )
    return jax.random.uniform(ctx.key, jnp.shape(w), jnp.float32)

  def score(self, w, state, ctx):
    del w, ctx
    return state


def _need_grad(name: str, ctx: UpdateContext, w: jax.Array) -> jax.Array:
  if ctx.grad is None:
    raise ValueError(
        f"{name} criterion at {ctx.path!r} needs the gradient on every spec.update call: "
        "pass grads= (the gradient of the loss with respect to spec.apply's output, with "
        "the structure of the params), as jc.make_train_step does."
    )
  if ctx.grad.shape != jnp.shape(w):
    raise ValueError(
        f"{name} criterion at {ctx.path!r}: the gradient has shape {ctx.grad.shape}, but "
        f"the weight has shape {jnp.shape(w)}; pass the gradient of the model params."
    )
  return _f32(ctx.grad)


@dataclasses.dataclass(frozen=True)
class Saliency(Criterion):
  """Score ``|w * g|`` (SNIP, Lee et al. 2019), ``g`` the gradient from ``spec.update``.

  ``spec.init`` has no gradient, so the initial mask uses ``|w|``. For SNIP's
  one-shot pruning at initialization give ``end_step=1``: the update at step 0
  (with ``grads``) replaces the magnitude mask by the saliency mask, which then
  stays fixed. Every ``spec.update`` call needs ``grads``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Saliency())])])
    >>> t, s = spec.init({"w": jnp.array([1.0, 2.0, 3.0, 4.0])})
    >>> g = {"w": jnp.array([4.0, 0.1, 0.1, 1.0])}
    >>> t, s = spec.update(t, s, 0, grads=g)
    >>> s["w"].stages["prune"].mask.tolist()
    [True, False, False, True]
  """

  def score(self, w, state, ctx):
    del state
    g = _need_grad("Saliency", ctx, w)
    return jnp.abs(_f32(w) * g)

  def init_score(self, w, state, ctx):
    del state, ctx
    return jnp.abs(_f32(w))


@dataclasses.dataclass(frozen=True)
class Movement(Criterion):
  """Movement pruning (Sanh et al. 2020): score ``S = -sum_t w_t * g_t``.

  ``S`` accumulates on every ``spec.update`` call (``S += -w * g``, ``w`` the
  trainable weight after the optimizer step and ``g`` the gradient passed as
  ``grads``) and lives in ``PruneState.score`` (float32). Weights moving away
  from zero score high. ``S`` is zero at ``spec.init``, so the initial mask
  uses ``|w|``. Pruned weights are zeroed in the trainable and stop moving;
  give ``straight_through=True`` to keep them training (and their scores
  changing), as in the paper. Every ``spec.update`` call needs ``grads``.
  Entries whose ``w * g`` is not finite (a NaN or inf gradient, as on a step
  that ``optax.apply_if_finite`` skips) add nothing to ``S`` on that call.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Movement())])])
    >>> t, s = spec.init({"w": jnp.array([1.0, 1.0, -1.0, -1.0])})
    >>> g = {"w": jnp.array([-1.0, 1.0, -1.0, 1.0])}  # entries 0 and 3 move away from 0
    >>> t, s = spec.update(t, s, 0, grads=g)
    >>> s["w"].stages["prune"].mask.tolist(), s["w"].stages["prune"].score.tolist()
    ([True, False, False, True], [1.0, -1.0, -1.0, 1.0])
  """

  def init_state(self, w, ctx):
    del ctx
    return jnp.zeros(jnp.shape(w), jnp.float32)

  def accumulate(self, w, state, ctx):
    g = _need_grad("Movement", ctx, w)
    step = _f32(w) * g
    # A non-finite product (a NaN or inf gradient, as on a step that
    # optax.apply_if_finite skips) adds nothing: it would stay in S forever.
    return state - jnp.where(jnp.isfinite(step), step, jnp.zeros_like(step))

  def score(self, w, state, ctx):
    del w, ctx
    return state

  def init_score(self, w, state, ctx):
    del state, ctx
    return jnp.abs(_f32(w))


@dataclasses.dataclass(frozen=True)
class Wanda(Criterion):
  """Wanda (Sun et al. 2024): score ``|w| * ||x||``, the activation norm per input feature.

  The statistic is a vector with one L2 norm per input feature (over the
  calibration tokens), passed as ``stats={path or module path: norms}`` to
  ``spec.update``; the input-feature axis is ``ndim - 2`` of the kernel (axis 0
  of a Flax ``(in, out)`` Dense kernel, axis 2 of a ``(h, w, in, out)`` conv
  kernel). For a batch ``x`` of shape ``(..., in)``:
  ``jnp.linalg.norm(x.reshape(-1, in), axis=0)``. ``spec.init`` has no
  statistics, so the initial mask uses ``|w|``. The paper compares weights
  within each output; give ``distribution=jc.prune.PerOutput()`` for that
  (the default ``Uniform()`` ranks them across the whole layer).

  Norms must be non-negative and not NaN: given as concrete arrays to
  ``spec.update`` they are checked at once (``ValueError`` naming the leaf);
  traced (``spec.update`` under ``jax.jit``) a recompute with such a norm
  makes the leaf's weights NaN, so the next loss is NaN instead of the mask
  silently wrong.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule(".*kernel", [jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Wanda())])])
    >>> params = {"dense": {"kernel": jnp.array([[1.0, 2.0], [3.0, 1.0]])}}
    >>> t, s = spec.init(params)
    >>> t, s = spec.update(t, s, 0, stats={"dense": jnp.array([10.0, 1.0])})
    >>> s["dense"]["kernel"].stages["prune"].mask.tolist()
    [[True, True], [False, False]]
  """

  def score(self, w, state, ctx):
    del state
    shape = jnp.shape(w)
    if len(shape) < 2:
      raise ValueError(
          f"Wanda criterion at {ctx.path!r}: the weight has shape {shape}, but Wanda needs "
          "a kernel with an input-feature axis (ndim >= 2); select kernels only."
      )
    axis = len(shape) - 2
    if ctx.stat is None:
      raise ValueError(
          f"Wanda criterion at {ctx.path!r} needs the activation norm of each input "
          f"feature: pass stats={{{ctx.path!r}: norms}} (or keyed by the module path) to "
          f"spec.update, norms of shape ({shape[axis]},)."
      )
    stat = jnp.asarray(ctx.stat)
    if stat.shape != (shape[axis],):
      raise ValueError(
          f"Wanda criterion at {ctx.path!r}: the activation-norm statistic has shape "
          f"{stat.shape}, expected ({shape[axis]},): one norm per input feature, axis "
          f"{axis} of the {shape} kernel."
      )
    norms = _f32(stat).reshape((shape[axis], 1))
    return jnp.abs(_f32(w)) * norms

  def check(self, w, ctx):
    if ctx.stat is None or jnp.ndim(ctx.stat) != 1:
      return None  # score() names what is missing or misshapen
    stat = jnp.asarray(ctx.stat)
    if not jnp.issubdtype(stat.dtype, jnp.floating):
      stat = stat.astype(jnp.float32)
    if not is_concrete(stat):
      return jnp.any(~(stat >= 0))  # negative or NaN
    # Concrete: check on the host (jnp ops here would be staged under an outer jit).
    bad = ~(np.asarray(stat, np.float32) >= 0)
    where = np.flatnonzero(bad)
    if where.size:
      raise ValueError(
          f"Wanda criterion at {ctx.path!r}: the activation-norm statistic has "
          f"{where.size} negative or NaN entries (input features {where[:8].tolist()}, values "
          f"{np.asarray(stat)[where[:8]].tolist()}); norms are non-negative. Pass "
          "jnp.linalg.norm(x.reshape(-1, in_features), axis=0) of finite activations x."
      )
    return None

  def init_score(self, w, state, ctx):
    del state, ctx
    return jnp.abs(_f32(w))

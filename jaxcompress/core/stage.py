"""The stage protocol: one compression step applied to one weight.

A stage is a frozen dataclass (hashable, so it is static under ``jax.jit``). The
spec (``jaxcompress.core.spec``) runs the stages of a rule left to right over
each leaf the rule selects. A stage sees a *value*: the weight as the previous
stages left it (for the first stage, the parameter itself).

Per leaf, a stage keeps

- ``params``: what it trains (``None`` when it trains nothing): an LSQ step, a
  k-means codebook, low-rank factors;
- ``state``: what it does not train (``None`` when stateless): a mask, cluster
  assignments, calibration ranges.

A stage with ``replaces_weight = True`` (low-rank, clustering) must come first in
its rule: its ``params`` replace the dense weight as the trainable, and its
``apply`` rebuilds the value from them (``value`` is ``None`` there). Its value
may be a pytree of arrays (for example low-rank factors) that exposes
``materialize()``; later stages are then applied to each array of that pytree.

All methods are pure and traceable.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple, Sequence

import jax

Array = jax.Array
PyTree = Any


class UpdateContext(NamedTuple):
  """What ``Stage.update`` gets besides the value, params and state.

  Attributes:
    path: the leaf's path string (``Dense_0/kernel``).
    step: the integer training step (a traced int32 scalar).
    grad: gradient of the loss with respect to this leaf of the model params
      (the output of ``spec.apply``), or ``None`` when not given or when the
      value's shape differs from the parameter's.
    stat: the statistic the caller passed for this leaf (``stats`` are looked up
      by leaf path, then by its parent module path), or ``None``.
    key: a PRNG key for this leaf and step, or ``None`` when not given.
  """

  path: str
  step: Array
  grad: Array | None
  stat: Any
  key: Array | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
  """Base class for compression stages. Subclasses override what they need.

  Defaults make a stateless, parameter-free identity stage.

  Example (a stage with one trainable gain per leaf):
    >>> import dataclasses, jax.numpy as jnp, jaxcompress as jc
    >>> from typing import ClassVar
    >>> @dataclasses.dataclass(frozen=True, kw_only=True)
    ... class Gain(jc.Stage):
    ...   name: ClassVar[str] = "gain"
    ...   def init(self, value, *, path, key):
    ...     return jnp.ones((), value.dtype), None   # (params, state)
    ...   def apply(self, value, params, state):
    ...     return value * params
    >>> spec = jc.Spec([jc.Rule("w", [Gain()])])
    >>> t, s = spec.init({"w": jnp.arange(3.0)})
    >>> t["w"].params["gain"].item(), spec.apply(t, s)["w"].tolist()
    (1.0, [0.0, 1.0, 2.0])
  """

  replaces_weight: ClassVar[bool] = False
  #: Whether ``init``/``update`` (and their group forms) are written for
  #: explicit sharding. ``False`` (the default, always safe): under an
  #: Explicit mesh the chain runs them with the mesh's axes made Auto, so XLA
  #: partitions them as on an Auto mesh (gathering what it cannot partition),
  #: and lays their outputs out as derived from the leaf. A stage whose
  #: computations are elementwise, or reduce along any axis without reshaping,
  #: sorting or factoring the leaf, sets ``True`` (or a property that says so
  #: per configuration) and then runs on the Explicit shards as they are.
  keeps_sharding: ClassVar[bool] = False
  #: Short name, used as the key of this stage's params/state in a leaf. Every
  #: concrete stage sets it (``jc.Rule`` refuses a stage without one).
  name: ClassVar[str] = ""

  # --- per leaf -----------------------------------------------------------
  def init(self, value: Array, *, path: str, key: Array | None) -> tuple[PyTree, PyTree]:
    """Returns ``(params, state)`` for one leaf. ``value`` may be abstract."""
    del value, path, key
    return None, None

  def apply(self, value: Array | None, params: PyTree, state: PyTree) -> Array:
    """Returns the transformed value. Must be differentiable in value/params."""
    del params, state
    return value

  def update(
      self, value: Array, params: PyTree, state: PyTree, ctx: UpdateContext
  ) -> tuple[Array, PyTree, PyTree]:
    """Returns ``(value, params, state)`` after one training step.

    The returned value is written back into the trainable weight when this stage
    is the first of its rule and does not replace the weight (so pruning can zero
    the weights it removes); otherwise it is ignored.
    """
    del ctx
    return value, params, state

  def update_mask(self, state: PyTree) -> Array | None:
    """A boolean array (True = keep) for the optimizer to hold at zero, or None.

    ``jc.masked_optimizer`` freezes the trainable weight where this mask is
    False and keeps its optimizer moments at zero there.
    """
    del state
    return None

  # --- over all leaves a rule selects (cross-leaf decisions) ---------------
  def init_group(
      self, values: Sequence[Array], *, paths: Sequence[str], keys: Sequence[Array | None]
  ) -> list[tuple[PyTree, PyTree]]:
    """Init over every leaf the stage owns. Override for cross-leaf decisions."""
    return [self.init(v, path=p, key=k) for v, p, k in zip(values, paths, keys)]

  def update_group(
      self,
      values: Sequence[Array],
      params: Sequence[PyTree],
      states: Sequence[PyTree],
      ctxs: Sequence[UpdateContext],
  ) -> list[tuple[Array, PyTree, PyTree]]:
    """Update over every leaf the stage owns. Override for cross-leaf decisions."""
    return [self.update(v, p, s, c) for v, p, s, c in zip(values, params, states, ctxs)]

  def describe(self) -> str:
    """One line for ``spec.describe``."""
    parts = []
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if not f.repr:
        continue
      if f.default is not dataclasses.MISSING and v == f.default:
        continue
      if f.default_factory is not dataclasses.MISSING and v == f.default_factory():
        continue
      parts.append(f"{f.name}={'<schedule>' if callable(v) and not dataclasses.is_dataclass(v) else repr(v)}")
    return f"{type(self).__name__}({', '.join(parts)})"


def materialize(value: Any) -> Array:
  """Turns a stage-chain value into a dense array (factors are multiplied out)."""
  return value.materialize() if hasattr(value, "materialize") else value

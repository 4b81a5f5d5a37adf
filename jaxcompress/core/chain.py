"""A chain of stages is itself a stage: where the composition rules live.

``Chain([prune, quantize])`` applies its stages left to right (Q(M * W)). The
bookkeeping of composition lives here, once:

- each stage's params and state are kept under the stage's key (its name, or
  the name and position when a name repeats) in dicts;
- a stage that replaces the weight (low-rank, clustering) must be first; the
  stages after it see its value, and when that value is a pytree of arrays
  (factors) they run on each array, with one params/state entry per array;
- cross-leaf decisions stay cross-leaf: the chain calls each stage's
  ``init_group``/``update_group`` over every leaf at once;
- ``update`` writes the first stage's returned value back as the new weight
  (pruning zeroes what it removes); stages after the first get the gradient of
  their own input (pulled back through a factorization's ``materialize``);
- under an Explicit-axis mesh, a stage that is not written for explicit
  sharding (``Stage.keeps_sharding`` false: sorts, reshapes, factorizations)
  runs with the mesh's Explicit axes made Auto (``jax.sharding.auto_axes``):
  XLA partitions it as on an Auto mesh and its outputs get the derived
  shardings; the others run on the shards as they are.

``jc.Spec`` is then a loop over rules, each owning one chain.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Sequence

import jax

from jaxcompress.core import sharding as _sharding
from jaxcompress.core.stage import Stage, UpdateContext
from jaxcompress.core.stage import materialize as _materialize

PyTree = Any


def _partitioned(stage: Stage, fn: Callable[[Any], Any], args: Any, out_shardings: Callable) -> Any:
  """``fn(args)``; for a stage that does not keep shardings, with Explicit axes made Auto.

  Such a stage (sorts, factorizations) is not written for explicit sharding;
  inside ``jax.sharding.auto_axes`` XLA partitions it as on an Auto mesh
  (sharded where the algorithm allows, gathered by XLA where not), and its
  outputs are laid out by ``out_shardings`` (``core.sharding.call_partitioned``).
  """
  if stage.keeps_sharding:
    return fn(args)
  return _sharding.call_partitioned(fn, args, out_shardings)[0]


def _init_shardings(items: list[Any]) -> Callable:
  """Each item's params and state laid out as derived from the item (a mask as the weight)."""

  def shardings(abstract_out, sharding_of):
    return [
        jax.tree_util.tree_map(
            lambda a, v=v: _sharding.derive(sharding_of(v), tuple(v.shape), tuple(a.shape)), o
        )
        for o, v in zip(abstract_out, items)
    ]

  return shardings


def _update_shardings(likes: list[Any]) -> Callable:
  """Each ``(value, params, state)`` laid out as before the update.

  Stages keep their structure across updates; anything that does not match
  its old value is replicated.
  """

  def shardings(abstract_out, sharding_of):
    return [
        jax.tree_util.tree_map(sharding_of, like)
        if jax.tree_util.tree_structure(o) == jax.tree_util.tree_structure(like)
        else jax.tree_util.tree_map(lambda _: sharding_of(None), o)
        for o, like in zip(abstract_out, likes)
    ]

  return shardings


def is_array(v: Any) -> bool:
  """True for an array value; False for a structured value (factors) or None."""
  return hasattr(v, "shape") and hasattr(v, "dtype") and not hasattr(v, "materialize")


def _split_value(value: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
  """An array is one item; a structured value (factors) is one item per array."""
  if is_array(value):
    return [value], lambda items: items[0]
  leaves, treedef = jax.tree_util.tree_flatten(value)
  return leaves, treedef.unflatten


def _join(parts: list[Any], is_arr: bool) -> Any:
  return parts[0] if is_arr else list(parts)


def _parts(x: Any, n: int, is_arr: bool) -> list[Any]:
  return [x] if is_arr else list(x) if x is not None else [None] * n


def _fold(key: jax.Array | None, i: Any) -> jax.Array | None:
  return None if key is None else jax.random.fold_in(key, i)


def _part_grads(value: Any, parts: list[Any], g: Any, replaces: bool) -> list[Any]:
  """The gradient each part of a stage's value gets, from the model params' ``g``.

  An array value gets ``g`` itself; a stage that replaces the weight gets ``g``
  (the gradient with respect to what it rebuilds); a structured value (factors)
  gets, per array, the gradient pulled back through its ``materialize``, so a
  stage after a factorization (saliency pruning of the factors) sees the
  gradient of its own input. Unused gradients are removed by XLA under jit.
  """
  if g is None:
    return [None] * len(parts)
  if replaces or is_array(value):
    return [g]
  _, rebuild = _split_value(value)
  out, pullback = jax.vjp(lambda ps: _materialize(rebuild(ps)), parts)
  return list(pullback(g.astype(out.dtype))[0])


def _flat(stages: Sequence[Stage]) -> tuple[Stage, ...]:
  out: list[Stage] = []
  for s in stages:
    out += list(s.stages) if isinstance(s, Chain) else [s]
  return tuple(out)


@dataclasses.dataclass(frozen=True, init=False)
class Chain(Stage):
  """Stages applied left to right, as one stage (nested chains are flattened).

  Its params and state are ``{stage key: that stage's params/state}``.

  Args:
    stages: the stages; one that replaces the weight must come first.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> chain = jc.Chain([jc.prune.magnitude(sparsity=0.5), jc.quant.FakeQuant(bits=8)])
    >>> chain.keys
    ('prune', 'quant')
    >>> spec = jc.Spec([jc.Rule("w", chain)])
    >>> t, s = spec.init({"w": jnp.array([0.1, -2.0, 0.5, 4.0])})
    >>> spec.apply(t, s)["w"].tolist()[0]  # pruned zeros stay exact zeros
    0.0
  """

  name: ClassVar[str] = "chain"
  stages: tuple[Stage, ...]

  def __init__(self, stages: Sequence[Stage]):
    stages = _flat(stages)
    for i, s in enumerate(stages):
      if s.replaces_weight and i != 0:
        raise ValueError(
            f"Stage {type(s).__name__} replaces the weight (it trains other leaves instead) "
            f"and must come first in its rule or chain, but it is at position {i}. Move it first."
        )
    object.__setattr__(self, "stages", stages)

  @property
  def replaces_weight(self) -> bool:  # type: ignore[override]
    return bool(self.stages) and self.stages[0].replaces_weight

  @property
  def keys(self) -> tuple[str, ...]:
    """The key of each stage in the chain's params and state dicts."""
    names = [s.name for s in self.stages]
    return tuple(n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names))

  def describe(self) -> str:
    return " -> ".join(s.describe() for s in self.stages)

  # --- one stage over one value ---------------------------------------------
  @staticmethod
  def _apply_one(stage: Stage, value: Any, params: Any, state: Any) -> Any:
    if stage.replaces_weight:
      return stage.apply(None, params, state)
    parts, rebuild = _split_value(value)
    is_arr = is_array(value)
    ps = _parts(params, len(parts), is_arr)
    ss = _parts(state, len(parts), is_arr)
    return rebuild([stage.apply(v, p, s) for v, p, s in zip(parts, ps, ss)])

  def apply(self, value: Any, params: Any, state: Any) -> Any:
    params = params or {}
    for stage, k in zip(self.stages, self.keys):
      value = self._apply_one(stage, value, params.get(k), state[k])
    return value

  def update_mask(self, state: Any) -> Any:
    """The weight's keep-mask: every stage's, combined (``None`` where none masks).

    Stages that do not replace the weight keep its shape, so a later stage's
    mask (a ``LoRA`` base frozen after a quantizer, pruning after it) says
    which weights still reach the output. After a stage that replaces the
    weight, later stages see factors or centroids instead: only its mask counts.
    """
    if not self.stages:
      return None
    if self.stages[0].replaces_weight:
      return self.stages[0].update_mask(state[self.keys[0]])
    mask = None
    for stage, k in zip(self.stages, self.keys):
      m = stage.update_mask(state[k])
      if m is not None:
        mask = m if mask is None else mask & m
    return mask

  # --- over every leaf a rule selects ---------------------------------------
  def init(self, value, *, path, key):
    return self.init_group([value], paths=[path], keys=[key])[0]

  def update(self, value, params, state, ctx):
    return self.update_group([value], [params], [state], [ctx])[0]

  def init_group(self, values, *, paths, keys):
    values = list(values)
    params: list[dict[str, Any]] = [{} for _ in values]
    states: list[dict[str, Any]] = [{} for _ in values]
    for si, (stage, k) in enumerate(zip(self.stages, self.keys)):
      items, item_paths, item_keys, spans, arr = [], [], [], [], []
      for n, v in enumerate(values):
        parts, _ = _split_value(v)
        arr.append(is_array(v))
        spans.append((len(items), len(parts)))
        items += parts
        item_paths += [paths[n]] * len(parts)
        item_keys += [_fold(_fold(keys[n], si), q) for q in range(len(parts))]
      out = _partitioned(
          stage,
          lambda a, stage=stage, item_paths=item_paths: stage.init_group(a[0], paths=item_paths, keys=a[1]),
          (items, item_keys),
          _init_shardings(items),
      )
      for n, (a, m) in enumerate(spans):
        params[n][k] = _join([o[0] for o in out[a : a + m]], arr[n])
        states[n][k] = _join([o[1] for o in out[a : a + m]], arr[n])
        if si < len(self.stages) - 1:
          values[n] = self._apply_one(stage, values[n], params[n][k], states[n][k])
    return [({k: v for k, v in p.items() if v is not None}, s) for p, s in zip(params, states)]

  def update_group(self, values, params, states, ctxs):
    params = [dict(p or {}) for p in params]
    states = [dict(s) for s in states]
    weights = list(values)
    values = list(values)
    for si, (stage, k) in enumerate(zip(self.stages, self.keys)):
      items, iparams, istates, ictxs, spans, arr = [], [], [], [], [], []
      for n, ctx in enumerate(ctxs):
        v = values[n]
        is_arr = stage.replaces_weight or is_array(v)
        parts = [v] if stage.replaces_weight else _split_value(v)[0]
        arr.append(is_arr)
        spans.append((len(items), len(parts)))
        skey = _fold(_fold(ctx.key, si), ctx.step)
        for q, gq in enumerate(_part_grads(v, parts, ctx.grad, stage.replaces_weight)):
          ictxs.append(UpdateContext(ctx.path, ctx.step, gq, ctx.stat, _fold(skey, q)))
        items += parts
        iparams += _parts(params[n].get(k), len(parts), is_arr)
        istates += _parts(states[n][k], len(parts), is_arr)
      def run(a, stage=stage, ictxs=ictxs):
        g_items, g_params, g_states, g_ctxs = a
        ctxs_in = [c._replace(step=st, grad=g, stat=x, key=r) for c, (st, g, x, r) in zip(ictxs, g_ctxs)]
        return stage.update_group(g_items, g_params, g_states, ctxs_in)

      out = _partitioned(
          stage,
          run,
          (items, iparams, istates, [(c.step, c.grad, c.stat, c.key) for c in ictxs]),
          _update_shardings(list(zip(items, iparams, istates))),
      )
      for n, (a, m) in enumerate(spans):
        new_v = [o[0] for o in out[a : a + m]]
        if k in params[n]:
          params[n][k] = _join([o[1] for o in out[a : a + m]], arr[n])
        states[n][k] = _join([o[2] for o in out[a : a + m]], arr[n])
        if si == 0 and not stage.replaces_weight:
          weights[n] = new_v[0] if arr[n] else _split_value(values[n])[1](new_v)
          values[n] = weights[n]
        if si < len(self.stages) - 1:
          values[n] = self._apply_one(stage, values[n], params[n].get(k), states[n][k])
    return [(w, p, s) for w, p, s in zip(weights, params, states)]

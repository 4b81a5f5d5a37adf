"""LoRA: a frozen base plus a trainable low-rank delta (QLoRA when the base is quantized).

``LoRA(rank, alpha=...)`` is a stage that adds ``(alpha / rank) * a @ b`` to
the value it gets, ``a (m, r)`` and ``b (r, n)`` being its trainable params
(an ``Adapter``) and ``(m, n) = (prod(shape[:-1]), shape[-1])`` the kernel seen
as a matrix (a Dense kernel as is, a conv kernel ``(h, w, in, out)`` as
``(h * w * in, out)``). The value it gets is the *base*: the leaf's weight
after the stages before it in the rule. So ``[LoRA(8)]`` adapts the float
weight, ``[jc.quant.FakeQuant(bits=4), LoRA(8)]`` is QLoRA (an int4 base, a
float adapter), and after a pruning stage the base keeps its mask (the delta
is dense). ``b`` starts at zero, so inserting the stage changes nothing: the
model gives the base's outputs until ``b`` trains. ``a`` starts uniform in
``[-1/sqrt(m), 1/sqrt(m)]``.

Where the frozen base is held
-----------------------------
The base stays where every other rule keeps it: the leaf's trainable weight,
run through the stages before ``LoRA``. It is not copied into this stage's
state: the spec keeps the weight in the trainable tree for any rule whose
first stage does not replace it, so a copy would double the base's memory, and
the stages before LoRA (a quantizer's ranges, a pruning mask) keep working on
the weight they were built for, which is also what makes the separate export
store the base in exactly its own encoding. Two things hold it still:

1. ``apply`` stops the gradient at the base. The weight, and whatever the
   stages before LoRA train (an LSQ step size), get an exactly zero gradient,
   and XLA never computes the dense weight gradient. With a zero gradient the
   masked optimizer's updates for the base are zero and its moments stay zero
   for every optimizer whose per-weight state stays zero under zero gradients
   and that does not decay weights (SGD, momentum, Adam, RMSProp, Adagrad).
2. ``update_mask`` is all False, so ``jc.masked_optimizer`` also zeroes the
   weight's updates and moments under decoupled weight decay (``adamw``,
   ``lion``).
   The spec asks only the first stage of a rule for this mask: it holds for
   ``[LoRA(8)]`` (a one-shot compressed base) but not for ``[FakeQuant,
   LoRA]``. There, wrap the optimizer in ``adapters_only``: every update
   outside the adapters is then zero, weight decay included.

A trainable with a zero mask was chosen over state for these reasons; what
it costs is optimizer moments allocated (and held at zero) for the base.

Export
------
- merged (the registered encoder, what ``jc.export.export`` stores): the
  float sum ``base + delta``, decoded bit for bit. Re-applying the base's
  compression to the merged weight (``merge_lora``) is *not* exact: a
  quantized base plus a dense delta is generally off the quantization grid
  (and off the pruning mask), so the re-quantized weight differs from what the
  model trained with.
- separate (``export_lora``): the base in its own encoding (packed int4 codes
  and scales, N:M values) and the adapter factors as they train (float32 or
  bfloat16), as two artifacts; ``decode_lora`` gives ``spec.apply`` bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress.core import sharding as _sharding
from jaxcompress.core.checks import check_int, check_number
from jaxcompress.core.paths import path_str
from jaxcompress.core.spec import Compressed, LeafState, Rule, Spec
from jaxcompress.core.stage import Stage

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class Adapter:
  """The trainable low-rank delta of one leaf: ``a (m, r)`` and ``b (r, n)``.

  Attributes:
    a: the input-side factor ``(m, r)``, ``m = prod(shape[:-1])``.
    b: the output-side factor ``(r, n)``, ``n = shape[-1]``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> ad = jc.lowrank.Adapter(jnp.ones((4, 2)), jnp.zeros((2, 3)))
    >>> ad.rank, ad.num_params
    (2, 14)
  """

  a: Array
  b: Array

  @property
  def rank(self) -> int:
    """The inner dimension ``r``."""
    return self.a.shape[-1]

  @property
  def num_params(self) -> int:
    """Entries trained: ``r * (m + n)``."""
    return math.prod(self.a.shape) + math.prod(self.b.shape)


@dataclasses.dataclass(frozen=True)
class LoRAState:
  """What a ``LoRA`` stage keeps per leaf besides its adapter: the base's shape (static).

  No arrays: ``update_mask`` builds the all-False mask of the frozen base from it.

  Attributes:
    shape: the shape of the value the adapter is added to.
  """

  shape: tuple[int, ...]


jax.tree_util.register_dataclass(Adapter, data_fields=["a", "b"], meta_fields=[])
jax.tree_util.register_dataclass(LoRAState, data_fields=[], meta_fields=["shape"])


def add_lora(base: Array, adapter: Adapter, *, scale: float) -> Array:
  """``base + scale * (a @ b)``, reshaped to ``base``'s shape, in ``base``'s dtype.

  The product and the sum are computed in float32 (or wider) and rounded once
  to ``base``'s dtype. ``LoRA.apply`` and ``decode_lora`` both call it, so a
  decoded separate export is ``spec.apply`` bit for bit.

  Args:
    base: the frozen value, of shape ``(*lead, n)`` with ``prod(lead) == m``.
    adapter: the ``Adapter`` with ``a (m, r)`` and ``b (r, n)``.
    scale: ``alpha / rank``.

  Returns:
    An array of ``base``'s shape and dtype.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> ad = jc.lowrank.Adapter(jnp.ones((2, 1)), jnp.full((1, 3), 0.5))
    >>> jc.lowrank.add_lora(jnp.zeros((2, 3)), ad, scale=2.0).tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
  """
  acc = jnp.promote_types(jnp.promote_types(base.dtype, adapter.a.dtype), jnp.float32)
  a = _sharding.unshard_axes(adapter.a, (1,))  # the rank axis, as Factors.materialize
  b = _sharding.unshard_axes(adapter.b, (0,))
  delta = jnp.matmul(a, b, preferred_element_type=acc) * scale
  if delta.shape != base.shape:
    delta = delta.reshape(base.shape)
  delta = _sharding.reshard_as(delta, base)
  return (base.astype(acc) + delta).astype(base.dtype)


def _matrix_shape(shape: tuple[int, ...], path: str) -> tuple[int, int]:
  if len(shape) < 2:
    raise ValueError(
        f"LoRA: leaf {path!r} has shape {shape}; an adapter a (in, r) @ b (r, out) needs a "
        "kernel of at least 2 dims (more dims are flattened to (prod(shape[:-1]), shape[-1])). "
        "Narrow the rule's pattern to kernels, e.g. r'.*kernel'."
    )
  return math.prod(shape[:-1]), shape[-1]


def _default_key(seed: int, path: str) -> Array:
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)


@dataclasses.dataclass(frozen=True)
class LoRA(Stage):
  """A frozen base plus a trainable low-rank delta: ``base + (alpha / rank) * a @ b``.

  ``base`` is the value the stage gets (the weight after the stages before it
  in the rule); its gradient is stopped, and ``update_mask`` freezes the
  weight when the stage is first in its rule (see the module docstring). The
  params are an ``Adapter``: ``a (m, rank)`` uniform in ``[-1/sqrt(m),
  1/sqrt(m)]`` and ``b (rank, n)`` zeros, so the stage changes nothing until
  ``b`` trains. A kernel of more than 2 dims is seen as the matrix
  ``(prod(shape[:-1]), shape[-1])``; a leaf of fewer dims is refused.

  Args:
    rank: the adapter's rank, at most ``min(m, n)``.
    alpha: the scale numerator: the delta is ``(alpha / rank) * a @ b``.
    dtype: the adapter's dtype (``"float32"``, ``"bfloat16"``); ``None``: the
      base's dtype.
    seed: seeds ``a`` when ``spec.init`` gets no key (folded with the leaf
      path, so leaves differ); with a key, the key is used.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> w = jax.random.normal(jax.random.key(0), (8, 4))
    >>> spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=4), jc.lowrank.LoRA(2)])])
    >>> t, s = spec.init({"w": w})
    >>> t["w"].params["lora"].a.shape, t["w"].params["lora"].b.shape
    ((8, 2), (2, 4))
    >>> int4 = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=4)])])
    >>> base = int4.apply(*int4.init({"w": w}))["w"]
    >>> bool((spec.apply(t, s)["w"] == base).all())  # b = 0: the int4 base as it was
    True
  """

  name: ClassVar[str] = "lora"
  keeps_sharding: ClassVar[bool] = True  # adapters shard as the kernel; nothing reshapes it

  rank: int = 8
  _: dataclasses.KW_ONLY
  alpha: float = 16.0
  dtype: Any = None
  seed: int = 0

  def __post_init__(self):
    check_int("LoRA", "rank", self.rank, low=1)
    check_number("LoRA", "alpha", self.alpha, low=0.0, low_open=True)
    if math.isinf(self.alpha):
      raise ValueError(f"LoRA: alpha must be a finite positive number, got {self.alpha!r}.")
    check_int("LoRA", "seed", self.seed)
    if self.dtype is not None:
      try:
        dt = jnp.dtype(self.dtype)
      except TypeError:
        dt = None
      if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"LoRA: dtype must be a floating dtype such as 'float32' or 'bfloat16' (or None for "
            f"the base's dtype), got {self.dtype!r}."
        )
      object.__setattr__(self, "dtype", dt.name)
    _register_encoder()

  @property
  def scale(self) -> float:
    """``alpha / rank``, the factor of ``a @ b``."""
    return self.alpha / self.rank

  def init(self, value, *, path, key):
    shape = tuple(value.shape)
    m, n = _matrix_shape(shape, path)
    if self.rank > min(m, n):
      raise ValueError(
          f"LoRA: leaf {path!r} of shape {shape} is the matrix ({m}, {n}), whose rank is at most "
          f"{min(m, n)}, but the adapter's rank is {self.rank}. Give a rank in [1, {min(m, n)}]; "
          "a higher one adds parameters but no expressiveness."
      )
    dtype = self.dtype or value.dtype
    key = _default_key(self.seed, path) if key is None else key
    bound = 1.0 / math.sqrt(m)
    a = jax.random.uniform(key, (m, self.rank), jnp.float32, -bound, bound).astype(dtype)
    b = jnp.zeros((self.rank, n), dtype)
    return Adapter(a, b), LoRAState(shape)

  def apply(self, value, params, state):
    del state
    return add_lora(jax.lax.stop_gradient(value), params, scale=self.scale)

  def update_mask(self, state):
    return jnp.zeros(state.shape, bool)


# --------------------------------------------------------------------------
# Which trainables are adapters.
# --------------------------------------------------------------------------


def adapter_mask(trainable: PyTree) -> PyTree:
  """True at the adapter factors (``a``, ``b``) of every ``LoRA`` stage, False elsewhere.

  A tree of bools with the structure of ``trainable``: the weight-decay
  ``mask=`` of ``optax.adamw``, or the mask of ``optax.masked``. It reads only
  the trainable tree. ``adapters_only`` builds the usual optimizer from it.

  Args:
    trainable: from ``spec.init`` (or its ``jax.eval_shape``).

  Returns:
    A pytree of Python bools, the structure of ``trainable``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    >>> spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=4), jc.lowrank.LoRA(2)])])
    >>> t, _ = jax.eval_shape(spec.init, params)
    >>> jax.tree.leaves(jc.lowrank.adapter_mask(t))  # b, w's weight, a, b
    [False, False, True, True]
  """

  def mark(node):
    return jax.tree_util.tree_map(lambda _: isinstance(node, Adapter), node)

  return jax.tree_util.tree_map(mark, trainable, is_leaf=lambda x: isinstance(x, Adapter))


def adapters_only(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner`` for the LoRA adapters alone; every other update is zero.

  Only ``a`` and ``b`` train: the frozen bases (also where ``LoRA`` follows
  other stages, so that its ``update_mask`` is not asked), the stages' other
  params and the leaves no rule selects get a zero update from any ``inner``,
  decoupled weight decay included. ``inner`` holds state (Adam's moments)
  for the adapters only: the bases carry none, so the optimizer's memory is
  that of the adapters, not twice the model's. Works with the step builders,
  which wrap it in ``jc.masked_optimizer``.

  Args:
    inner: the optimizer of the adapters, e.g. ``optax.adamw(1e-3)``.

  Returns:
    ``optax.chain(optax.masked(inner, adapter_mask),
    optax.masked(optax.set_to_zero(), not adapter_mask))``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxcompress as jc
    >>> params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    >>> spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=4), jc.lowrank.LoRA(2)])])
    >>> t, s = spec.init(params)
    >>> opt = jc.lowrank.adapters_only(optax.adamw(1e-2, weight_decay=0.1))
    >>> updates, _ = jax.jit(opt.update)(jax.tree.map(jnp.ones_like, t), opt.init(t), t)
    >>> [bool(x.any()) for x in jax.tree.leaves(updates)]  # b, w's weight, a, b
    [False, False, True, True]
  """
  frozen = lambda t: jax.tree_util.tree_map(lambda m: not m, adapter_mask(t))
  return optax.chain(optax.masked(inner, adapter_mask), optax.masked(optax.set_to_zero(), frozen))


# --------------------------------------------------------------------------
# The base without its adapters, the adapters, the merged weights.
# --------------------------------------------------------------------------


def _is_node(x: Any) -> bool:
  return isinstance(x, (Compressed, LeafState))


def _lora_position(rule: Rule) -> int | None:
  idx = [i for i, s in enumerate(rule.stages) if isinstance(s, LoRA)]
  if not idx:
    return None
  if len(idx) > 1 or idx[0] != len(rule.stages) - 1:
    raise ValueError(
        f"Rule {rule.pattern!r} has stages {rule.chain.describe()}: the base and the adapter can be "
        "told apart only when one LoRA stage comes last in its rule. Move LoRA to the end of the rule."
    )
  return idx[0]


def _base_rules(spec: Spec) -> tuple[list[Rule], dict[int, int | None]]:
  """The rules without their LoRA stage, and where each old rule went (None: no stage left)."""
  rules: list[Rule] = []
  where: dict[int, int | None] = {}
  for i, rule in enumerate(spec.rules):
    pos = _lora_position(rule)
    stages = rule.stages if pos is None else rule.stages[:pos]
    if stages:
      where[i] = len(rules)
      rules.append(Rule(rule.pattern, stages))
    else:
      where[i] = None
  return rules, where


class _Leaf(NamedTuple):
  """One leaf of a (trainable, state) pair, as the helpers below read it."""

  path: str
  trainable: Any
  state: LeafState
  adapted: bool  # owned by a rule that ends in LoRA


def _leaves(spec: Spec, trainable: PyTree, state: PyTree, fn: str) -> tuple[list[_Leaf], Any]:
  if not isinstance(spec, Spec):
    raise TypeError(f"{fn}: spec must be a jc.Spec, got {type(spec).__name__}.")
  flat, treedef = jax.tree_util.tree_flatten_with_path(trainable, is_leaf=_is_node)
  try:
    s_leaves = treedef.flatten_up_to(state)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{fn}: state does not have the structure of trainable ({e}); pass the pair that "
        "spec.init/spec.update returned."
    ) from None
  out = []
  for (p, t), s in zip(flat, s_leaves):
    if not isinstance(s, LeafState):
      raise TypeError(
          f"{fn}: the state of leaf {path_str(p)!r} is {type(s).__name__}, not a LeafState; "
          "pass the state that spec.init/spec.update returned."
      )
    adapted = bool(s.stages) and _lora_position(spec.rules[s.rule]) is not None
    if adapted and not isinstance(t.params[spec.rules[s.rule].keys[-1]], Adapter):
      raise ValueError(
          f"{fn}: the LoRA stage of rule {spec.rules[s.rule].pattern!r} adapts each factor of "
          f"leaf {path_str(p)!r} (a factorizing stage comes before it); only an adapter on an "
          "array can be split from its base."
      )
    out.append(_Leaf(path_str(p), t, s, adapted))
  return out, treedef


def _without_lora(leaf: _Leaf, spec: Spec) -> tuple[dict, dict]:
  """The params and the stage states of an adapted leaf, without the adapter's."""
  key = spec.rules[leaf.state.rule].keys[-1]
  params = {k: v for k, v in leaf.trainable.params.items() if k != key}
  return params, {k: v for k, v in leaf.state.stages.items() if k != key}


def _base_node(weight: Any, params: dict, stages: dict, rule: int | None, shape) -> tuple[Any, LeafState]:
  """A leaf's trainable and state as ``spec.init`` builds them (no rule: the weight as is)."""
  if rule is None:
    return weight, LeafState({})
  return (Compressed(weight, params) if params or weight is None else weight), LeafState(stages, rule, shape)


def lora_base(spec: Spec, trainable: PyTree, state: PyTree) -> tuple[Spec, PyTree, PyTree]:
  """The spec, trainable and state of the frozen base: every ``LoRA`` stage removed.

  ``base_spec.apply(base_trainable, base_state)`` is the value each adapter
  is added to, and ``jc.export.export`` of the triple stores the base in its
  own encoding. A rule left without stages (``[LoRA(8)]``) is dropped and
  its leaves pass through as their (frozen) weights. Each ``LoRA`` must be
  the last stage of its rule.

  Args:
    spec: the spec with ``LoRA`` stages.
    trainable, state: from ``spec.init``/``spec.update`` (or a train state).

  Returns:
    ``(base_spec, base_trainable, base_state)``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
    >>> spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=4), jc.lowrank.LoRA(2)])])
    >>> base_spec, bt, bs = jc.lowrank.lora_base(spec, *spec.init(params))
    >>> base_spec.rules[0].chain.describe()
    'FakeQuant(bits=4)'
    >>> jc.export.export(base_spec, bt, bs).leaves[0].record.encoding
    'int4 channel@-1 dense:xfloat32 dense:u4-8'
  """
  rules, where = _base_rules(spec)
  leaves, treedef = _leaves(spec, trainable, state, "lora_base")
  t_out, s_out = [], []
  for leaf in leaves:
    t, st = leaf.trainable, leaf.state
    if leaf.adapted:
      params, stages = _without_lora(leaf, spec)
      t, st = _base_node(t.weight, params, stages, where[st.rule], st.shape)
    elif st.stages:
      st = LeafState(st.stages, where[st.rule], st.shape)
    t_out.append(t)
    s_out.append(st)
  return Spec(rules), treedef.unflatten(t_out), treedef.unflatten(s_out)


def lora_adapters(spec: Spec, trainable: PyTree, state: PyTree) -> dict[str, dict[str, Array]]:
  """The adapters and their scales, by leaf path: ``{path: {"a", "b", "scale"}}``.

  ``scale`` is ``alpha / rank`` as a float32 scalar, so the dict holds all
  ``add_lora`` needs besides the base.

  Args:
    spec, trainable, state: as for ``lora_base``.

  Returns:
    A dict in the order of the leaves.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.lowrank.LoRA(2, alpha=8.0)])])
    >>> ads = jc.lowrank.lora_adapters(spec, *spec.init({"w": jnp.ones((4, 4))}))
    >>> ads["w"]["a"].shape, float(ads["w"]["scale"])
    ((4, 2), 4.0)
  """
  leaves, _ = _leaves(spec, trainable, state, "lora_adapters")
  out = {}
  for leaf in leaves:
    if leaf.adapted:
      rule = spec.rules[leaf.state.rule]
      adapter = leaf.trainable.params[rule.keys[-1]]
      out[leaf.path] = {"a": adapter.a, "b": adapter.b, "scale": jnp.asarray(rule.stages[-1].scale, jnp.float32)}
  return out


def merge_lora(
    spec: Spec, trainable: PyTree, state: PyTree, *, key: Array | None = None
) -> tuple[Spec, PyTree, PyTree]:
  """The adapters folded into their bases, and the base's compression applied again.

  Each adapted leaf's weight becomes the merged float value ``base + delta``
  (``spec.apply``'s), and the stages before its ``LoRA`` are initialized
  afresh on it (new quantization ranges, a new pruning mask), as ``spec.init``
  would. This is *not* exact: the merged weight is generally off the base's
  quantization grid and pruning mask, so the re-compressed value differs from
  what the model trained with (by up to the quantization error). To store the
  float sum exactly, export the spec as it is; to keep the base exactly,
  use ``export_lora``. Leaves without an adapter keep their trainable and state.

  Args:
    spec, trainable, state: as for ``lora_base``.
    key: PRNG key for stages that draw random numbers at init.

  Returns:
    ``(merged_spec, merged_trainable, merged_state)``: the spec without its
    ``LoRA`` stages; ``jc.export.export`` of the triple stores the merged
    weights in the base's encoding.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
    >>> spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=4), jc.lowrank.LoRA(2)])])
    >>> t, s = spec.init(params)
    >>> ms, mt, mst = jc.lowrank.merge_lora(spec, t, s)
    >>> bool((ms.apply(mt, mst)["w"] == spec.apply(t, s)["w"]).all())  # b = 0: already on the grid
    True
  """
  rules, where = _base_rules(spec)
  leaves, treedef = _leaves(spec, trainable, state, "merge_lora")
  merged = treedef.flatten_up_to(spec.apply(trainable, state))
  t_out = [leaf.trainable for leaf in leaves]
  s_out = [LeafState(l.state.stages, where[l.state.rule], l.state.shape) if l.state.stages else l.state for l in leaves]
  groups: dict[int, list[int]] = {}  # the adapted leaves by their new rule
  for j, leaf in enumerate(leaves):
    if leaf.adapted:
      new = where[leaf.state.rule]
      if new is None:  # [LoRA] alone: the merged float weight, owned by no rule
        t_out[j], s_out[j] = _base_node(merged[j], {}, {}, None, None)
      else:
        groups.setdefault(new, []).append(j)
  for new, idxs in groups.items():
    chain = rules[new].chain
    keys = [None if key is None else jax.random.fold_in(key, zlib.crc32(leaves[j].path.encode()) & 0x7FFFFFFF)
            for j in idxs]
    out = chain.init_group([merged[j] for j in idxs], paths=[leaves[j].path for j in idxs], keys=keys)
    for j, (p, st) in zip(idxs, out):
      weight = None if chain.replaces_weight else merged[j]
      t_out[j], s_out[j] = _base_node(weight, p, st, new, leaves[j].state.shape)
  return Spec(rules), treedef.unflatten(t_out), treedef.unflatten(s_out)


# --------------------------------------------------------------------------
# Export: merged (the registered encoder) and separate.
# --------------------------------------------------------------------------


class LoRAArtifact(NamedTuple):
  """A separate LoRA export: the base in its own encoding, and the adapters.

  Save each with ``jc.export.save``; ``jc.export.load`` them back (the
  adapters without ``like=``) and ``decode_lora`` gives the model params.

  Attributes:
    base: the ``jc.export.Artifact`` of ``lora_base``: every leaf as the
      stages before its adapter store it (packed int4 codes and scales, N:M
      values, ...).
    adapters: a ``jc.export.Artifact`` of ``lora_adapters``: per adapted leaf
      ``<path>/a``, ``<path>/b`` (stored as they train, float32 or bfloat16)
      and ``<path>/scale`` (float32).
  """

  base: Any
  adapters: Any


def export_lora(spec: Spec, trainable: PyTree, state: PyTree, *, huffman: bool = False) -> LoRAArtifact:
  """The separate export: the base in its own encoding, the adapters as they train.

  Args:
    spec, trainable, state: as for ``lora_base`` (concrete arrays).
    huffman: Huffman-code the base's integer streams (``jc.export.export``).

  Returns:
    A ``LoRAArtifact``; ``decode_lora`` of it is ``spec.apply(trainable,
    state)`` bit for bit.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
    >>> spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=4), jc.lowrank.LoRA(2)])])
    >>> t, s = spec.init(params)
    >>> art = jc.lowrank.export_lora(spec, t, s)
    >>> [r.path for r in art.adapters.records]
    ['w/a', 'w/b', 'w/scale']
    >>> bool((jc.lowrank.decode_lora(art)["w"] == spec.apply(t, s)["w"]).all())
    True
  """
  from jaxcompress import export as _export  # noqa: PLC0415 (export imports lowrank)

  base = _export.export(*lora_base(spec, trainable, state), huffman=huffman)
  adapters = lora_adapters(spec, trainable, state)
  plain = Spec([])
  return LoRAArtifact(base, _export.export(plain, adapters, plain.init(adapters)[1]))


def decode_lora(artifact: LoRAArtifact) -> PyTree:
  """The model params of a separate export: each base plus its adapter.

  Args:
    artifact: from ``export_lora``, or its two artifacts loaded back
      (``LoRAArtifact(jc.export.load(...), jc.export.load(...))``).

  Returns:
    The params, in the structure of ``artifact.base``: ``spec.apply``'s
    value bit for bit.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.lowrank.LoRA(1)])])
    >>> t, s = spec.init({"w": jnp.ones((2, 2))})
    >>> jc.lowrank.decode_lora(jc.lowrank.export_lora(spec, t, s))["w"].tolist()
    [[1.0, 1.0], [1.0, 1.0]]
  """
  from jaxcompress import export as _export  # noqa: PLC0415 (export imports lowrank)

  if not isinstance(artifact, LoRAArtifact):
    raise TypeError(
        f"decode_lora: expected the LoRAArtifact of jc.lowrank.export_lora, got {type(artifact).__name__}."
    )
  parts: dict[str, dict[str, Array]] = {}
  for leaf in artifact.adapters.leaves:
    path, _, name = leaf.record.path.rpartition("/")
    if name not in ("a", "b", "scale") or not path:
      raise ValueError(
          f"decode_lora: the adapters artifact has a leaf {leaf.record.path!r}; it holds only "
          "<path>/a, <path>/b and <path>/scale, as export_lora writes them."
      )
    parts.setdefault(path, {})[name] = leaf.decode()
  base = _export.decode(artifact.base)
  flat, treedef = jax.tree_util.tree_flatten_with_path(base)
  by_path = {path_str(p): i for i, (p, _) in enumerate(flat)}
  leaves = [v for _, v in flat]
  for path, p in parts.items():
    if sorted(p) != ["a", "b", "scale"] or path not in by_path:
      raise ValueError(
          f"decode_lora: the adapter of {path!r} has {sorted(p)}"
          + ("" if path in by_path else ", and the base has no such leaf")
          + "; pass the two artifacts of one export_lora call."
      )
    i = by_path[path]
    leaves[i] = add_lora(leaves[i], Adapter(p["a"], p["b"]), scale=float(np.asarray(p["scale"])))
  return treedef.unflatten(leaves)


def _encode_merged(stage: LoRA, ctx: Any) -> Any:
  """The merged export: the float sum, exactly as ``apply`` gives it."""
  from jaxcompress.export import Plain  # noqa: PLC0415 (export imports lowrank)

  del stage
  return Plain(np.asarray(ctx.output))


@functools.cache
def _register_encoder() -> None:
  """Registers the merged encoder once, when the first ``LoRA`` is built.

  ``jaxcompress.export`` imports this package while it loads, so the
  registration waits until both are loaded.
  """
  from jaxcompress import export as _export  # noqa: PLC0415 (export imports lowrank)

  _export.register_encoder(LoRA, _encode_merged)

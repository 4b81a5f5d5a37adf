"""The compression spec: rules map params to trainables and state, and back.

    trainable, state = spec.init(params)
    model_params     = spec.apply(trainable, state)
    trainable, state = spec.update(trainable, state, step, grads=..., stats=...)
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxcompress.core import sharding as _sharding
from jaxcompress.core.paths import parent, path_str
from jaxcompress.core.chain import Chain, is_array
from jaxcompress.core.stage import Stage, UpdateContext
from jaxcompress.core.stage import materialize as _materialize

PyTree = Any

# --------------------------------------------------------------------------
# Per-leaf containers.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Compressed:
  """The trainable node of a leaf whose stages train something besides the weight.

  Attributes:
    weight: the dense weight, or ``None`` when the first stage replaces it.
    params: ``{stage key: that stage's trainable params}``.
  """

  weight: Any
  params: dict[str, Any]


@dataclasses.dataclass
class LeafState:
  """The state node of a leaf: ``{stage key: that stage's state}``.

  Leaves that no rule selects hold an empty ``LeafState``.
  """

  stages: dict[str, Any]
  #: Index of the owning rule in ``Spec.rules`` (static), -1 when none.
  rule: int = -1
  #: Shape of the param the state was made for (static), so that a state of
  #: another tree is refused instead of broadcast; None when no rule owns it.
  shape: tuple[int, ...] | None = None


jax.tree_util.register_dataclass(Compressed, data_fields=["weight", "params"], meta_fields=[])
jax.tree_util.register_dataclass(LeafState, data_fields=["stages"], meta_fields=["rule", "shape"])


def _is_node(x: Any) -> bool:
  return isinstance(x, (Compressed, LeafState))


# --------------------------------------------------------------------------
# Rules.
# --------------------------------------------------------------------------


Pattern = Any  # str | Callable[[str, Any], bool] | tuple of them


def check_pattern(pattern: Pattern, *, what: str = "Rule", arg: str = "leaf") -> None:
  """Refuses what ``matches`` cannot take: a bad regex, an empty tuple, a
  non-callable. ``what`` and ``arg`` name the caller in the message.

  Example:
    >>> from jaxcompress.core.spec import check_pattern
    >>> check_pattern(("Dense_0/kernel", lambda path, leaf: leaf.ndim == 2))
    >>> check_pattern("(")
    Traceback (most recent call last):
    ...
    ValueError: Rule pattern '(' is not a valid regular expression: missing ), unterminated subpattern at position 0.
  """
  if isinstance(pattern, tuple):
    if not pattern:
      raise ValueError(f"{what} pattern is an empty tuple; give at least one regex or predicate.")
    for p in pattern:
      check_pattern(p, what=what, arg=arg)
  elif isinstance(pattern, str):
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{what} pattern {pattern!r} is not a valid regular expression: {e}.") from e
  elif not callable(pattern):
    raise TypeError(
        f"{what} pattern must be a regular expression (str), a predicate `(path, {arg}) -> bool`, "
        f"or a tuple of them; got {pattern!r}."
    )


def matches(pattern: Pattern, path: str, leaf: Any = None) -> bool:
  """Whether ``pattern`` selects the leaf at ``path``: a regular expression
  (``re.fullmatch`` on the path string), a predicate ``(path, leaf) -> bool``,
  or a tuple of them (any one matching selects the leaf)."""
  if isinstance(pattern, tuple):
    return any(matches(p, path, leaf) for p in pattern)
  if isinstance(pattern, str):
    return re.fullmatch(pattern, path) is not None
  return bool(pattern(path, leaf))


@dataclasses.dataclass(frozen=True)
class Rule:
  """Selects leaves and compresses them with a chain of stages.

  Args:
    pattern: which leaves: a regular expression matched with ``re.fullmatch``
      against the leaf path (``Dense_0/kernel``; see
      ``jaxcompress.core.paths.path_str``), a predicate ``(path, leaf) -> bool``,
      or a tuple of them (a leaf matching any one is selected).
    stages: stages applied left to right (``[prune, quantize]`` gives
      Q(M * W)), or one stage, or a ``jc.Chain``.

  Example:
    >>> import jaxcompress as jc
    >>> rule = jc.Rule(r".*kernel", [jc.prune.magnitude(sparsity=0.5)])
    >>> big = jc.Rule(lambda path, leaf: leaf.ndim == 2 and leaf.size >= 4096,
    ...               jc.quant.FakeQuant(bits=8))
  """

  pattern: Pattern
  chain: Chain

  def __init__(self, pattern: Pattern, stages: Sequence[Stage] | Stage):
    check_pattern(pattern)
    if isinstance(stages, Stage):
      stages = (stages,)
    stages = tuple(stages)
    if not stages:
      raise ValueError(f"Rule {pattern!r} has no stages; give at least one stage.")
    for i, s in enumerate(stages):
      if not isinstance(s, Stage):
        raise TypeError(
            f"Rule {pattern!r}: stage {i} is {s!r}, not a jaxcompress stage. Build stages "
            "with the technique modules, e.g. jc.prune.magnitude(sparsity=0.9)."
        )
    try:
      chain = Chain(stages)
    except ValueError as e:
      raise ValueError(f"Rule {pattern!r}: {e}") from None
    for i, s in enumerate(chain.stages):
      if not isinstance(s.name, str) or not s.name.isidentifier():
        raise TypeError(
            f"Rule {pattern!r}: stage {i} ({type(s).__name__}) has no name (got "
            f"{s.name!r}). A stage class sets a short identifier as its key in the "
            f"state: `name: ClassVar[str] = \"{type(s).__name__.lower()}\"`."
        )
    object.__setattr__(self, "pattern", pattern)
    object.__setattr__(self, "chain", chain)

  def matches(self, path: str, leaf: Any = None) -> bool:
    """Whether this rule selects the leaf at ``path``."""
    return matches(self.pattern, path, leaf)

  @property
  def stages(self) -> tuple[Stage, ...]:
    """The stages, left to right."""
    return self.chain.stages

  @property
  def keys(self) -> tuple[str, ...]:
    """The key of each stage in a leaf's ``Compressed.params`` and ``LeafState``."""
    return self.chain.keys


def _check_unique_paths(paths: list[str], keypaths: list[Any]) -> None:
  """Two leaves with one path string (``{"a/b": x, "a": {"b": y}}``) would share
  rules, statistics and export names: refuse them."""
  seen: dict[str, Any] = {}
  for p, kp in zip(paths, keypaths):
    if p in seen:
      raise ValueError(
          f"Two leaves have the same path string {p!r}: {jax.tree_util.keystr(seen[p])} and "
          f"{jax.tree_util.keystr(kp)}. Rules, statistics and artifacts address leaves by "
          "this string; rename one key (a key that contains '/' collides with nesting)."
      )
    seen[p] = kp


def _flatten_like(what: str, fn: str, treedef: Any, tree: PyTree) -> list[Any]:
  """``treedef.flatten_up_to(tree)`` with an error that names the argument."""
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{fn}: {what} does not have the structure of `trainable` ({e}). Pass the "
        f"{what} that belongs to this trainable (from the same spec.init/spec.update "
        "call, or the model params' gradients for grads)."
    ) from None


def _check_step(step: Any) -> jax.Array:
  dtype = getattr(step, "dtype", None)
  if isinstance(step, bool) or (dtype is not None and not jnp.issubdtype(dtype, jnp.integer)) or (
      dtype is None and not isinstance(step, int)
  ):
    raise TypeError(
        f"spec.update: step must be an integer (a Python int or an int32 scalar), got "
        f"{step!r}. A float step would be truncated; pass the training step counter."
    )
  if jnp.ndim(step) != 0:
    raise ValueError(f"spec.update: step must be a scalar, got shape {jnp.shape(step)}.")
  return jnp.asarray(step, jnp.int32)


def _check_leaf_shape(fn: str, path: str, t: Any, s: LeafState) -> None:
  """A state made for a param of another shape is refused (never broadcast)."""
  weight = t.weight if isinstance(t, Compressed) else t
  if s.shape is not None and is_array(weight) and tuple(weight.shape) != s.shape:
    raise ValueError(
        f"{fn}: leaf {path!r} has shape {tuple(weight.shape)}, but its compression state was "
        f"made for shape {s.shape}: the state comes from another model or tree. Pass the "
        "state that spec.init/spec.update returned with this trainable."
    )


def _leaf_key(key: jax.Array | None, path: str) -> jax.Array | None:
  if key is None:
    return None
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


# --------------------------------------------------------------------------
# The spec.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
  """A compression spec: an ordered list of rules. The first matching rule wins.

  Args:
    rules: the rules. Leaves no rule matches pass through unchanged. A rule that
      matches no leaf is an error.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"dense": {"kernel": jnp.arange(8.0).reshape(4, 2), "bias": jnp.ones(2)}}
    >>> spec = jc.Spec([jc.Rule(r".*kernel", [jc.prune.magnitude(sparsity=0.5)])])
    >>> trainable, state = spec.init(params)
    >>> model_params = spec.apply(trainable, state)
    >>> int((model_params["dense"]["kernel"] == 0).sum())
    4
  """

  rules: tuple[Rule, ...]

  def __init__(self, rules: Sequence[Rule] | Rule):
    if isinstance(rules, Rule):
      rules = (rules,)
    rules = tuple(rules)
    for r in rules:
      if not isinstance(r, Rule):
        raise TypeError(f"Spec takes jc.Rule objects, got {r!r}.")
    object.__setattr__(self, "rules", rules)

  # ----- leaf assignment ---------------------------------------------------
  def _assign(self, params: PyTree) -> tuple[list[str], list[Any], list[int | None], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in flat]
    leaves = [v for _, v in flat]
    _check_unique_paths(paths, [p for p, _ in flat])
    owner: list[int | None] = []
    used = [False] * len(self.rules)
    for path, leaf in zip(paths, leaves):
      idx = next((i for i, r in enumerate(self.rules) if r.matches(path, leaf)), None)
      if idx is not None:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
          raise TypeError(
              f"Rule {self.rules[idx].pattern!r} selects leaf {path!r} of dtype {dtype}, but "
              "compression stages take real floating-point weights. Narrow the pattern so it "
              "matches float leaves only."
          )
        if 0 in tuple(leaf.shape):
          raise ValueError(
              f"Rule {self.rules[idx].pattern!r} selects leaf {path!r} of shape "
              f"{tuple(leaf.shape)}, which has no elements: there is nothing to compress. "
              "Narrow the pattern so it skips empty leaves."
          )
        used[idx] = True
      owner.append(idx)
    for i, r in enumerate(self.rules):
      if not used[i]:
        shown = ", ".join(repr(p) for p in paths[:20]) + (" ..." if len(paths) > 20 else "")
        first = next(
            (j for j in range(i) if any(o == j and r.matches(p, v) for p, v, o in zip(paths, leaves, owner))),
            None,
        )
        why = (
            f" (the leaves it matches are already owned by the earlier rule {self.rules[first].pattern!r})"
            if first is not None
            else ""
        )
        raise ValueError(
            f"Rule {r.pattern!r} matches no leaf{why}. Patterns are regular expressions "
            f"matched with re.fullmatch against leaf paths (or predicates over (path, leaf)); "
            f"the paths are: {shown}."
        )
    return paths, leaves, owner, treedef

  def _paths(self, trainable: PyTree) -> list[str]:
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable, is_leaf=_is_node)[0]]

  def _flatten(self, tree: PyTree) -> tuple[list[Any], Any]:
    return jax.tree_util.tree_flatten(tree, is_leaf=_is_node)

  def _groups(self, owner: list[int | None]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for j, o in enumerate(owner):
      if o is not None:
        groups.setdefault(o, []).append(j)
    return groups

  # ----- init --------------------------------------------------------------
  def init(self, params: PyTree, *, key: jax.Array | None = None) -> tuple[PyTree, PyTree]:
    """Builds ``(trainable, state)`` from a parameter pytree.

    Args:
      params: any pytree of arrays (Flax linen params, an NNX ``State``, a dict).
      key: PRNG key for stages that draw random numbers (random pruning, k-means++).

    Returns:
      ``trainable`` (what the optimizer sees) and ``state`` (masks, ranges, ...),
      both with the structure of ``params`` down to its leaves.
    """
    paths, leaves, owner, treedef = self._assign(params)
    t_out: list[Any] = list(leaves)
    s_out: list[Any] = [LeafState({}) for _ in leaves]
    for ri, idxs in self._groups(owner).items():
      chain = self.rules[ri].chain
      out = chain.init_group(
          [leaves[j] for j in idxs],
          paths=[paths[j] for j in idxs],
          keys=[_leaf_key(key, paths[j]) for j in idxs],
      )
      for j, (p, st) in zip(idxs, out):
        if chain.replaces_weight:
          t_out[j] = Compressed(None, p)
        else:
          t_out[j] = Compressed(leaves[j], p) if p else leaves[j]
        s_out[j] = LeafState(st, ri, tuple(leaves[j].shape))
    return treedef.unflatten(t_out), treedef.unflatten(s_out)

  # ----- apply -------------------------------------------------------------
  def apply(self, trainable: PyTree, state: PyTree, *, materialize: bool = True) -> PyTree:
    """The model params: the structure, shapes and dtypes of the original params.

    Differentiable with respect to ``trainable``.

    Args:
      trainable, state: from ``init`` or ``update``.
      materialize: if False, a leaf whose stages end in factors (low-rank) is
        returned as those factors, not multiplied out, for factorized inference.

    Returns:
      The model params.
    """
    t_leaves, treedef = self._flatten(trainable)
    s_leaves = _flatten_like("state", "spec.apply", treedef, state)
    out = []
    for path, t, s in zip(self._paths(trainable), t_leaves, s_leaves):
      if not isinstance(s, LeafState):
        raise TypeError(
            "spec.apply got a state that does not come from spec.init (a leaf state is "
            f"{type(s).__name__}). Pass the state returned by spec.init/spec.update."
        )
      _check_leaf_shape("spec.apply", path, t, s)
      out.append(self._apply_leaf(t, s, materialize))
    return treedef.unflatten(out)

  def _rule_for_state(self, s: LeafState) -> Rule:
    # Compare as sets: a dict that went through jit comes back with sorted keys.
    if not 0 <= s.rule < len(self.rules) or sorted(self.rules[s.rule].keys) != sorted(s.stages):
      raise ValueError(
          f"A leaf state has stages {tuple(s.stages)} from rule #{s.rule}, which this spec "
          "does not have: the state comes from a different spec."
      )
    return self.rules[s.rule]

  # ----- update ------------------------------------------------------------
  def update(
      self,
      trainable: PyTree,
      state: PyTree,
      step: jax.Array | int,
      *,
      grads: PyTree | None = None,
      stats: Mapping[str, Any] | None = None,
      key: jax.Array | None = None,
  ) -> tuple[PyTree, PyTree]:
    """Advances the compression state by one training step.

    Args:
      trainable, state: from ``init`` or a previous ``update``.
      step: the training step (an int or int32 scalar), read by schedules.
      grads: gradient of the loss with respect to the model params (the output of
        ``apply``; same structure as params), for saliency, movement and RigL.
      stats: ``{path: statistic}``, looked up by leaf path, then module path
        (activation norms for Wanda, ranges for calibration).
      key: PRNG key for random stages (SET regrowth, random pruning).

    Returns:
      The new ``(trainable, state)``, with the same structure as the inputs.
    """
    t_leaves, treedef = self._flatten(trainable)
    s_leaves = _flatten_like("state", "spec.update", treedef, state)
    g_leaves = (
        _flatten_like("grads", "spec.update", treedef, grads) if grads is not None else [None] * len(t_leaves)
    )
    flat_paths = self._paths(trainable)
    step = _check_step(step)
    stats = dict(stats or {})
    # Group leaves by rule (the same grouping as init).
    groups: dict[int, list[int]] = {}
    for j, s in enumerate(s_leaves):
      if not isinstance(s, LeafState):
        raise TypeError(
            "spec.update got a state that does not come from spec.init (a leaf state is "
            f"{type(s).__name__}). Pass the state returned by spec.init/spec.update."
        )
      if s.stages:
        self._rule_for_state(s)
        _check_leaf_shape("spec.update", flat_paths[j], t_leaves[j], s)
        groups.setdefault(s.rule, []).append(j)
        if g_leaves[j] is not None:
          self._check_grad(flat_paths[j], t_leaves[j], s, g_leaves[j])
    t_out, s_out = list(t_leaves), list(s_leaves)
    for ri, idxs in groups.items():
      comp = [isinstance(t_leaves[j], Compressed) for j in idxs]
      ctxs = []
      for j in idxs:
        path = flat_paths[j]
        stat = stats.get(path, stats.get(parent(path)))
        ctxs.append(UpdateContext(path, step, g_leaves[j], stat, _leaf_key(key, path)))
      out = self.rules[ri].chain.update_group(
          [t_leaves[j].weight if c else t_leaves[j] for j, c in zip(idxs, comp)],
          [t_leaves[j].params if c else {} for j, c in zip(idxs, comp)],
          [s_leaves[j].stages for j in idxs],
          ctxs,
      )
      for j, c, (w, p, st) in zip(idxs, comp, out):
        t_out[j] = Compressed(w, p) if c else w
        s_out[j] = LeafState(st, ri, s_leaves[j].shape)
    return treedef.unflatten(t_out), treedef.unflatten(s_out)

  def _apply_leaf(self, t: Any, s: LeafState, materialize: bool = True) -> Any:
    """One leaf of ``apply``: its rule's chain over its trainable node."""
    if not s.stages:
      return t
    chain = self._rule_for_state(s).chain
    if isinstance(t, Compressed):
      value = chain.apply(t.weight, t.params, s.stages)
    else:
      value = chain.apply(t, {}, s.stages)
    return _materialize(value) if materialize else value

  def _check_grad(self, path: str, t: Any, s: LeafState, g: Any) -> None:
    want = jax.eval_shape(self._apply_leaf, t, s)
    if getattr(g, "shape", None) != want.shape:
      raise ValueError(
          f"spec.update: grads[{path!r}] has shape {getattr(g, 'shape', None)}, but the model "
          f"param has shape {want.shape}. Pass the gradient of the loss with respect to "
          "spec.apply's output (the model params), not with respect to the trainables."
      )

  # ----- helpers -----------------------------------------------------------
  def update_masks(self, trainable: PyTree, state: PyTree) -> PyTree:
    """Boolean keep-masks for the trainable weights, ``None`` where nothing is masked.

    Has the structure of ``trainable``. Used by ``jc.masked_optimizer`` to keep
    pruned weights and their optimizer moments at exactly zero.
    """
    t_leaves, treedef = self._flatten(trainable)
    s_leaves = _flatten_like("state", "spec.update_masks", treedef, state)
    out = []
    for t, s in zip(t_leaves, s_leaves):
      mask = None
      if s.stages:
        chain = self._rule_for_state(s).chain
        if not chain.replaces_weight and is_array(t.weight if isinstance(t, Compressed) else t):
          mask = chain.update_mask(s.stages)
      if isinstance(t, Compressed):
        out.append(Compressed(mask, jax.tree_util.tree_map(lambda _: None, t.params)))
      else:
        out.append(mask)
    return treedef.unflatten(out)

  def owners(self, params: PyTree) -> dict[str, Rule | None]:
    """The rule that owns each leaf, by path (``None`` where no rule matches).

    Args:
      params: the params, or their abstract shapes.

    Returns:
      ``{path: rule or None}`` in the order of the params' leaves; a rule's
      ``stages`` and ``keys`` say which stage keeps which entry of the leaf's
      ``Compressed.params`` and ``LeafState.stages``.

    Example:
      >>> import jax.numpy as jnp, jaxcompress as jc
      >>> spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5)])])
      >>> {p: r and r.keys for p, r in spec.owners({"w": jnp.ones((4, 4)), "b": jnp.ones(4)}).items()}
      {'b': None, 'w': ('prune',)}
    """
    paths, _, owner, _ = self._assign(params)
    return {p: None if o is None else self.rules[o] for p, o in zip(paths, owner)}

  def describe(self, params: PyTree) -> str:
    """A table of every leaf: path, shape, dtype, owning rule and stages.

    Example:
      >>> import jax.numpy as jnp, jaxcompress as jc
      >>> spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5)])])
      >>> print(spec.describe({"w": jnp.ones((4, 4)), "b": jnp.ones(4)}))
      path  shape   dtype    rule  stages
      b     (4,)    float32  -     -
      w     (4, 4)  float32  'w'   Prune(sparsity=0.5)
    """
    paths, leaves, owner, _ = self._assign(params)
    rows = [("path", "shape", "dtype", "rule", "stages")]
    for p, v, o in zip(paths, leaves, owner):
      rule = self.rules[o] if o is not None else None
      rows.append(
          (
              p,
              str(tuple(getattr(v, "shape", ()))),
              str(getattr(v, "dtype", type(v).__name__)),
              repr(rule.pattern) if rule else "-",
              rule.chain.describe() if rule else "-",
          )
      )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows
    )

  def shardings(
      self, params: PyTree, param_shardings: PyTree, *, key: jax.Array | None = None
  ) -> tuple[PyTree, PyTree]:
    """Shardings of ``trainable`` and ``state`` derived from the params' shardings.

    A mask shares its param's ``PartitionSpec``; a per-channel scale keeps the
    channel axis and drops reduced axes; low-rank factors keep the axis they share
    with the kernel. Use them as ``jax.jit(spec.init, out_shardings=...)`` so that
    init allocates no replicated dense copy.

    Args:
      params: the params, or their abstract shapes (``jax.eval_shape`` output).
      param_shardings: a ``NamedSharding`` per param leaf (same structure).
      key: the PRNG key ``init`` will get, for stages that need one at init.

    Returns:
      ``(trainable_shardings, state_shardings)``.
    """
    t_abs, s_abs = jax.eval_shape(lambda p, k: self.init(p, key=k), params, key)
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    sh_leaves = treedef.flatten_up_to(param_shardings)
    t_leaves = treedef.flatten_up_to(t_abs)
    s_leaves = treedef.flatten_up_to(s_abs)

    def derive(p, sh, sub):
      return jax.tree_util.tree_map(lambda a: _sharding.derive(sh, p.shape, a.shape), sub)

    t_sh = [derive(p, sh, t) for p, sh, t in zip(p_leaves, sh_leaves, t_leaves)]
    s_sh = [derive(p, sh, s) for p, sh, s in zip(p_leaves, sh_leaves, s_leaves)]
    return treedef.unflatten(t_sh), treedef.unflatten(s_sh)

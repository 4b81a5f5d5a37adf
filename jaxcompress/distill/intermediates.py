"""Intermediate features, selected by module path and paired student to teacher.

Collect intermediates the way each Flax API offers them, inside the jitted
step (XLA drops those that no loss reads):

- linen, every module's output:
  ``y, col = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])``
- linen, chosen values: ``self.sow("intermediates", "feat", h)`` in the module and
  the same ``mutable=["intermediates"]``;
- NNX: ``self.sow(nnx.Intermediate, "feat", h)`` in the module and
  ``y, col = nnx.capture(model, nnx.Intermediate)(x)`` (add
  ``method_outputs=nnx.Intermediate`` for every method's output).

Feature paths are written like param paths (``Block_0/feat``): the leading
``intermediates`` collection, NNX's ``value`` and linen's ``__call__`` are
dropped, so ``capture_intermediates`` gives module outputs at the module's own
path (``Block_0/Dense_0``). A value sown once has no call index; a module
called ``n > 1`` times gives ``name/0`` ... ``name/{n-1}``.

Patterns are regular expressions matched with ``re.fullmatch``. Matches are
ordered naturally (``layer_2`` before ``layer_10``), and student and teacher
matches are paired in that order.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax

Array = jax.Array
PyTree = Any

_DROP = {"intermediates", "value", "__call__"}


def _key_name(k: Any) -> str:
  return jax.tree_util.keystr((k,), simple=True, separator="/")


def _natural_key(path: str) -> list[Any]:
  return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", path) if p]


def feature_paths(intermediates: PyTree) -> dict[str, Array]:
  """Every array of an intermediates collection, by feature path, in natural order.

  Args:
    intermediates: linen's mutable collections (``{"intermediates": ...}``),
      the collection itself, or the NNX ``State`` from ``nnx.capture``.

  Returns:
    ``{path: array}``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> col = {"intermediates": {"Block_1": {"__call__": (jnp.ones(2),)},
    ...                          "Block_0": {"feat": (jnp.ones(2), jnp.ones(2))}}}
    >>> list(jc.distill.feature_paths(col))
    ['Block_0/feat/0', 'Block_0/feat/1', 'Block_1']
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(intermediates, is_leaf=lambda x: isinstance(x, tuple))
  out: dict[str, Array] = {}
  for path, leaf in flat:
    names = [n for n in (_key_name(k) for k in path) if n not in _DROP]
    base = "/".join(names)
    if isinstance(leaf, tuple):
      items = [(base, leaf[0])] if len(leaf) == 1 else [(f"{base}/{i}", v) for i, v in enumerate(leaf)]
    else:
      items = [(base, leaf)]
    for p, v in items:
      if not hasattr(v, "shape"):
        continue
      if p in out:
        raise ValueError(
            f"feature_paths: two intermediates have the path {p!r} once 'intermediates', "
            "'value' and '__call__' are dropped; give the sown values distinct names."
        )
      out[p] = v
  return {p: out[p] for p in sorted(out, key=_natural_key)}


def _shown(feats: dict[str, Array]) -> str:
  items = [f"{p} {tuple(v.shape)}" for p, v in list(feats.items())[:30]]
  return ", ".join(items) + (" ..." if len(feats) > 30 else "")


def select_features(intermediates: PyTree, pattern: str) -> dict[str, Array]:
  """The intermediates whose feature path fully matches ``pattern``.

  Args:
    intermediates: as for ``feature_paths``.
    pattern: a regular expression, matched with ``re.fullmatch``.

  Returns:
    ``{path: array}`` in natural order; never empty.

  Raises:
    ValueError: when nothing matches (the message lists the paths there are).

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> col = {"intermediates": {"Block_0": {"feat": (jnp.ones(2),)},
    ...                          "Block_1": {"feat": (jnp.ones(2),)}, "head": (jnp.ones(1),)}}
    >>> list(jc.distill.select_features(col, r"Block_\\d+/feat"))
    ['Block_0/feat', 'Block_1/feat']
  """
  try:
    rx = re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ValueError(f"select_features: pattern {pattern!r} is not a valid regular expression: {e}.") from e
  feats = feature_paths(intermediates)
  chosen = {p: v for p, v in feats.items() if rx.fullmatch(p)}
  if not chosen:
    there = _shown(feats) or (
        "none (run linen with capture_intermediates=True or sow, and mutable=['intermediates']; "
        "NNX with nnx.capture(model, nnx.Intermediate))"
    )
    raise ValueError(
        f"select_features: pattern {pattern!r} matches no intermediate (matched with re.fullmatch). "
        f"The intermediates are: {there}."
    )
  return chosen


class FeaturePair(NamedTuple):
  """A student feature and the teacher feature it learns from.

  Attributes:
    student_path: the student's feature path.
    teacher_path: the teacher's feature path.
    student: the student's array.
    teacher: the teacher's array.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> pair = jc.distill.FeaturePair("b0", "layer_1", jnp.ones((2, 4)), jnp.ones((2, 4)))
    >>> pair.student_path, pair.teacher.shape
    ('b0', (2, 4))
  """

  student_path: str
  teacher_path: str
  student: Array
  teacher: Array


def pair_features(
    student_intermediates: PyTree,
    teacher_intermediates: PyTree,
    *,
    student_pattern: str,
    teacher_pattern: str,
    same_width: bool = True,
) -> list[FeaturePair]:
  """Pairs the student's and teacher's matches, in natural order.

  Args:
    student_intermediates: the student's intermediates (see ``feature_paths``).
    teacher_intermediates: the teacher's.
    student_pattern: selects the student's features.
    teacher_pattern: selects the teacher's features; as many as the student's.
    same_width: require equal shapes; with ``False`` only the last (feature)
      axis may differ, for a learned projection.

  Returns:
    A list of ``FeaturePair``.

  Raises:
    ValueError: when the counts differ or a pair's shapes do not fit.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> s = {"intermediates": {"b0": (jnp.ones((2, 4)),), "b1": (jnp.ones((2, 4)),)}}
    >>> t = {"intermediates": {"layer_1": (jnp.ones((2, 8)),), "layer_3": (jnp.ones((2, 8)),)}}
    >>> pairs = jc.distill.pair_features(s, t, student_pattern=r"b\\d", teacher_pattern=r"layer_(1|3)",
    ...                                  same_width=False)
    >>> [(p.student_path, p.teacher_path) for p in pairs]
    [('b0', 'layer_1'), ('b1', 'layer_3')]
  """
  s = select_features(student_intermediates, student_pattern)
  t = select_features(teacher_intermediates, teacher_pattern)
  if len(s) != len(t):
    raise ValueError(
        f"pair_features: student pattern {student_pattern!r} matches {len(s)} features but teacher "
        f"pattern {teacher_pattern!r} matches {len(t)}; they pair one to one in natural order. "
        f"Student: {_shown(s)}. Teacher: {_shown(t)}."
    )
  pairs = []
  for (sp, sv), (tp, tv) in zip(s.items(), t.items()):
    ok = sv.shape == tv.shape if same_width else (
        sv.ndim == tv.ndim and sv.shape[:-1] == tv.shape[:-1]
    )
    if not ok:
      need = "equal shapes" if same_width else "equal shapes except the last (feature) axis"
      hint = (
          " Pass same_width=False and project the student's features (init_projection)."
          if same_width and sv.ndim == tv.ndim and sv.shape[:-1] == tv.shape[:-1]
          else ""
      )
      raise ValueError(
          f"pair_features: student feature {sp!r} {tuple(sv.shape)} does not pair with teacher "
          f"feature {tp!r} {tuple(tv.shape)}: need {need}.{hint}"
      )
    pairs.append(FeaturePair(sp, tp, sv, tv))
  return pairs

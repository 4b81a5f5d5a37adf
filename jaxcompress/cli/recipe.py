"""Compression recipes: a TOML file that lists ``jc.Rule``s by name.

A recipe is the ``jc.Spec`` of a one-shot compression, written as data::

    huffman = true                     # optional: Huffman-code the integer streams

    [[rules]]
    pattern = 'Dense_[01]/kernel'      # a regular expression, as jc.Rule takes (or a list of them)
    stages = [
      { stage = "prune.magnitude", sparsity = 0.5 },
      { stage = "quant.FakeQuant", bits = 8 },
    ]

    [[rules]]
    pattern = 'Dense_2/kernel'
    stages = [{ stage = "quant.gptq", bits = 4 }]

is ``jc.Spec([jc.Rule(r"Dense_[01]/kernel", [jc.prune.magnitude(sparsity=0.5),
jc.quant.FakeQuant(bits=8)]), ...])``. A stage is named ``module.name`` after
the public API: every stage class and stage factory of ``jc.prune``,
``jc.quant``, ``jc.lowrank`` and ``jc.cluster`` (``prune.Prune``,
``prune.magnitude``, ``quant.FakeQuant``, ``quant.LSQ``, ``lowrank.svd``,
``cluster.kmeans``, ...); its other keys are the keyword arguments. An argument
that is itself an object is a table with a ``type`` key:
``structure = { type = "prune.NM", n = 2, m = 4 }``,
``granularity = { type = "quant.PerGroup", size = 32 }``. TOML arrays become
tuples. Stages may also be written as ``[[rules.stages]]`` tables.

``quant.gptq`` is the one name that is not a stage: GPTQ (``jc.quant.gptq``)
from calibration inputs, the only stage of its rule, with ``gptq``'s keyword
arguments (``bits``, ``granularity``, ``damp``, ``block_size``, ...). Its result is
stored as a ``jc.quant.FakeQuant`` leaf of the same format that holds GPTQ's
codes and scales (see ``jaxcompress.cli.oneshot``).

Every error is a ``RecipeError`` that names the file and the line: TOML syntax
(the line ``tomllib`` reports), an unknown key or stage, an argument the stage
does not take or refuses, and, once the params are known (``Recipe.check``), a
pattern that selects no leaf.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import tomllib
import typing
from typing import Any, Callable, Mapping, Sequence

import jax

import jaxcompress as jc
from jaxcompress.core.paths import path_str
from jaxcompress.core.spec import check_pattern

PyTree = Any

GPTQ = "quant.gptq"
_MODULES = ("prune", "quant", "lowrank", "cluster")
_TOP_KEYS = ("rules", "huffman")
_RULE_KEYS = ("pattern", "stages")
#: Keyword arguments of ``jc.quant.gptq`` that set the format (FakeQuant takes them too).
_FORMAT_KEYS = ("bits", "dtype", "symmetric", "narrow_range", "granularity")


class RecipeError(ValueError):
  """A recipe that cannot be used: the message starts with ``file:line:``.

  Attributes:
    source: the recipe file (or ``"<recipe>"``).
    line: the 1-based line the error points at.
  """

  def __init__(self, source: str, line: int, message: str, text: str | None = None):
    self.source, self.line = source, line
    shown = ""
    if text is not None:
      lines = text.splitlines()
      if 1 <= line <= len(lines):
        shown = f"\n  {line:>3} | {lines[line - 1]}"
    super().__init__(f"{source}:{line}: {message}{shown}")


# --------------------------------------------------------------------------
# The vocabulary: public stage classes and factories, and argument types.
# --------------------------------------------------------------------------


def _returns_stage(fn: Callable) -> bool:
  try:
    ret = typing.get_type_hints(fn).get("return")
  except Exception:  # an annotation that does not resolve: not a stage factory
    return False
  return isinstance(ret, type) and issubclass(ret, jc.Stage)


def stage_names() -> dict[str, Callable[..., jc.Stage]]:
  """Every stage a recipe can name: ``{"prune.magnitude": jc.prune.magnitude, ...}``.

  The stage classes and the functions returning a stage in the ``__all__`` of
  ``jc.prune``, ``jc.quant``, ``jc.lowrank`` and ``jc.cluster``.

  Example:
    >>> from jaxcompress.cli.recipe import stage_names
    >>> [n for n in stage_names() if n.startswith("quant.")]
    ['quant.FakeQuant', 'quant.LSQ']
  """
  out = {}
  for module_name in _MODULES:
    module = getattr(jc, module_name)
    for name in module.__all__:
      obj = getattr(module, name)
      if (isinstance(obj, type) and issubclass(obj, jc.Stage)) or (
          inspect.isfunction(obj) and _returns_stage(obj)
      ):
        out[f"{module_name}.{name}"] = obj
  return out


def _type_names() -> dict[str, type]:
  """Classes an argument table can build with ``type = "module.Name"``."""
  out = {}
  for module_name in _MODULES:
    module = getattr(jc, module_name)
    for name in module.__all__:
      obj = getattr(module, name)
      if isinstance(obj, type) and not issubclass(obj, jc.Stage):
        out[f"{module_name}.{name}"] = obj
  return out


def _suggest(name: str, known: Sequence[str]) -> str:
  close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
  return f" Did you mean {close[0]!r}?" if close else ""


# --------------------------------------------------------------------------
# Where things are in the text.
# --------------------------------------------------------------------------


def _code_only(line: str) -> str:
  """The line with string contents blanked and the comment cut (same length up to the cut)."""
  out, quote, i = [], None, 0
  while i < len(line):
    c = line[i]
    if quote:
      if c == "\\" and quote == '"' and i + 1 < len(line):
        out.append("  ")
        i += 2
        continue
      out.append(c if c == quote else " ")
      if c == quote:
        quote = None
    elif c in "\"'":
      quote = c
      out.append(c)
    elif c == "#":
      break
    else:
      out.append(c)
    i += 1
  return "".join(out)


_RULE_HEADER = re.compile(r"^\s*\[\[\s*rules\s*\]\]")
_STAGE_HEADER = re.compile(r"^\s*\[\[\s*rules\s*\.\s*stages\s*\]\]")
_ANY_ARRAY_HEADER = re.compile(r"^\s*\[\[")


def _key_re(key: str) -> re.Pattern:
  k = re.escape(key)
  return re.compile(rf"(?:^|[\s{{,])(?:{k}|\"{k}\"|'{k}')\s*=|\.\s*{k}\s*\]")


class _Lines:
  """Finds the line of a rule, a stage or a key of a recipe's text (1-based)."""

  def __init__(self, text: str):
    self.code = [_code_only(line) for line in text.splitlines()]
    self.rule_starts = [i for i, line in enumerate(self.code) if _RULE_HEADER.match(line)]

  def _find(self, key: str, start: int, end: int) -> int | None:
    pattern = _key_re(key)
    for i in range(start, min(end, len(self.code))):
      if pattern.search(self.code[i]):
        return i
    return None

  def top_key(self, key: str) -> int:
    end = self.rule_starts[0] if self.rule_starts else len(self.code)
    i = self._find(key, 0, end)
    return 1 if i is None else i + 1

  def _rule_span(self, r: int) -> tuple[int, int]:
    if r < len(self.rule_starts):
      ends = self.rule_starts[r + 1 :] + [len(self.code)]
      return self.rule_starts[r], ends[0]
    i = self._find("rules", 0, len(self.code))  # rules written as one inline array
    return (0, len(self.code)) if i is None else (i, len(self.code))

  def rule(self, r: int) -> int:
    return self._rule_span(r)[0] + 1

  def rule_key(self, r: int, key: str) -> int:
    start, end = self._rule_span(r)
    i = self._find(key, start, end)
    return start + 1 if i is None else i + 1

  def _stage_span(self, r: int, s: int) -> tuple[int, int]:
    start, end = self._rule_span(r)
    headers = [i for i in range(start, end) if _STAGE_HEADER.match(self.code[i])]
    if headers:
      if s >= len(headers):
        return start, end
      nxt = [i for i in range(headers[s] + 1, end) if _ANY_ARRAY_HEADER.match(self.code[i])]
      return headers[s], nxt[0] if nxt else end
    seen = 0
    pattern = _key_re("stage")
    for i in range(start, end):
      n = len(pattern.findall(self.code[i]))
      if seen + n > s:
        return i, i + 1
      seen += n
    i = self._find("stages", start, end)  # a stage without a name: point at the list
    return (start, end) if i is None else (i, i + 1)

  def stage(self, r: int, s: int) -> int:
    start, end = self._stage_span(r, s)
    i = self._find("stage", start, end)
    return start + 1 if i is None else i + 1

  def stage_key(self, r: int, s: int, key: str) -> int:
    start, end = self._stage_span(r, s)
    i = self._find(key, start, end)
    return self.stage(r, s) if i is None else i + 1


# --------------------------------------------------------------------------
# The recipe.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A parsed recipe: the spec's rules, GPTQ settings and export options.

  Attributes:
    rules: the ``jc.Rule`` of each ``[[rules]]`` table, in order (a GPTQ rule
      as a ``FakeQuant(ranges="static")`` of GPTQ's format).
    gptq: per rule, ``jc.quant.gptq``'s keyword arguments for a GPTQ rule,
      else ``None``.
    huffman: ``jc.export.export(..., huffman=)``.
    source: the file name, for messages.
    text: the recipe's text.
  """

  rules: tuple[jc.Rule, ...]
  gptq: tuple[dict | None, ...]
  huffman: bool = False
  source: str = "<recipe>"
  text: str = ""

  def spec(self) -> jc.Spec:
    """The ``jc.Spec`` of the rules."""
    return jc.Spec(self.rules)

  def error(self, line: int, message: str) -> RecipeError:
    """A ``RecipeError`` at ``line`` of this recipe."""
    return RecipeError(self.source, line, message, self.text)

  def rule_line(self, r: int) -> int:
    """The line of rule ``r``'s pattern."""
    return _Lines(self.text).rule_key(r, "pattern")

  def stage_line(self, r: int, s: int) -> int:
    """The line of stage ``s`` of rule ``r``."""
    return _Lines(self.text).stage(r, s)

  def owners(self, params: PyTree) -> dict[str, int | None]:
    """The rule that owns each leaf (as ``jc.Spec``: the first that matches), checked.

    Raises:
      RecipeError: at the pattern's line, for a rule that selects no leaf
        (or only leaves an earlier rule owns), or a GPTQ rule that selects a
        leaf that is not 2-D.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [path_str(p) for p, _ in flat]
    owner = []
    for (_, leaf), path in zip(flat, paths):
      owner.append(next((i for i, r in enumerate(self.rules) if r.matches(path, leaf)), None))
    shown = ", ".join(repr(p) for p in paths[:20]) + (" ..." if len(paths) > 20 else "")
    for i, rule in enumerate(self.rules):
      if i in owner:
        continue
      taken = [p for p, o, (_, leaf) in zip(paths, owner, flat) if rule.matches(p, leaf)]
      why = (
          f" (the leaves it matches, {taken[0]!r}{' ...' if len(taken) > 1 else ''}, are owned "
          f"by the earlier rule {self.rules[owner[paths.index(taken[0])]].pattern!r})"
          if taken else ""
      )
      raise self.error(
          self.rule_line(i),
          f"pattern {rule.pattern!r} selects no leaf{why}. A pattern is a regular expression "
          f"matched against the whole leaf path; the paths are: {shown}.",
      )
    for path, o, (_, leaf) in zip(paths, owner, flat):
      if o is not None and self.gptq[o] is not None and getattr(leaf, "ndim", 0) != 2:
        raise self.error(
            self.rule_line(o),
            f"quant.gptq quantizes 2-D Dense kernels (in, out), but pattern "
            f"{self.rules[o].pattern!r} also selects {path!r} of shape "
            f"{tuple(getattr(leaf, 'shape', ()))}; narrow the pattern to the kernels.",
        )
    return dict(zip(paths, owner))


def _convert(value: Any, build: Callable[[str, str, dict], Any], key: str) -> Any:
  """TOML value -> argument: tables with ``type`` are built, arrays become tuples."""
  if isinstance(value, dict):
    if "type" in value:
      args = {k: _convert(v, build, key) for k, v in value.items() if k != "type"}
      return build(key, value["type"], args)
    return {k: _convert(v, build, key) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_convert(v, build, key) for v in value)
  return value


def _unexpected(e: TypeError) -> str | None:
  m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
  return m.group(1) if m else None


def _call(fn: Callable, kwargs: dict, describe: str, key_line: Callable[[str], int],
          line: int, fail: Callable[[int, str], RecipeError]) -> Any:
  """``fn(**kwargs)`` with its errors turned into ``RecipeError``s at the right line."""
  sig = inspect.signature(fn).parameters
  names = [n for n, p in sig.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
  if not any(p.kind == p.VAR_KEYWORD for p in sig.values()):
    for k in kwargs:
      if k not in names:
        raise fail(key_line(k), f"{describe} takes no argument {k!r}.{_suggest(k, names)} "
                   f"Its arguments are: {', '.join(names)}.")
  try:
    inspect.signature(fn).bind(**kwargs)
  except TypeError as e:
    raise fail(line, f"{describe}: {e}.") from None
  try:
    return fn(**kwargs)
  except (TypeError, ValueError) as e:
    message = str(e)
    bad = _unexpected(e) if isinstance(e, TypeError) else None
    if bad is None:  # the first argument the message names
      named = [k for k in kwargs if re.search(rf"\b{re.escape(k)}\b", message)]
      bad = named[0] if named else None
    if not message.startswith((describe, describe.rsplit(".", 1)[-1])):
      message = f"{describe}: {message}"
    raise fail(line if bad is None else key_line(bad), message) from None


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
  """Parses a recipe's TOML text.

  Args:
    text: the TOML text (see the module docstring).
    source: the file name that error messages show.

  Returns:
    A ``Recipe``.

  Raises:
    RecipeError: naming the file and line.

  Example:
    >>> from jaxcompress.cli.recipe import parse_recipe
    >>> recipe = parse_recipe('''
    ... [[rules]]
    ... pattern = '.*kernel'
    ... stages = [{ stage = "prune.magnitude", sparsity = 0.5 }, { stage = "quant.FakeQuant", bits = 4 }]
    ... ''')
    >>> recipe.rules[0].chain.describe()
    'Prune(sparsity=0.5) -> FakeQuant(bits=4)'
    >>> parse_recipe('[[rules]]\\npattern = "w"\\nstages = [{ stage = "prune.magnitud" }]\\n', "r.toml")
    Traceback (most recent call last):
    ...
    jaxcompress.cli.recipe.RecipeError: r.toml:3: unknown stage 'prune.magnitud'. Did you mean 'prune.magnitude'? ...
  """
  try:
    data = tomllib.loads(text)
  except tomllib.TOMLDecodeError as e:
    m = re.search(r"at line (\d+)", str(e))
    raise RecipeError(source, int(m.group(1)) if m else 1, f"invalid TOML: {e}", text) from None
  lines = _Lines(text)

  def fail(line: int, message: str) -> RecipeError:
    return RecipeError(source, line, message, text)

  for key in data:
    if key not in _TOP_KEYS:
      raise fail(lines.top_key(key), f"unknown key {key!r}.{_suggest(key, _TOP_KEYS)} A recipe "
                 "has [[rules]] tables and an optional huffman = true/false.")
  huffman = data.get("huffman", False)
  if not isinstance(huffman, bool):
    raise fail(lines.top_key("huffman"), f"huffman must be true or false, got {huffman!r}.")
  rules_data = data.get("rules")
  if not isinstance(rules_data, list) or not rules_data or not all(isinstance(r, dict) for r in rules_data):
    raise fail(lines.top_key("rules") if "rules" in data else 1,
               "a recipe needs at least one [[rules]] table with a pattern and stages.")

  stages, types = stage_names(), _type_names()
  rules, gptq = [], []
  for r, rule_data in enumerate(rules_data):
    for key in rule_data:
      if key not in _RULE_KEYS:
        raise fail(lines.rule_key(r, key), f"rule {r + 1} has an unknown key {key!r}."
                   f"{_suggest(key, _RULE_KEYS)} A rule has a pattern and stages.")
    if "pattern" not in rule_data:
      raise fail(lines.rule(r), f"rule {r + 1} has no pattern; give pattern = 'a regular "
                 "expression' matched against leaf paths such as Dense_0/kernel.")
    pattern = rule_data["pattern"]
    if isinstance(pattern, list) and pattern and all(isinstance(p, str) for p in pattern):
      pattern = tuple(pattern)
    if not isinstance(pattern, (str, tuple)):
      raise fail(lines.rule_key(r, "pattern"), f"pattern must be a string or a list of strings, "
                 f"got {pattern!r}.")
    try:
      check_pattern(pattern)
    except (TypeError, ValueError) as e:
      raise fail(lines.rule_key(r, "pattern"), str(e)) from None
    stage_list = rule_data.get("stages")
    if not isinstance(stage_list, list) or not stage_list or not all(isinstance(s, dict) for s in stage_list):
      raise fail(lines.rule_key(r, "stages") if "stages" in rule_data else lines.rule(r),
                 f"rule {r + 1} ({pattern!r}) needs stages = [{{ stage = \"module.name\", ... }}, ...].")

    built, gptq_args = [], None
    for s, stage_data in enumerate(stage_list):
      def key_line(key, r=r, s=s):
        return lines.stage_key(r, s, key)

      def build(key, type_name, args, r=r, s=s):
        if type_name not in types:
          raise fail(lines.stage_key(r, s, key), f"unknown type {type_name!r} for {key!r}."
                     f"{_suggest(str(type_name), list(types))} Types are named module.Class, "
                     f"e.g. 'prune.NM', 'quant.PerGroup', 'lowrank.Fraction'.")
        return _call(types[type_name], args, type_name, lambda k: lines.stage_key(r, s, k),
                     lines.stage_key(r, s, key), fail)

      name = stage_data.get("stage")
      line = lines.stage(r, s)
      if not isinstance(name, str):
        raise fail(line, f"stage {s + 1} of rule {r + 1} has no name: give stage = \"module.name\", "
                   "e.g. stage = \"prune.magnitude\".")
      if name != GPTQ and name not in stages:
        known = list(stages) + [GPTQ]
        raise fail(line, f"unknown stage {name!r}.{_suggest(name, known)} Stages are: "
                   f"{', '.join(known)}.")
      kwargs = {k: _convert(v, build, k) for k, v in stage_data.items() if k != "stage"}
      if name == GPTQ:
        if len(stage_list) != 1:
          raise fail(line, "quant.gptq must be the only stage of its rule (GPTQ quantizes the "
                     "float kernel from its inputs); put other stages in rules of their own.")
        gptq_args = _gptq_arguments(kwargs, name, key_line, line, fail)
        built.append(_call(jc.quant.FakeQuant, {**{k: v for k, v in kwargs.items() if k in _FORMAT_KEYS},
                                                "ranges": "static"}, name, key_line, line, fail))
      else:
        built.append(_call(stages[name], kwargs, name, key_line, line, fail))
    try:
      rules.append(jc.Rule(pattern, built))
    except (TypeError, ValueError) as e:
      raise fail(lines.rule_key(r, "pattern"), str(e)) from None
    gptq.append(gptq_args)
  return Recipe(tuple(rules), tuple(gptq), huffman, source, text)


def _gptq_arguments(kwargs, name, key_line, line, fail) -> dict:
  """Checks ``quant.gptq``'s keyword arguments against ``jc.quant.gptq``'s signature."""
  params = inspect.signature(jc.quant.gptq).parameters
  allowed = [k for k, p in params.items() if p.kind == p.KEYWORD_ONLY and k != "path"]
  for k in kwargs:
    if k not in allowed:
      raise fail(key_line(k), f"{name} takes no argument {k!r}.{_suggest(k, allowed)} Its "
                 f"arguments are: {', '.join(allowed)}.")
  for k, low in (("damp", 0.0), ("block_size", 1)):
    v = kwargs.get(k)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < low
                          or (k == "block_size" and not isinstance(v, int))):
      raise fail(key_line(k), f"{name}: {k}={v!r}; it must be " +
                 ("a number >= 0 (e.g. 0.01)." if k == "damp" else "a positive int (e.g. 128)."))
  if "act_order" in kwargs and not isinstance(kwargs["act_order"], bool):
    raise fail(key_line("act_order"), f"{name}: act_order must be true or false.")
  if kwargs.get("act_order") and isinstance(kwargs.get("granularity"), jc.quant.PerGroup):
    raise fail(key_line("act_order"), f"{name}: act_order = true reorders input rows, which "
               "breaks contiguous groups of PerGroup; drop it or use quant.PerChannel.")
  return dict(kwargs)


def load_recipe(path: str | os.PathLike) -> Recipe:
  """Reads and parses a recipe file.

  Args:
    path: the TOML file.

  Returns:
    A ``Recipe``.

  Raises:
    RecipeError: naming the file and line; ``FileNotFoundError`` when it does not exist.
  """
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise RecipeError(str(path), raw[: e.start].count(b"\n") + 1, "the file is not UTF-8 text.") from None
  return parse_recipe(text, str(path))


__all__ = ["GPTQ", "Recipe", "RecipeError", "load_recipe", "parse_recipe", "stage_names"]

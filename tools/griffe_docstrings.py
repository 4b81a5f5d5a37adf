"""Griffe extension for the docs build: reads jaxcompress docstrings and exports as written.

The docstrings follow Google style with two habits that Griffe's Google parser
does not know:

- the example section is headed ``Example:`` (Griffe knows ``Examples:``), so
  its ``>>>`` lines would be rendered as prose;
- parameters and attributes that share a description are listed together,
  ``trainable, state: from spec.init``, which Griffe reads as one parameter
  named ``"trainable, state"`` and reports as missing from the signature.

This extension rewrites each docstring before Griffe parses it: ``Example:``
becomes ``Examples:``, and a shared entry becomes one entry per name with the
same description, so every name is still checked against the signature.

It also reads an ``__all__`` built from lists of the module itself
(``__all__ = _NUMERICS_ALL + _ACTIVATIONS_ALL`` in ``jaxcompress.quant``):
Griffe expands only other modules' ``__all__`` there, and would otherwise
document no member of such a package. An ``__all__`` item it cannot read is a
warning, which fails ``mkdocs build --strict``.

mkdocs.yml loads it for mkdocstrings (``extensions:``).
"""

from __future__ import annotations

import ast
import re
from typing import Any

import griffe

# Sections whose entries are "name: description" (as Griffe's Google parser reads them).
_ITEM_SECTIONS = {
    "args",
    "arguments",
    "params",
    "parameters",
    "keyword args",
    "keyword arguments",
    "other args",
    "other arguments",
    "other params",
    "other parameters",
    "attributes",
}
_SECTION = re.compile(r"^([A-Za-z][A-Za-z ]*):\s*$")
_SHARED = re.compile(r"^(\s+)(\**\w+(?:,\s*\**\w+)+):(\s.*|)$")


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def rewrite(text: str) -> str:
  """The docstring with ``Example:`` headings and shared entries rewritten.

  Args:
    text: a docstring, dedented (as Griffe stores it).

  Returns:
    The rewritten docstring.
  """
  lines = text.split("\n")
  out: list[str] = []
  section = None
  i = 0
  while i < len(lines):
    line = lines[i]
    head = _SECTION.match(line)
    if head:
      name = head.group(1).lower()
      if name == "example":
        line, name = "Examples:", "examples"
      section = name
      out.append(line)
      i += 1
      continue
    if line and not line[0].isspace():
      section = None  # prose at the docstring's own indentation ends a section
    shared = _SHARED.match(line) if section in _ITEM_SECTIONS else None
    if not shared:
      out.append(line)
      i += 1
      continue
    indent, names, first = shared.group(1), shared.group(2), shared.group(3)
    body = [first]
    i += 1
    while i < len(lines) and lines[i].strip() and _indent(lines[i]) > len(indent):
      body.append("\n" + lines[i])
      i += 1
    for n in re.split(r",\s*", names):
      out.append(f"{indent}{n}:" + "".join(body))
  return "\n".join(out)


def _local_list(module: griffe.Module, export: Any) -> list[str] | None:
  """The strings of a list of ``module`` named by ``export``, or None if it is not one."""
  target = module.members.get(getattr(export, "name", None))
  if target is None or target.is_alias or not isinstance(target, griffe.Attribute):
    return None
  elements = getattr(target.value, "elements", None)
  if elements is None:
    return None
  try:
    names = [ast.literal_eval(str(e)) for e in elements]
  except (ValueError, SyntaxError):
    return None
  return names if all(isinstance(n, str) for n in names) else None


def _expand_local_exports(module: griffe.Module) -> None:
  if module.exports:
    exports: list[Any] = []
    for export in module.exports:
      if isinstance(export, str):
        exports.append(export)
        continue
      names = _local_list(module, export)
      if names is None:
        if getattr(export, "name", None) in module.members:
          griffe.logger.warning(
              "%s.__all__: cannot read the item %s; write the names as string literals",
              module.path,
              export,
          )
        exports.append(export)  # another module's __all__: Griffe expands it
      else:
        exports.extend(n for n in names if n not in exports)
    module.exports = exports
  for sub in module.modules.values():
    if not sub.is_alias:
      _expand_local_exports(sub)


class JaxcompressDocstrings(griffe.Extension):
  """Rewrites docstrings and local ``__all__`` lists (see the module docstring)."""

  def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
    del kwargs
    if obj.docstring is not None:
      obj.docstring.value = rewrite(obj.docstring.value)

  def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
    del kwargs
    _expand_local_exports(pkg)

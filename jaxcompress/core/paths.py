"""Leaf paths: the strings rules match against."""

from __future__ import annotations

from typing import Any

import jax


def path_str(path: tuple[Any, ...]) -> str:
  """The path string of a key path: ``Dense_0/kernel``.

  Written as ``jax.tree_util.keystr(path, simple=True, separator="/")``, with a
  trailing ``/value`` dropped, so that an NNX ``State`` leaf (``l1/kernel/value``)
  is matched by the same pattern as the linen one (``l1/kernel``).
  """
  s = jax.tree_util.keystr(path, simple=True, separator="/")
  if s.endswith("/value"):
    s = s[: -len("/value")]
  return s


def parent(path: str) -> str:
  """The module path of a leaf path: ``Dense_0/kernel`` -> ``Dense_0``."""
  return path.rsplit("/", 1)[0] if "/" in path else ""

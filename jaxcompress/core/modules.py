"""Module surgery on NNX model clones: reading and replacing children by key.

Shared by the inference paths that swap layers in a copy of a model
(factorized, served from codes) and by the passes that wrap layers (input
quantization, calibration capture).
"""

from __future__ import annotations

from typing import Any

from flax import nnx


def key_of(entry: Any) -> Any:
  """The attribute name, dict key or list index of one ``jax.tree_util`` key path entry."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  raise TypeError(f"Unsupported key path entry {entry!r}.")


def get_child(obj: Any, key: Any) -> Any:
  """``obj.key`` for a name, ``obj[key]`` for an index or dict key."""
  return getattr(obj, key) if isinstance(key, str) else obj[key]


def children(holder: Any) -> list[tuple[Any, Any]]:
  """``(key, child)`` pairs of a module, list, tuple or dict."""
  if isinstance(holder, (nnx.List, list, tuple)):
    return list(enumerate(holder))
  if isinstance(holder, (nnx.Dict, dict)):
    return list(holder.items())
  return list(vars(holder).items())


def set_child(holder: Any, key: Any, value: Any, path: str) -> None:
  """Replaces one child; a tuple cannot be changed, and the error names ``path``."""
  if isinstance(holder, tuple):
    raise ValueError(
        f"Layer {path!r} is held in a tuple, which cannot be changed in place; hold layers in "
        "an nnx.List (or a list)."
    )
  if isinstance(holder, (nnx.List, list, nnx.Dict, dict)):
    holder[key] = value
  else:
    setattr(holder, key, value)

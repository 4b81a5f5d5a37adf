"""Shardings of compression state derived from the shardings of the params."""

from __future__ import annotations

from typing import Any

from jax.sharding import NamedSharding, PartitionSpec


def derive(param_sharding: Any, param_shape: tuple[int, ...], shape: tuple[int, ...]) -> Any:
  """The sharding of an array derived from a param, given both shapes.

  An axis keeps the param's partitioning where the derived array has the same
  size on that axis as the param (a mask: every axis; a per-channel scale of
  shape ``(1, out)``: the channel axis; a factor ``U (in, r)``: the input axis),
  or a size the mesh axes still divide (a bit-packed mask). Every other axis is
  replicated, and so is an array whose rank differs from the param's.

  Args:
    param_sharding: the param's ``NamedSharding`` (anything else is returned as is).
    param_shape: the param's shape.
    shape: the derived array's shape.

  Returns:
    A ``NamedSharding`` on the same mesh.

  Example:
    >>> import jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> tuple(derive(NamedSharding(mesh, P(None, "model")), (8, 4), (1, 4)).spec)
    (None, 'model')
  """
  if not isinstance(param_sharding, NamedSharding):
    return param_sharding
  mesh = param_sharding.mesh
  pspec = tuple(param_sharding.spec) + (None,) * (len(param_shape) - len(param_sharding.spec))
  if len(shape) != len(param_shape):
    return NamedSharding(mesh, PartitionSpec())
  axes = []
  for size, psize, ax in zip(shape, param_shape, pspec):
    if ax is None:
      axes.append(None)
      continue
    names = ax if isinstance(ax, tuple) else (ax,)
    n = 1
    for a in names:
      n *= mesh.shape[a]
    axes.append(ax if (size == psize or (size > 1 and size % n == 0)) else None)
  return NamedSharding(mesh, PartitionSpec(*axes))

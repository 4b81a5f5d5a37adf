"""Shardings of compression state derived from the shardings of the params."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def derive(param_sharding: Any, param_shape: tuple[int, ...], shape: tuple[int, ...]) -> Any:
  """The sharding of an array derived from a param, given both shapes.

  An axis keeps the param's partitioning where the derived array has the same
  size on that axis as the param (a mask: every axis; a per-channel scale of
  shape ``(1, out)``: the channel axis; a factor ``U (in, r)``: the input axis,
  ``V (r, out)``: the output axis). Every other axis is replicated (a rank
  axis, a reduced axis, the groups of a per-group scale), and so is an array
  whose rank differs from the param's.

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
    >>> tuple(derive(NamedSharding(mesh, P("model", None)), (8, 4), (8, 2)).spec)  # U (in, r)
    ('model', None)
  """
  if not isinstance(param_sharding, NamedSharding):
    return param_sharding
  mesh = param_sharding.mesh
  pspec = tuple(param_sharding.spec) + (None,) * (len(param_shape) - len(param_sharding.spec))
  if len(shape) != len(param_shape):
    return NamedSharding(mesh, PartitionSpec())
  axes = [ax if size == psize else None for size, psize, ax in zip(shape, param_shape, pspec)]
  return NamedSharding(mesh, PartitionSpec(*axes))


def explicit_sharding(x: Any) -> Any:
  """The ``NamedSharding`` of ``x`` when an Explicit mesh axis shards it, else None.

  Example:
    >>> import jax.numpy as jnp
    >>> explicit_sharding(jnp.ones(3)) is None  # no mesh
    True
  """
  try:
    sharding = jax.typeof(x).sharding
  except (TypeError, AttributeError):
    return None
  if not isinstance(sharding, NamedSharding):
    return None
  explicit = {
      name for name, t in zip(sharding.mesh.axis_names, sharding.mesh.axis_types)
      if t == AxisType.Explicit
  }
  for ax in sharding.spec:
    names = ax if isinstance(ax, tuple) else (ax,)
    if any(a in explicit for a in names if a is not None):
      return sharding
  return None


def replicate_explicit(tree: Any) -> tuple[Any, bool]:
  """``tree`` with every array that an Explicit mesh axis shards made replicated.

  Stages compute on whole leaves (a top-k over all weights, an SVD, k-means
  over all values), which explicit sharding does not partition implicitly; on
  Auto meshes (GSPMD) and without a mesh this returns ``tree`` unchanged.

  Returns:
    ``(tree, changed)``; ``changed`` says whether anything was resharded.
  """
  changed = False

  def one(x):
    nonlocal changed
    if explicit_sharding(x) is None:
      return x
    changed = True
    return jax.sharding.reshard(x, PartitionSpec())

  return jax.tree_util.tree_map(one, tree), changed


def reshard_like(tree: Any, param: Any) -> Any:
  """Every array of ``tree`` resharded as derived from the Explicit sharding of ``param``.

  The inverse of ``replicate_explicit`` for the outputs of a stage: a mask
  gets the weight's sharding, a per-channel scale its channel axis (``derive``).
  """
  sharding = explicit_sharding(param)
  if sharding is None:
    return tree
  shape = tuple(param.shape)
  return jax.tree_util.tree_map(
      lambda a: jax.sharding.reshard(a, derive(sharding, shape, tuple(a.shape)).spec), tree
  )


def reshard_as(tree: Any, like: Any) -> Any:
  """Every array of ``tree`` resharded as the matching array of ``like`` was.

  For a stage's new state and params, which keep the structure of the old ones
  (an invariant of every stage). Arrays of ``like`` without Explicit sharding,
  and trees whose structure differs, leave ``tree`` as it is.
  """
  t_leaves, t_def = jax.tree_util.tree_flatten(tree)
  l_leaves, l_def = jax.tree_util.tree_flatten(like)
  if t_def != l_def:
    return tree
  out = []
  for a, b in zip(t_leaves, l_leaves):
    sharding = explicit_sharding(b)
    out.append(a if sharding is None else jax.sharding.reshard(a, sharding.spec))
  return t_def.unflatten(out)


def unshard_axes(x: Any, axes: tuple[int, ...]) -> Any:
  """``x`` with ``axes`` replicated where an Explicit mesh axis shards them.

  For the rank axis of low-rank factors before they are multiplied: a derived
  sharding may split it on different mesh axes in ``U`` and ``V``, which
  explicit sharding refuses to contract. No-op on Auto meshes and without one.
  """
  sharding = explicit_sharding(x)
  if sharding is None:
    return x
  spec = list(sharding.spec) + [None] * (x.ndim - len(sharding.spec))
  if all(spec[a] is None for a in axes):
    return x
  for a in axes:
    spec[a] = None
  return jax.sharding.reshard(x, PartitionSpec(*spec))

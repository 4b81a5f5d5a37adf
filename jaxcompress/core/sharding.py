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
    >>> from jaxcompress.core.sharding import derive
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
    >>> from jaxcompress.core.sharding import explicit_sharding
    >>> explicit_sharding(jnp.ones(3)) is None  # no mesh
    True
  """
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    sharding = x.sharding  # a concrete array: the sharding on its concrete mesh
  else:
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


def reshard_as(tree: Any, like: Any) -> Any:
  """Every array of ``tree`` resharded as the matching array of ``like`` was.

  For arrays made from others that keep their structure (a LoRA delta is
  laid out as its base kernel). Arrays of ``like`` without Explicit sharding,
  and trees whose structure differs, leave ``tree`` as it is.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    >>> from jaxcompress.core.sharding import reshard_as
    >>> mesh = jax.make_mesh((2,), ("model",), axis_types=(AxisType.Explicit,),
    ...                      devices=jax.devices()[:2])
    >>> old = {"mask": jax.device_put(jnp.ones((4, 2), bool), NamedSharding(mesh, P("model")))}
    >>> new = reshard_as({"mask": jnp.zeros((4, 2), bool)}, old)
    >>> tuple(new["mask"].sharding.spec)
    ('model',)
  """
  t_leaves, t_def = jax.tree_util.tree_flatten(tree)
  l_leaves, l_def = jax.tree_util.tree_flatten(like)
  if t_def != l_def:
    return tree
  out = []
  for a, b in zip(t_leaves, l_leaves):
    sharding = explicit_sharding(b)
    out.append(a if sharding is None else _reshard(a, sharding, sharding.spec))
  return t_def.unflatten(out)


def unshard_axes(x: Any, axes: tuple[int, ...]) -> Any:
  """``x`` with ``axes`` replicated where an Explicit mesh axis shards them.

  For the rank axis of low-rank factors before they are multiplied: a derived
  sharding may split it on different mesh axes in ``U`` and ``V``, which
  explicit sharding refuses to contract. No-op on Auto meshes and without one.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    >>> from jaxcompress.core.sharding import unshard_axes
    >>> mesh = jax.make_mesh((2,), ("model",), axis_types=(AxisType.Explicit,),
    ...                      devices=jax.devices()[:2])
    >>> u = jax.device_put(jnp.ones((4, 2)), NamedSharding(mesh, P(None, "model")))
    >>> tuple(unshard_axes(u, (1,)).sharding.spec)
    (None, None)
  """
  sharding = explicit_sharding(x)
  if sharding is None:
    return x
  spec = list(sharding.spec) + [None] * (x.ndim - len(sharding.spec))
  if all(spec[a] is None for a in axes):
    return x
  for a in axes:
    spec[a] = None
  return _reshard(x, sharding, PartitionSpec(*spec))


def _reshard(x: Any, like: NamedSharding, spec: PartitionSpec) -> Any:
  """``x`` laid out as ``spec`` on the mesh of ``like``, under jit or eagerly."""
  target = NamedSharding(like.mesh, spec)
  if isinstance(x, jax.core.Tracer):
    return jax.sharding.reshard(x, target)
  # Eagerly, x may live on one device (a constant a stage made): a transfer.
  return jax.device_put(x, target)


def _sharding_on(x: Any, mesh: Any) -> NamedSharding:
  """The ``NamedSharding`` of ``x``; replicated on ``mesh`` when it has none (a host constant)."""
  sharding = x.sharding if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) else None
  if sharding is None:
    try:
      sharding = jax.typeof(x).sharding
    except (TypeError, AttributeError):
      sharding = None
  if isinstance(sharding, NamedSharding) and not sharding.mesh.empty:
    return sharding
  return NamedSharding(mesh, PartitionSpec())


def call_partitioned(fn: Any, args: Any, out_shardings: Any) -> tuple[Any, bool]:
  """``fn(args)`` with the Explicit mesh axes that shard ``args`` made Auto inside it.

  For computations that are not written for explicit sharding (sorts,
  factorizations, reshapes): inside, XLA's partitioner shards them as it does
  on an Auto mesh, so a leaf sharded over an Explicit axis is not gathered
  where a sharded algorithm exists, and is gathered by XLA where none does.
  The outputs are laid out as ``out_shardings(abstract_out, sharding_of)``
  says: a tree of ``NamedSharding`` like ``abstract_out`` (``fn``'s output
  shapes), where ``sharding_of(x)`` is the sharding of an input ``x``
  (replicated for a host constant). Only the array leaves of ``args`` travel
  into ``fn`` as arguments; the others (strings, Python numbers, None) are
  passed as they are.

  Returns:
    ``(out, changed)``: without an Explicit axis sharding ``args``, ``fn(args)``
    as it is and False.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    >>> from jaxcompress.core.sharding import call_partitioned, derive
    >>> mesh = jax.make_mesh((2,), ("model",), axis_types=(AxisType.Explicit,),
    ...                      devices=jax.devices()[:2])
    >>> w = jax.device_put(jnp.arange(8.0).reshape(2, 4), NamedSharding(mesh, P(None, "model")))
    >>> sort_all = lambda a: jnp.sort(a.reshape(-1)).reshape(a.shape)  # a reshape explicit axes refuse
    >>> out, changed = call_partitioned(
    ...     sort_all, w, lambda o, sharding_of: derive(sharding_of(w), w.shape, o.shape))
    >>> changed, tuple(out.sharding.spec), out[1].tolist()
    (True, (None, 'model'), [4.0, 5.0, 6.0, 7.0])
  """
  leaves, treedef = jax.tree_util.tree_flatten(args)
  idx = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]
  like = next((s for s in (explicit_sharding(leaves[i]) for i in idx) if s is not None), None)
  if like is None:
    return fn(args), False
  mesh = like.mesh
  axes = tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit)

  def on_arrays(arrays):
    full = list(leaves)
    for i, a in zip(idx, arrays):
      full[i] = a
    return fn(treedef.unflatten(full))

  arrays = [leaves[i] for i in idx]
  abstract_args = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), arrays)
  abstract_out = jax.eval_shape(on_arrays, abstract_args)
  shardings = out_shardings(abstract_out, lambda x: _sharding_on(x, mesh))
  out = jax.sharding.auto_axes(on_arrays, axes=axes, out_sharding=shardings)(arrays)
  return out, True

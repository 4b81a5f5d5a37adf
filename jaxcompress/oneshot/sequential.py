"""Block-by-block calibration: one-shot compression of a model's Dense kernels.

GPTQ, SparseGPT, Wanda and AWQ compress a kernel from the inputs its layer
sees. ``sequential`` gets them the way those papers do, one block at a time:

1. the calibration batches go through the model's ``embed`` once; the result
   is the input of block 0;
2. for each block in turn, the block runs on every batch (jitted) with each
   selected ``Linear`` (NNX) / ``Dense`` (linen) recording its inputs; each
   such kernel is replaced by ``compress(path, kernel, x)``, ``x`` being all
   the rows (tokens) that layer saw, shape ``(n, in)``;
3. the block, with its compressed kernels, runs again on every batch: its
   outputs are the inputs of the next block.

All kernels of a block are compressed from inputs captured in one pass of the
block as it was before any of them changed (the SparseGPT recipe; the blocks
before it are already compressed). Memory holds the current block's input
activations and the inputs its selected layers saw, never those of two blocks.

The model states its blocks: ``blocks(model)`` returns the sequence of block
modules (default: ``model.blocks``) and ``embed(model, batch)`` the input of
the first one (default: ``model.embed(batch)``). Each block maps one array
(batch first) to an array of the same kind. Inputs are captured by module
surgery on a clone of each NNX block (the model is never changed) and by
``flax.linen.intercept_methods`` for linen; nothing global is patched.

With ``sharding`` (a ``NamedSharding`` of the batch axis over a mesh), block
inputs are placed with it and the captured rows ``x`` reach ``compress``
sharded over their first axis, so the statistics computed from them
(``X^T X`` for GPTQ and SparseGPT, column norms for Wanda) are reduced across
the devices.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Hashable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxcompress.core.modules import children, set_child
from jaxcompress.core.paths import path_str
from jaxcompress.core.spec import check_pattern, matches

Array = jax.Array
PyTree = Any
Compress = Callable[[str, Array, Array], Array]


def _module_path(names: Sequence[Hashable]) -> str:
  return path_str(tuple(jax.tree_util.DictKey(n) for n in names))


def _join(prefix: str, rel: str) -> str:
  return "/".join(p for p in (prefix, rel) if p)


def _add_rows(seen: Array | None, x: Array) -> Array:
  """Appends the tokens of ``x (..., in)`` to the rows ``seen (n, in)``."""
  rows = x.reshape(-1, x.shape[-1])
  return rows if seen is None else jnp.concatenate([seen, rows.astype(seen.dtype)])


# --------------------------------------------------------------------------
# NNX: a clone of each block with its selected Linears wrapped.
# --------------------------------------------------------------------------


class _Seen(nnx.Variable):
  """The inputs a tapped layer saw in one call of its block, ``(rows, in)``."""


class _Tap(nnx.Module):
  """Runs ``inner`` and records its inputs (every call appends its rows)."""

  def __init__(self, inner: nnx.Linear):
    self.inner = inner
    self.seen = _Seen(jnp.zeros((0, inner.in_features), jnp.float32))

  def __call__(self, x, *args, **kwargs):
    prev = self.seen[...]
    self.seen.set_value(_add_rows(prev if prev.shape[0] else None, x))
    return self.inner(x, *args, **kwargs)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _run_nnx(graphdef, state, x, capture):
  block = nnx.merge(graphdef, state)
  y = block(x)
  if not capture:
    return y, {}
  seen = {_module_path(p): n.seen[...] for p, n in nnx.iter_graph(block) if isinstance(n, _Tap)}
  return y, seen


class _NNXBlock:
  """One NNX block: a clone whose selected Linears are tapped."""

  def __init__(self, block: nnx.Module, prefix: str, pattern: Any, seen_paths: list[str]):
    self.prefix = prefix
    clone = nnx.clone(block)
    # (holder, key, layer, path relative to the block); a block may be a Linear itself.
    places = [(None, None, clone, "")] if isinstance(clone, nnx.Linear) else []
    for hpath, holder in nnx.iter_graph(clone):
      if isinstance(holder, (nnx.Pytree, list, dict, tuple)):
        for key, child in children(holder):
          if isinstance(child, nnx.Linear):
            places.append((holder, key, child, _module_path((*hpath, key))))
    places.sort(key=lambda p: p[3])
    taps: dict[int, _Tap] = {}
    self.taps: dict[str, _Tap] = {}
    for holder, key, layer, rel in places:
      full = _join(prefix, rel)
      seen_paths.append(full)
      if id(layer) not in taps and matches(pattern, full, layer):
        taps[id(layer)] = self.taps[rel] = _Tap(layer)
      if id(layer) in taps and holder is not None:
        set_child(holder, key, taps[id(layer)], full)
    self.module = taps.get(id(clone), clone)

  def run(self, x: Array, capture: bool) -> tuple[Array, dict[str, Array]]:
    graphdef, state = nnx.split(self.module)
    return _run_nnx(graphdef, state, x, capture)

  def kernel(self, rel: str) -> Array:
    return self.taps[rel].inner.kernel[...]

  def set_kernel(self, rel: str, value: Array) -> None:
    self.taps[rel].inner.kernel[...] = value


# --------------------------------------------------------------------------
# linen: each block unbound from the model, its Dense inputs intercepted.
# --------------------------------------------------------------------------


def _run_linen(module, prefix, pattern, variables, x, capture):
  seen: dict[str, Array] = {}

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if capture and context.method_name == "__call__" and isinstance(m, nn.Dense):
      rel = _module_path(m.path)
      if matches(pattern, _join(prefix, rel), m):
        seen[rel] = _add_rows(seen.get(rel), args[0] if args else kwargs["inputs"])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    y = module.apply(variables, x)
  return y, seen


class _LinenBlock:
  """One bound linen block, unbound into a module and its variables."""

  def __init__(self, block: nn.Module, pattern: Any, seen_paths: list[str]):
    self.prefix = _module_path(block.path)
    self.module, self.variables = block.unbind()
    self.seen_paths = seen_paths
    self._run = jax.jit(functools.partial(_run_linen, self.module, self.prefix, pattern), static_argnums=2)

  def run(self, x: Array, capture: bool) -> tuple[Array, dict[str, Array]]:
    y, seen = self._run(self.variables, x, capture)
    if capture:
      self.seen_paths.extend(_join(self.prefix, rel) for rel in seen)
    return y, seen

  def _leaf(self, rel: str) -> tuple[str, ...]:
    return ("params", *rel.split("/"), "kernel")

  def kernel(self, rel: str) -> Array:
    node = self.variables
    for k in self._leaf(rel):
      node = node[k]
    return node

  def set_kernel(self, rel: str, value: Array) -> None:
    target = self._leaf(rel)
    self.variables = jax.tree_util.tree_map_with_path(
        lambda p, leaf: value if tuple(k.key for k in p) == target else leaf, self.variables
    )


# --------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------


def _default_blocks(model: Any) -> Any:
  if not hasattr(model, "blocks"):
    raise ValueError(
        f"sequential: the model ({type(model).__name__}) has no attribute 'blocks'; pass "
        "blocks=lambda model: <the sequence of its blocks>, e.g. lambda m: m.layers."
    )
  return model.blocks


def _default_embed(model: Any, batch: Any) -> Array:
  if not hasattr(model, "embed"):
    raise ValueError(
        f"sequential: the model ({type(model).__name__}) has no method 'embed'; pass "
        "embed=lambda model, batch: <the input of the first block>."
    )
  return model.embed(batch)


def _check_nonempty(block_list: list) -> None:
  if not block_list:
    raise ValueError("sequential: blocks(model) is empty; it must return the model's blocks.")


def _check_result(new: Any, old: Array, path: str) -> Array:
  if not isinstance(new, (jax.Array, np.ndarray)):
    raise TypeError(
        f"sequential: compress returned a {type(new).__name__} for {path}; it must return the "
        f"new kernel, an array of shape {tuple(old.shape)}: take .kernel of a Pruned, AWQResult "
        "or Smoothed result, and jc.quant.dequantize a QArray."
    )
  if tuple(new.shape) != tuple(old.shape):
    raise ValueError(
        f"sequential: compress returned shape {tuple(new.shape)} for {path}, whose kernel has "
        f"shape {tuple(old.shape)}; return a kernel of the same shape."
    )
  return new.astype(old.dtype)


def _auto(sharding: NamedSharding) -> NamedSharding:
  """The sharding on the same devices with every mesh axis ``Auto``: XLA then decides
  how products over the sharded rows (``X^T X``) are reduced, as the one-shot
  algorithms expect, also for a mesh made with ``Explicit`` axes."""
  mesh = sharding.mesh
  auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
  return NamedSharding(auto, sharding.spec)


def _selects_nothing(pattern: Any, paths: Sequence[str]) -> ValueError:
  shown = ", ".join(repr(p) for p in paths[:20]) + (" ..." if len(paths) > 20 else "")
  return ValueError(
      f"sequential: pattern {pattern!r} selects no Linear/Dense layer of the blocks. Patterns "
      "are regular expressions fully matched against layer paths (or predicates over (path, "
      f"module)); the layers are: {shown or '(none)'}."
  )


def _rows_sharding(sharding: NamedSharding | None) -> NamedSharding | None:
  if sharding is None:
    return None
  first = sharding.spec[0] if len(sharding.spec) else None
  return NamedSharding(sharding.mesh, PartitionSpec(first, None))


def _place(x: Array, sharding: NamedSharding | None, what: str) -> Array:
  if sharding is None:
    return x
  first = sharding.spec[0] if len(sharding.spec) else None
  names = () if first is None else (first,) if isinstance(first, str) else tuple(first)
  ways = 1
  for name in names:
    ways *= sharding.mesh.shape[name]
  if x.shape[0] % ways:
    raise ValueError(
        f"sequential: {what} has {x.shape[0]} rows on its first axis, which the sharding "
        f"{sharding.spec} splits {ways} ways; use batches whose size is a multiple of {ways}."
    )
  return jax.device_put(x, sharding)


def sequential(
    model: nnx.Module | nn.Module,
    batches: Iterable[Any],
    compress: Compress,
    *,
    params: PyTree | None = None,
    blocks: Callable[[Any], Sequence[Any]] | None = None,
    embed: Callable[[Any, Any], Array] | None = None,
    pattern: Any = r".*",
    sharding: NamedSharding | None = None,
) -> PyTree:
  """Compresses the Dense kernels of a model block by block from calibration batches.

  See the module docstring for the procedure. The model is not changed.

  Args:
    model: an NNX module, or a linen module (give its ``params`` too). Its
      blocks are ``blocks(model)`` (for linen, of the model bound to
      ``params``).
    batches: calibration batches: the model's inputs (e.g. token arrays), each
      given to ``embed``.
    compress: ``compress(path, kernel, x) -> new kernel`` for each selected
      layer: ``path`` is the kernel's leaf path in the returned params
      (``blocks/0/attn/q/kernel``), ``kernel`` its ``(in, out)`` array, ``x``
      the ``(n, in)`` inputs the layer saw (every token of every batch). It
      returns an array of the kernel's shape (cast to its dtype), e.g.
      ``jc.oneshot.sparsegpt(kernel, x, sparsity=0.5).kernel``.
    params: linen only: the model's ``"params"`` collection.
    blocks: ``blocks(model) -> sequence of block modules`` (default
      ``model.blocks``). Each is called as ``block(x)``.
    embed: ``embed(model, batch) -> input of the first block`` (default
      ``model.embed(batch)``; for linen it runs as an ``apply`` method).
    pattern: which ``nnx.Linear`` / ``linen.Dense`` layers are compressed: a
      regular expression fully matched against the layer's path in the model
      (``blocks/0/attn/q``; linen ``blocks_0/attn/q``), a predicate ``(path,
      module) -> bool``, or a tuple of them, as ``jc.Rule`` selects leaves.
    sharding: optional ``NamedSharding`` of the batch axis (e.g.
      ``NamedSharding(mesh, P("data"))``): block inputs are placed with it and
      ``x`` is sharded over its rows on the same mesh axis (on the mesh's
      devices with its axes ``Auto``, whatever their type).

  Returns:
    The compressed parameters, in the structure of ``nnx.state(model,
    nnx.Param)`` (NNX: an ``nnx.State``, for ``nnx.update`` on a clone) or of
    ``params`` (linen). Unselected leaves are the caller's arrays.

  Raises:
    TypeError: a wrong kind of model, blocks, sharding, or compress result.
    ValueError: ``pattern`` selects no layer, a compressed kernel has the
      wrong shape, or a batch does not split over the mesh.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcompress.oneshot.sequential import sequential
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])
    ...   def embed(self, x):
    ...     return x
    >>> net = Net(nnx.Rngs(0))
    >>> seen = {}
    >>> def halve(path, kernel, x):
    ...   seen[path] = x.shape
    ...   return kernel / 2
    >>> state = sequential(net, [jnp.ones((3, 4))], halve)
    >>> seen
    {'blocks/0/kernel': (3, 4), 'blocks/1/kernel': (3, 4)}
    >>> bool(jnp.allclose(state["blocks"][1]["kernel"][...], net.blocks[1].kernel[...] / 2))
    True
  """
  check_pattern(pattern, what="sequential", arg="module")
  if not callable(compress):
    raise TypeError(f"sequential: compress must be a function (path, kernel, x) -> kernel, got {compress!r}.")
  if sharding is not None and not isinstance(sharding, NamedSharding):
    raise TypeError(
        f"sequential: sharding must be a jax.sharding.NamedSharding of the batch axis, e.g. "
        f"NamedSharding(mesh, PartitionSpec('data')); got {sharding!r}."
    )
  sharding = None if sharding is None else _auto(sharding)
  blocks = _default_blocks if blocks is None else blocks
  embed = _default_embed if embed is None else embed
  seen_paths: list[str] = []

  if isinstance(model, nnx.Module):
    if params is not None:
      raise TypeError(
          "sequential: params= is for linen models; an NNX model holds its own parameters "
          "(nnx.update it first to calibrate other values)."
      )
    block_list = list(blocks(model))
    _check_nonempty(block_list)
    where = {id(node): _module_path(p) for p, node in nnx.iter_graph(model)}
    for i, b in enumerate(block_list):
      if not isinstance(b, nnx.Module) or id(b) not in where:
        raise TypeError(
            f"sequential: block {i} is {type(b).__name__}, not an nnx.Module of the model; "
            "blocks(model) must return the model's own block modules."
        )
    # Known before any work: a pattern that selects nothing fails at once.
    layers = [(where[id(n)], n) for b in block_list for _, n in nnx.iter_graph(b) if isinstance(n, nnx.Linear)]
    if not any(matches(pattern, path, n) for path, n in layers):
      raise _selects_nothing(pattern, [path for path, _ in layers])
    runners = (_NNXBlock(b, where[id(b)], pattern, seen_paths) for b in block_list)
    first = [embed(model, batch) for batch in batches]
    result = nnx.state(model, nnx.Param)
  elif isinstance(model, nn.Module):
    if params is None:
      raise TypeError("sequential: a linen model needs its parameters: sequential(model, ..., params=params).")
    bound = model.bind({"params": params})
    block_list = list(blocks(bound))
    _check_nonempty(block_list)
    for i, b in enumerate(block_list):
      if not isinstance(b, nn.Module) or b.scope is None:
        raise TypeError(
            f"sequential: block {i} is {type(b).__name__}, not a submodule of the bound model; "
            "blocks(model) must return the model's own block modules (define them in setup)."
        )
    runners = (_LinenBlock(b, pattern, seen_paths) for b in block_list)
    first = [model.apply({"params": params}, batch, method=embed) for batch in batches]
    result = params
  else:
    raise TypeError(
        f"sequential: model must be a flax.nnx.Module or a flax.linen.Module, got {type(model).__name__}."
    )
  if not first:
    raise ValueError("sequential: batches is empty; give at least one calibration batch.")

  hs = [_place(h, sharding, f"calibration batch {i}") for i, h in enumerate(first)]
  rows = _rows_sharding(sharding)
  updates: dict[str, Array] = {}
  for block in runners:
    seen = [block.run(h, True)[1] for h in hs]
    for rel in sorted(seen[0]):
      x = jnp.concatenate([s[rel] for s in seen]) if len(seen) > 1 else seen[0][rel]
      x = x if rows is None else jax.device_put(x, rows)
      path = _join(block.prefix, rel) + "/kernel"
      if x.shape[0] == 0:
        raise ValueError(
            f"sequential: {path} is selected, but its block never called its layer, so it has no "
            "calibration inputs; narrow the pattern to the layers the blocks use."
        )
      old = block.kernel(rel)
      new = _check_result(compress(path, old, x), old, path)
      block.set_kernel(rel, new)
      updates[path] = new
    del seen
    hs = [block.run(h, False)[0] for h in hs]

  if not updates:
    raise _selects_nothing(pattern, seen_paths)
  return jax.tree_util.tree_map_with_path(lambda p, leaf: updates.get(path_str(p), leaf), result)


__all__ = ["sequential"]

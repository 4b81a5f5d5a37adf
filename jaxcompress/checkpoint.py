"""Checkpoints of the whole training state with Orbax: sharded, async, checked on restore.

    jc.checkpoint.save(path, train_state)                  # every process calls it
    ts = jc.checkpoint.restore(path, abstract_state, shardings=state_shardings)

``save`` writes any pytree of arrays (a ``jc.TrainState``: the trainable tree
with its ``jc.Compressed`` nodes, the compression state, the optimizer state,
the step and the raw PRNG key data) as one Orbax checkpoint directory with two
items: ``state`` (Orbax's standard sharded array format, where every process
writes the shards it holds) and ``manifest`` (JSON: the tree's structure).

The manifest lists every node of the tree in order, as a path and a kind: a
leaf's dtype and shape (``float32[16, 32]``), a container's type, and the
static fields of a dataclass node (a ``LeafState``'s rule and shape). ``restore``
compares it with the target's before reading any array, so a checkpoint of
another spec, optimizer or model is refused with the first path that differs,
instead of being restored into the wrong leaves (or reshaped) by Orbax.

``restore`` reads each array straight into the sharding it is given: the
target's own (concrete arrays, or ``jax.ShapeDtypeStruct`` with a sharding),
or ``shardings=`` (``jc.train_state_shardings`` for a ``TrainState``), on any
mesh: a checkpoint written on a 2x4 mesh restores onto 8x1 or one device.
Restoring does not depend on how the checkpoint was sharded, and the values
come back bit for bit, so a run stopped and resumed from a checkpoint trains
exactly as one that never stopped.

Several processes (``jax.distributed``): every process calls ``save`` and
``restore`` with the same path on a file system they share; each writes and
reads only the shards of its own devices.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax

PyTree = Any
FORMAT = "jaxcompress.checkpoint"
VERSION = 1


# --------------------------------------------------------------------------
# The manifest: every node of the tree, as (path, kind), in order.
# --------------------------------------------------------------------------


def _plain(x: Any) -> str:
  """``repr`` of a static field made of numbers, strings and tuples; else its type.

  Static fields holding functions or objects print their memory address, which
  differs between runs; their type is what can be compared.
  """
  if x is None or isinstance(x, (bool, int, float, str)):
    return repr(x)
  if isinstance(x, tuple):
    return "(" + ", ".join(_plain(v) for v in x) + ("," if len(x) == 1 else "") + ")"
  if isinstance(x, list):
    return "[" + ", ".join(_plain(v) for v in x) + "]"
  return type(x).__name__


def _kind(node: Any, treedef: Any) -> str:
  """What a node is: ``float32[16, 32]`` for an array, else its container type."""
  data = treedef.node_data()
  if data is None:  # a leaf
    if hasattr(node, "shape") and hasattr(node, "dtype"):
      return f"{node.dtype}{list(node.shape)}"
    return type(node).__name__
  typ, aux = data
  if typ is type(None):
    return "None"
  kind = typ.__name__
  if dataclasses.is_dataclass(typ) and aux is not None:  # its static fields
    kind += _plain(tuple(aux)) if isinstance(aux, (tuple, list)) else f"({_plain(aux)})"
  return kind


def _entries(tree: PyTree) -> list[tuple[str, str]]:
  """Every node of ``tree`` in pre-order (dict keys sorted, as pytrees order them)."""
  out: list[tuple[str, str]] = []

  def walk(node: Any, keys: tuple[Any, ...]) -> None:
    # One level: the node's children (None, an empty dict: no children).
    children, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    out.append((jax.tree_util.keystr(keys, simple=True, separator="/"), _kind(node, treedef)))
    if treedef.node_data() is not None:
      for key, child in children:
        walk(child, keys + tuple(key))

  walk(tree, ())
  return out


def _show(path: str) -> str:
  return repr(path) if path else "the root"


def _manifest(tree: PyTree) -> dict:
  return {"format": FORMAT, "version": VERSION, "nodes": [list(e) for e in _entries(tree)]}


def _check_fits(stored: list[list[str]], target: PyTree, source: str) -> None:
  """Raises naming the first node where the stored tree and ``target`` differ."""
  want = _entries(target)
  have = [tuple(e) for e in stored]
  fix = (
      "Build the target from the spec, optimizer and params the checkpoint was written "
      "with (jax.eval_shape(lambda: jc.init_train_state(spec, optimizer, params)))."
  )
  for (hp, hk), (wp, wk) in zip(have, want):
    if hp == wp and hk != wk:
      raise ValueError(
          f"restore: the checkpoint {source!r} does not fit the target at {_show(wp)}: the "
          f"checkpoint holds {hk} there, the target {wk}. {fix}"
      )
    if hp != wp:
      raise ValueError(
          f"restore: the checkpoint {source!r} does not fit the target: the target has "
          f"{_show(wp)} ({wk}) where the checkpoint has {_show(hp)} ({hk}). {fix}"
      )
  if len(have) != len(want):
    longer, which = (have, "checkpoint") if len(have) > len(want) else (want, "target")
    p, k = longer[min(len(have), len(want))]
    raise ValueError(
        f"restore: the checkpoint {source!r} does not fit the target: only the {which} has "
        f"{_show(p)} ({k}). {fix}"
    )


# --------------------------------------------------------------------------
# Orbax.
# --------------------------------------------------------------------------


def _checkpointer(async_: bool) -> Any:
  import orbax.checkpoint as ocp

  registry = ocp.DefaultCheckpointHandlerRegistry()
  for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
    registry.add("state", args, ocp.StandardCheckpointHandler)
  for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
    registry.add("manifest", args, ocp.JsonCheckpointHandler)
  handler = ocp.CompositeCheckpointHandler(handler_registry=registry)
  return ocp.AsyncCheckpointer(handler) if async_ else ocp.Checkpointer(handler)


class PendingSave:
  """A checkpoint being written; ``save`` returns it.

  Attributes:
    path: the checkpoint directory.
  """

  def __init__(self, path: pathlib.Path, checkpointer: Any):
    self.path = path
    self._checkpointer = checkpointer

  def wait(self) -> pathlib.Path:
    """Blocks until the checkpoint is complete on disk; returns its path.

    Every process calls it (the last step is a barrier across processes).
    Errors of the background write are raised here. Calling it again is a no-op.
    """
    if self._checkpointer is not None:
      checkpointer, self._checkpointer = self._checkpointer, None
      checkpointer.wait_until_finished()
      checkpointer.close()
    return self.path

  def __repr__(self) -> str:
    state = "written" if self._checkpointer is None else "being written"
    return f"PendingSave({str(self.path)!r}, {state})"


def _check_savable(tree: PyTree) -> None:
  for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    path = jax.tree_util.keystr(keys, simple=True, separator="/")
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      raise TypeError(
          f"save: leaf {_show(path)} is a typed PRNG key, which Orbax does not store. Keep "
          "its raw data instead (jax.random.key_data(key)); jc.TrainState does."
      )
    if isinstance(leaf, jax.core.Tracer):
      raise TypeError(f"save: leaf {_show(path)} is a tracer; save concrete arrays, outside jit.")


def save(
    path: str | os.PathLike, state: PyTree, *, overwrite: bool = False, wait: bool = True
) -> PendingSave:
  """Writes ``state`` (a ``jc.TrainState`` or any pytree of arrays) as an Orbax checkpoint.

  Sharded arrays are written shard by shard: each process writes the shards of
  its own devices, so every process calls ``save`` with the same ``path`` (on
  a file system they share). The arrays are copied to host memory before
  ``save`` returns, so the state may be donated to the next train step at
  once, even with ``wait=False``.

  Args:
    path: the checkpoint directory (it must not exist unless ``overwrite``).
    state: the pytree to save. Never modified or donated.
    overwrite: replace an existing checkpoint at ``path``.
    wait: block until the files are written (the default). With
      ``wait=False`` the files are written in a background thread while
      training goes on; call ``.wait()`` on the result before reading the
      checkpoint, saving to the same path again, or exiting.

  Returns:
    A ``PendingSave`` (already complete when ``wait``).

  Example:
    >>> import os, tempfile, jax.numpy as jnp, optax, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5)])])
    >>> ts = jc.init_train_state(spec, optax.adam(0.1), {"w": jnp.arange(4.0)})
    >>> saved = jc.checkpoint.save(os.path.join(tempfile.mkdtemp(), "ckpt"), ts)
    >>> saved.path.name
    'ckpt'
  """
  path = pathlib.Path(path).absolute()
  _check_savable(state)
  if path.exists() and not overwrite:
    raise ValueError(
        f"save: {str(path)!r} already exists. Pass overwrite=True to replace it, or save "
        "each checkpoint to its own directory (e.g. one per step)."
    )
  import orbax.checkpoint as ocp

  checkpointer = _checkpointer(async_=True)
  checkpointer.save(
      path,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), manifest=ocp.args.JsonSave(_manifest(state))
      ),
      force=overwrite,
  )
  pending = PendingSave(path, checkpointer)
  if wait:
    pending.wait()
  return pending


def _target_shardings(leaves: list[Any], keypaths: list[Any], treedef: Any, shardings: Any) -> list[Any]:
  if shardings is None:
    given = [getattr(x, "sharding", None) for x in leaves]
  elif isinstance(shardings, jax.sharding.Sharding):
    given = [shardings] * len(leaves)
  else:
    try:
      given = treedef.flatten_up_to(shardings)
    except (ValueError, TypeError) as e:
      raise ValueError(
          f"restore: shardings does not have the structure of the target ({e}). Pass one "
          "sharding per target leaf (jc.train_state_shardings(...) for a TrainState), or one "
          "jax.sharding.Sharding for every leaf."
      ) from None
  out = []
  for keys, s in zip(keypaths, given):
    if s is None:
      if jax.process_count() > 1:
        raise ValueError(
            f"restore: target leaf {_show(jax.tree_util.keystr(keys, simple=True, separator='/'))} "
            "has no sharding; with several processes every leaf needs one. Pass "
            "shardings=jc.train_state_shardings(...) (or a NamedSharding for every leaf)."
        )
      s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if not isinstance(s, jax.sharding.Sharding):
      raise TypeError(
          f"restore: the sharding of leaf "
          f"{_show(jax.tree_util.keystr(keys, simple=True, separator='/'))} is {s!r}, not a "
          "jax.sharding.Sharding."
      )
    out.append(s)
  return out


def restore(path: str | os.PathLike, target: PyTree, *, shardings: Any = None) -> PyTree:
  """Reads a checkpoint written by ``save`` into the structure of ``target``.

  The checkpoint's tree (paths, container types, dtypes, shapes) is compared
  with ``target``'s before any array is read; the first difference is an
  error naming its path.

  Args:
    path: the checkpoint directory.
    target: the tree to restore into: abstract (``jax.eval_shape(lambda:
      jc.init_train_state(spec, optimizer, params))``) or concrete arrays
      (only their structure, shapes, dtypes and shardings are used; they are
      never modified).
    shardings: where the arrays go: a pytree of shardings with the structure
      of ``target`` (``jc.train_state_shardings(...)`` for a TrainState, on any
      mesh), or one ``jax.sharding.Sharding`` for every leaf. Default: each
      target leaf's own ``.sharding``; a leaf without one goes to the first
      device (one process only).

  Returns:
    The restored tree, with ``target``'s structure and the given shardings.

  Raises:
    ValueError: ``path`` holds no checkpoint written by ``save``, or one whose
      tree differs from ``target``'s (another spec, optimizer or model).

  Example:
    >>> import os, tempfile, jax, jax.numpy as jnp, optax, jaxcompress as jc
    >>> spec, opt = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5)])]), optax.adam(0.1)
    >>> params = {"w": jnp.arange(4.0)}
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> _ = jc.checkpoint.save(path, jc.init_train_state(spec, opt, params))
    >>> target = jax.eval_shape(lambda: jc.init_train_state(spec, opt, params))
    >>> ts = jc.checkpoint.restore(path, target)
    >>> ts.spec_state["w"].stages["prune"].mask.tolist()
    [False, False, True, True]
  """
  path = pathlib.Path(path).absolute()
  source = str(path)
  if not (path / "manifest").is_dir() or not (path / "state").is_dir():
    raise ValueError(
        f"restore: {source!r} holds no checkpoint written by jc.checkpoint.save (no "
        "'state' and 'manifest' items; a save that did not finish leaves none). Give the "
        "directory save wrote."
    )
  import orbax.checkpoint as ocp

  checkpointer = _checkpointer(async_=False)
  manifest = checkpointer.restore(path, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))
  manifest = manifest["manifest"]
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ValueError(f"restore: {source!r} is not a jc.checkpoint checkpoint (its manifest is not {FORMAT!r}).")
  if manifest.get("version") != VERSION:
    raise ValueError(
        f"restore: {source!r} has format version {manifest.get('version')!r}; this version of "
        f"jaxcompress reads version {VERSION}."
    )
  _check_fits(manifest["nodes"], target, source)
  flat, treedef = jax.tree_util.tree_flatten_with_path(target)
  keypaths, leaves = [k for k, _ in flat], [x for _, x in flat]
  sh = _target_shardings(leaves, keypaths, treedef, shardings)
  abstract = treedef.unflatten(
      [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, sh)]
  )
  out = checkpointer.restore(path, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return out["state"]

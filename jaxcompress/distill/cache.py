"""Offline distillation: the teacher's top-k logits computed once, kept on disk.

``write_topk_cache`` runs the teacher over a dataset once and stores, per
position, its k largest logits, their indices and the full logsumexp at the
chosen temperature (``TopKLogits``) as memory-mapped ``.npy`` files:

    directory/values.npy      [examples, ..., k]  float32 (or the dtype asked for)
    directory/indices.npy     [examples, ..., k]  int32
    directory/logsumexp.npy   [examples, ...]     float32
    directory/meta.json       format, version, k, vocab_size, temperature, shapes

The logsumexp is what lets ``topk_distillation_loss`` give the student the
teacher's leftover mass ``1 - sum(top-k probabilities)`` exactly. It depends on
the temperature, so a cache serves one temperature: the one in its metadata
(``TopKCache.temperature``); train with that temperature.

``load_topk_cache`` opens the files read-only and memory-mapped: index them
with a batch of example ids (``cache.values[ids]``) to read only that batch.
Training from the cache is the distillation step with a teacher function that
reads the batch (see ``make_distill_step``). Give ``load_topk_cache`` the
``k``, ``vocab_size`` and ``temperature`` the training uses: a cache made with
others is refused, naming the field.

Several processes (``jax.distributed``) write one cache together: with
``batch_sharding``, every process calls ``write_topk_cache`` with the whole
dataset (it reads only the rows its devices are fed), the teacher runs as one
sharded program over the global batch, and each process writes the rows its
devices computed into the same files, on a file system the processes share.
Process 0 creates the files and writes ``meta.json`` last, after every process
has written its rows, so a cache whose writing did not finish has no
``meta.json`` and is refused. Reading is global: any process reads any example.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxcompress.core.checks import check_int, check_number
from jaxcompress.distill.losses import TopKLogits, topk_logits

PyTree = Any
FORMAT = "jaxcompress.distill.topk_cache"
VERSION = 1
_FILES = {"values": "values.npy", "indices": "indices.npy", "logsumexp": "logsumexp.npy"}


class TopKCache(NamedTuple):
  """A teacher's top-k logits for a dataset, memory-mapped from disk.

  Attributes:
    values: ``[examples, ..., k]`` top-k teacher logits.
    indices: ``[examples, ..., k]`` int32 class indices.
    logsumexp: ``[examples, ...]`` ``logsumexp(logits / temperature)``.
    k: entries kept per position.
    vocab_size: classes of the teacher's logits.
    temperature: the temperature ``logsumexp`` was taken at.

  Example:
    >>> import tempfile, jax.numpy as jnp, jaxcompress as jc
    >>> cache = jc.distill.write_topk_cache(tempfile.mkdtemp(), lambda x: x, jnp.eye(3), k=2)
    >>> cache.indices.shape, cache.logsumexp.shape
    ((3, 2), (3,))
  """

  values: np.ndarray
  indices: np.ndarray
  logsumexp: np.ndarray
  k: int
  vocab_size: int
  temperature: float

  def topk(self, ids: Any) -> TopKLogits:
    """The cached ``TopKLogits`` of the examples ``ids`` (a slice or index array).

    Example:
      >>> import tempfile, jax.numpy as jnp, jaxcompress as jc
      >>> d = tempfile.mkdtemp()
      >>> cache = jc.distill.write_topk_cache(d, lambda x: x, jnp.eye(4), k=2, batch_size=4)
      >>> cache.topk(slice(0, 2)).indices.shape
      (2, 2)
    """
    return TopKLogits(
        np.asarray(self.values[ids]), np.asarray(self.indices[ids]), np.asarray(self.logsumexp[ids])
    )


def write_topk_cache(
    directory: str | os.PathLike,
    logits_fn: Callable[[PyTree], jax.Array],
    inputs: PyTree,
    *,
    k: int,
    temperature: float = 1.0,
    batch_size: int = 256,
    dtype: Any = np.float32,
    batch_sharding: NamedSharding | None = None,
) -> TopKCache:
  """Runs the teacher over ``inputs`` once and writes its top-k logits to ``directory``.

  Args:
    directory: where to write (created if needed; the cache files in it are
      overwritten).
    logits_fn: ``logits_fn(inputs_batch) -> logits [batch, ..., vocab]``, the
      teacher with its params bound (e.g. ``lambda x: apply(params, x)`` with
      ``apply = jax.jit(model.apply)``). It is called as given, once per batch:
      jit it yourself, taking sharded params as an argument (a jitted function
      cannot close over arrays that span other processes' devices).
    inputs: a pytree of arrays (numpy or memory-mapped) sharing a leading
      example axis.
    k: entries to keep per position, ``1 <= k <= vocab``.
    temperature: the temperature of the stored logsumexp (train with it).
    batch_size: examples per teacher call (the global batch). The last batch
      is padded, so the teacher compiles once.
    dtype: storage dtype of the values (``np.float16`` halves the file).
    batch_sharding: how a batch is laid out over the devices: a
      ``NamedSharding`` whose first ``PartitionSpec`` entry shards the example
      axis (e.g. ``NamedSharding(mesh, P("data"))``; the other axes of every
      input and output are replicated). ``logits_fn`` then gets global arrays
      and each process writes the rows of its own devices. Needed with several
      processes (every process calls this function with the same arguments);
      ``batch_size`` must be a multiple of the number of shards.

  Returns:
    The ``TopKCache``, memory-mapped read-only.

  Example:
    >>> import tempfile, jax.numpy as jnp, jaxcompress as jc
    >>> d = tempfile.mkdtemp()
    >>> logits = jnp.array([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    >>> cache = jc.distill.write_topk_cache(d, lambda x: x, logits, k=1, batch_size=2)
    >>> cache.indices[:, 0].tolist()
    [1, 0, 2]
  """
  fn = "write_topk_cache"
  temperature = check_number(fn, "temperature", temperature, low=0.0, low_open=True, high=math.inf, high_open=True)
  batch_size = check_int(fn, "batch_size", batch_size, low=1)
  leaves = jax.tree_util.tree_leaves(inputs)
  if not leaves:
    raise ValueError(f"{fn}: inputs has no arrays.")
  n = int(np.shape(leaves[0])[0])
  for x in leaves:
    if np.shape(x)[:1] != (n,):
      raise ValueError(
          f"{fn}: every input array needs the same leading (example) axis, got shapes "
          f"{[np.shape(x) for x in leaves]}."
      )
  if n == 0:
    raise ValueError(f"{fn}: inputs hold no examples.")
  if batch_sharding is None:
    if jax.process_count() > 1:
      raise ValueError(
          f"{fn}: with {jax.process_count()} processes, pass batch_sharding (e.g. "
          "NamedSharding(mesh, P('data'))): the processes then share the teacher's work and "
          "each writes its own rows."
      )
    bs, shard = min(batch_size, n), None
  else:
    bs, shard = batch_size, _example_axis_sharding(fn, batch_sharding, batch_size)

  def host_batch(i: int, rows: slice) -> PyTree:
    """Rows ``rows`` of the batch starting at example ``i`` (zeros past the end)."""

    def take(x):
      lo, hi = min(i + rows.start, n), min(i + rows.stop, n)
      part = np.asarray(x[lo:hi])
      want = rows.stop - rows.start
      if part.shape[0] < want:
        pad = np.zeros((want - part.shape[0],) + part.shape[1:], part.dtype)
        part = np.concatenate([part, pad])
      return part

    return jax.tree_util.tree_map(take, inputs)

  def batch(i: int) -> PyTree:
    if shard is None:
      return host_batch(i, slice(0, bs))
    # This process's rows of the global batch: those its devices are fed.
    index = shard.addressable_devices_indices_map((bs,)).values()
    rows = slice(min(ix[0].indices(bs)[0] for ix in index), max(ix[0].indices(bs)[1] for ix in index))
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_process_local_data(shard, a, (bs,) + a.shape[1:]),
        host_batch(i, rows),
    )

  example = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((bs,) + tuple(np.shape(x)[1:]), np.asarray(x[:1]).dtype), inputs
  )
  out_shape = jax.eval_shape(logits_fn, example)
  if not hasattr(out_shape, "shape") or len(out_shape.shape) < 2 or out_shape.shape[0] != bs:
    raise ValueError(
        f"{fn}: logits_fn must return one array [batch, ..., vocab] for a batch of {bs}, got "
        f"{out_shape}."
    )
  vocab = int(out_shape.shape[-1])
  k = check_int(fn, "k (at most the vocabulary of the teacher's logits)", k, low=1, high=vocab)
  positions = tuple(int(d) for d in out_shape.shape[1:-1])
  jit_kwargs = {} if shard is None else {"out_shardings": shard}
  select = jax.jit(lambda logits: topk_logits(logits, k, temperature=temperature), **jit_kwargs)

  def compute(x):
    # logits_fn is called as given, not traced into one program with the top-k:
    # a teacher that closes over params on other processes' devices cannot be.
    return select(logits_fn(x))

  shapes = {
      "values": ((n,) + positions + (k,), np.dtype(dtype)),
      "indices": ((n,) + positions + (k,), np.dtype(np.int32)),
      "logsumexp": ((n,) + positions, np.dtype(np.float32)),
  }
  files = {name: os.path.join(directory, f) for name, f in _FILES.items()}
  meta_path = os.path.join(directory, "meta.json")
  primary = jax.process_index() == 0
  if primary:  # the files, at full size, before anyone writes rows
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(meta_path):
      os.remove(meta_path)  # a reader never takes a half-written cache for the old one
    for name, (shp, dt) in shapes.items():
      np.lib.format.open_memmap(files[name], mode="w+", dtype=dt, shape=shp).flush()
  _barrier("jaxcompress_topk_cache_created")
  arrays = {name: np.load(files[name], mmap_mode="r+") for name in shapes}
  # One batch in flight while the previous one is copied to disk.
  starts = list(range(0, n, bs))
  pending = compute(batch(starts[0]))
  for j, i in enumerate(starts):
    result = pending
    if j + 1 < len(starts):
      pending = compute(batch(starts[j + 1]))
    for name, value in zip(TopKLogits._fields, result):
      _write_rows(arrays[name], value, i, n)
  for a in arrays.values():
    a.flush()
  del arrays
  _barrier("jaxcompress_topk_cache_written")
  if primary:
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "k": int(k),
        "vocab_size": vocab,
        "temperature": float(temperature),
        "num_examples": n,
        "positions": list(positions),
        "values_dtype": np.dtype(dtype).name,
        "processes": jax.process_count(),
    }
    with open(meta_path + ".tmp", "w") as f:
      json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
  _barrier("jaxcompress_topk_cache_done")
  return load_topk_cache(directory)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _example_axis_sharding(fn: str, sharding: Any, batch_size: int) -> NamedSharding:
  """The sharding of every batch input and output: the example axis as given, the rest replicated."""
  if not isinstance(sharding, NamedSharding):
    raise TypeError(
        f"{fn}: batch_sharding must be a jax.sharding.NamedSharding (e.g. "
        f"NamedSharding(mesh, P('data'))), got {sharding!r}."
    )
  axis = tuple(sharding.spec)[0] if len(sharding.spec) else None
  out = NamedSharding(sharding.mesh, PartitionSpec(axis))
  names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
  shards = int(np.prod([sharding.mesh.shape[a] for a in names], dtype=np.int64))
  if batch_size % shards:
    raise ValueError(
        f"{fn}: batch_size={batch_size} does not split into the {shards} shards of the example "
        f"axis (mesh axes {names}); use a multiple of {shards}."
    )
  return out


def _write_rows(file: np.ndarray, value: jax.Array, start: int, n: int) -> None:
  """Writes the rows of ``value`` (a batch starting at example ``start``) that this
  process's devices hold, once each (replicas skipped), dropping the padding."""
  for shard in value.addressable_shards:
    if shard.replica_id != 0:
      continue
    lo, hi, _ = shard.index[0].indices(value.shape[0])
    stop = min(start + hi, n)
    if start + lo < stop:
      file[start + lo : stop] = np.asarray(shard.data)[: stop - start - lo].astype(file.dtype)


def load_topk_cache(
    directory: str | os.PathLike,
    *,
    k: int | None = None,
    vocab_size: int | None = None,
    temperature: float | None = None,
) -> TopKCache:
  """Opens a cache written by ``write_topk_cache``, memory-mapped read-only.

  Args:
    directory: the cache directory.
    k, vocab_size, temperature: what the training expects; each one given must
      equal the cache's (a cache of another teacher, top-k size or temperature
      would give a wrong loss without any error).

  Returns:
    The ``TopKCache``.

  Raises:
    ValueError: when the directory holds no complete cache, another format or
      version, files whose shapes or dtypes disagree with the metadata, or a
      ``k``, ``vocab_size`` or ``temperature`` other than the one asked for.

  Example:
    >>> import tempfile, jax.numpy as jnp, jaxcompress as jc
    >>> d = tempfile.mkdtemp()
    >>> _ = jc.distill.write_topk_cache(d, lambda x: 2.0 * x, jnp.eye(3), k=2, temperature=2.0)
    >>> cache = jc.distill.load_topk_cache(d, k=2, temperature=2.0)
    >>> cache.k, cache.vocab_size, cache.temperature, cache.values.shape
    (2, 3, 2.0, (3, 2))
  """
  fn = "load_topk_cache"
  source = str(directory)
  meta_path = os.path.join(directory, "meta.json")
  if not os.path.exists(meta_path):
    raise ValueError(
        f"{fn}: {source!r} holds no meta.json; write the cache with write_topk_cache (a cache "
        "whose writing did not finish has none)."
    )
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise ValueError(
        f"{fn}: {meta_path!r} has format {meta.get('format')!r} version {meta.get('version')!r}; "
        f"this version reads {FORMAT!r} version {VERSION}."
    )
  for name, asked, fix in (
      ("k", k, "write the cache again with k={asked}, or train with k={have}"),
      ("vocab_size", vocab_size, "the cache comes from a teacher with another vocabulary; "
       "write it again with this teacher"),
      ("temperature", temperature, "its logsumexp belongs to temperature {have}: train at "
       "temperature={have}, or write the cache again with temperature={asked}"),
  ):
    have = meta[name]
    if asked is not None and (float(asked) != float(have)):
      raise ValueError(
          f"{fn}: the cache in {source!r} has {name}={have!r}, but {name}={asked!r} was asked "
          f"for; " + fix.format(asked=asked, have=have) + "."
      )
  n, kk, positions = meta["num_examples"], meta["k"], tuple(meta["positions"])
  expect = {
      "values": ((n,) + positions + (kk,), np.dtype(meta["values_dtype"])),
      "indices": ((n,) + positions + (kk,), np.dtype(np.int32)),
      "logsumexp": ((n,) + positions, np.dtype(np.float32)),
  }
  arrays = {}
  for name, fname in _FILES.items():
    try:
      a = np.load(os.path.join(directory, fname), mmap_mode="r")
    except (OSError, ValueError) as e:
      raise ValueError(
          f"{fn}: {fname} in {source!r} cannot be read ({e}); the cache is incomplete or "
          "damaged: write it again."
      ) from None
    shape, dtype = expect[name]
    for what, got, want in (("shape", a.shape, shape), ("dtype", a.dtype, dtype)):
      if got != want:
        raise ValueError(
            f"{fn}: {fname} in {source!r} has {what} {got}, but meta.json says {want}; the "
            "cache is incomplete or was overwritten: write it again."
        )
    arrays[name] = a
  return TopKCache(
      arrays["values"], arrays["indices"], arrays["logsumexp"], kk, meta["vocab_size"], meta["temperature"]
  )

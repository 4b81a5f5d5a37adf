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
reads the batch (see ``make_distill_step``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

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
) -> TopKCache:
  """Runs the teacher over ``inputs`` once and writes its top-k logits to ``directory``.

  Args:
    directory: where to write (created if needed; the cache files in it are
      overwritten).
    logits_fn: ``logits_fn(inputs_batch) -> logits [batch, ..., vocab]``, the
      teacher with its params bound (e.g. ``lambda x: model.apply(params, x)``;
      it may itself be a sharded jitted function).
    inputs: a pytree of arrays (numpy or memory-mapped) sharing a leading
      example axis.
    k: entries to keep per position, ``1 <= k <= vocab``.
    temperature: the temperature of the stored logsumexp (train with it).
    batch_size: examples per teacher call. The last batch is padded, so the
      teacher compiles once.
    dtype: storage dtype of the values (``np.float16`` halves the file).

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
  bs = min(batch_size, n)

  def batch(i: int) -> PyTree:
    def take(x):
      part = np.asarray(x[i : i + bs])
      if part.shape[0] < bs:
        pad = np.zeros((bs - part.shape[0],) + part.shape[1:], part.dtype)
        part = np.concatenate([part, pad])
      return part

    return jax.tree_util.tree_map(take, inputs)

  out_shape = jax.eval_shape(logits_fn, batch(0))
  if not hasattr(out_shape, "shape") or len(out_shape.shape) < 2 or out_shape.shape[0] != bs:
    raise ValueError(
        f"{fn}: logits_fn must return one array [batch, ..., vocab] for a batch of {bs}, got "
        f"{out_shape}."
    )
  vocab = int(out_shape.shape[-1])
  k = check_int(fn, "k (at most the vocabulary of the teacher's logits)", k, low=1, high=vocab)
  positions = tuple(int(d) for d in out_shape.shape[1:-1])
  compute = jax.jit(lambda x: topk_logits(logits_fn(x), k, temperature=temperature))

  os.makedirs(directory, exist_ok=True)
  files = {name: os.path.join(directory, f) for name, f in _FILES.items()}
  shapes = {
      "values": ((n,) + positions + (k,), np.dtype(dtype)),
      "indices": ((n,) + positions + (k,), np.dtype(np.int32)),
      "logsumexp": ((n,) + positions, np.dtype(np.float32)),
  }
  arrays = {
      name: np.lib.format.open_memmap(files[name], mode="w+", dtype=dt, shape=shp)
      for name, (shp, dt) in shapes.items()
  }
  # One batch in flight while the previous one is copied to disk.
  starts = list(range(0, n, bs))
  pending = compute(batch(starts[0]))
  for j, i in enumerate(starts):
    result = pending
    if j + 1 < len(starts):
      pending = compute(batch(starts[j + 1]))
    m = min(bs, n - i)
    for name, value in zip(TopKLogits._fields, result):
      arrays[name][i : i + m] = np.asarray(value[:m]).astype(arrays[name].dtype)
  for a in arrays.values():
    a.flush()
  del arrays
  meta = {
      "format": FORMAT,
      "version": VERSION,
      "k": int(k),
      "vocab_size": vocab,
      "temperature": float(temperature),
      "num_examples": n,
      "positions": list(positions),
      "values_dtype": np.dtype(dtype).name,
  }
  with open(os.path.join(directory, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return load_topk_cache(directory)


def load_topk_cache(directory: str | os.PathLike) -> TopKCache:
  """Opens a cache written by ``write_topk_cache``, memory-mapped read-only.

  Args:
    directory: the cache directory.

  Returns:
    The ``TopKCache``.

  Raises:
    ValueError: when the directory holds no cache, another format or version,
      or files whose shapes disagree with the metadata.

  Example:
    >>> import tempfile, jax.numpy as jnp, jaxcompress as jc
    >>> d = tempfile.mkdtemp()
    >>> _ = jc.distill.write_topk_cache(d, lambda x: 2.0 * x, jnp.eye(3), k=2, temperature=2.0)
    >>> cache = jc.distill.load_topk_cache(d)
    >>> cache.k, cache.vocab_size, cache.temperature, cache.values.shape
    (2, 3, 2.0, (3, 2))
  """
  fn = "load_topk_cache"
  meta_path = os.path.join(directory, "meta.json")
  if not os.path.exists(meta_path):
    raise ValueError(f"{fn}: {str(directory)!r} holds no meta.json; write the cache with write_topk_cache.")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise ValueError(
        f"{fn}: {meta_path!r} has format {meta.get('format')!r} version {meta.get('version')!r}; "
        f"this version reads {FORMAT!r} version {VERSION}."
    )
  n, k, positions = meta["num_examples"], meta["k"], tuple(meta["positions"])
  expect = {
      "values": (n,) + positions + (k,),
      "indices": (n,) + positions + (k,),
      "logsumexp": (n,) + positions,
  }
  arrays = {}
  for name, fname in _FILES.items():
    a = np.load(os.path.join(directory, fname), mmap_mode="r")
    if a.shape != expect[name]:
      raise ValueError(
          f"{fn}: {fname} in {str(directory)!r} has shape {a.shape}, but meta.json says "
          f"{expect[name]}; the cache is incomplete or was overwritten: write it again."
      )
    arrays[name] = a
  return TopKCache(
      arrays["values"], arrays["indices"], arrays["logsumexp"], k, meta["vocab_size"], meta["temperature"]
  )

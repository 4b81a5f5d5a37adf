"""What a compressed model really costs to store: a per-leaf, entropy-coded size report.

``compressed_size(model_params)`` reads the model params (the output of
``spec.apply``) and, per leaf, finds the cheapest of a few real storage
formats, counting every bit a decoder needs:

- positions: ``dense`` (every entry stored, zeros included) or ``sparse``: the
  nonzeros and filler zeros, each with a Huffman-coded relative index of ``p``
  bits (``jaxcompress.cluster.entropy.relative_index``), as in Deep Compression;
- values: ``float`` (``float_bits`` each), or a codebook of the distinct
  nonzero values (``float_bits`` each; zero is implicit) with Huffman-coded
  indices; one codebook per leaf, or one per output channel (last axis). A
  codebook holds at most 256 values (8-bit indices before Huffman coding).

Each Huffman code costs its table too: 8 bits (a code length) per symbol of
its alphabet, as a canonical Huffman code is stored. The shape and a format
tag per leaf (a few bytes) are not counted. Works for clustered leaves
(``2^b`` shared values), quantized ones (few distinct values per channel),
pruned ones and untouched ones alike.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from jaxcompress.cluster.entropy import huffman_code_lengths, relative_index
from jaxcompress.core.checks import is_int
from jaxcompress.core.paths import path_str

MAX_CODEBOOK = 256
TABLE_BITS_PER_SYMBOL = 8


@dataclasses.dataclass(frozen=True)
class LeafSize:
  """The stored size of one leaf.

  Attributes:
    path: the leaf path (``Dense_0/kernel``).
    shape: the leaf's shape.
    nonzeros: number of nonzero entries.
    format: the storage format chosen, e.g. ``sparse idx5, codebook 32``.
    bits: stored bits, everything included.
    float_bits: bits of a dense value (the reference size), 32 for float32.

  Example:
    >>> import numpy as np, jaxcompress as jc
    >>> leaf = jc.cluster.compressed_size({"w": np.zeros((8, 8))}).leaves[0]
    >>> leaf.path, leaf.sparsity, leaf.dense_bytes, leaf.compressed_bytes
    ('w', 1.0, 256, 0)
  """

  path: str
  shape: tuple[int, ...]
  nonzeros: int
  format: str
  bits: int
  float_bits: int = 32

  @property
  def size(self) -> int:
    """Number of entries."""
    return math.prod(self.shape)

  @property
  def sparsity(self) -> float:
    """Fraction of zero entries."""
    return 1.0 - self.nonzeros / self.size if self.size else 0.0

  @property
  def bits_per_weight(self) -> float:
    """Stored bits per entry (zeros included)."""
    return self.bits / self.size if self.size else 0.0

  @property
  def dense_bytes(self) -> int:
    """Bytes of the dense array at ``float_bits`` per entry."""
    return math.ceil(self.size * self.float_bits / 8)

  @property
  def compressed_bytes(self) -> int:
    """Stored bytes (bits rounded up to whole bytes)."""
    return math.ceil(self.bits / 8)

  @property
  def ratio(self) -> float:
    """``dense_bytes / compressed_bytes``."""
    return self.dense_bytes / max(self.compressed_bytes, 1)


@dataclasses.dataclass(frozen=True)
class SizeReport:
  """Stored sizes of every leaf of a params tree; ``print`` it for a table.

  Attributes:
    leaves: one ``LeafSize`` per leaf, in tree order.

  Example:
    >>> import numpy as np, jaxcompress as jc
    >>> report = jc.cluster.compressed_size({"a": np.ones(4), "b": np.zeros(4)})
    >>> report.dense_bytes, report.compressed_bytes, [l.format for l in report.leaves]
    (32, 7, ['dense, codebook 1', 'all zero'])
  """

  leaves: tuple[LeafSize, ...]

  @property
  def dense_bytes(self) -> int:
    """Total dense bytes."""
    return sum(l.dense_bytes for l in self.leaves)

  @property
  def compressed_bytes(self) -> int:
    """Total stored bytes."""
    return sum(l.compressed_bytes for l in self.leaves)

  @property
  def ratio(self) -> float:
    """Total ``dense_bytes / compressed_bytes``."""
    return self.dense_bytes / max(self.compressed_bytes, 1)

  def table(self) -> str:
    """The per-leaf table: path, shape, sparsity, format, bits per weight, bytes, ratio."""
    head = ("path", "shape", "sparsity", "format", "bits/w", "dense B", "stored B", "ratio")
    rows = [head]
    for l in self.leaves:
      rows.append(
          (
              l.path,
              str(l.shape),
              f"{100 * l.sparsity:.1f}%",
              l.format,
              f"{l.bits_per_weight:.2f}",
              str(l.dense_bytes),
              str(l.compressed_bytes),
              f"{l.ratio:.1f}x",
          )
      )
    n = sum(l.size for l in self.leaves)
    nz = sum(l.nonzeros for l in self.leaves)
    bits = sum(l.bits for l in self.leaves)
    rows.append(
        (
            "total",
            f"{n} entries",
            f"{100 * (1 - nz / n) if n else 0.0:.1f}%",
            "",
            f"{bits / n if n else 0.0:.2f}",
            str(self.dense_bytes),
            str(self.compressed_bytes),
            f"{self.ratio:.1f}x",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    right = {2, 4, 5, 6, 7}
    return "\n".join(
        "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    )

  def __str__(self) -> str:
    return self.table()


def _stream_bits(counts: np.ndarray) -> int:
  """Huffman-coded bits of a symbol stream with these frequencies, table included."""
  counts = np.asarray(counts, np.int64)
  if counts.sum() == 0:
    return 0
  return int((counts * huffman_code_lengths(counts)).sum()) + TABLE_BITS_PER_SYMBOL * counts.size


def _codebook_counts(x: np.ndarray, per_channel: bool) -> tuple[np.ndarray, int, str] | None:
  """Pooled index frequencies of the nonzeros, codebook entries, and a label.

  Index ``j`` of a codebook is its ``j``-th smallest value; with one codebook
  per channel, index ``j`` of every channel is one symbol. ``None`` when a
  codebook would exceed ``MAX_CODEBOOK`` values.
  """
  flat = x.reshape(-1)
  pos = np.flatnonzero(flat)
  v = flat[pos]
  channels = x.shape[-1] if per_channel else 1
  ch = pos % channels
  order = np.lexsort((v, ch))
  v, ch = v[order], ch[order]
  new = np.ones(v.size, bool)
  new[1:] = (v[1:] != v[:-1]) | (ch[1:] != ch[:-1])
  starts = np.flatnonzero(new)
  counts = np.diff(np.append(starts, v.size))
  group_ch = ch[starts]
  sizes = np.bincount(group_ch, minlength=channels)
  if sizes.size and sizes.max() > MAX_CODEBOOK:
    return None
  first = np.cumsum(sizes) - sizes  # index of each channel's first group
  rank = np.arange(starts.size) - first[group_ch]
  pooled = np.bincount(rank, weights=counts, minlength=1).astype(np.int64)
  label = f"codebook {channels}x<={sizes.max() if sizes.size else 0}" if per_channel else f"codebook {starts.size}"
  return pooled, int(starts.size), label


def _leaf_size(path: str, x: np.ndarray, index_bits: int | None, float_bits: int) -> LeafSize:
  n = x.size
  nonzero = x != 0
  nnz = int(nonzero.sum())
  if nnz == 0:
    return LeafSize(path, tuple(x.shape), 0, "all zero", 0, float_bits)
  value_codings = [("float", None, 0)]
  for per_channel in (False, True) if x.ndim >= 2 else (False,):
    cb = _codebook_counts(x, per_channel)
    if cb is not None:
      pooled, entries, label = cb
      value_codings.append((label, pooled, entries * float_bits))

  def value_bits(coding, zeros_stored: int) -> int:
    label, pooled, codebook_bits = coding
    if pooled is None:
      return (nnz + zeros_stored) * float_bits
    return codebook_bits + _stream_bits(np.concatenate([[zeros_stored], pooled]))

  # (positions label, position bits, zeros stored as values)
  layouts = [("dense", 0, n - nnz)]
  for p in range(1, 9) if index_bits is None else (index_bits,):
    runs, filler = relative_index(nonzero, p)
    layouts.append((f"sparse idx{p}", _stream_bits(np.bincount(runs, minlength=1 << p)), int(filler.sum())))
  best = None
  for pos_label, pos_bits, zeros in layouts:
    for coding in value_codings:
      bits = pos_bits + value_bits(coding, zeros)
      if best is None or bits < best[0]:
        best = (bits, f"{pos_label}, {coding[0]}")
  return LeafSize(path, tuple(x.shape), nnz, best[1], int(best[0]), float_bits)


def compressed_size(params: Any, *, index_bits: int | None = None, float_bits: int = 32) -> SizeReport:
  """The entropy-coded stored size of every leaf, against the dense size.

  Args:
    params: a pytree of concrete arrays: the model params, ``spec.apply(t, s)``.
    index_bits: bits of a sparse relative index (Deep Compression uses 5 for
      Dense layers, 8 for Conv); ``None`` picks the best of 1..8 per leaf.
    float_bits: bits of a stored float (codebook entries, raw values) and of
      the dense reference; 32 for float32.

  Returns:
    A ``SizeReport``: ``print(report)`` shows the per-leaf table;
    ``report.ratio`` is the total dense bytes over stored bytes.

  Raises:
    ValueError: for ``index_bits`` or ``float_bits`` out of range.
    TypeError: for traced arrays (call it outside ``jax.jit``).

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> w = jnp.zeros((64, 64)).at[::8, ::8].set(jnp.tile(jnp.array([1.0, -1.0]), (8, 4)))
    >>> print(jc.cluster.compressed_size({"kernel": w, "bias": jnp.zeros(64)}))
    path    shape         sparsity  format                   bits/w  dense B  stored B   ratio
    bias    (64,)           100.0%  all zero                   0.00      256         0  256.0x
    kernel  (64, 64)         98.4%  sparse idx5, codebook 2    0.19    16384       100  163.8x
    total   4160 entries     98.5%                             0.19    16640       100  166.4x
  """
  if index_bits is not None and (
      not is_int(index_bits) or not 1 <= index_bits <= 16
  ):
    raise ValueError(
        f"compressed_size: index_bits must be an int in 1..16 or None (best per leaf), "
        f"got {index_bits!r}."
    )
  if not is_int(float_bits) or float_bits < 1:
    raise ValueError(f"compressed_size: float_bits must be a positive int, got {float_bits!r}.")
  leaves = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_str(path)
    if isinstance(leaf, jax.core.Tracer):
      raise TypeError(
          f"compressed_size: leaf {name!r} is a traced array; the size report runs on the "
          "host over concrete arrays. Call it outside jax.jit."
      )
    x = np.asarray(leaf)
    x = x.astype(np.float64) if x.dtype != np.float64 else x
    leaves.append(_leaf_size(name, x, index_bits, float_bits))
  return SizeReport(tuple(leaves))

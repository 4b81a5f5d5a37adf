"""Stored arrays: which entries are stored (the layout) and how (the symbol stream).

An array of integer symbols (quantization codes, cluster indices) or of floats
is stored as the entries a *layout* names, in one *symbol stream*; every other
entry equals the array's ``fill`` (the zero code, or ``+0.0``). Layouts:

- ``dense``: every entry;
- ``bitmask``: one bit per entry;
- ``nm``: exactly ``n`` entries in every group of ``m`` along an axis, each with
  its position in the group in ``ceil(log2 m)`` bits (2:4: 2 bits per entry);
- ``csr``: the array as a matrix ``(prod(shape[:-1]), shape[-1])``: a count per
  row and a column index per entry, packed;
- ``runs``: Deep Compression's relative index: per stored entry the number of
  entries skipped since the previous one, in ``p`` bits, longer gaps bridged by
  an escape symbol ``2**p - 1`` that skips ``2**p - 1`` entries and stores
  nothing; the run symbols are packed or Huffman-coded.

Symbol streams: ``packed`` integers of a fixed width (``int4``: two per byte),
``huffman`` (canonical code, table of 4-bit lengths), or ``raw`` bytes of a
float dtype. ``store`` tries every layout that applies and keeps the smallest.

A stored array is described by a short string, ``layout:stream``, that is both
its name in the manifest and all a decoder needs besides its buffers, which
follow one another in the order they were written:

    layout  = dense | bitmask | csr | nm<n>/<m>@<axis> | runs<p>x<count>(<stream>)
    stream  = u<bits>[<offset>] (packed, value = stored + offset, e.g. u4-8)
            | h<alphabet>[<offset>] (Huffman) | <dtype name> (raw bytes)
            | x<dtype name> (floats XOR-coded with their predecessor; small arrays)

e.g. ``runs3x3706(h8):h32``: relative indices of 3 bits, Huffman-coded,
then Huffman-coded symbols of a 32-symbol alphabet.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import numpy as np

from jaxcompress.export import bits as _bits

Buffers = list[np.ndarray]


class Reader:
  """Hands out a leaf's buffers in the order they were written."""

  def __init__(self, buffers: list[np.ndarray]):
    self._buffers = list(buffers)
    self._next = 0

  def next(self) -> np.ndarray:
    if self._next >= len(self._buffers):
      raise ValueError("the encoding names more buffers than the leaf has.")
    self._next += 1
    return np.asarray(self._buffers[self._next - 1], np.uint8)

  @property
  def position(self) -> int:
    """How many buffers were handed out."""
    return self._next

  def done(self) -> None:
    if self._next != len(self._buffers):
      raise ValueError(f"the leaf has {len(self._buffers) - self._next} buffers its encoding does not use.")


def np_dtype(name: str) -> np.dtype:
  """A numpy dtype from its name, ``bfloat16`` and ``float8_*`` included."""
  import ml_dtypes  # noqa: F401  (registers bfloat16 / float8 with numpy)

  try:
    return np.dtype(name)
  except TypeError:
    return np.dtype(getattr(ml_dtypes, name))


def raw_bits(x: np.ndarray) -> np.ndarray:
  """The bit patterns of ``x`` as unsigned integers of the same width."""
  return np.ascontiguousarray(x).view(np.dtype(f"u{x.dtype.itemsize}"))


# --------------------------------------------------------------------------
# Symbol streams.
# --------------------------------------------------------------------------


class Stream:
  """A planned symbol stream: its size in bytes and how to write it (returns its descriptor)."""

  def __init__(self, nbytes: int, write: Callable[[Buffers], str]):
    self.nbytes = nbytes
    self.write = write


def _int_stream(symbols: np.ndarray, lo: int, hi: int, huffman: bool) -> Stream:
  """The smaller of packed and (if allowed) Huffman-coded, for ints in ``[lo, hi]``."""
  s = np.asarray(symbols, np.int64).reshape(-1) - lo
  alphabet = hi - lo + 1
  b = _bits.width(alphabet)

  def write_packed(bufs):
    bufs.append(_bits.pack(s, b))
    return f"u{b}{_offset(lo)}"

  best = Stream(_bits.packed_bytes(s.size, b), write_packed)
  if huffman and s.size:
    lengths = _bits.huffman_lengths(s, alphabet)
    if lengths is not None:
      nbytes = (_bits.huffman_bits(s, lengths) + 7) // 8 + _bits.packed_bytes(alphabet, 4)
      if nbytes < best.nbytes:

        def write_huffman(bufs):
          stream, table = _bits.huffman_encode(s, lengths)
          bufs += [table, stream]
          return f"h{alphabet}{_offset(lo)}"

        best = Stream(nbytes, write_huffman)
  return best


def _offset(lo: int) -> str:
  return f"{lo:+d}" if lo else ""


XOR_MAX = 4096  # XOR-delta coding (a Python loop to decode) only for arrays this small


def _raw_stream(values: np.ndarray) -> Stream:
  """Raw bytes, or for small float arrays XOR-delta coded if smaller (``x<dtype>``)."""
  v = np.ascontiguousarray(values).reshape(-1)

  def write(bufs):
    bufs.append(v.view(np.uint8).copy())
    return v.dtype.name

  best = Stream(v.nbytes, write)
  if 0 < v.size <= XOR_MAX and np.issubdtype(v.dtype, np.inexact):
    w = 8 * v.dtype.itemsize
    words = raw_bits(v)
    nbytes = _bits.xor_bytes(words, w)
    if nbytes < best.nbytes:

      def write_xor(bufs):
        bufs.append(_bits.xor_encode(words, w))
        return "x" + v.dtype.name

      best = Stream(nbytes, write_xor)
  return best


_STREAM = re.compile(r"(?:([uh])(\d+)([+-]\d+)?|([a-z][a-z0-9_]*))$")


def _read_stream(desc: str, bufs: Reader, count: int) -> np.ndarray:
  m = _STREAM.match(desc)
  if m is None:
    raise ValueError(f"unknown symbol stream {desc!r}.")
  kind, n, offset, dtype_name = m.groups()
  if dtype_name is not None and dtype_name.startswith("x"):
    dtype = np_dtype(dtype_name[1:])
    words = _bits.xor_decode(bufs.next(), count, 8 * dtype.itemsize)
    return words.astype(np.dtype(f"u{dtype.itemsize}")).view(dtype)
  if dtype_name is not None:
    dtype = np_dtype(dtype_name)
    buf = bufs.next()
    if buf.size != count * dtype.itemsize:
      raise ValueError(f"a raw {dtype} stream of {count} entries has {buf.size} bytes.")
    return buf.view(dtype).copy()
  offset = int(offset or 0)
  if kind == "u":
    return _bits.unpack(bufs.next(), int(n), count) + offset
  table = bufs.next()
  return _bits.huffman_decode(bufs.next(), table, count, int(n)) + offset


# --------------------------------------------------------------------------
# Layouts.
# --------------------------------------------------------------------------


def _runs(kept_flat: np.ndarray, p: int) -> np.ndarray:
  """Escape-coded gaps before each stored entry (see the module docstring)."""
  escape = (1 << p) - 1
  pos = np.flatnonzero(kept_flat)
  gaps = np.diff(pos, prepend=-1) - 1
  n_esc = gaps // escape
  per = n_esc + 1
  out = np.full(int(per.sum()), escape, np.int64)
  out[np.cumsum(per) - 1] = gaps % escape
  return out


def _nm_positions(kept: np.ndarray, nm: tuple[int, int, int]) -> np.ndarray | None:
  """Positions in group of the kept entries (moved-axis order), or None if not exactly N:M."""
  n, m, axis = nm
  if kept.ndim == 0 or kept.shape[axis] % m:
    return None
  moved = np.moveaxis(kept, axis, -1)
  groups = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
  if not np.all(groups.sum(-1) == n):
    return None
  return np.nonzero(groups)[-1]


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  if len(shape) < 2:
    return 1, math.prod(shape)
  return math.prod(shape[:-1]), shape[-1]


def _layouts(kept: np.ndarray, nm: tuple[int, int, int] | None, huffman: bool):
  """``(nbytes, symbol order, write)`` for each layout that can store ``kept``."""
  size = kept.size
  flat = kept.reshape(-1)
  count = int(flat.sum())
  if count == size:
    return [(0, "flat", lambda bufs: "dense")]

  def write_bitmask(bufs):
    bufs.append(_bits.pack(flat, 1))
    return "bitmask"

  out = [(_bits.packed_bytes(size, 1), "flat", write_bitmask)]
  rows, cols = _matrix_shape(kept.shape)
  if size:
    per_row = flat.reshape(rows, cols).sum(1)
    cidx = np.flatnonzero(flat) % cols
    wc, wr = _bits.width(cols), _bits.width(cols + 1)

    def write_csr(bufs):
      bufs += [_bits.pack(per_row, wr), _bits.pack(cidx, wc)]
      return "csr"

    out.append((_bits.packed_bytes(rows, wr) + _bits.packed_bytes(count, wc), "flat", write_csr))
  if nm is not None:
    pos = _nm_positions(kept, nm)
    if pos is not None:
      n, m, axis = nm
      wm = _bits.width(m)

      def write_nm(bufs):
        bufs.append(_bits.pack(pos, wm))
        return f"nm{n}/{m}@{axis}"

      out.append((_bits.packed_bytes(pos.size, wm), "moved", write_nm))
  if count and 2 * count <= size:  # runs lose to a bitmask above half density
    for p in range(1, 9):
      runs = _runs(flat, p)
      stream = _int_stream(runs, 0, (1 << p) - 1, huffman)

      def write_runs(bufs, runs=runs, stream=stream, p=p):
        return f"runs{p}x{runs.size}({stream.write(bufs)})"

      out.append((stream.nbytes, "flat", write_runs))
  return out


_LAYOUT = re.compile(r"(dense|bitmask|csr)$|nm(\d+)/(\d+)@(\d+)$|runs(\d+)x(\d+)\((.*)\)$")


def _parse_layout(desc: str) -> re.Match:
  m = _LAYOUT.match(desc)
  if m is None:
    raise ValueError(f"unknown layout {desc!r}.")
  return m


def _read_kept(desc: str, bufs: Reader, shape: tuple[int, ...]) -> np.ndarray:
  """The bool mask of stored entries (moved axis last for ``nm``)."""
  size = math.prod(shape)
  simple, n, m, axis, p, count, runs_desc = _parse_layout(desc).groups()
  if simple == "dense":
    return np.ones(shape, bool)
  if simple == "bitmask":
    return _bits.unpack(bufs.next(), 1, size).astype(bool).reshape(shape)
  if simple == "csr":
    rows, cols = _matrix_shape(shape)
    per_row = _bits.unpack(bufs.next(), _bits.width(cols + 1), rows)
    if np.any(per_row > cols):
      raise ValueError("a CSR row count exceeds the number of columns.")
    total = int(per_row.sum())
    cidx = _bits.unpack(bufs.next(), _bits.width(cols), total)
    if np.any(cidx >= cols):
      raise ValueError("a CSR column index is out of range.")
    kept = np.zeros((rows, cols), bool)
    kept[np.repeat(np.arange(rows), per_row), cidx] = True
    if int(kept.sum()) != total:
      raise ValueError("CSR column indices repeat within a row.")
    return kept.reshape(shape)
  if n is not None:
    n, m, axis = int(n), int(m), int(axis)
    if axis >= len(shape) or shape[axis] % m or not 1 <= n <= m:
      raise ValueError(f"layout {desc!r} does not fit shape {shape}.")
    moved_shape = shape[:axis] + shape[axis + 1 :] + (shape[axis],)
    groups = moved_shape[:-1] + (moved_shape[-1] // m, m)
    pos = _bits.unpack(bufs.next(), _bits.width(m), math.prod(groups[:-1]) * n)
    if np.any(pos >= m):
      raise ValueError("an N:M position is out of its group.")
    kept = np.zeros(groups, bool)
    np.put_along_axis(kept, pos.reshape(groups[:-1] + (n,)), True, axis=-1)
    if np.any(kept.sum(-1) != n):
      raise ValueError("N:M positions repeat within a group.")
    return kept.reshape(moved_shape)
  p = int(p)
  escape = (1 << p) - 1
  runs = _read_stream(runs_desc, bufs, int(count))
  adv = np.where(runs == escape, escape, runs + 1)
  pos = np.cumsum(adv)[runs != escape] - 1
  if pos.size and (pos[-1] >= size or runs.max() > escape):
    raise ValueError("a relative index points past the end of the array.")
  kept = np.zeros(size, bool)
  kept[pos] = True
  return kept.reshape(shape)


# --------------------------------------------------------------------------
# Arrays.
# --------------------------------------------------------------------------


def nonfill(x: np.ndarray, fill: Any) -> np.ndarray:
  """Entries that differ from ``fill`` (bitwise for floats: ``-0.0`` and NaN differ from ``+0.0``)."""
  if np.issubdtype(x.dtype, np.integer):
    return x != fill
  return raw_bits(x) != raw_bits(np.asarray(fill, x.dtype).reshape(1))[0]


def store(
    bufs: Buffers,
    x: np.ndarray,
    *,
    fill: Any = 0,
    int_range: tuple[int, int] | None = None,
    kept: np.ndarray | None = None,
    nm: tuple[int, int, int] | None = None,
    huffman: bool = False,
    dense: bool = False,
) -> str:
  """Stores ``x`` in the smallest layout and symbol stream; returns its descriptor.

  Args:
    bufs: the leaf's buffers, appended to.
    x: the array: integers (then ``int_range`` gives the symbol range) or floats
      (stored raw in their dtype).
    fill: the value of every entry a sparse layout does not store.
    int_range: ``(lo, hi)``, the range of integer symbols.
    kept: a mask of entries a structure keeps (a pruning mask): when every
      non-fill entry lies inside it and it is exactly N:M (``nm``), the N:M
      layout is used.
    nm: ``(n, m, axis)`` of an N:M structure, with ``kept``.
    huffman: allow Huffman-coded streams.
    dense: store every entry (small arrays: scales, codebooks).

  Returns:
    The descriptor ``layout:stream``.
  """
  x = np.asarray(x)
  is_int = int_range is not None
  everything = np.ones(x.shape, bool)
  candidates = [(everything, None)]
  if not dense:
    needed = nonfill(x, fill)
    structured = False
    if kept is not None and nm is not None:
      kept = np.asarray(kept, bool)
      if kept.shape == x.shape and not np.any(needed & ~kept) and _nm_positions(kept, nm) is not None:
        # An N:M-pruned array keeps the N:M layout (what sparse kernels read): its
        # positions cost no more than a bit mask; at most kept zeros are stored.
        candidates = [(kept, nm)]
        structured = True
    if not structured and not needed.all():
      candidates.append((needed, None))
  best = None
  for mask, structure in candidates:
    for pos_bytes, order, write_layout in _layouts(mask, structure, huffman):
      if structure is not None and order != "moved":
        continue
      if order == "moved":
        axis = structure[2]
        symbols = np.moveaxis(x, axis, -1)[np.moveaxis(mask, axis, -1)]
      else:
        symbols = x.reshape(-1)[mask.reshape(-1)]
      if is_int:
        lo, hi = int_range
        if lo == fill and lo < hi and not np.any(symbols == fill):
          lo += 1  # the fill symbol is never stored: one symbol fewer
        stream = _int_stream(symbols, lo, hi, huffman)
      else:
        stream = _raw_stream(symbols)
      total = pos_bytes + stream.nbytes
      if best is None or total < best[0]:
        best = (total, write_layout, stream)
  _, write_layout, stream = best
  layout = write_layout(bufs)
  return f"{layout}:{stream.write(bufs)}"


def load(desc: str, bufs: Reader, shape: tuple[int, ...], fill: Any = 0) -> np.ndarray:
  """The array ``store`` wrote: int64 for integer symbols, else the raw stream's dtype.

  Args:
    desc: the descriptor ``store`` returned.
    bufs: the leaf's buffers, read in order.
    shape: the array's shape.
    fill: the value of entries the layout does not store.

  Returns:
    The dense array.
  """
  layout, sep, stream = desc.rpartition(":")
  if not sep:
    raise ValueError(f"an array descriptor needs a layout and a stream, got {desc!r}.")
  kept = _read_kept(layout, bufs, shape)
  values = _read_stream(stream, bufs, int(kept.sum()))
  out = np.full(kept.shape, fill, values.dtype)
  out[kept] = values
  if layout.startswith("nm"):
    out = np.moveaxis(out, -1, int(_parse_layout(layout).group(4)))
  return out.reshape(shape)

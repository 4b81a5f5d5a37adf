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
The node it returns is plain JSON; buffers are ``uint8`` arrays by name.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from jaxcompress.export import bits as _bits

Buffers = dict[str, np.ndarray]


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
  """A planned symbol stream: its size in bytes and how to write it."""

  def __init__(self, nbytes: int, write: Callable[[Buffers, str], dict]):
    self.nbytes = nbytes
    self.write = write


def _int_stream(symbols: np.ndarray, lo: int, hi: int, huffman: bool) -> Stream:
  """The smaller of packed and (if allowed) Huffman-coded, for ints in ``[lo, hi]``."""
  s = np.asarray(symbols, np.int64).reshape(-1) - lo
  alphabet = hi - lo + 1
  b = _bits.width(alphabet)
  best = Stream(
      _bits.packed_bytes(s.size, b),
      lambda bufs, name: _put(bufs, name, _bits.pack(s, b), {"coding": "packed", "bits": b, "offset": lo}),
  )
  if huffman and s.size:
    lengths = _bits.huffman_lengths(s, alphabet)
    if lengths is not None:
      nbytes = (_bits.huffman_bits(s, lengths) + 7) // 8 + _bits.packed_bytes(alphabet, 4)
      if nbytes < best.nbytes:

        def write(bufs, name):
          stream, table = _bits.huffman_encode(s, lengths)
          bufs[name + "h"] = table
          return _put(bufs, name, stream, {"coding": "huffman", "alphabet": alphabet, "offset": lo})

        best = Stream(nbytes, write)
  return best


def _raw_stream(values: np.ndarray) -> Stream:
  v = np.ascontiguousarray(values).reshape(-1)
  return Stream(
      v.nbytes,
      lambda bufs, name: _put(bufs, name, v.view(np.uint8), {"coding": "raw", "dtype": v.dtype.name}),
  )


def _put(bufs: Buffers, name: str, data: np.ndarray, node: dict) -> dict:
  bufs[name] = np.asarray(data, np.uint8).reshape(-1)
  return {**node, "buf": name}


def _read_stream(node: dict, bufs: Buffers, count: int) -> np.ndarray:
  buf = bufs[node["buf"]]
  coding = node["coding"]
  if coding == "raw":
    dtype = np_dtype(node["dtype"])
    if buf.size != count * dtype.itemsize:
      raise ValueError(f"a raw {dtype} stream of {count} entries has {buf.size} bytes.")
    return buf.view(dtype).copy()
  if coding == "packed":
    return _bits.unpack(buf, node["bits"], count) + node["offset"]
  if coding == "huffman":
    table = bufs[node["buf"] + "h"]
    return _bits.huffman_decode(buf, table, count, node["alphabet"]) + node["offset"]
  raise ValueError(f"unknown symbol coding {coding!r}.")


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
    return [(0, "flat", lambda bufs, name: {"type": "dense"})]
  out = []
  out.append(
      (
          _bits.packed_bytes(size, 1),
          "flat",
          lambda bufs, name: _put(bufs, name, _bits.pack(flat, 1), {"type": "bitmask"}),
      )
  )
  rows, cols = _matrix_shape(kept.shape)
  if size:
    per_row = flat.reshape(rows, cols).sum(1)
    cidx = np.flatnonzero(flat) % cols
    wc, wr = _bits.width(cols), _bits.width(cols + 1)

    def write_csr(bufs, name):
      bufs[name + "r"] = _bits.pack(per_row, wr)
      return _put(bufs, name, _bits.pack(cidx, wc), {"type": "csr"})

    out.append((_bits.packed_bytes(rows, wr) + _bits.packed_bytes(count, wc), "flat", write_csr))
  if nm is not None:
    pos = _nm_positions(kept, nm)
    if pos is not None:
      n, m, axis = nm
      wm = _bits.width(m)
      out.append(
          (
              _bits.packed_bytes(pos.size, wm),
              "moved",
              lambda bufs, name: _put(
                  bufs, name, _bits.pack(pos, wm), {"type": "nm", "n": n, "m": m, "axis": axis}
              ),
          )
      )
  if count and 2 * count <= size:  # runs lose to a bitmask above half density
    for p in range(1, 9):
      runs = _runs(flat, p)
      stream = _int_stream(runs, 0, (1 << p) - 1, huffman)

      def write_runs(bufs, name, runs=runs, stream=stream, p=p):
        return {"type": "runs", "p": p, "count": int(runs.size), "runs": stream.write(bufs, name)}

      out.append((stream.nbytes, "flat", write_runs))
  return out


def _read_kept(layout: dict, bufs: Buffers, shape: tuple[int, ...]) -> np.ndarray:
  """The bool mask of stored entries (in the layout's own axis order for ``nm``)."""
  size = math.prod(shape)
  kind = layout["type"]
  if kind == "dense":
    return np.ones(shape, bool)
  if kind == "bitmask":
    return _bits.unpack(bufs[layout["buf"]], 1, size).astype(bool).reshape(shape)
  if kind == "csr":
    rows, cols = _matrix_shape(shape)
    per_row = _bits.unpack(bufs[layout["buf"] + "r"], _bits.width(cols + 1), rows)
    if np.any(per_row > cols):
      raise ValueError("a CSR row count exceeds the number of columns.")
    count = int(per_row.sum())
    cidx = _bits.unpack(bufs[layout["buf"]], _bits.width(cols), count)
    if np.any(cidx >= cols):
      raise ValueError("a CSR column index is out of range.")
    kept = np.zeros((rows, cols), bool)
    kept[np.repeat(np.arange(rows), per_row), cidx] = True
    if int(kept.sum()) != count:
      raise ValueError("CSR column indices repeat within a row.")
    return kept.reshape(shape)
  if kind == "nm":
    n, m, axis = layout["n"], layout["m"], layout["axis"]
    moved_shape = shape[:axis] + shape[axis + 1 :] + (shape[axis],)
    groups = moved_shape[:-1] + (moved_shape[-1] // m, m)
    pos = _bits.unpack(bufs[layout["buf"]], _bits.width(m), math.prod(groups[:-1]) * n)
    if np.any(pos >= m):
      raise ValueError("an N:M position is out of its group.")
    kept = np.zeros(groups, bool)
    np.put_along_axis(kept, pos.reshape(groups[:-1] + (n,)), True, axis=-1)
    if np.any(kept.sum(-1) != n):
      raise ValueError("N:M positions repeat within a group.")
    return kept.reshape(moved_shape)
  if kind == "runs":
    p = layout["p"]
    escape = (1 << p) - 1
    runs = _read_stream(layout["runs"], bufs, layout["count"])
    adv = np.where(runs == escape, escape, runs + 1)
    ends = np.cumsum(adv)
    pos = ends[runs != escape] - 1
    if pos.size and pos[-1] >= size:
      raise ValueError("a relative index points past the end of the array.")
    kept = np.zeros(size, bool)
    kept[pos] = True
    return kept.reshape(shape)
  raise ValueError(f"unknown layout {kind!r}.")


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
    name: str,
    x: np.ndarray,
    *,
    fill: Any = 0,
    int_range: tuple[int, int] | None = None,
    kept: np.ndarray | None = None,
    nm: tuple[int, int, int] | None = None,
    huffman: bool = False,
    dense: bool = False,
) -> dict:
  """Stores ``x`` in the smallest layout and symbol stream; returns its JSON node.

  Args:
    bufs: the leaf's buffers, written to.
    name: prefix of this array's buffer names.
    x: the array: integers (then ``int_range`` gives the symbol range) or floats
      (stored raw in their dtype).
    fill: the value of every entry a sparse layout does not store.
    int_range: ``(lo, hi)``, the range of integer symbols.
    kept: a mask of entries a structure keeps (a pruning mask); used as an extra
      candidate (for ``nm``) when every non-fill entry lies inside it.
    nm: ``(n, m, axis)`` of an N:M structure, with ``kept``.
    huffman: allow Huffman-coded streams.
    dense: store every entry (small arrays: scales, codebooks).

  Returns:
    ``{"shape", "fill", "layout", "values"}``.
  """
  x = np.asarray(x)
  is_int = int_range is not None
  everything = np.ones(x.shape, bool)
  candidates = [(everything, None)]
  if not dense:
    needed = nonfill(x, fill)
    if kept is not None and nm is not None:  # first: an N:M layout wins ties
      kept = np.asarray(kept, bool)
      if kept.shape == x.shape and not np.any(needed & ~kept):
        candidates.append((kept, nm))
    if not needed.all():
      candidates.append((needed, None))
  best = None
  for mask, structure in candidates:
    for pos_bytes, order, write_layout in _layouts(mask, structure, huffman):
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
  layout = write_layout(bufs, name + "p")
  fill_json = int(fill) if is_int else 0.0
  return {"shape": list(x.shape), "fill": fill_json, "layout": layout, "values": stream.write(bufs, name)}


def load(node: dict, bufs: Buffers, dtype: np.dtype | None = None) -> np.ndarray:
  """The array ``store`` wrote: int64 for integer symbols, else the raw stream's dtype.

  Args:
    node: the node ``store`` returned.
    bufs: the leaf's buffers.
    dtype: for float arrays, the dtype to expect (checked against the stream).

  Returns:
    The dense array.
  """
  shape = tuple(node["shape"])
  layout = node["layout"]
  kept = _read_kept(layout, bufs, shape)
  values = _read_stream(node["values"], bufs, int(kept.sum()))
  if dtype is not None and values.dtype != dtype:
    raise ValueError(f"expected a {dtype} array, the stored stream holds {values.dtype}.")
  out = np.full(kept.shape, node["fill"], values.dtype)
  out[kept] = values
  if layout["type"] == "nm":
    out = np.moveaxis(out, -1, layout["axis"])
  return out.reshape(shape)


def describe(node: dict) -> str:
  """A short name of an array node, e.g. ``nm2:4 packed4`` or ``runs5 huffman``."""
  layout = node["layout"]
  kind = layout["type"]
  if kind == "nm":
    pos = f"nm{layout['n']}:{layout['m']}"
  elif kind == "runs":
    pos = f"runs{layout['p']}" + ("h" if layout["runs"]["coding"] == "huffman" else "")
  else:
    pos = kind
  v = node["values"]
  if v["coding"] == "packed":
    val = f"int{v['bits']}"
  elif v["coding"] == "huffman":
    val = "huffman"
  else:
    val = v["dtype"]
  return val if kind == "dense" else f"{val} {pos}"

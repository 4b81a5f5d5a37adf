"""Bit-level storage on the host: packed fixed-width integers and canonical Huffman codes.

Everything here is numpy over concrete arrays; the results are ``uint8`` buffers
that go to disk as they are.

- ``pack``/``unpack``: unsigned integers of ``bits`` bits each (1 to 16), in a
  little-endian bit stream: entry ``i`` occupies bits ``[i * bits, (i + 1) * bits)``,
  bit ``j`` of byte ``k`` being stream bit ``8 * k + j``. Two 4-bit entries share
  a byte, the first in the low nibble; 8-bit entries are plain bytes.
- ``huffman_encode``/``huffman_decode``: a canonical Huffman code (codes of one
  length are consecutive integers, in symbol order), so that the code is given
  by its code lengths alone. The lengths are stored as 4-bit nibbles (at most
  15 bits per code); the bit stream is most-significant bit first.
"""

from __future__ import annotations

import math

import numpy as np

from jaxcompress.cluster.entropy import huffman_code_lengths

MAX_CODE_LENGTH = 15


def width(n: int) -> int:
  """Bits that hold the integers ``0 .. n - 1`` (at least 1).

  Example:
    >>> from jaxcompress.export.bits import width
    >>> width(2), width(4), width(5), width(1)
    (1, 2, 3, 1)
  """
  return max(1, math.ceil(math.log2(max(n, 1))))


def packed_bytes(count: int, bits: int) -> int:
  """Bytes that ``count`` entries of ``bits`` bits take when packed."""
  return (count * bits + 7) // 8


def pack(values: np.ndarray, bits: int) -> np.ndarray:
  """Packs unsigned integers below ``2**bits`` into a ``uint8`` buffer.

  Args:
    values: non-negative integers (any shape; flattened row-major).
    bits: bits per entry, 1 to 16.

  Returns:
    ``uint8`` of ``packed_bytes(values.size, bits)`` bytes.

  Example:
    >>> import numpy as np
    >>> from jaxcompress.export.bits import pack
    >>> pack(np.array([1, 2, 15]), 4).tolist()
    [33, 15]
  """
  v = np.asarray(values).reshape(-1).astype(np.uint32)
  if v.size and int(v.max()) >> bits:
    raise ValueError(f"pack: value {int(v.max())} does not fit in {bits} bits.")
  if bits == 8:
    return v.astype(np.uint8)
  if bits == 4:
    if v.size % 2:
      v = np.append(v, np.uint32(0))
    return (v[0::2] | (v[1::2] << 4)).astype(np.uint8)
  stream = ((v[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
  return np.packbits(stream.reshape(-1), bitorder="little")


def unpack(buffer: np.ndarray, bits: int, count: int) -> np.ndarray:
  """The ``count`` integers ``pack`` stored in ``buffer`` (int64).

  Example:
    >>> import numpy as np
    >>> from jaxcompress.export.bits import pack, unpack
    >>> unpack(pack(np.array([5, 0, 7]), 3), 3, 3).tolist()
    [5, 0, 7]
  """
  buf = np.asarray(buffer, np.uint8).reshape(-1)
  if buf.size < packed_bytes(count, bits):
    raise ValueError(
        f"unpack: {count} entries of {bits} bits need {packed_bytes(count, bits)} bytes, "
        f"the buffer has {buf.size}."
    )
  if bits == 8:
    return buf[:count].astype(np.int64)
  if bits == 4:
    out = np.empty(2 * ((count + 1) // 2), np.int64)
    head = buf[: (count + 1) // 2]
    out[0::2] = head & 15
    out[1::2] = head >> 4
    return out[:count]
  stream = np.unpackbits(buf, bitorder="little")[: count * bits].reshape(count, bits)
  return stream.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))


# --------------------------------------------------------------------------
# Canonical Huffman codes.
# --------------------------------------------------------------------------


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
  """Canonical code of each symbol (by length, then by symbol); 0 for unused."""
  codes = np.zeros(lengths.size, np.int64)
  code, prev = 0, 0
  for s in np.lexsort((np.arange(lengths.size), lengths)):
    n = int(lengths[s])
    if n == 0:
      continue
    code <<= n - prev
    codes[s] = code
    code += 1
    prev = n
  return codes


def huffman_lengths(symbols: np.ndarray, alphabet: int) -> np.ndarray | None:
  """Huffman code lengths of a stream of symbols in ``[0, alphabet)``.

  Returns:
    int64 ``(alphabet,)`` lengths, or ``None`` when a code would be longer than
    ``MAX_CODE_LENGTH`` bits (then store the symbols packed instead).
  """
  lengths = huffman_code_lengths(np.bincount(np.asarray(symbols, np.int64), minlength=alphabet))
  if lengths.size and lengths.max() > MAX_CODE_LENGTH:
    return None
  return lengths


def huffman_bits(symbols: np.ndarray, lengths: np.ndarray) -> int:
  """Bits of the coded stream (the table not included)."""
  return int(lengths[np.asarray(symbols, np.int64)].sum())


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Codes ``symbols`` with the canonical code of ``lengths``.

  Args:
    symbols: integers in ``[0, lengths.size)``, each with a nonzero length.
    lengths: code lengths (from ``huffman_lengths``).

  Returns:
    ``(stream, table)``: the bit stream, MSB first, zero-padded to whole bytes,
    and the code lengths as 4-bit nibbles (``pack(lengths, 4)``).

  Example:
    >>> import numpy as np
    >>> from jaxcompress.export.bits import huffman_decode, huffman_encode, huffman_lengths
    >>> s = np.array([0, 0, 0, 1, 2, 0])
    >>> stream, table = huffman_encode(s, huffman_lengths(s, 3))
    >>> huffman_decode(stream, table, s.size, 3).tolist()
    [0, 0, 0, 1, 2, 0]
  """
  s = np.asarray(symbols, np.int64).reshape(-1)
  codes = _canonical_codes(lengths)
  n = lengths[s]
  total = int(n.sum())
  starts = np.cumsum(n) - n
  within = np.arange(total, dtype=np.int64) - np.repeat(starts, n)
  shift = np.repeat(n, n) - 1 - within
  bits = (np.repeat(codes[s], n) >> shift) & 1
  return np.packbits(bits.astype(np.uint8)), pack(lengths, 4)


def huffman_decode(stream: np.ndarray, table: np.ndarray, count: int, alphabet: int) -> np.ndarray:
  """The ``count`` symbols of a canonical Huffman bit stream.

  Decoding is table-driven and vectorized: the symbol whose code starts at
  every bit position is found at once (one pass per code length), then the
  chain of code boundaries is followed from bit 0.

  Args:
    stream: the bit stream from ``huffman_encode``.
    table: the code lengths, 4-bit nibbles.
    count: number of symbols.
    alphabet: number of symbols of the code.

  Returns:
    int64 ``(count,)``.

  Raises:
    ValueError: when the stream ends early or holds a bit pattern that is no
      code (a corrupted buffer).
  """
  lengths = unpack(table, 4, alphabet)
  if count == 0:
    return np.zeros(0, np.int64)
  used = np.flatnonzero(lengths)
  if used.size == 0:
    raise ValueError("huffman_decode: the code table is empty but symbols are expected.")
  codes = _canonical_codes(lengths)
  bits = np.unpackbits(np.asarray(stream, np.uint8)).astype(np.int64)
  total = bits.size
  max_len = int(lengths.max())
  padded = np.concatenate([bits, np.zeros(max_len, np.int64)])
  symbol_at = np.full(total, -1, np.int64)
  length_at = np.zeros(total, np.int64)
  value = np.zeros(total, np.int64)
  for n in range(1, max_len + 1):
    value = (value << 1) | padded[n - 1 : n - 1 + total]
    of_len = used[lengths[used] == n]
    if of_len.size == 0:
      continue
    first = codes[of_len[0]]  # canonical: codes of one length are consecutive
    k = value - first
    hit = (symbol_at < 0) & (k >= 0) & (k < of_len.size)
    symbol_at[hit] = of_len[k[hit]]
    length_at[hit] = n
  out = np.empty(count, np.int64)
  sym, step = symbol_at.tolist(), length_at.tolist()
  pos = 0
  for i in range(count):
    if pos >= total or sym[pos] < 0:
      raise ValueError(
          f"huffman_decode: the bit stream ends or breaks after {i} of {count} symbols "
          "(the buffer is truncated or corrupted)."
      )
    out[i] = sym[pos]
    pos += step[pos]
  if pos > total:
    raise ValueError("huffman_decode: the last code runs past the end of the bit stream.")
  return out


# --------------------------------------------------------------------------
# XOR-delta coding of floats (for small arrays: codebooks, scales).
# --------------------------------------------------------------------------


def xor_encode(words: np.ndarray, width_bits: int) -> np.ndarray:
  """Codes unsigned words (float bit patterns) by the XOR with their predecessor.

  Each XOR ``d`` is stored as its count of leading zeros in
  ``width(width_bits + 1)`` bits, then its bits below the leading one (none when
  ``d == 0``). Neighbouring values of a sorted codebook share sign, exponent
  and leading mantissa bits, so ``d`` has many leading zeros. Little-endian bit
  stream, like ``pack``.

  Args:
    words: unsigned integers of ``width_bits`` bits (``x.view(np.uint32)``).
    width_bits: 8, 16, 32 or 64.

  Returns:
    The ``uint8`` stream.

  Example:
    >>> import numpy as np
    >>> from jaxcompress.export.bits import xor_decode, xor_encode
    >>> w = np.array([1.0, 1.5, 1.75], np.float32).view(np.uint32)
    >>> xor_decode(xor_encode(w, 32), 3, 32).astype(np.uint32).view(np.float32).tolist()
    [1.0, 1.5, 1.75]
  """
  u = np.asarray(words, np.uint64).reshape(-1)
  d = u ^ np.concatenate([[np.uint64(0)], u[:-1]])
  nbits = np.array([int(x).bit_length() for x in d.tolist()], np.int64)
  lz = width_bits - nbits
  head = width(width_bits + 1)
  payload = np.maximum(nbits - 1, 0)
  fields = []
  for z, n, x in zip(lz.tolist(), payload.tolist(), d.tolist()):
    fields.append([(z >> i) & 1 for i in range(head)] + [(x >> i) & 1 for i in range(n)])
  bits = np.array([b for f in fields for b in f], np.uint8)
  return np.packbits(bits, bitorder="little")


def xor_decode(buffer: np.ndarray, count: int, width_bits: int) -> np.ndarray:
  """The ``count`` words ``xor_encode`` stored (uint64)."""
  bits = np.unpackbits(np.asarray(buffer, np.uint8), bitorder="little").tolist()
  head = width(width_bits + 1)
  out = np.zeros(count, np.uint64)
  pos, prev = 0, 0
  for i in range(count):
    if pos + head > len(bits):
      raise ValueError("an XOR-coded stream ends early (truncated or corrupted).")
    z = sum(bits[pos + j] << j for j in range(head))
    pos += head
    if z > width_bits:
      raise ValueError("an XOR-coded stream is corrupted.")
    n = width_bits - z
    d = 0
    if n:
      if pos + n - 1 > len(bits):
        raise ValueError("an XOR-coded stream ends early (truncated or corrupted).")
      d = (1 << (n - 1)) | sum(bits[pos + j] << j for j in range(n - 1))
      pos += n - 1
    prev ^= d
    out[i] = prev
  return out


def xor_bytes(words: np.ndarray, width_bits: int) -> int:
  """Bytes ``xor_encode`` takes, without building it."""
  u = np.asarray(words, np.uint64).reshape(-1)
  d = u ^ np.concatenate([[np.uint64(0)], u[:-1]])
  nbits = np.array([int(x).bit_length() for x in d.tolist()], np.int64)
  return (int(np.maximum(nbits - 1, 0).sum()) + d.size * width(width_bits + 1) + 7) // 8

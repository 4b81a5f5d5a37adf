"""Entropy coding for size accounting: Huffman code lengths and sparse relative indices.

These run on the host, in numpy, over concrete arrays: they measure what a
compressed model costs to store, they do not run inside a training step.
"""

from __future__ import annotations

import heapq

import numpy as np

from jaxcompress.core.checks import is_int


def huffman_code_lengths(counts: np.ndarray | list[int]) -> np.ndarray:
  """Code lengths of an optimal (Huffman) prefix code for symbol frequencies.

  Args:
    counts: non-negative symbol frequencies, shape ``(m,)``.

  Returns:
    int64 ``(m,)``: the code length of each symbol; 0 for symbols that never
    occur. A lone occurring symbol gets length 1 (a decoder needs one bit to
    read a symbol). The total ``sum(counts * lengths)`` is the minimum over
    all prefix codes.

  Raises:
    ValueError: for negative or non-integer counts, or not one-dimensional.

  Example:
    >>> import jaxcompress as jc
    >>> jc.cluster.huffman_code_lengths([8, 4, 2, 1, 1]).tolist()
    [1, 2, 3, 4, 4]
  """
  c = np.asarray(counts)
  if c.ndim != 1:
    raise ValueError(f"huffman_code_lengths: counts must be 1-D, got shape {c.shape}.")
  if c.size and (not np.issubdtype(c.dtype, np.integer) or c.min() < 0):
    raise ValueError(
        f"huffman_code_lengths: counts must be non-negative integers, got dtype {c.dtype} "
        f"with minimum {c.min()}. Pass symbol frequencies, e.g. np.bincount(symbols)."
    )
  lengths = np.zeros(c.shape, np.int64)
  used = np.flatnonzero(c)
  if used.size == 1:
    lengths[used] = 1
  if used.size <= 1:
    return lengths
  # Leaves are nodes 0..m-1 (m = used symbols); each merge makes a new node.
  heap = [(int(c[s]), n) for n, s in enumerate(used)]
  heapq.heapify(heap)
  parent: list[int] = [-1] * used.size
  while len(heap) > 1:
    w1, a = heapq.heappop(heap)
    w2, b = heapq.heappop(heap)
    node = len(parent)
    parent.append(-1)
    parent[a] = parent[b] = node
    heapq.heappush(heap, (w1 + w2, node))
  # Parents are created after their children: walk from the root down.
  depth = [0] * len(parent)
  for node in range(len(parent) - 2, -1, -1):
    depth[node] = depth[parent[node]] + 1
  lengths[used] = depth[: used.size]
  return lengths


def relative_index(nonzero: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
  """The sparse index encoding of Deep Compression: relative positions with fillers.

  Entries are stored in flat (row-major) order; each stores the number of zeros
  skipped since the previous stored entry, in ``index_bits`` bits, so at most
  ``2^index_bits - 1``. A longer run of zeros is bridged with filler entries:
  a filler skips the largest run, ``2^index_bits - 1`` zeros, and stores a
  zero value at the next position (Han et al. 2016, figure 2). A run of ``z``
  zeros before a nonzero thus takes ``z // 2^index_bits`` fillers. Zeros after
  the last nonzero need no entry (the decoder knows the size).

  Args:
    nonzero: bool array (any shape; flattened in row-major order), True where
      a value is stored.
    index_bits: bits per relative index, at least 1.

  Returns:
    ``(runs, filler)``, both ``(entries,)``: the relative index stored with each
    entry (int64 in ``[0, 2^index_bits)``) and whether the entry is a filler.
    ``entries`` is the number of nonzeros plus the number of fillers.

  Raises:
    ValueError: for ``index_bits < 1``.

  Example:
    >>> import numpy as np, jaxcompress as jc
    >>> runs, filler = jc.cluster.relative_index(np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], bool), 3)
    >>> runs.tolist(), filler.tolist()
    ([0, 7, 1], [False, True, False])
  """
  if not is_int(index_bits) or index_bits < 1:
    raise ValueError(
        f"relative_index: index_bits must be an int >= 1, got {index_bits!r} (Deep "
        "Compression uses 5 for Dense and 8 for Conv layers)."
    )
  span = 1 << int(index_bits)
  pos = np.flatnonzero(np.asarray(nonzero).reshape(-1))
  gaps = np.diff(pos, prepend=-1) - 1
  fillers = gaps // span
  per_nonzero = fillers + 1
  total = int(per_nonzero.sum())
  runs = np.full(total, span - 1, np.int64)
  filler = np.ones(total, bool)
  last = np.cumsum(per_nonzero) - 1  # each nonzero comes after its fillers
  runs[last] = gaps % span
  filler[last] = False
  return runs, filler

"""Huffman code lengths and Deep Compression's relative index, against references."""

import heapq

import numpy as np
import pytest

from jaxcompress.cluster import huffman_code_lengths, relative_index


def huffman_cost(counts):
  """Total Huffman-coded length: the sum of the weights of all merged nodes."""
  heap = [int(c) for c in counts if c > 0]
  heapq.heapify(heap)
  total = 0
  while len(heap) > 1:
    merged = heapq.heappop(heap) + heapq.heappop(heap)
    total += merged
    heapq.heappush(heap, merged)
  return total


def test_known_code():
  assert huffman_code_lengths([8, 4, 2, 1, 1]).tolist() == [1, 2, 3, 4, 4]
  assert huffman_code_lengths([5, 5, 5, 5]).tolist() == [2, 2, 2, 2]
  assert huffman_code_lengths([0, 3, 0, 1]).tolist() == [0, 1, 0, 1]
  assert huffman_code_lengths([0, 7]).tolist() == [0, 1]
  assert huffman_code_lengths([0, 0]).tolist() == [0, 0]
  assert huffman_code_lengths(np.zeros(0, np.int64)).tolist() == []


@pytest.mark.parametrize("seed", range(5))
def test_optimal_and_complete(seed):
  rng = np.random.default_rng(seed)
  counts = rng.geometric(0.05, size=rng.integers(2, 200))
  counts[rng.random(counts.size) < 0.2] = 0
  counts[:2] = [3, 9]
  lengths = huffman_code_lengths(counts)
  used = counts > 0
  assert int((counts * lengths).sum()) == huffman_cost(counts)
  assert np.sum(2.0 ** -lengths[used]) == 1.0  # Kraft equality: a complete prefix code
  assert np.all(lengths[~used] == 0)
  p = counts[used] / counts.sum()
  entropy = -(p * np.log2(p)).sum()
  mean = (counts * lengths).sum() / counts.sum()
  assert entropy <= mean < entropy + 1


def test_bad_counts():
  with pytest.raises(ValueError, match="non-negative integers"):
    huffman_code_lengths([1, -2])
  with pytest.raises(ValueError, match="non-negative integers, got dtype float64"):
    huffman_code_lengths([1.5, 2.0])
  with pytest.raises(ValueError, match=r"must be 1-D, got shape \(2, 2\)"):
    huffman_code_lengths(np.ones((2, 2), int))


def naive_encode(mask, index_bits):
  """Walks the array: a filler is emitted on the zero where the run would overflow."""
  span = 2**index_bits
  nz = np.flatnonzero(mask)
  runs, filler, zeros = [], [], 0
  for i in range(nz[-1] + 1 if nz.size else 0):
    if mask[i]:
      runs.append(zeros), filler.append(False)
      zeros = 0
    elif zeros == span - 1:
      runs.append(zeros), filler.append(True)
      zeros = 0
    else:
      zeros += 1
  return runs, filler


def decode(runs, filler, size):
  mask, pos = np.zeros(size, bool), -1
  for r, f in zip(runs, filler):
    pos += r + 1
    mask[pos] = not f
  return mask


def test_relative_index_by_hand():
  def enc(positions, size, bits):
    m = np.zeros(size, bool)
    m[positions] = True
    runs, filler = relative_index(m, bits)
    return runs.tolist(), filler.tolist()

  # 3 bits: runs of up to 7 zeros fit; 8 zeros take one filler; 16 take two.
  assert enc([0, 8], 9, 3) == ([0, 7], [False, False])
  assert enc([0, 9], 10, 3) == ([0, 7, 0], [False, True, False])
  assert enc([16], 17, 3) == ([7, 7, 0], [True, True, False])
  assert enc([15], 17, 3) == ([7, 7], [True, False])
  assert enc([2, 3], 40, 3) == ([2, 0], [False, False])  # trailing zeros: no entries
  assert enc([], 40, 3) == ([], [])
  assert enc([3], 4, 1) == ([1, 1], [True, False])


@pytest.mark.parametrize("bits", [1, 3, 5])
def test_relative_index_matches_naive_encoder_and_decodes(bits):
  rng = np.random.default_rng(bits)
  mask = rng.random(3000) < 0.04
  runs, filler = relative_index(mask.reshape(50, 60), bits)
  ref_runs, ref_filler = naive_encode(mask, bits)
  assert runs.tolist() == ref_runs and filler.tolist() == ref_filler
  assert runs.max() < 2**bits
  last = np.flatnonzero(mask)[-1]
  np.testing.assert_array_equal(decode(runs, filler, mask.size)[: last + 1], mask[: last + 1])


def test_relative_index_bad_bits():
  with pytest.raises(ValueError, match="index_bits must be an int >= 1, got 0"):
    relative_index(np.ones(3, bool), 0)

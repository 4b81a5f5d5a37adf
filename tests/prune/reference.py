"""Independent numpy references for the pruning tests (sorting is fine here)."""

import numpy as np


def keep_topk(scores, k):
  """Bool mask keeping the k largest of ``scores`` (any shape).

  Order: numbers by value (descending), then NaN; ties by lower flat index.
  Built on ``np.lexsort``, independent of the library's bisection.
  """
  s = np.asarray(scores, np.float64).ravel()
  nan = np.isnan(s)
  order = np.lexsort((np.arange(s.size), -np.where(nan, 0.0, s), nan))
  keep = np.zeros(s.size, bool)
  keep[order[: max(0, min(k, s.size))]] = True
  return keep.reshape(np.shape(scores))


def keep_topk_many(scores_list, k):
  """Global top-k over several arrays; ties go to earlier arrays, then lower index."""
  flat = np.concatenate([np.asarray(s, np.float64).ravel() for s in scores_list])
  keep = keep_topk(flat, k)
  out, start = [], 0
  for s in scores_list:
    n = np.size(s)
    out.append(keep[start : start + n].reshape(np.shape(s)))
    start += n
  return out


def n_keep(size, sparsity):
  return int(np.round((1.0 - sparsity) * size))


def nm_mask(scores, n, m, axis):
  """N:M along ``axis``: in each run of m entries keep the n largest (partial last group allowed)."""
  s = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
  keep = np.zeros(s.shape, bool)
  for idx in np.ndindex(s.shape[:-1]):
    row = s[idx]
    for start in range(0, row.size, m):
      group = row[start : start + m]
      keep[idx + (slice(start, start + m),)] = keep_topk(group, n)
  return np.moveaxis(keep, -1, axis)


def block_mask(scores, block, k):
  """Keep the k blocks with the largest score sums (row-major block order for ties)."""
  s = np.asarray(scores, np.float64)
  grid = tuple(d // b for d, b in zip(s.shape, block))
  sums = np.zeros(grid)
  for g in np.ndindex(grid):
    sl = tuple(slice(i * b, (i + 1) * b) for i, b in zip(g, block))
    sums[g] = s[sl].sum()
  keep_blocks = keep_topk(sums, k)
  mask = np.zeros(s.shape, bool)
  for g in np.ndindex(grid):
    sl = tuple(slice(i * b, (i + 1) * b) for i, b in zip(g, block))
    mask[sl] = keep_blocks[g]
  return mask


def channel_scores(scores):
  s = np.asarray(scores, np.float64)
  return np.sqrt((s**2).reshape(-1, s.shape[-1]).sum(axis=0))


def erk_sparsities(shapes, sparsity, power=1.0):
  """The Erdos-Renyi-Kernel layer sparsities, following the RigL paper's algorithm."""
  dense = set()
  while True:
    divisor, rhs, raw = 0.0, 0.0, {}
    for i, shape in enumerate(shapes):
      n = float(np.prod(shape))
      if i in dense:
        rhs -= n * sparsity
      else:
        rhs += n * (1.0 - sparsity)
        raw[i] = (np.sum(shape) / np.prod(shape)) ** power
        divisor += raw[i] * n
    eps = rhs / divisor
    max_prob = max(raw.values())
    if max_prob * eps > 1.0:
      dense |= {i for i, p in raw.items() if p == max_prob}
    else:
      break
  return [0.0 if i in dense else 1.0 - eps * raw[i] for i in range(len(shapes))]

"""One-dimensional k-means in JAX: optimal initialisation and Lloyd to convergence.

Every function works on one group of scalars (a flat ``x`` with a ``valid``
mask; invalid entries, such as pruned zeros, take no part) and is vmapped over
groups (output channels) by the cluster stage. All of it is traceable, runs
under ``jax.jit`` (loops are ``lax.scan``/``lax.while_loop`` with static caps)
and never syncs with the host.

In one dimension every cluster of an optimal (and of every Lloyd) partition is a
run of consecutive values once they are sorted. So the data are sorted once,
with prefix sums of the values and of their squares: the mean and the squared
error of any run then cost O(1), and

- one Lloyd iteration costs O(k log n): the ``k - 1`` midpoints between sorted
  centroids are located in the sorted data (``searchsorted``), and each
  cluster's mean is a difference of prefix sums. Lloyd therefore runs until the
  partition stops changing (an exact fixed point), under an iteration cap;
- the optimal partition is found by dynamic programming over candidate cut
  positions (``init_optimal``; Bellman's recursion, as in Wang and Song 2011,
  "Ckmeans.1d.dp"): exact when there are at most ``max_cuts`` valid values,
  and over a grid of cuts (equal-count and equal-width positions, so dense
  centres and sparse tails are both resolved) otherwise, then polished by Lloyd.

A cluster left empty by Lloyd is re-seeded at the farthest end of the cluster
with the largest squared error, which strictly lowers the error, so the loop
ends.

Precision: prefix sums are float32 over values centred on their mean. The
error of a run's squared error is about ``eps * n * var``, far below the
optimum's per-cluster error for up to 64 clusters; at 256 clusters the dynamic
programme's choices are approximate and Lloyd polishes them.

The nearest centroid of an arbitrary entry is found without an ``(n, k)``
distance matrix: the number of midpoints below it (``assign``), O(n log k).

Sharded leaves: sorting a whole leaf split over devices gathers it (XLA does
not partition a sort of the flattened leaf). ``sort_columns`` instead sorts each
column of the leaf seen as a matrix ``(prod(shape[:-1]), shape[-1])``, a sort
along an axis that XLA partitions, with per-column prefix sums kept at block
boundaries (``PREFIX_BLOCK`` rows; a prefix inside a block adds up its few
entries), so that the layout holds one copy of the leaf, not three. Every question
the algorithms ask of the sorted data has an answer from the columns:

- how many entries are at most ``t``, and their sums: a binary search in every
  column, summed over columns (O(C log R) per threshold);
- the value at a rank (a quantile): bisection over the order-preserving
  integer image of float32 on that count, at most 32 rounds;
- a prefix sum at a rank ``p``: the sums of the entries below the value ``v``
  at rank ``p``, plus ``v`` once for each of the ties that the prefix holds.

So Lloyd, the dynamic programme and the density init give the same centroids
from either layout (up to float summation order). The stage clusters one
codebook per layer from columns; per-channel codebooks sort each channel, which
already partitions over a sharded channel axis.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcompress.core.select import float_of_sortable_bits, sortable_bits

Array = jax.Array

#: Centroid initialisations. ``"optimal"`` is the global optimum (dynamic
#: programming); the other three are the starting points compared in Deep
#: Compression (Han et al. 2016, section 3.2), each followed by Lloyd.
INITS = ("optimal", "linear", "density", "kmeans++")

#: Candidate cut positions of the dynamic programme (its cost is
#: ``k * cuts**2`` per group; exact when a group has at most this many values).
MAX_CUTS = 512


class Sorted(NamedTuple):
  """The valid entries of one group, sorted, with centred prefix sums.

  Attributes:
    xs: float32 ``(N,)``, ascending; the ``N - n`` invalid entries are ``+inf`` at the end.
    n: int32 scalar, the number of valid entries.
    shift: float32 scalar, the mean of the valid entries (0 when there are none).
    s1: float32 ``(N + 1,)``, ``s1[i] = sum(xs[:i] - shift)`` over valid entries.
    s2: float32 ``(N + 1,)``, ``s2[i] = sum((xs[:i] - shift)**2)`` over valid entries.
  """

  xs: Array
  n: Array
  shift: Array
  s1: Array
  s2: Array


#: Rows per block of the column layout's prefix sums: they are kept at block
#: boundaries only, and a prefix within a block adds up its entries (at most
#: this many) from the sorted column.
PREFIX_BLOCK = 32


class Columns(NamedTuple):
  """The valid entries of a matrix, each column sorted, with centred prefix sums per block.

  Full prefix sums would be two more float32 copies of the leaf; at block
  boundaries they cost ``2 / PREFIX_BLOCK`` of it.

  Attributes:
    cols: float32 ``(C, R)``: row ``c`` holds column ``c`` of the matrix ascending
      (contiguous, for the searches), its invalid entries ``+inf`` at its end.
    counts: int32 ``(C,)``, the valid entries of each column.
    n: int32 scalar, ``sum(counts)``.
    shift: float32 scalar, the mean of the valid entries (0 when there are none).
    p1: float32 ``(C, ceil(R / B) + 1)``, ``B = PREFIX_BLOCK``:
      ``p1[c, i] = sum(cols[c, :i * B] - shift)`` over valid entries.
    p2: the same for the squares.
  """

  cols: Array
  counts: Array
  n: Array
  shift: Array
  p1: Array
  p2: Array


def _shift(x: Array, valid: Array, n: Array) -> Array:
  return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(n, 1).astype(jnp.float32)


def sort_valid(x: Array, valid: Array) -> Sorted:
  """Sorts the valid entries of ``x`` and takes their prefix sums.

  Args:
    x: float32 ``(N,)``.
    valid: bool ``(N,)``.

  Returns:
    A ``Sorted``.
  """
  n = jnp.sum(valid, dtype=jnp.int32)
  xs = jnp.sort(jnp.where(valid, x, jnp.inf))
  shift = _shift(x, valid, n)
  d = jnp.where(jnp.arange(x.shape[0]) < n, xs - shift, 0.0)
  zero = jnp.zeros((1,), jnp.float32)
  return Sorted(xs, n, shift, jnp.concatenate([zero, jnp.cumsum(d)]), jnp.concatenate([zero, jnp.cumsum(d * d)]))


def sort_columns(x: Array, valid: Array) -> Columns:
  """Sorts the valid entries of every column of ``x`` and takes their prefix sums.

  A sort and prefix sums along axis 0 only: where ``x`` is sharded, XLA keeps
  them sharded (over the columns, or by moving a sharded row axis to them).

  Args:
    x: float32 ``(R, C)``.
    valid: bool ``(R, C)``.

  Returns:
    A ``Columns``.
  """
  # One variadic reduce: XLA:CPU materializes the operand of a plain large
  # reduction (a converted copy of the leaf), not of a variadic one.
  counts, sums = jax.lax.reduce(
      (valid.astype(jnp.int32), jnp.where(valid, x, 0.0)), (jnp.int32(0), jnp.float32(0)),
      lambda a, b: (a[0] + b[0], a[1] + b[1]), (0,),
  )
  n = jnp.sum(counts)
  # Sorted transposed: each column's entries contiguous (the transpose fuses
  # into the sort's input; a leaf sharded over its columns stays sharded).
  cols = jnp.sort(jnp.where(valid, x, jnp.inf).T, axis=1)
  shift = jnp.sum(sums) / jnp.maximum(n, 1).astype(jnp.float32)
  r, c = x.shape
  blocks = -(-r // PREFIX_BLOCK)
  d = jnp.where(jnp.arange(r)[None] < counts[:, None], cols - shift, 0.0)
  d = jnp.pad(d, ((0, 0), (0, blocks * PREFIX_BLOCK - r))).reshape(c, blocks, PREFIX_BLOCK)
  b1, b2 = jax.lax.reduce((d, d * d), (jnp.float32(0),) * 2, lambda a, b: (a[0] + b[0], a[1] + b[1]), (2,))
  zero = jnp.zeros((c, 1), jnp.float32)
  prefix = lambda v: jnp.concatenate([zero, jnp.cumsum(v, axis=1)], axis=1)
  return Columns(cols, counts, n, shift, prefix(b1), prefix(b2))


Data = Sorted | Columns


#: Thresholds searched for at once in every column: more are handled in chunks of
#: this many (``lax.map``), which bounds the ``(C, chunk)`` index arrays.
SEARCH_CHUNK = 32


def _over_chunks(fn, *qs: Array) -> tuple[Array, ...]:
  """``fn`` over per-threshold arrays ``qs`` (each ``(q,)``), ``SEARCH_CHUNK`` at a time.

  ``fn`` maps ``(chunk,)`` arrays to a tuple of ``(chunk,)`` arrays.
  """
  q = qs[0].shape[0]
  if q <= SEARCH_CHUNK:
    return fn(*qs)
  chunks = -(-q // SEARCH_CHUNK)
  padded = tuple(jnp.pad(x, (0, chunks * SEARCH_CHUNK - q), mode="edge").reshape(chunks, -1) for x in qs)
  out = jax.lax.map(lambda xs: fn(*xs), padded)
  return tuple(o.reshape(-1)[:q] for o in out)


def _column_search(d: Columns, t: Array, side: str) -> Array:
  """``(C, q)``: per column, how many valid entries are ``<= t`` (``side="right"``) or ``< t``."""
  found = jax.vmap(
      lambda col: jnp.searchsorted(col, t, side=side, method="scan_unrolled")
  )(d.cols)
  return jnp.minimum(found.astype(jnp.int32), d.counts[:, None])


def _column_sums(d: Columns, idx: Array) -> tuple[Array, Array, Array]:
  """Count and centred sums of the first ``idx[c, j]`` entries of every column, summed over columns.

  The block prefix below each ``idx``, plus the entries of its block up to it.
  """
  c, r = d.cols.shape
  block = idx // PREFIX_BLOCK  # (C, q)
  rows = block[..., None] * PREFIX_BLOCK + jnp.arange(PREFIX_BLOCK)  # (C, q, B)
  vals = jnp.take_along_axis(d.cols, jnp.minimum(rows, r - 1).reshape(c, -1), axis=1).reshape(rows.shape)
  dv = jnp.where(rows < idx[..., None], vals - d.shift, 0.0)
  s1 = jnp.take_along_axis(d.p1, block, axis=1) + jnp.sum(dv, axis=2)
  s2 = jnp.take_along_axis(d.p2, block, axis=1) + jnp.sum(dv * dv, axis=2)
  return jnp.sum(idx, axis=0), jnp.sum(s1, axis=0), jnp.sum(s2, axis=0)


def _below(d: Data, t: Array, side: str = "right") -> tuple[Array, Array, Array]:
  """Count, centred sum and centred sum of squares of the valid entries ``<= t`` (or ``< t``)."""
  if isinstance(d, Sorted):
    b = jnp.minimum(jnp.searchsorted(d.xs, t, side=side, method="scan_unrolled"), d.n).astype(jnp.int32)
    return b, d.s1[b], d.s2[b]
  return _over_chunks(lambda t: _column_sums(d, _column_search(d, t, side)), t)


def _ends(d: Data) -> tuple[Array, Array]:
  """The smallest and the largest valid entry (``+inf`` and the padding when there are none)."""
  if isinstance(d, Sorted):
    return d.xs[0], d.xs[jnp.maximum(d.n - 1, 0)]
  last = jnp.take_along_axis(d.cols, jnp.maximum(d.counts - 1, 0)[:, None], axis=1)[:, 0]
  return jnp.min(d.cols[:, 0]), jnp.max(jnp.where(d.counts > 0, last, -jnp.inf))


def _count(d: Columns, keys: Array, side: str) -> Array:
  return jnp.sum(_column_search(d, float_of_sortable_bits(keys), side), axis=0)


def _bracket(d: Columns, ranks: Array) -> tuple[Array, Array]:
  """Sortable images ``lo <= hi`` between which the entries at ``ranks`` lie.

  With ``f = rank / n``, fewer than ``rank + 1`` entries are below the smallest
  over columns of each column's entry at index ``f * n_c - 1``, and at least
  ``rank + 1`` are at most the largest of each column's entry at index
  ``(rank + 1) / n * n_c + 1``. The margins (one index, and one more per 2^20
  entries of a column) cover the float32 rounding of those indices.
  """
  cnt = d.counts.astype(jnp.float32)[:, None]
  margin = 1.0 + jnp.ceil(cnt * 2.0**-20)
  nf = jnp.maximum(d.n, 1).astype(jnp.float32)
  f, g = ranks.astype(jnp.float32) / nf, (ranks + 1).astype(jnp.float32) / nf
  i = jnp.maximum(jnp.floor(f * cnt) - margin, 0).astype(jnp.int32)  # (C, q)
  j = (jnp.minimum(jnp.ceil(g * cnt) + margin, cnt) - 1).astype(jnp.int32)
  used = (d.counts > 0)[:, None]
  lo = jnp.min(jnp.where(used, jnp.take_along_axis(d.cols, i, axis=1), jnp.inf), axis=0)
  hi = jnp.max(jnp.where(used, jnp.take_along_axis(d.cols, jnp.maximum(j, 0), axis=1), -jnp.inf), axis=0)
  return sortable_bits(lo), sortable_bits(hi)


def _select(d: Columns, ranks: Array) -> Array:
  """The sortable images of the entries at ``ranks`` (``< n``): for each, the smallest
  ``K`` with ``count(<= K) > rank``, by bisection over ``[lo, hi]`` (``_bracket``)."""
  lo, hi = _bracket(d, ranks)

  def body(state):
    lo, hi = state
    mid = lo + (hi - lo) // 2
    enough = _count(d, mid, "right") > ranks
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  return jax.lax.while_loop(lambda s: jnp.any(s[0] < s[1]), body, (lo, hi))[0]


def _at(d: Data, ranks: Array) -> Array:
  """The valid entries at ``ranks`` (0-based, clipped to ``[0, n - 1]``) in sorted order."""
  ranks = jnp.clip(ranks, 0, jnp.maximum(d.n - 1, 0))
  if isinstance(d, Sorted):
    return d.xs[ranks]
  return float_of_sortable_bits(_over_chunks(lambda r: (_select(d, r),), ranks)[0])


def _prefix(d: Data, ranks: Array) -> tuple[Array, Array, Array]:
  """Centred prefix sums (values, squares) of the first ``ranks`` sorted valid entries,
  and the entries at ``ranks`` (clipped as in ``_at``)."""
  v = _at(d, ranks)
  if isinstance(d, Sorted):
    return d.s1[ranks], d.s2[ranks], v
  # The entries below v, and v once for each of its ties inside the prefix.
  c, t1, t2 = _below(d, v, "left")
  ties = (ranks - c).astype(jnp.float32)
  dv = v - d.shift
  return jnp.where(d.n > 0, t1 + ties * dv, 0.0), jnp.where(d.n > 0, t2 + ties * dv * dv, 0.0), v


def _run_ends(d: Data, t: Array, b: Array) -> tuple[Array, Array]:
  """First and last entry of each run between thresholds ``t`` (``(k + 1,)``, ranks ``b``).

  Run ``j`` holds the valid entries in ``(t[j], t[j + 1]]``; its values are
  meaningful only where it holds at least one entry.
  """
  if isinstance(d, Sorted):
    return d.xs[jnp.minimum(b[:-1], d.xs.shape[0] - 1)], d.xs[jnp.maximum(b[1:] - 1, 0)]

  def ends(t):
    idx = _column_search(d, t, "right")  # (C, chunk)
    above = jnp.take_along_axis(d.cols, jnp.minimum(idx, d.cols.shape[1] - 1), axis=1)
    upto = jnp.take_along_axis(d.cols, jnp.maximum(idx - 1, 0), axis=1)
    first = jnp.min(jnp.where(idx < d.counts[:, None], above, jnp.inf), axis=0)
    return first, jnp.max(jnp.where(idx > 0, upto, -jnp.inf), axis=0)

  first, last = _over_chunks(ends, t)
  return first[:-1], last[1:]


def _runs(
    shift: Array, lo: tuple[Array, Array, Array], hi: tuple[Array, Array, Array]
) -> tuple[Array, Array, Array]:
  """Count, mean and squared error of runs from their ends' (count, s1, s2) (broadcasting)."""
  cnt = hi[0] - lo[0]
  w = jnp.maximum(cnt, 1).astype(jnp.float32)
  t1 = hi[1] - lo[1]
  sse = jnp.maximum(hi[2] - lo[2] - t1 * t1 / w, 0.0)
  return cnt, shift + t1 / w, jnp.where(cnt > 0, sse, 0.0)


def init_linear(x: Array, valid: Array, k: int) -> Array:
  """``k`` centroids evenly spaced over ``[min, max]`` of the valid entries.

  Args:
    x: float32 values, shape ``(n,)``.
    valid: bool, shape ``(n,)``; entries that take part.
    k: number of centroids (at least 2).

  Returns:
    float32 ``(k,)``: ``min + (max - min) * j / (k - 1)``; zeros when nothing is valid.
  """
  any_valid = jnp.any(valid)
  lo = jnp.where(any_valid, jnp.min(jnp.where(valid, x, jnp.inf)), 0.0)
  hi = jnp.where(any_valid, jnp.max(jnp.where(valid, x, -jnp.inf)), 0.0)
  return lo + (hi - lo) * (jnp.arange(k, dtype=jnp.float32) / (k - 1))


def init_density(d: Data, k: int) -> Array:
  """Centroids at evenly spaced levels of the empirical CDF of the valid entries.

  Centroid ``j`` is the inverse empirical CDF at ``(j + 1/2) / k``: the smallest
  valid value ``v`` with ``#{x <= v} >= (j + 1/2) n / k`` (numpy's
  ``quantile(..., method="inverted_cdf")``).

  Args:
    d: the sorted entries (``sort_valid`` or ``sort_columns``).
    k: number of centroids.

  Returns:
    float32 ``(k,)``, ascending; zeros when nothing is valid.
  """
  levels = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k
  idx = jnp.ceil(levels * d.n.astype(jnp.float32)).astype(jnp.int32) - 1
  return jnp.where(d.n > 0, _at(d, idx), jnp.zeros((k,), jnp.float32))


def init_kmeans_pp(x: Array, valid: Array, k: int, key: Array) -> Array:
  """k-means++ seeding (Arthur and Vassilvitskii 2007) over the valid entries.

  The first centroid is a valid entry drawn uniformly; each next one a valid
  entry drawn with probability proportional to its squared distance to the
  nearest centroid so far. When every valid entry already is a centroid (fewer
  distinct values than ``k``), the draw falls back to uniform.

  Args:
    x, valid, k: as for ``init_linear``.
    key: PRNG key.

  Returns:
    float32 ``(k,)``, each a valid entry of ``x`` (zeros when nothing is valid).
  """
  any_valid = jnp.any(valid)
  uniform = jnp.where(valid, 0.0, -jnp.inf)

  def draw(i, logits):
    logits = jnp.where(any_valid, logits, jnp.zeros_like(logits))
    j = jax.random.categorical(jax.random.fold_in(key, i), logits)
    return jnp.where(any_valid, x[j], jnp.zeros((), x.dtype))

  first = draw(0, uniform)
  centroids = jnp.zeros((k,), jnp.float32).at[0].set(first)
  d2 = jnp.square(x - first)

  def body(i, carry):
    centroids, d2 = carry
    ok = valid & (d2 > 0)
    logits = jnp.where(ok, jnp.log(jnp.where(ok, d2, 1.0)), -jnp.inf)
    logits = jnp.where(jnp.any(ok), logits, uniform)
    c = draw(i, logits)
    return centroids.at[i].set(c), jnp.minimum(d2, jnp.square(x - c))

  centroids, _ = jax.lax.fori_loop(1, k, body, (centroids, d2))
  return centroids


def num_cuts(size: int, k: int, groups: int) -> int:
  """Equal-count cut positions of the dynamic programme for groups of ``size`` entries.

  All ``size + 1`` positions (an exact optimum) up to ``MAX_CUTS``; fewer when
  many groups are clustered at once (per-channel codebooks), so that the
  ``groups * cuts**2`` cost table stays within about 2^25 entries.

  Args:
    size: entries per group (valid or not).
    k: clusters.
    groups: groups clustered together.

  Returns:
    A positive int.
  """
  budget = int((2**25 / max(groups, 1)) ** 0.5)
  return max(min(size, MAX_CUTS, budget), k, 1)


def init_optimal(d: Data, k: int, cuts: int) -> Array:
  """The k-means optimum over partitions whose boundaries lie on candidate cuts.

  The candidates are ``round(j n / cuts)`` for ``j = 0..cuts`` (every position
  when ``n <= cuts``: then the result is the exact global optimum) and, when
  ``n`` may exceed ``cuts``, ``cuts // 4`` positions of equally spaced values
  over ``[min, max]``, which resolve sparse tails. Bellman's recursion
  ``E_j(i) = min_l E_{j-1}(l) + SSE(l, i)`` runs over a ``(cuts, cuts)`` table
  of run errors.

  Args:
    d: the sorted entries (``sort_valid`` or ``sort_columns``).
    k: number of clusters.
    cuts: number of equal-count cuts (``num_cuts``).

  Returns:
    float32 ``(k,)``, ascending: the means of the optimal runs (an empty run,
    possible only with fewer distinct values than ``k``, repeats its neighbour).
  """
  size = d.xs.shape[0] if isinstance(d, Sorted) else d.cols.size
  nf = d.n.astype(jnp.float32)
  pos = jnp.floor(jnp.arange(cuts + 1, dtype=jnp.float32) * (nf / cuts) + 0.5).astype(jnp.int32)
  pos = [jnp.minimum(pos, d.n)]
  if size > cuts:
    m = max(cuts // 4, 2)
    lo, hi = _ends(d)
    edges = lo + (hi - lo) * (jnp.arange(1, m, dtype=jnp.float32) / m)
    pos.append(_below(d, edges)[0])
  pos = jnp.sort(jnp.concatenate(pos))
  c = pos.shape[0]
  s1, s2, at_pos = _prefix(d, pos)
  cnt, _, sse = _runs(d.shift, (pos[:, None], s1[:, None], s2[:, None]), (pos[None], s1[None], s2[None]))
  row, col = jnp.arange(c)[:, None], jnp.arange(c)[None, :]
  cost = jnp.where(row <= col, sse, jnp.inf)  # cost[l, i]: one cluster over cuts l..i

  def layer(e, _):
    t = e[:, None] + cost
    arg = jnp.argmin(t, axis=0).astype(jnp.int32)
    return jnp.take_along_axis(t, arg[None], axis=0)[0], arg

  _, args = jax.lax.scan(layer, cost[0], None, length=k - 1)

  def back(i, arg):
    return arg[i], arg[i]

  _, starts = jax.lax.scan(back, jnp.int32(c - 1), args, reverse=True)
  bi = jnp.concatenate([jnp.zeros((1,), jnp.int32), starts, jnp.full((1,), c - 1, jnp.int32)])
  lo_i, hi_i = bi[:-1], bi[1:]
  cnt, mean, _ = _runs(d.shift, (pos[lo_i], s1[lo_i], s2[lo_i]), (pos[hi_i], s1[hi_i], s2[hi_i]))
  # An empty run takes the value at its position, so the centroids stay sorted.
  return jnp.where(d.n > 0, jnp.where(cnt > 0, mean, at_pos[lo_i]), 0.0)


def assign(x: Array, centroids: Array) -> Array:
  """Index of the nearest centroid for each entry (ties go to the lower index).

  Args:
    x: float32 ``(n,)``.
    centroids: float32 ``(k,)``, ascending.

  Returns:
    int32 ``(n,)`` in ``[0, k)``.
  """
  mid = 0.5 * (centroids[1:] + centroids[:-1])
  return jnp.searchsorted(mid, x, side="left", method="scan_unrolled").astype(jnp.int32)


def lloyd_sorted(d: Data, centroids: Array, max_iters: int) -> tuple[Array, Array]:
  """Lloyd iterations until the partition stops changing, at most ``max_iters``.

  Each iteration moves every centroid to the mean of its run and re-seeds the
  first empty cluster, if any, at the end farther from its centroid of the run
  with the largest squared error (among runs of at least two distinct values).

  Args:
    d: the sorted entries (``sort_valid`` or ``sort_columns``).
    centroids: float32 ``(k,)``, the start.
    max_iters: the iteration cap (a Python int, may be 0).

  Returns:
    ``(centroids, iterations)``: float32 ``(k,)`` ascending, int32 scalar.
  """

  def step(c):
    # Run j: the entries in (t[j], t[j + 1]]; x goes to the lower centroid when
    # x <= mid (as in ``assign``).
    inf = jnp.full((1,), jnp.inf, jnp.float32)
    t = jnp.concatenate([-inf, 0.5 * (c[1:] + c[:-1]), inf])
    b, t1, t2 = _below(d, t)
    cnt, mean, sse = _runs(d.shift, (b[:-1], t1[:-1], t2[:-1]), (b[1:], t1[1:], t2[1:]))
    new = jnp.where(cnt > 0, mean, c)
    empty = cnt == 0

    def reseed(new):
      first, last = _run_ends(d, t, b)
      splittable = (cnt > 1) & (last > first)
      big = jnp.argmax(jnp.where(splittable, sse, -1.0))
      far = jnp.where(new[big] - first[big] > last[big] - new[big], first[big], last[big])
      return jnp.where(jnp.any(splittable), new.at[jnp.argmax(empty)].set(far), new)

    # The ends of the runs are needed only to re-seed an empty cluster.
    new = jax.lax.cond(jnp.any(empty), reseed, lambda new: new, new)
    return jnp.sort(new)

  def cond(carry):
    _, it, changed = carry
    return changed & (it < max_iters)

  def body(carry):
    c, it, _ = carry
    new = step(c)
    return new, it + 1, jnp.any(new != c)

  c, it, _ = jax.lax.while_loop(cond, body, (jnp.sort(centroids), jnp.int32(0), jnp.bool_(True)))
  return c, it


def lloyd(x: Array, valid: Array, centroids: Array, iters: int) -> tuple[Array, Array]:
  """Lloyd from ``centroids`` over the valid entries, to convergence or ``iters`` iterations.

  Args:
    x: float32 ``(n,)``.
    valid: bool ``(n,)``.
    centroids: float32 ``(k,)``, the initialisation.
    iters: the iteration cap (a Python int, may be 0).

  Returns:
    ``(centroids, assignments)``: float32 ``(k,)`` ascending, and int32 ``(n,)``
    the nearest centroid of every entry (also of invalid ones).
  """
  c, _ = lloyd_sorted(sort_valid(x, valid), centroids, iters)
  return c, assign(x, c)


def kmeans(
    x: Array, valid: Array, k: int, *, init: str, iters: int, key: Array | None, cuts: int = MAX_CUTS
) -> tuple[Array, Array]:
  """Initialisation then Lloyd to convergence, for one group.

  Args:
    x: float32 ``(n,)``, sorted whole (``sort_valid``), or ``(R, C)``, sorted by
      columns (``sort_columns``: a sharded ``x`` is not gathered, except by
      ``"kmeans++"``, which draws from the flattened entries).
    valid: bool, the shape of ``x``.
    k: number of centroids.
    init: one of ``INITS``.
    iters: the Lloyd iteration cap.
    key: PRNG key, used by ``"kmeans++"`` only.
    cuts: equal-count cuts of ``"optimal"`` (``num_cuts``).

  Returns:
    As ``lloyd``, the assignments in the shape of ``x``.
  """
  d = sort_valid(x, valid) if x.ndim == 1 else sort_columns(x, valid)
  if init == "optimal":
    c0 = init_optimal(d, k, cuts)
  elif init == "linear":
    c0 = init_linear(x, valid, k)
  elif init == "density":
    c0 = init_density(d, k)
  else:
    c0 = init_kmeans_pp(x.reshape(-1), valid.reshape(-1), k, key)
  c, _ = lloyd_sorted(d, c0, iters)
  return c, assign(x, c)

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
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

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
  shift = jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(n, 1).astype(jnp.float32)
  d = jnp.where(jnp.arange(x.shape[0]) < n, xs - shift, 0.0)
  zero = jnp.zeros((1,), jnp.float32)
  return Sorted(xs, n, shift, jnp.concatenate([zero, jnp.cumsum(d)]), jnp.concatenate([zero, jnp.cumsum(d * d)]))


def _runs(s: Sorted, lo: Array, hi: Array) -> tuple[Array, Array, Array]:
  """Count, mean and squared error of the sorted runs ``[lo, hi)`` (broadcasting)."""
  cnt = hi - lo
  w = jnp.maximum(cnt, 1).astype(jnp.float32)
  t1 = s.s1[hi] - s.s1[lo]
  sse = jnp.maximum(s.s2[hi] - s.s2[lo] - t1 * t1 / w, 0.0)
  return cnt, s.shift + t1 / w, jnp.where(cnt > 0, sse, 0.0)


def _last(s: Sorted) -> Array:
  return s.xs[jnp.maximum(s.n - 1, 0)]


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


def init_density(x: Array, valid: Array, k: int) -> Array:
  """Centroids at evenly spaced levels of the empirical CDF of the valid entries.

  Centroid ``j`` is the inverse empirical CDF at ``(j + 1/2) / k``: the smallest
  valid value ``v`` with ``#{x <= v} >= (j + 1/2) n / k`` (numpy's
  ``quantile(..., method="inverted_cdf")``).

  Args:
    x, valid, k: as for ``init_linear``.

  Returns:
    float32 ``(k,)``, ascending; zeros when nothing is valid.
  """
  n = jnp.sum(valid, dtype=jnp.int32)
  ordered = jnp.sort(jnp.where(valid, x, jnp.inf))
  levels = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k
  idx = jnp.ceil(levels * n.astype(jnp.float32)).astype(jnp.int32) - 1
  idx = jnp.clip(idx, 0, jnp.maximum(n - 1, 0))
  return jnp.where(n > 0, ordered[idx], jnp.zeros((k,), jnp.float32))


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


def init_optimal(s: Sorted, k: int, cuts: int) -> Array:
  """The k-means optimum over partitions whose boundaries lie on candidate cuts.

  The candidates are ``round(j n / cuts)`` for ``j = 0..cuts`` (every position
  when ``n <= cuts``: then the result is the exact global optimum) and, when
  ``n`` may exceed ``cuts``, ``cuts // 4`` positions of equally spaced values
  over ``[min, max]``, which resolve sparse tails. Bellman's recursion
  ``E_j(i) = min_l E_{j-1}(l) + SSE(l, i)`` runs over a ``(cuts, cuts)`` table
  of run errors.

  Args:
    s: the sorted group (``sort_valid``).
    k: number of clusters.
    cuts: number of equal-count cuts (``num_cuts``).

  Returns:
    float32 ``(k,)``, ascending: the means of the optimal runs (an empty run,
    possible only with fewer distinct values than ``k``, repeats its neighbour).
  """
  size = s.xs.shape[0]
  nf = s.n.astype(jnp.float32)
  pos = jnp.floor(jnp.arange(cuts + 1, dtype=jnp.float32) * (nf / cuts) + 0.5).astype(jnp.int32)
  pos = [jnp.minimum(pos, s.n)]
  if size > cuts:
    m = max(cuts // 4, 2)
    lo, hi = s.xs[0], _last(s)
    edges = lo + (hi - lo) * (jnp.arange(1, m, dtype=jnp.float32) / m)
    pos.append(jnp.minimum(jnp.searchsorted(s.xs, edges, side="right"), s.n).astype(jnp.int32))
  pos = jnp.sort(jnp.concatenate(pos))
  c = pos.shape[0]
  cnt, _, sse = _runs(s, pos[:, None], pos[None, :])
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
  bounds = pos[jnp.concatenate([jnp.zeros((1,), jnp.int32), starts, jnp.full((1,), c - 1, jnp.int32)])]
  cnt, mean, _ = _runs(s, bounds[:-1], bounds[1:])
  # An empty run takes the value at its position, so the centroids stay sorted.
  at = s.xs[jnp.clip(bounds[:-1], 0, jnp.maximum(s.n - 1, 0))]
  return jnp.where(s.n > 0, jnp.where(cnt > 0, mean, at), 0.0)


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


def _bounds(s: Sorted, centroids: Array) -> Array:
  """``(k + 1,)`` run boundaries in the sorted data of the nearest-centroid partition."""
  mid = 0.5 * (centroids[1:] + centroids[:-1])
  # x goes to the lower centroid when x <= mid (as in ``assign``).
  b = jnp.searchsorted(s.xs, mid, side="right", method="scan_unrolled").astype(jnp.int32)
  b = jnp.minimum(b, s.n)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), b, s.n[None]])


def lloyd_sorted(s: Sorted, centroids: Array, max_iters: int) -> tuple[Array, Array]:
  """Lloyd iterations until the partition stops changing, at most ``max_iters``.

  Each iteration moves every centroid to the mean of its run and re-seeds the
  first empty cluster, if any, at the end farther from its centroid of the run
  with the largest squared error (among runs of at least two distinct values).

  Args:
    s: the sorted group.
    centroids: float32 ``(k,)``, the start.
    max_iters: the iteration cap (a Python int, may be 0).

  Returns:
    ``(centroids, iterations)``: float32 ``(k,)`` ascending, int32 scalar.
  """

  def step(c):
    b = _bounds(s, c)
    cnt, mean, sse = _runs(s, b[:-1], b[1:])
    new = jnp.where(cnt > 0, mean, c)
    first = s.xs[jnp.minimum(b[:-1], s.xs.shape[0] - 1)]
    last = s.xs[jnp.maximum(b[1:] - 1, 0)]
    splittable = (cnt > 1) & (last > first)
    big = jnp.argmax(jnp.where(splittable, sse, -1.0))
    far = jnp.where(new[big] - first[big] > last[big] - new[big], first[big], last[big])
    empty = cnt == 0
    reseed = jnp.any(empty) & jnp.any(splittable)
    new = jnp.where(reseed, new.at[jnp.argmax(empty)].set(far), new)
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
    x: float32 ``(n,)``; valid: bool ``(n,)``; k: number of centroids.
    init: one of ``INITS``.
    iters: the Lloyd iteration cap.
    key: PRNG key, used by ``"kmeans++"`` only.
    cuts: equal-count cuts of ``"optimal"`` (``num_cuts``).

  Returns:
    As ``lloyd``.
  """
  s = sort_valid(x, valid)
  if init == "optimal":
    c0 = init_optimal(s, k, cuts)
  elif init == "linear":
    c0 = init_linear(x, valid, k)
  elif init == "density":
    c0 = init_density(x, valid, k)
  else:
    c0 = init_kmeans_pp(x, valid, k, key)
  c, _ = lloyd_sorted(s, c0, iters)
  return c, assign(x, c)

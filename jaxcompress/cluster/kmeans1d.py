"""One-dimensional k-means in JAX: centroid initialisation and Lloyd iterations.

Every function works on one group of scalars (a flat ``x`` with a ``valid``
mask; invalid entries, such as pruned zeros, take no part) and is vmapped over
groups (output channels) by the cluster stage. All of it is traceable, runs
under ``jax.jit`` with a fixed number of iterations (``lax.fori_loop``) and
never syncs with the host.

In one dimension the nearest centroid is found without an ``(n, k)`` distance
matrix: with the centroids sorted, the index of a point is the number of
midpoints between consecutive centroids that lie below it
(``jnp.searchsorted``), O(n log k).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

#: Centroid initialisations (Han et al. 2016, "Deep Compression", section 3.2).
INITS = ("linear", "density", "kmeans++")


def _valid_range(x: Array, valid: Array) -> tuple[Array, Array]:
  any_valid = jnp.any(valid)
  lo = jnp.min(jnp.where(valid, x, jnp.inf))
  hi = jnp.max(jnp.where(valid, x, -jnp.inf))
  zero = jnp.zeros((), x.dtype)
  return jnp.where(any_valid, lo, zero), jnp.where(any_valid, hi, zero)


def init_linear(x: Array, valid: Array, k: int) -> Array:
  """``k`` centroids evenly spaced over ``[min, max]`` of the valid entries.

  Args:
    x: float32 values, shape ``(n,)``.
    valid: bool, shape ``(n,)``; entries that take part.
    k: number of centroids (at least 2).

  Returns:
    float32 ``(k,)``: ``min + (max - min) * j / (k - 1)``; zeros when nothing is valid.
  """
  lo, hi = _valid_range(x, valid)
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


def lloyd(x: Array, valid: Array, centroids: Array, iters: int) -> tuple[Array, Array]:
  """``iters`` Lloyd iterations from ``centroids`` over the valid entries.

  Each iteration assigns every valid entry to its nearest centroid and moves
  each centroid to the mean of its entries; a centroid with no entries stays
  where it is. Centroids are kept sorted (k-means in 1-D is invariant to their
  order), so the result is ascending.

  Args:
    x: float32 ``(n,)``.
    valid: bool ``(n,)``.
    centroids: float32 ``(k,)``, the initialisation.
    iters: number of iterations (a Python int, may be 0).

  Returns:
    ``(centroids, assignments)``: float32 ``(k,)`` ascending, and int32 ``(n,)``
    the nearest centroid of every entry (also of invalid ones).
  """
  k = centroids.shape[0]
  xv = jnp.where(valid, x, 0.0)
  w = valid.astype(jnp.float32)

  def body(_, c):
    c = jnp.sort(c)
    a = assign(x, c)
    sums = jax.ops.segment_sum(xv, a, num_segments=k)
    counts = jax.ops.segment_sum(w, a, num_segments=k)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c)

  centroids = jnp.sort(jax.lax.fori_loop(0, iters, body, centroids))
  return centroids, assign(x, centroids)


def kmeans(
    x: Array, valid: Array, k: int, *, init: str, iters: int, key: Array | None
) -> tuple[Array, Array]:
  """Initialisation then Lloyd iterations, for one group.

  Args:
    x: float32 ``(n,)``; valid: bool ``(n,)``; k: number of centroids.
    init: one of ``INITS``.
    iters: Lloyd iterations.
    key: PRNG key, used by ``"kmeans++"`` only.

  Returns:
    As ``lloyd``.
  """
  if init == "linear":
    c0 = init_linear(x, valid, k)
  elif init == "density":
    c0 = init_density(x, valid, k)
  else:
    c0 = init_kmeans_pp(x, valid, k, key)
  return lloyd(x, valid, c0, iters)

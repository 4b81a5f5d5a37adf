"""Exact top-k selection without a sort, across one or many arrays.

Mask updates must not sort every weight on every step (a full argsort dominates
a training step). ``topk_masks`` finds the k-th largest score by radix select on
the order-preserving integer image of float32 (three histogram passes over 11,
11 and 10 bits). The last histogram also counts the entries equal to the k-th
largest: when all of them are kept (no tie to break, the usual case) the masks
are one compare; otherwise ties are broken by position (a cumulative sum) so
that exactly k entries are kept.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def _sortable_bits(x: jax.Array) -> jax.Array:
  """uint32 whose unsigned order equals the float order of ``x`` (float32).

  NaN is mapped below every number (NaN scores are dropped first).
  """
  x = x.astype(jnp.float32)
  nan = jnp.isnan(x)
  # -0.0 -> +0.0 so that both zeros tie (a compare: XLA folds `x + 0.0` into `x`).
  x = jnp.where(nan | (x == 0.0), 0.0, x)
  b = jax.lax.bitcast_convert_type(x, jnp.uint32)
  neg = (b >> 31) == 1
  b = jnp.where(neg, ~b, b | jnp.uint32(0x80000000))
  # -inf maps to 0x007FFFFF, so 0 is free for NaN, below every number.
  return jnp.where(nan, jnp.uint32(0), b)


def _kth_largest_bits(
    bits: Sequence[jax.Array], k: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Largest t with ``count(bits >= t) >= k`` over all arrays (``k >= 1``).

  Radix select: three passes, each a histogram of the next 11/11/10 bits of the
  entries that share the prefix found so far.

  Returns:
    ``(t, need, n_eq)``: the threshold, how many of the entries equal to ``t``
    are kept (``1 <= need <= n_eq``), and how many entries equal ``t``.
  """
  prefix = jnp.uint32(0)
  need = k
  for shift, width in ((21, 11), (10, 11), (0, 10)):
    nbins = 1 << width
    hist = jnp.zeros((nbins,), jnp.int32)
    top = shift + width
    for b in bits:
      digit = ((b >> shift) & (nbins - 1)).astype(jnp.int32).reshape(-1)
      if top < 32:  # entries off the prefix get an out-of-range bin: dropped
        same = ((b >> top) == (prefix >> top)).reshape(-1)
        digit = jnp.where(same, digit, nbins)
      hist = hist.at[digit].add(1, mode="drop")
    from_top = jnp.cumsum(hist[::-1])  # from_top[i]: entries with digit >= nbins-1-i
    i = jnp.argmax(from_top >= need)
    d = nbins - 1 - i
    need = need - (from_top[i] - hist[d])
    prefix = prefix | (d.astype(jnp.uint32) << shift)
  return prefix, need, hist[d]


def topk_masks(scores: Sequence[jax.Array], k: jax.Array | int) -> list[jax.Array]:
  """Boolean masks keeping exactly the ``k`` largest scores over all arrays.

  Ties at the threshold go to earlier arrays, then to lower flat indices. NaN
  scores rank below every number, ``-inf`` included. ``k`` may be traced; it is
  clipped to ``[0, total size]``.

  Args:
    scores: float arrays of any shapes.
    k: how many entries to keep in total.

  Returns:
    One bool mask per score array, same shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> [m.tolist() for m in topk_masks([jnp.array([3., 1.]), jnp.array([2., 5.])], 2)]
    [[True, False], [False, True]]
  """
  bits = [_sortable_bits(s) for s in scores]
  total = sum(int(s.size) for s in scores)
  k = jnp.clip(jnp.asarray(k, jnp.int32), 0, total)
  t, need, n_eq = _kth_largest_bits(bits, jnp.maximum(k, 1))

  def keep_all_ties(_):
    return [b >= t for b in bits]

  def keep_first_ties(_):  # ties go to earlier arrays, then to lower flat indices
    masks, taken = [], jnp.int32(0)
    for b in bits:
      eq = (b == t).reshape(-1)
      rank = jnp.cumsum(eq, dtype=jnp.int32) - 1 + taken
      masks.append((b > t) | (eq & (rank < need)).reshape(b.shape))
      taken = taken + jnp.sum(eq, dtype=jnp.int32)
    return masks

  masks = jax.lax.cond(need == n_eq, keep_all_ties, keep_first_ties, None)
  return [m & (k > 0) for m in masks]

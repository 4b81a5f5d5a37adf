"""Exact top-k selection without a sort, across one or many arrays.

Mask updates must not sort every weight on every step (a full argsort dominates
a training step). ``topk_masks`` finds the k-th largest score by radix select on
the order-preserving integer image of float32: a histogram (scatter-add) of the
top 16 bits, then one of the low 16 bits of the entries in the bin found. The
last histogram also counts the entries equal to the k-th largest: when all of
them are kept (no tie to break, the usual case) the masks are one compare;
otherwise ties are broken by position (a cumulative sum) so that exactly k
entries are kept.

A mask recomputed every step usually comes out as it was: with magnitude
pruning at a constant sparsity the pruned weights are zeros and every kept
weight is larger. Given the previous masks, ``topk_masks`` first checks in one
pass whether they are still the answer (they keep ``k`` entries and every kept
score is strictly above every pruned one, so the top-k set is unique) and
returns them if so. The same pass bounds the new k-th largest between the
guess's lowest kept and highest pruned score; the first histogram then spans
only that band, and when it holds at most 2**16 distinct values no second
histogram is needed. The result is the same either way.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


_TOP = np.uint32(0xFFFFFFFF)  # above every sortable image (+inf maps to 0xFF800000)
_BOTTOM = np.uint32(0)  # the image of NaN, below every number


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


_BINS = 1 << 16  # digits per histogram pass
_ROW = 256  # the histogram is searched as rows of this many bins
_DROP = _BINS + _ROW  # an out-of-range bin: entries sent there are not counted


def _histogram(bits, lo, hi, shift, count_above: bool) -> jax.Array:
  """Counts of ``(b - lo) >> shift`` over the entries ``lo <= b <= hi``.

  ``_BINS + _ROW`` bins; with ``count_above`` the entries above ``hi`` are
  counted in bin ``_BINS`` (above every digit), else they are dropped.
  """
  hist = jnp.zeros((_BINS + _ROW,), jnp.int32)
  for b in bits:
    b = b.reshape(-1)
    digit = ((b - lo) >> shift).astype(jnp.int32)
    digit = jnp.where(b > hi, _BINS if count_above else _DROP, digit)
    digit = jnp.where(b < lo, _DROP, digit)
    hist = hist.at[digit].add(1, mode="drop")
  return hist


def _highest_bin_reaching(hist: jax.Array, need: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The highest bin ``d`` with ``sum(hist[d:]) >= need``, and ``sum(hist[d + 1:])``.

  Two levels (row totals, then one row) instead of a cumulative sum over all
  bins, which XLA:CPU computes slowly.
  """
  rows = hist.reshape(-1, _ROW)[::-1, ::-1]  # bins in descending order
  row_total = jnp.sum(rows, axis=1)
  row_cum = jnp.cumsum(row_total)
  r = jnp.argmax(row_cum >= need)
  within = jnp.cumsum(rows[r]) + (row_cum[r] - row_total[r])
  j = jnp.argmax(within >= need)
  return hist.size - 1 - (r * _ROW + j), within[j] - rows[r, j]


def _kth_largest_bits(
    bits: Sequence[jax.Array], k: jax.Array, lo: jax.Array = _BOTTOM, hi: jax.Array = _TOP
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Largest t with ``count(bits >= t) >= k`` over all arrays, known to lie in ``[lo, hi]``.

  Radix select over the band ``[lo, hi]`` (the whole range by default): a
  histogram of 2**16 digits of width ``2**shift`` covering the band, then, when
  the band is wider than 2**16 values, a second histogram over the values of
  the bin found. ``1 <= k <= total`` entries.

  Returns:
    ``(t, need, n_eq)``: the threshold, how many of the entries equal to ``t``
    are kept (``1 <= need <= n_eq``), and how many entries equal ``t``.
  """
  width = 32 - jax.lax.clz(hi - lo).astype(jnp.int32)  # bits of the band's span
  shift = jnp.maximum(width - 16, 0).astype(jnp.uint32)
  hist = _histogram(bits, lo, hi, shift, count_above=True)
  d, above = _highest_bin_reaching(hist, k)
  need = k - above
  base = lo + (d.astype(jnp.uint32) << shift)

  top = base + jnp.minimum((jnp.uint32(1) << shift) - 1, hi - base)

  def done():  # one value per bin already
    return base, need, hist[d]

  def refine_by_histogram():  # up to 2**16 values: a histogram of one value per digit
    fine = _histogram(bits, base, top, jnp.uint32(0), count_above=False)
    d2, above2 = _highest_bin_reaching(fine, need)
    return base + d2.astype(jnp.uint32), need - above2, fine[d2]

  return jax.lax.cond(shift == 0, done, refine_by_histogram)


def topk_masks(
    scores: Sequence[jax.Array],
    k: jax.Array | int,
    *,
    previous: Sequence[jax.Array] | None = None,
) -> list[jax.Array]:
  """Boolean masks keeping exactly the ``k`` largest scores over all arrays.

  Ties at the threshold go to earlier arrays, then to lower flat indices. NaN
  scores rank below every number, ``-inf`` included. ``k`` may be traced; it is
  clipped to ``[0, total size]``.

  Args:
    scores: float arrays of any shapes.
    k: how many entries to keep in total.
    previous: optional bool masks of the same shapes, a guess at the answer
      (the masks of the last update). When they keep exactly ``k`` entries and
      every kept score is strictly above every other, they are returned
      without a select; otherwise they are ignored. The result never depends
      on them.

  Returns:
    One bool mask per score array, same shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.core.select import topk_masks
    >>> [m.tolist() for m in topk_masks([jnp.array([3., 1.]), jnp.array([2., 5.])], 2)]
    [[True, False], [False, True]]
  """
  bits = [_sortable_bits(s) for s in scores]
  total = sum(int(s.size) for s in scores)
  k = jnp.clip(jnp.asarray(k, jnp.int32), 0, total)
  if previous is None:
    return _select(bits, k)
  if len(previous) != len(scores) or any(
      tuple(p.shape) != tuple(s.shape) for p, s in zip(previous, scores)
  ):
    raise ValueError(
        "topk_masks: previous must hold one mask per score array, of the same shapes; got "
        f"{[tuple(p.shape) for p in previous]} for {[tuple(s.shape) for s in scores]}."
    )
  previous = [jnp.asarray(p, jnp.bool_) for p in previous]
  still, lo, hi = _check_guess(previous, bits, k)
  return jax.lax.cond(still, lambda: previous, lambda: _select(bits, k, lo, hi))


def _kept_bounds(
    mask: jax.Array, bits: jax.Array, axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Over ``axes``: how many entries ``mask`` keeps, its lowest kept and highest dropped bits.

  One pass, as a single variadic reduce (XLA:CPU runs it several times faster
  than three separate reductions). With none kept the lowest is ``_TOP``;
  with none dropped the highest is ``_BOTTOM``.
  """
  return jax.lax.reduce(
      (mask.astype(jnp.int32), jnp.where(mask, bits, _TOP), jnp.where(mask, _BOTTOM, bits)),
      (jnp.int32(0), _TOP, _BOTTOM),
      lambda x, y: (x[0] + y[0], jnp.minimum(x[1], y[1]), jnp.maximum(x[2], y[2])),
      axes,
  )


def _check_guess(
    previous: list[jax.Array], bits: list[jax.Array], k: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Whether ``previous`` are exactly the top-k masks of ``bits``, and a band for the select.

  They are when they keep ``k`` entries and every kept entry is strictly above
  every dropped one (the top-k set is then unique, whatever the tie rule).
  When they keep ``k`` entries but are not, the k-th largest lies between
  their lowest kept and their highest dropped score (``k`` entries are at least
  the former, fewer than ``k`` exceed the latter), a band that is usually
  narrow enough for one histogram pass.

  Returns:
    ``(still_exact, lo, hi)``, with ``[lo, hi]`` the whole range when the
    count differs.
  """
  n_kept, lowest_kept, highest_dropped = jnp.int32(0), _TOP, _BOTTOM
  for p, b in zip(previous, bits):
    n, lo, hi = _kept_bounds(p, b, tuple(range(b.ndim)))
    n_kept, lowest_kept = n_kept + n, jnp.minimum(lowest_kept, lo)
    highest_dropped = jnp.maximum(highest_dropped, hi)
  total = sum(int(b.size) for b in bits)
  same_count = n_kept == k
  # With nothing dropped (k == total) the guess is right whatever the scores.
  still = same_count & ((lowest_kept > highest_dropped) | (n_kept == total))
  lo = jnp.where(same_count, lowest_kept, _BOTTOM)
  hi = jnp.where(same_count, jnp.maximum(highest_dropped, lowest_kept), _TOP)
  return still, lo, hi


def _select(
    bits: list[jax.Array], k: jax.Array, lo: jax.Array = _BOTTOM, hi: jax.Array = _TOP
) -> list[jax.Array]:
  """The exact top-k masks of sortable bits, ``0 <= k <= total`` (traced).

  The k-th largest must lie in ``[lo, hi]``.
  """
  t, need, n_eq = _kth_largest_bits(bits, jnp.maximum(k, 1), lo, hi)

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

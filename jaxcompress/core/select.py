"""Exact top-k selection without a sort: over one or many arrays, or per row.

Mask updates must not sort every weight on every step (a full argsort dominates
a training step). Two selections share one algorithm:

- ``topk_masks(scores, k)`` keeps the ``k`` largest entries over a list of
  arrays (one leaf, or every leaf of a global budget);
- ``topk_rows(scores, k)`` keeps the ``k`` largest entries of every row of a
  2-D array (Wanda's per-output comparison).

Both rank the same way: NaN below every number (``-inf`` included), ``-0.0``
tied with ``+0.0``, ties at the threshold to the earlier array, then the lower
flat index (the lower column, per row).

The algorithm is a radix select (radix 4) on the order-preserving uint32 image
of float32, by counting rather than by histograms: each of 16 passes decides
two bits of every row's threshold from three counts per row (the entries at
least each candidate digit), taken in one variadic ``lax.reduce`` per array.
The counts of the digit chosen and of the next one up carry over from pass to
pass, so at the end each row also knows how many entries equal its threshold:
when every row keeps all its ties (the usual case) the mask is one compare;
otherwise each row keeps its first ``need`` ties, found by the same counting
select over the (reversed) index of the ties.

Counting replaced scatter-add histograms (radix 2**16, two passes), which this
module used for whole arrays, after side-by-side runs on XLA:CPU (2 cores, 10%
kept, three runs): counting took 0.85-1.0x the histogram's time on a 784x300
leaf, 0.5-0.6x on 1024x4096 and 0.7-1.1x on 4096x4096 (0.4-0.9x given the
last masks as a guess); per row, a vmapped histogram took 87-161x counting's
time. ``benchmarks/pruning.py`` reports ``per_output_select_speedup`` (a
per-row ``jax.lax.top_k`` mask over ``topk_rows``).

A mask recomputed every step usually comes out as it was: with magnitude
pruning at a constant sparsity the pruned weights are zeros and every kept
weight is larger. Given the previous masks, both functions first check in one
pass whether they are still the answer (``k`` kept, the lowest kept score
strictly above the highest dropped one, so the top-k set is unique) and return
them if so. For ``topk_masks`` the same pass bounds the new k-th largest
between the guess's lowest kept and highest dropped score; the passes over the
bits that band's ends share are skipped. The result is the same either way.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core import sharding as _sharding


_TOP = np.uint32(0xFFFFFFFF)  # above every sortable image (+inf maps to 0xFF800000)
_BOTTOM = np.uint32(0)  # the image of NaN, below every number
_DIGIT_BITS = 2  # bits decided per counting pass: 2**2 - 1 = 3 counts per entry

#: An array, or a function that computes it where it is used, called with a
#: uint32 zero: inside the counting loop, an elementwise function of arrays
#: already in memory (iotas, compares) then fuses into each pass instead of
#: being materialized as a loop operand of the whole leaf's size. The zero
#: changes nothing but must enter the computation at its leaves (each iota,
#: each compare): inside the loop it is opaque and varies with the pass, so
#: XLA cannot hoist the computation out of the loop and materialize it there.
Lazy = Union[jax.Array, Callable[[jax.Array], jax.Array]]


class LazyScores:
  """Scores that ``topk_masks`` computes where it uses them, from arrays already in memory.

  Materialized, the scores' uint32 image is a copy of the leaf held through
  the select. ``fn(zero)`` must compute the scores from arrays the caller
  holds anyway (the weight), adding the uint32 ``zero`` to them (as float,
  ``w + zero.astype(w.dtype)``): it is 0, and makes each counting pass
  recompute the scores instead of XLA hoisting them out of the loop. Meant
  for cheap elementwise scores (magnitude); anything costlier is recomputed
  once per pass.

  Args:
    fn: ``fn(zero) -> scores``.
    shape: the scores' shape.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.core.select import LazyScores, topk_masks
    >>> w = jnp.array([3.0, -5.0, 1.0])
    >>> lazy = LazyScores(lambda zero: jnp.abs(w + zero.astype(w.dtype)), w.shape)
    >>> topk_masks([lazy], 2)[0].tolist()
    [True, True, False]
  """

  def __init__(self, fn: Callable[[jax.Array], jax.Array], shape: Sequence[int]):
    self.fn = fn
    self.shape = tuple(int(d) for d in shape)
    self.size = int(np.prod(self.shape))

  def __call__(self, zero: jax.Array) -> jax.Array:
    return self.fn(zero)


def sortable_bits(x: jax.Array) -> jax.Array:
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


def float_of_sortable_bits(bits: jax.Array) -> jax.Array:
  """The float32 whose ``sortable_bits`` are ``bits`` (any uint32: a bisection's midpoints too).

  The inverse of ``sortable_bits`` for every number but ``-0.0`` (its image is
  ``+0.0``'s); ``0`` and the images above ``+inf`` decode to NaN.
  """
  b = jnp.where((bits >> 31) == 1, bits & jnp.uint32(0x7FFFFFFF), ~bits)
  return jax.lax.bitcast_convert_type(b, jnp.float32)


def _value(x: Lazy, zero: jax.Array) -> jax.Array:
  return x(zero) if callable(x) else x


def _count_at_least(
    keys: Sequence[Lazy],
    cands: Sequence[jax.Array],
    valid: Sequence[Lazy] | None,
    zero: jax.Array = np.uint32(0),
) -> list[jax.Array]:
  """Per row, how many valid keys are ``>=`` each candidate ``(rows, 1)``, over all arrays.

  One variadic reduce over every axis but the first of each array (XLA:CPU
  runs it several times faster than separate reductions or a scatter-add
  histogram). The arrays keep their own shapes (``(rows, *shape)``): a sharded
  leaf is counted where it lies, with no gather.
  """
  totals = None
  for i, ks in enumerate(keys):
    ks = _value(ks, zero)
    ok = None if valid is None else _value(valid[i], zero)
    cs = [c.reshape(c.shape[:1] + (1,) * (ks.ndim - 1)) for c in cands]
    ops = tuple(((ks >= c) if ok is None else ((ks >= c) & ok)).astype(jnp.int32) for c in cs)
    counts = jax.lax.reduce(
        ops, (jnp.int32(0),) * len(ops), lambda x, y: tuple(u + v for u, v in zip(x, y)),
        tuple(range(1, ks.ndim)),
    )
    totals = list(counts) if totals is None else [t + c for t, c in zip(totals, counts)]
  return totals


def _kth_largest(
    keys: Sequence[Lazy],
    k: jax.Array,
    n_bits: int,
    valid: Sequence[Lazy] | None = None,
    band: tuple[jax.Array, jax.Array] | None = None,
    *,
    shapes: Sequence[tuple[int, ...]] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per row, the largest ``t`` with ``count(keys >= t) >= k``, by counting passes.

  ``keys`` are uint32 arrays ``(rows, n_i)`` (arrays, or ``Lazy`` functions
  of the given ``shapes``) below ``2**n_bits``, counted
  together per row; only the entries where ``valid`` is True count (all of
  them when None). ``k`` is int32 ``(rows,)`` with ``1 <= k <=`` the valid
  count of the row. Each pass decides ``_DIGIT_BITS`` bits of every row's
  ``t`` (most significant first). The passes run in a ``fori_loop``: as fast
  as unrolled, and several times quicker to compile.

  ``band=(lo, hi)`` (scalars; one row, ``n_bits == 32``): ``t`` is known to
  lie in ``[lo, hi]``, so the passes over the leading bits that ``lo`` and
  ``hi`` share are skipped (one count of the band's ends replaces them).

  Returns:
    ``(t, at_least, above)``: the thresholds (uint32 ``(rows,)``), and per row
    how many valid entries are ``>= t`` and ``> t``.
  """
  if shapes is None:
    shapes = [ks.shape for ks in keys]
  rows = shapes[0][0]

  def count_pass(shift, width, state):
    # Within [t, t + 2**(shift + width)), which digit of `width` bits at `shift`
    # holds the k-th largest; at_least and above count the entries at least the
    # range's start and its end.
    t, at_least, above = state
    cands = [(t | (jnp.uint32(j) << shift))[:, None] for j in range(1, 1 << width)]
    # A zero that XLA cannot fold, and that varies with the pass (see Lazy).
    zero = jax.lax.optimization_barrier((shift, jnp.uint32(0)))[1]
    counts = _count_at_least(keys, cands, valid, zero)
    # counts[j - 1]: entries >= t + j * 2**shift, non-increasing in j.
    digit = sum((c >= k).astype(jnp.uint32) for c in counts)
    ladder = [at_least, *counts, above]
    new_at_least, new_above = ladder[0], ladder[1]
    for j in range(1, len(ladder) - 1):
      new_at_least = jnp.where(digit == j, ladder[j], new_at_least)
      new_above = jnp.where(digit == j, ladder[j + 1], new_above)
    return t | (digit << shift), new_at_least, new_above

  full = n_bits // _DIGIT_BITS
  if band is None:
    if valid is None:
      at_least = jnp.full((rows,), sum(int(np.prod(sh[1:])) for sh in shapes), jnp.int32)
    else:
      at_least = sum(
          jnp.sum(_value(v, np.uint32(0)), axis=tuple(range(1, len(sh))), dtype=jnp.int32)
          for v, sh in zip(valid, shapes)
      )
    # Start: the range [0, 2**n_bits) holds every key, none is at least its end.
    state = (jnp.zeros((rows,), jnp.uint32), at_least, jnp.zeros((rows,), jnp.int32))
    if n_bits % _DIGIT_BITS:  # a first, narrower pass
      state = count_pass(jnp.uint32(n_bits - n_bits % _DIGIT_BITS), n_bits % _DIGIT_BITS, state)
    first = 0
  else:
    if n_bits != 32 or rows != 1:
      raise ValueError("_kth_largest: a band needs one row of 32-bit keys.")
    lo, hi = (jnp.asarray(b, jnp.uint32) for b in band)
    # Passes whose digits lo and hi share are decided already: start below them.
    first = jax.lax.clz(lo ^ hi).astype(jnp.int32) // _DIGIT_BITS  # 16 when lo == hi
    width = (32 - first * _DIGIT_BITS).astype(jnp.uint32)  # bits left to decide
    start = jnp.where(width == 32, jnp.uint32(0), (lo >> width) << width)
    # The band's end, 0 when it wraps past 2**32 - 1 (nothing is at least it then).
    end = jnp.where(width == 32, jnp.uint32(0), start + (jnp.uint32(1) << width))
    c_start, c_end = _count_at_least(keys, [start[None, None], end[None, None]], valid)
    state = (start[None], c_start, jnp.where(end == 0, 0, c_end))
  return jax.lax.fori_loop(
      first,
      full,
      lambda i, st: count_pass((full - 1 - i).astype(jnp.uint32) * _DIGIT_BITS, _DIGIT_BITS, st),
      state,
  )


def _flipped_index(like: jax.Array, top: int, zero: jax.Array) -> jax.Array:
  """``top`` minus each entry's row-major flat index within its row (uint32), laid out as ``like``.

  ``zero`` enters every iota (see ``Lazy``).
  """
  shape = like.shape
  sharding = _sharding.explicit_sharding(like)
  index = jnp.zeros(shape, jnp.uint32, out_sharding=sharding) + zero
  for ax in range(1, len(shape)):
    stride = int(np.prod(shape[ax + 1 :]))
    iota = jax.lax.broadcasted_iota(jnp.uint32, shape, ax, out_sharding=sharding) + zero
    index = index + iota * jnp.uint32(stride)
  return jnp.uint32(top) - index


def _select(
    bits: Sequence[Lazy],
    k: jax.Array,
    band: tuple[jax.Array, jax.Array] | None = None,
    shapes: Sequence[tuple[int, ...]] | None = None,
) -> list[jax.Array]:
  """The exact per-row top-k masks of sortable bits ``(rows, n_i)``, ``0 <= k <= sum(n_i)``.

  Rows count across the arrays; ties go to earlier arrays, then lower columns.
  ``bits`` may be ``Lazy`` (then ``shapes`` gives their shapes).
  """
  if shapes is None:
    shapes = [b.shape for b in bits]
  rows = shapes[0][0]
  z = np.uint32(0)
  need = jnp.broadcast_to(jnp.maximum(k, 1), (rows,)).astype(jnp.int32)
  t, at_least, above = _kth_largest(bits, need, 32, band=band, shapes=shapes)
  per_row = lambda x, shape: x.reshape((rows,) + (1,) * (len(shape) - 1))
  need = need - above  # of the at_least - above entries equal to t, the row keeps need

  def keep_all_ties(_):
    return [_value(b, z) >= per_row(t, sh) for b, sh in zip(bits, shapes)]

  def keep_first_ties(_):
    # The need-th largest reversed index among the ties: the need-th tie from the left.
    # Computed where used (Lazy): materialized, the indices alone would be a
    # uint32 copy of every leaf.
    total = sum(int(np.prod(sh[1:])) for sh in shapes)
    eqs, flipped, offset = [], [], 0
    for b, sh in zip(bits, shapes):
      # (_value(b, z) only lends its shape and sharding: XLA drops the computation.)
      flipped.append(functools.partial(_flipped_index, _value(b, z), total - 1 - offset))
      eqs.append(lambda zero, b=b, sh=sh: _value(b, zero) == per_row(t, sh) + zero)
      offset += int(np.prod(sh[1:]))
    c, _, _ = _kth_largest(flipped, need, max(total - 1, 1).bit_length(), eqs, shapes=shapes)
    return [
        (_value(b, z) > per_row(t, sh)) | (eq(z) & (f(z) >= per_row(c, sh)))
        for b, sh, eq, f in zip(bits, shapes, eqs, flipped)
    ]

  masks = jax.lax.cond(jnp.all(need == at_least - above), keep_all_ties, keep_first_ties, None)
  return [m & (k > 0) for m in masks]


def _kept_bounds(
    mask: jax.Array, bits: jax.Array, axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Over ``axes``: how many entries ``mask`` keeps, its lowest kept and highest dropped bits.

  One pass, as a single variadic reduce. With none kept the lowest is
  ``_TOP``; with none dropped the highest is ``_BOTTOM``.
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
  the former, fewer than ``k`` exceed the latter).

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
  lo = jnp.where(same_count, jnp.minimum(highest_dropped, lowest_kept), _BOTTOM)
  hi = jnp.where(same_count, jnp.maximum(highest_dropped, lowest_kept), _TOP)
  return still, lo, hi


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
    scores: float arrays of any shapes, or ``LazyScores`` (computed in each
      counting pass instead of held as a uint32 image).
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
  shapes = [s.shape if isinstance(s, LazyScores) else tuple(jnp.shape(s)) for s in scores]
  if previous is not None and (
      len(previous) != len(scores) or any(tuple(jnp.shape(p)) != sh for p, sh in zip(previous, shapes))
  ):
    raise ValueError(
        "topk_masks: previous must hold one mask per score array, of the same shapes; got "
        f"{[tuple(jnp.shape(p)) for p in previous]} for {shapes}."
    )
  total = sum(int(np.prod(sh)) for sh in shapes)
  if total == 0:
    return [jnp.zeros(sh, jnp.bool_) for sh in shapes]
  bits: list[Lazy] = [
      (lambda zero, s=s: sortable_bits(s(zero))) if isinstance(s, LazyScores) else sortable_bits(jnp.asarray(s))
      for s in scores
  ]
  k = jnp.clip(jnp.asarray(k, jnp.int32), 0, total)
  # Empty arrays take no part in the select.
  live = [i for i, sh in enumerate(shapes) if int(np.prod(sh))]
  flat = [(lambda zero, b=bits[i]: _value(b, zero)[None]) for i in live]

  def select(band=None):
    masks = [jnp.zeros(sh, jnp.bool_) for sh in shapes]
    for i, m in zip(live, _select(flat, k, band, [(1,) + shapes[i] for i in live])):
      masks[i] = m[0]
    return masks

  if previous is None:
    return select()
  previous = [jnp.asarray(p, jnp.bool_) for p in previous]
  z = np.uint32(0)
  still, lo, hi = _check_guess([previous[i] for i in live], [_value(bits[i], z) for i in live], k)
  return jax.lax.cond(still, lambda: previous, lambda: select((lo, hi)))


def _rows_still_exact(previous: jax.Array, bits: jax.Array, k: jax.Array) -> jax.Array:
  """Whether ``previous`` is the per-row top-k mask of ``bits`` in every row.

  A row's mask is when it keeps ``k`` entries and its lowest kept entry is
  strictly above its highest dropped one (the top-k set is then unique,
  whatever the tie rule), or when it keeps every entry.
  """
  n_kept, lowest_kept, highest_dropped = _kept_bounds(previous, bits, (1,))
  n = bits.shape[1]
  still = (n_kept == k) & ((lowest_kept > highest_dropped) | (n_kept == n))
  return jnp.all(still)


def topk_rows(
    scores: jax.Array, k: jax.Array | int, *, previous: jax.Array | None = None
) -> jax.Array:
  """Bool mask keeping exactly the ``k`` largest entries of every row.

  NaN scores rank below every number (``-inf`` included), ``-0.0`` ties with
  ``+0.0``, and ties at a row's threshold go to the lower column index, as in
  ``topk_masks``. No sort: the same counting radix select, batched over rows.

  Args:
    scores: a float array of shape ``(rows, n)`` (ranked as float32).
    k: how many entries each row keeps, the same for every row; an int or a
      traced int32 scalar, clipped to ``[0, n]``.
    previous: optional bool mask of the same shape, a guess at the answer (the
      mask of the last update). When in every row it keeps ``k`` entries and
      its lowest kept score is strictly above its highest dropped one, it is
      returned without a select; otherwise it is ignored. The result never
      depends on it.

  Returns:
    A bool mask of the shape of ``scores``.

  Raises:
    ValueError: if ``scores`` is not 2-D, ``k`` is not a scalar, or ``previous``
      has another shape.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.core.select import topk_rows
    >>> topk_rows(jnp.array([[3.0, 1.0, 2.0], [0.0, 5.0, 5.0]]), 2).tolist()
    [[True, False, True], [False, True, True]]
    >>> topk_rows(jnp.array([[1.0, jnp.nan, 1.0, 0.5]]), 1).tolist()
    [[True, False, False, False]]
  """
  scores = jnp.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(
        f"topk_rows: scores must be 2-D (rows, n), got shape {tuple(scores.shape)}; "
        "reshape to (rows, n) first, e.g. x.reshape(-1, x.shape[-1])."
    )
  rows, n = scores.shape
  k = jnp.asarray(k)
  if k.ndim != 0:
    raise ValueError(
        f"topk_rows: k must be a scalar (every row keeps the same count), got shape "
        f"{tuple(k.shape)}; for a count per row, call topk_rows on each row group."
    )
  if previous is not None:
    previous = jnp.asarray(previous)
    if tuple(previous.shape) != tuple(scores.shape):
      raise ValueError(
          f"topk_rows: previous must be a mask of the shape of scores, {tuple(scores.shape)}; "
          f"got {tuple(previous.shape)}."
      )
  if rows == 0 or n == 0:
    return jnp.zeros(scores.shape, jnp.bool_)
  return _topk_rows(scores, k.astype(jnp.int32), previous)


# Compiled as one function, so that an eager call compiles once per shape
# instead of op by op; under an outer jit it is inlined.
@jax.jit
def _topk_rows(scores: jax.Array, k: jax.Array, previous: jax.Array | None) -> jax.Array:
  k = jnp.clip(k, 0, scores.shape[1])
  bits = sortable_bits(scores)
  if previous is None:
    return _select([bits], k)[0]
  previous = previous.astype(jnp.bool_)
  still = _rows_still_exact(previous, bits, k)
  return jax.lax.cond(still, lambda: previous, lambda: _select([bits], k)[0])

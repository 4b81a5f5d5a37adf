"""Distillation losses over logits, in the style of ``optax.losses``.

Every loss returns one value per position (the logits' shape without the class
axis): reduce it yourself (``.mean()``). Hyperparameters are keyword-only.
``where`` is a boolean mask over positions (the shape of the output): masked
positions give exactly zero loss and zero gradient (give finite logits there).

Temperatures and weights are scalars: plain numbers or traced arrays, so a
schedule of ``jaxcompress.core.schedules`` is used by evaluating it at the
step, ``temperature=schedule(step)``. A concrete temperature must be positive
and finite (checked); a traced one cannot be checked without a host sync.

Classes masked with ``-inf`` (in both the student's and the teacher's logits)
have probability 0 on both sides: they add 0 to every divergence and get a
zero (not NaN) gradient. Concrete labels and top-k indices are checked (a
``ValueError`` naming the argument and the value); traced ones cannot be
checked without a host sync, so a position with an invalid one gets a NaN
loss instead of a silently wrong one.

Arithmetic is done in float32 (or the logits' wider float type); the losses
return that type. Gradients flow into both arguments; the distillation step
(``jaxcompress.distill.make_distill_step``) stops them on the teacher side.

The divergences are scaled by ``T^2`` (Hinton et al., 2015) so that the
gradient keeps its size as ``T`` changes: for ``soft_target_loss`` the gradient
with respect to the student logits is ``T * (softmax(s / T) - softmax(t / T))``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.checks import check_int, check_number, is_concrete

Array = jax.Array
ArrayLike = Any


# --------------------------------------------------------------------------
# Input checks.
# --------------------------------------------------------------------------


def _check_scalar(fn: str, name: str, value: ArrayLike, *, low: float, low_open: bool, high: float = math.inf) -> None:
  """A scalar hyperparameter: checked now when concrete; a traced one is not (no host sync)."""
  if callable(value):
    raise TypeError(
        f"{fn}: {name} must be a number or a scalar array, got the callable {value!r}. To follow "
        f"a schedule, evaluate it at the step: {name}=schedule(step)."
    )
  if jnp.ndim(value) != 0:
    raise ValueError(f"{fn}: {name} must be a scalar, got shape {jnp.shape(value)}.")
  if is_concrete(value):
    check_number(fn, name, np.asarray(value)[()], low=low, low_open=low_open, high=high, high_open=high == math.inf)


def _check_temperature(fn: str, temperature: ArrayLike) -> None:
  _check_scalar(fn, "temperature", temperature, low=0.0, low_open=True)


def _float_dtype(*xs: ArrayLike) -> Any:
  dt = jnp.float32
  for x in xs:
    d = jnp.asarray(x).dtype
    if not jnp.issubdtype(d, jnp.floating):
      raise TypeError(f"logits must be floating point, got dtype {d}.")
    if jnp.finfo(d).bits > jnp.finfo(dt).bits:
      dt = d
  return dt


def _check_same_shape(fn: str, student: ArrayLike, teacher: ArrayLike) -> None:
  if jnp.shape(student) != jnp.shape(teacher):
    raise ValueError(
        f"{fn}: student_logits has shape {jnp.shape(student)} but teacher_logits has shape "
        f"{jnp.shape(teacher)}; they must be equal (same positions, same vocabulary). For a "
        "teacher with a larger vocabulary, slice it to the student's vocabulary first."
    )
  if jnp.ndim(student) < 1:
    raise ValueError(f"{fn}: logits need a class axis (the last one), got a scalar.")


def _check_where(fn: str, where: ArrayLike | None, shape: tuple[int, ...]) -> None:
  if where is not None and jnp.shape(where) != tuple(shape):
    raise ValueError(
        f"{fn}: where has shape {jnp.shape(where)} but the loss has shape {tuple(shape)} "
        "(the logits' shape without the class axis); give one boolean per position."
    )


def _masked(loss: Array, where: ArrayLike | None) -> Array:
  if where is None:
    return loss
  return jnp.where(jnp.asarray(where, bool), loss, jnp.zeros_like(loss))


def _plogp_ratio(log_p: Array, log_q: Array) -> Array:
  """``p * (log p - log q)``, 0 where ``p == 0`` (also where ``log q = -inf``).

  Both logs are replaced where ``p == 0`` so that neither the value nor the
  gradient sees ``0 * inf``; where ``p > 0`` and ``q == 0`` the term is
  ``+inf``, as the divergence is.
  """
  p = jnp.exp(log_p)
  safe = p > 0
  return jnp.where(safe, p * (jnp.where(safe, log_p, 0.0) - jnp.where(safe, log_q, 0.0)), 0.0)


def _check_pair(fn: str, student_logits, teacher_logits, temperature, where) -> None:
  _check_temperature(fn, temperature)
  _check_same_shape(fn, student_logits, teacher_logits)
  _check_where(fn, where, jnp.shape(student_logits)[:-1])
  _float_dtype(student_logits, teacher_logits)


def _log_probs(student_logits, teacher_logits, temperature):
  dt = _float_dtype(student_logits, teacher_logits)
  t = jnp.asarray(temperature, dt)
  log_q = jax.nn.log_softmax(jnp.asarray(student_logits).astype(dt) / t, axis=-1)
  log_p = jax.nn.log_softmax(jnp.asarray(teacher_logits).astype(dt) / t, axis=-1)
  return log_q, log_p, t


@jax.jit
def _forward_kl(student_logits, teacher_logits, temperature, where):
  log_q, log_p, t = _log_probs(student_logits, teacher_logits, temperature)
  return _masked(t * t * jnp.sum(_plogp_ratio(log_p, log_q), axis=-1), where)


@jax.jit
def _reverse_kl(student_logits, teacher_logits, temperature, where):
  log_q, log_p, t = _log_probs(student_logits, teacher_logits, temperature)
  return _masked(t * t * jnp.sum(_plogp_ratio(log_q, log_p), axis=-1), where)


@jax.jit
def _jensen_shannon(student_logits, teacher_logits, temperature, where):
  log_q, log_p, t = _log_probs(student_logits, teacher_logits, temperature)
  # Where both are -inf, m = 0 and both terms vanish: give logaddexp finite
  # inputs there, so that its gradient is not NaN.
  dead = jnp.isneginf(log_p) & jnp.isneginf(log_q)
  lp, lq = jnp.where(dead, 0.0, log_p), jnp.where(dead, 0.0, log_q)
  log_m = jnp.where(dead, 0.0, jnp.logaddexp(lp, lq) - jnp.log(2.0).astype(log_p.dtype))
  js = 0.5 * jnp.sum(_plogp_ratio(log_p, log_m) + _plogp_ratio(log_q, log_m), axis=-1)
  return _masked(t * t * js, where)


# --------------------------------------------------------------------------
# Divergences between full distributions.
# --------------------------------------------------------------------------


def soft_target_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
) -> Array:
  r"""Soft-target distillation (Hinton et al., 2015): ``T^2 KL(p_T || q_T)``.

  ``p_T = softmax(teacher / T)``, ``q_T = softmax(student / T)``. This is the
  forward KL: it differs from Hinton's cross-entropy to the soft targets by the
  teacher's entropy, a constant, so the gradient is the same and the loss is
  zero when the student equals the teacher. Its gradient with respect to the
  student logits is ``T * (q_T - p_T)``.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    temperature: ``T > 0``, a number or a scalar array (e.g. ``schedule(step)``).
    where: optional boolean mask of shape ``[...]``; masked positions give 0.

  Returns:
    The loss per position, shape ``[...]``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> s = jnp.array([[1.0, 2.0, 3.0]])
    >>> round(float(jc.distill.soft_target_loss(s, s, temperature=2.0)[0]), 6)
    0.0
    >>> round(float(jc.distill.soft_target_loss(s, jnp.array([[3.0, 2.0, 1.0]]))[0]), 4)
    1.1504
  """
  _check_pair("soft_target_loss", student_logits, teacher_logits, temperature, where)
  return _forward_kl(student_logits, teacher_logits, temperature, where)


def reverse_kl_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
) -> Array:
  r"""Reverse KL distillation: ``T^2 KL(q_T || p_T)`` (mode seeking).

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    temperature: ``T > 0``.
    where: optional boolean mask of shape ``[...]``.

  Returns:
    The loss per position, shape ``[...]``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> s, t = jnp.array([[0.0, 1.0]]), jnp.array([[1.0, 0.0]])
    >>> round(float(jc.distill.reverse_kl_loss(s, t)[0]), 4)
    0.4621
  """
  _check_pair("reverse_kl_loss", student_logits, teacher_logits, temperature, where)
  return _reverse_kl(student_logits, teacher_logits, temperature, where)


def jensen_shannon_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
) -> Array:
  r"""Jensen-Shannon distillation: ``T^2 (KL(p||m) + KL(q||m)) / 2``, ``m = (p + q) / 2``.

  Symmetric and bounded by ``T^2 log 2``.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    temperature: ``T > 0``.
    where: optional boolean mask of shape ``[...]``.

  Returns:
    The loss per position, shape ``[...]``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> s, t = jnp.array([[0.0, 1.0]]), jnp.array([[1.0, 0.0]])
    >>> round(float(jc.distill.jensen_shannon_loss(s, t)[0]), 4)
    0.1109
  """
  _check_pair("jensen_shannon_loss", student_logits, teacher_logits, temperature, where)
  return _jensen_shannon(student_logits, teacher_logits, temperature, where)


def distillation_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: ArrayLike = 0.5,
    temperature: ArrayLike = 1.0,
    divergence: Callable[..., Array] = soft_target_loss,
    where: ArrayLike | None = None,
) -> Array:
  r"""Soft and hard targets mixed: ``alpha * D_T(s, t) + (1 - alpha) * CE(s, labels)``.

  The hard-label term is the softmax cross entropy at temperature 1; the soft
  term is ``divergence`` (already scaled by ``T^2``), as in Hinton et al.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    labels: integer class labels in ``[0, classes)``, shape ``[...]``. Labels
      out of range are refused (``ValueError``) where ``where`` is True (or
      not given); traced ones give that position a NaN loss. Positions with
      ``where`` False may hold any label (padding).
    alpha: weight of the soft term in ``[0, 1]`` (e.g. ``schedule(step)``).
    temperature: ``T > 0`` of the soft term.
    divergence: ``soft_target_loss`` (default), ``reverse_kl_loss``,
      ``jensen_shannon_loss`` or any function with their signature.
    where: optional boolean mask of shape ``[...]``.

  Returns:
    The loss per position, shape ``[...]``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> s = jnp.array([[2.0, 0.0]])
    >>> round(float(jc.distill.distillation_loss(s, s, jnp.array([0]), alpha=0.5)[0]), 4)
    0.0635
  """
  fn = "distillation_loss"
  _check_scalar(fn, "alpha", alpha, low=0.0, low_open=False, high=1.0)
  _check_same_shape(fn, student_logits, teacher_logits)
  if jnp.shape(labels) != jnp.shape(student_logits)[:-1]:
    raise ValueError(
        f"{fn}: labels has shape {jnp.shape(labels)}, expected {jnp.shape(student_logits)[:-1]} "
        "(integer class indices, one per position of the logits)."
    )
  if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
    raise TypeError(f"{fn}: labels must be integer class indices, got dtype {jnp.asarray(labels).dtype}.")
  _check_where(fn, where, jnp.shape(labels))
  if is_concrete(labels) and (where is None or is_concrete(where)):
    classes = jnp.shape(student_logits)[-1]
    lab = np.asarray(labels)
    bad = (lab < 0) | (lab >= classes)
    if where is not None:
      bad &= np.asarray(where, bool)
    if bad.any():
      pos = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
          f"{fn}: labels must be class indices in [0, {classes}), got {int(lab[pos])} at "
          f"position {pos} ({int(bad.sum())} out of range). Give the class index of each "
          "position; mark positions without a label (padding) False in where=."
      )
  soft = divergence(student_logits, teacher_logits, temperature=temperature, where=where)
  return _mix(student_logits, labels, soft, alpha, where)


@jax.jit
def _mix(student_logits, labels, soft, alpha, where):
  dt = soft.dtype
  log_q1 = jax.nn.log_softmax(jnp.asarray(student_logits).astype(dt), axis=-1)
  classes = log_q1.shape[-1]
  labels = jnp.asarray(labels).astype(jnp.int32)
  ok = (labels >= 0) & (labels < classes)
  picked = jnp.take_along_axis(log_q1, jnp.where(ok, labels, 0)[..., None], axis=-1)[..., 0]
  hard = jnp.where(ok, -picked, jnp.nan)  # a traced out-of-range label: a visible NaN
  a = jnp.asarray(alpha, dt)
  return _masked(a * soft + (1.0 - a) * hard, where)


# --------------------------------------------------------------------------
# Top-k (sparse) distillation from cached teacher logits.
# --------------------------------------------------------------------------


class TopKLogits(NamedTuple):
  """The teacher's top-k logits at each position, enough for ``topk_distillation_loss``.

  Attributes:
    values: ``[..., k]`` the k largest teacher logits (raw, not divided by T),
      in decreasing order.
    indices: ``[..., k]`` int32 class indices of ``values``.
    logsumexp: ``[...]`` ``logsumexp(logits / temperature)`` over the whole
      vocabulary: it fixes the probability mass the top k leave over,
      ``1 - sum(exp(values / T - logsumexp))``. It belongs to the temperature it
      was computed at; use the same temperature in the loss.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> tk = jc.distill.TopKLogits(jnp.array([[2.0]]), jnp.array([[0]]), jnp.array([2.0]))
    >>> round(float(jc.distill.topk_distillation_loss(jnp.array([[2.0, -9.0]]), *tk)[0]), 4)
    0.0
  """

  values: Array
  indices: Array
  logsumexp: Array


def _check_k(fn: str, k: int, vocab: int) -> None:
  check_int(fn, "k", k, low=1)
  if k > vocab:
    raise ValueError(
        f"{fn}: k={k} is larger than the vocabulary ({vocab} classes, the last axis of the "
        f"logits); use k <= {vocab}."
    )


def topk_logits(logits: ArrayLike, k: int, *, temperature: ArrayLike = 1.0) -> TopKLogits:
  """The top-k logits, their indices and the full logsumexp at ``temperature``.

  Args:
    logits: teacher logits ``[..., vocab]``.
    k: how many to keep, ``1 <= k <= vocab``.
    temperature: ``T > 0``, the temperature the distillation loss will use.

  Returns:
    A ``TopKLogits``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> tk = jc.distill.topk_logits(jnp.array([[0.0, 3.0, 1.0, 2.0]]), 2)
    >>> tk.values.tolist(), tk.indices.tolist()
    ([[3.0, 2.0]], [[1, 3]])
  """
  fn = "topk_logits"
  _check_temperature(fn, temperature)
  if jnp.ndim(logits) < 1:
    raise ValueError(f"{fn}: logits need a class axis (the last one), got a scalar.")
  _check_k(fn, k, jnp.shape(logits)[-1])
  _float_dtype(logits)
  return _topk_logits(logits, int(k), temperature)


@functools.partial(jax.jit, static_argnums=1)
def _topk_logits(logits, k, temperature):
  logits = jnp.asarray(logits)
  dt = _float_dtype(logits)
  values, indices = jax.lax.top_k(logits, k)
  lse = jax.nn.logsumexp(logits.astype(dt) / jnp.asarray(temperature, dt), axis=-1)
  return TopKLogits(values, indices.astype(jnp.int32), lse)


def _topk_membership(indices: Array, vocab: int) -> Array:
  """Boolean ``[..., vocab]``: True at the given indices (a batched scatter)."""
  lead = indices.shape[:-1]
  flat = indices.reshape((-1, indices.shape[-1]))
  mark = jax.vmap(lambda i: jnp.zeros((vocab,), bool).at[i].set(True))(flat)
  return mark.reshape(lead + (vocab,))


def _check_topk_indices(fn: str, idx: np.ndarray, vocab: int) -> None:
  out = (idx < 0) | (idx >= vocab)
  if out.any():
    pos = tuple(int(i) for i in np.argwhere(out)[0])
    raise ValueError(
        f"{fn}: teacher_topk_indices must be class indices in [0, {vocab}), got {int(idx[pos])} "
        f"at {pos}. Pass the indices topk_logits returned for logits with this vocabulary."
    )
  srt = np.sort(idx, axis=-1)
  dup = srt[..., 1:] == srt[..., :-1]
  if dup.any():
    pos = tuple(int(i) for i in np.argwhere(dup)[0])
    raise ValueError(
        f"{fn}: teacher_topk_indices repeat class {int(srt[pos])} at position {pos[:-1]}; the "
        "k indices of a position must be distinct (a class counted twice makes the KL "
        "negative). Pass the indices topk_logits returned."
    )


def topk_distillation_loss(
    student_logits: ArrayLike,
    teacher_topk_values: ArrayLike,
    teacher_topk_indices: ArrayLike,
    teacher_logsumexp: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
) -> Array:
  r"""Forward KL to a teacher known only by its top-k logits, with a rest bucket.

  The vocabulary is split into the teacher's k classes and one "rest" bucket
  holding all other classes. The teacher puts ``p_i = exp(v_i / T - lse)`` on
  its k classes and ``p_rest = 1 - sum_i p_i`` on the rest (``lse`` is the
  teacher's full logsumexp, stored alongside: see ``TopKLogits``); the student's
  rest mass ``q_rest`` is its exact probability outside the k indices. The loss
  is the KL divergence between these k + 1 bucket distributions, times ``T^2``:

      T^2 [ sum_i p_i log(p_i / q_i) + p_rest log(p_rest / q_rest) ]

  It equals ``soft_target_loss`` when ``k`` is the whole vocabulary, and its
  gradient with respect to the student logits is ``T (q - p~)``, where ``p~``
  is ``p_i`` on the top k and spreads ``p_rest`` over the other classes in
  proportion to the student's own probabilities.

  Args:
    student_logits: ``[..., vocab]``.
    teacher_topk_values: ``[..., k]`` the teacher's top-k logits (raw).
    teacher_topk_indices: ``[..., k]`` their class indices, distinct per
      position and in ``[0, vocab)``: concrete ones are checked
      (``ValueError``); traced ones that repeat or fall outside give that
      position a NaN loss.
    teacher_logsumexp: ``[...]`` ``logsumexp(teacher_logits / temperature)``.
    temperature: ``T > 0``; the same temperature ``teacher_logsumexp`` was
      computed at.
    where: optional boolean mask of shape ``[...]``.

  Returns:
    The loss per position, shape ``[...]``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> t = jnp.array([[4.0, 1.0, 0.5, 0.0]])
    >>> s = jnp.array([[3.0, 1.0, 0.0, 0.0]])
    >>> tk = jc.distill.topk_logits(t, 2)
    >>> round(float(jc.distill.topk_distillation_loss(s, *tk)[0]), 4)
    0.0401
  """
  fn = "topk_distillation_loss"
  _check_temperature(fn, temperature)
  s_shape = jnp.shape(student_logits)
  if len(s_shape) < 1:
    raise ValueError(f"{fn}: student_logits need a class axis (the last one), got a scalar.")
  lead, vocab = s_shape[:-1], s_shape[-1]
  v_shape, i_shape = jnp.shape(teacher_topk_values), jnp.shape(teacher_topk_indices)
  if v_shape != i_shape or v_shape[:-1] != lead:
    raise ValueError(
        f"{fn}: teacher_topk_values {v_shape} and teacher_topk_indices {i_shape} must both have "
        f"shape {lead} + (k,) to match student_logits {s_shape}."
    )
  if jnp.shape(teacher_logsumexp) != lead:
    raise ValueError(
        f"{fn}: teacher_logsumexp has shape {jnp.shape(teacher_logsumexp)}, expected {lead} "
        "(one value per position: logsumexp(teacher_logits / temperature))."
    )
  k = v_shape[-1]
  _check_k(fn, k, vocab)
  if not jnp.issubdtype(jnp.asarray(teacher_topk_indices).dtype, jnp.integer):
    raise TypeError(f"{fn}: teacher_topk_indices must be integers, got {jnp.asarray(teacher_topk_indices).dtype}.")
  _check_where(fn, where, lead)
  _float_dtype(student_logits, teacher_topk_values, teacher_logsumexp)
  if is_concrete(teacher_topk_indices):
    _check_topk_indices(fn, np.asarray(teacher_topk_indices), vocab)
  return _topk_kl(student_logits, teacher_topk_values, teacher_topk_indices, teacher_logsumexp, temperature, where)


@jax.jit
def _topk_kl(student_logits, teacher_topk_values, teacher_topk_indices, teacher_logsumexp, temperature, where):
  vocab, k = student_logits.shape[-1], teacher_topk_values.shape[-1]
  dt = _float_dtype(student_logits, teacher_topk_values, teacher_logsumexp)
  t = jnp.asarray(temperature, dt)
  idx = jnp.asarray(teacher_topk_indices).astype(jnp.int32)
  s = jnp.asarray(student_logits).astype(dt) / t
  lse_s = jax.nn.logsumexp(s, axis=-1)
  log_q = jnp.take_along_axis(s, idx, axis=-1) - lse_s[..., None]
  log_p = jnp.asarray(teacher_topk_values).astype(dt) / t - jnp.asarray(teacher_logsumexp).astype(dt)[..., None]
  kl = jnp.sum(_plogp_ratio(log_p, log_q), axis=-1)
  inside = _topk_membership(idx, vocab)
  # Repeated or out-of-range indices mark fewer than k classes: a visible NaN.
  valid = jnp.sum(inside, axis=-1, dtype=jnp.int32) == k
  valid &= jnp.all((idx >= 0) & (idx < vocab), axis=-1)
  kl = jnp.where(valid, kl, jnp.nan)
  if k < vocab:
    outside = ~inside
    log_q_rest = jax.nn.logsumexp(s, axis=-1, where=outside) - lse_s
    p_rest = jnp.clip(1.0 - jnp.sum(jnp.exp(log_p), axis=-1), 0.0, 1.0)
    has = p_rest > 0
    log_p_rest = jnp.log(jnp.where(has, p_rest, 1.0))
    kl = kl + jnp.where(has, p_rest * (log_p_rest - log_q_rest), 0.0)
  return _masked(t * t * kl, where)

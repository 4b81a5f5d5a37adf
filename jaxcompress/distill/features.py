"""Feature distillation losses: hidden states, attention maps, relations.

Like the logit losses these are unreduced (one value per position, example,
pair or triplet), take keyword-only hyperparameters and a boolean ``where``
mask of the output's shape, and compute in float32 (or wider).

When the student's width differs from the teacher's, map the student's
features with a learned linear projection (FitNets, Romero et al. 2015):
``init_projection`` returns its params, a plain dict you train with the
student (put it in the same params tree, e.g. ``{"student": ..., "proj": ...}``),
and ``apply_projection`` is the pure map.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.core.checks import check_int, check_number, is_concrete

Array = jax.Array
ArrayLike = Any


def _dtype(fn: str, *xs: ArrayLike) -> Any:
  dt = jnp.float32
  for x in xs:
    d = jnp.asarray(x).dtype
    if not jnp.issubdtype(d, jnp.floating):
      raise TypeError(f"{fn}: features must be floating point, got dtype {d}.")
    if jnp.finfo(d).bits > jnp.finfo(dt).bits:
      dt = d
  return dt


def _check_where(fn: str, where: ArrayLike | None, shape: tuple[int, ...]) -> None:
  if where is not None and jnp.shape(where) != tuple(shape):
    raise ValueError(
        f"{fn}: where has shape {jnp.shape(where)} but the loss has shape {tuple(shape)}; "
        "give one boolean per output element."
    )


def _masked(loss: Array, where: ArrayLike | None) -> Array:
  if where is None:
    return loss
  return jnp.where(jnp.asarray(where, bool), loss, jnp.zeros_like(loss))


def _check_equal_shapes(fn: str, student: ArrayLike, teacher: ArrayLike) -> None:
  ss, ts = jnp.shape(student), jnp.shape(teacher)
  if ss != ts:
    hint = ""
    if len(ss) == len(ts) and ss[:-1] == ts[:-1]:
      hint = (
          f" The widths differ ({ss[-1]} vs {ts[-1]}): project the student's features first, "
          f"apply_projection(init_projection(key, {ss[-1]}, {ts[-1]}), student)."
      )
    raise ValueError(f"{fn}: student features have shape {ss} but teacher features {ts}.{hint}")
  if len(ss) < 1:
    raise ValueError(f"{fn}: features need a feature axis (the last one), got a scalar.")


def _check_positive(fn: str, name: str, value: Any) -> None:
  """A hyperparameter in ``(0, inf)``: checked when concrete (a traced one is not)."""
  if is_concrete(value):
    check_number(fn, name, value, low=0.0, low_open=True, high=math.inf, high_open=True)


def _safe_norm(x: Array, axis: int = -1) -> Array:
  """Euclidean norm with a zero (not NaN) gradient at the zero vector."""
  sq = jnp.sum(x * x, axis=axis)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


# --------------------------------------------------------------------------
# Hidden-state losses.
# --------------------------------------------------------------------------


def feature_mse_loss(
    student: ArrayLike, teacher: ArrayLike, *, where: ArrayLike | None = None
) -> Array:
  """Mean squared error over the feature (last) axis.

  Args:
    student: ``[..., d]`` student features (projected if widths differ).
    teacher: ``[..., d]`` teacher features.
    where: optional boolean mask of shape ``[...]``.

  Returns:
    ``mean((student - teacher)^2, axis=-1)``, shape ``[...]``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> jc.distill.feature_mse_loss(jnp.array([[1.0, 2.0]]), jnp.array([[0.0, 0.0]])).tolist()
    [2.5]
  """
  fn = "feature_mse_loss"
  _check_equal_shapes(fn, student, teacher)
  _check_where(fn, where, jnp.shape(student)[:-1])
  _dtype(fn, student, teacher)
  return _mse(student, teacher, where)


@jax.jit
def _mse(student, teacher, where):
  dt = _dtype("feature_mse_loss", student, teacher)
  d = jnp.asarray(student).astype(dt) - jnp.asarray(teacher).astype(dt)
  return _masked(jnp.mean(d * d, axis=-1), where)


def feature_cosine_loss(
    student: ArrayLike,
    teacher: ArrayLike,
    *,
    epsilon: float = 1e-8,
    where: ArrayLike | None = None,
) -> Array:
  """Cosine distance ``1 - cos(student, teacher)`` over the feature (last) axis.

  Args:
    student: ``[..., d]`` student features (projected if widths differ).
    teacher: ``[..., d]`` teacher features.
    epsilon: lower bound on each norm in the denominator, in ``(0, inf)``.
    where: optional boolean mask of shape ``[...]``.

  Returns:
    The distance per position, shape ``[...]``, in ``[0, 2]``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> jc.distill.feature_cosine_loss(jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 3.0]])).tolist()
    [1.0]
  """
  fn = "feature_cosine_loss"
  _check_positive(fn, "epsilon", epsilon)
  _check_equal_shapes(fn, student, teacher)
  _check_where(fn, where, jnp.shape(student)[:-1])
  _dtype(fn, student, teacher)
  return _cosine(student, teacher, epsilon, where)


@jax.jit
def _cosine(student, teacher, epsilon, where):
  dt = _dtype("feature_cosine_loss", student, teacher)
  s, t = jnp.asarray(student).astype(dt), jnp.asarray(teacher).astype(dt)
  ns = jnp.maximum(_safe_norm(s), epsilon)
  nt = jnp.maximum(_safe_norm(t), epsilon)
  return _masked(1.0 - jnp.sum(s * t, axis=-1) / (ns * nt), where)


def init_projection(
    key: jax.Array, in_features: int, out_features: int, *, dtype: Any = jnp.float32
) -> dict[str, Array]:
  """Params of a linear map from student width to teacher width.

  The kernel is LeCun-normal (variance ``1 / in_features``), the bias zero.
  Train them with the student: they are ordinary params.

  Args:
    key: PRNG key.
    in_features: the student's feature width.
    out_features: the teacher's feature width.
    dtype: param dtype.

  Returns:
    ``{"kernel": [in, out], "bias": [out]}``.

  Example:
    >>> import jax, jaxcompress as jc
    >>> p = jc.distill.init_projection(jax.random.key(0), 4, 8)
    >>> p["kernel"].shape, p["bias"].shape
    ((4, 8), (8,))
  """
  in_features = check_int("init_projection", "in_features", in_features, low=1)
  out_features = check_int("init_projection", "out_features", out_features, low=1)
  kernel = jax.nn.initializers.lecun_normal()(key, (in_features, out_features), dtype)
  return {"kernel": kernel, "bias": jnp.zeros((out_features,), dtype)}


def apply_projection(params: dict[str, ArrayLike], x: ArrayLike) -> Array:
  """``x @ kernel + bias`` over the last axis of ``x``.

  Args:
    params: from ``init_projection``.
    x: ``[..., in_features]``.

  Returns:
    ``[..., out_features]`` in the params' dtype.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> p = {"kernel": jnp.eye(2, 3), "bias": jnp.ones(3)}
    >>> jc.distill.apply_projection(p, jnp.array([[2.0, 5.0]])).tolist()
    [[3.0, 6.0, 1.0]]
  """
  kernel, bias = params["kernel"], params["bias"]
  if jnp.shape(x)[-1:] != jnp.shape(kernel)[:1]:
    raise ValueError(
        f"apply_projection: features of width {jnp.shape(x)[-1:]} do not fit a kernel of shape "
        f"{jnp.shape(kernel)}; build it with init_projection(key, {jnp.shape(x)[-1]}, teacher_width)."
    )
  return jnp.asarray(x).astype(kernel.dtype) @ kernel + bias


# --------------------------------------------------------------------------
# Attention transfer (Zagoruyko and Komodakis, 2017).
# --------------------------------------------------------------------------


def _attention_map(x: Array, p: float, channel_axis: int) -> Array:
  a = jnp.mean(jnp.abs(x) ** p, axis=channel_axis)
  a = a.reshape((a.shape[0], -1))
  n = _safe_norm(a)
  return a / jnp.maximum(n, 1e-12)[:, None]


def attention_transfer_loss(
    student: ArrayLike,
    teacher: ArrayLike,
    *,
    p: float = 2.0,
    channel_axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  """Attention transfer: distance between normalized spatial attention maps.

  The attention map of an activation ``A`` (batch first) is
  ``Q = mean_c |A_c|^p`` over the channel axis, flattened over the remaining
  (spatial) axes and divided by its L2 norm (Zagoruyko and Komodakis, 2017,
  Eq. 2 with ``F_sum^p``). The loss per example is the mean over spatial
  positions of ``(Q_s - Q_t)^2``, so ``loss.mean()`` is the ``at_loss`` of the
  paper's code (multiply by its ``beta``, 1000 there, yourself). Channel counts
  may differ; spatial shapes must agree.

  Args:
    student: ``[batch, ..., channels]`` activations (NHWC by default).
    teacher: ``[batch, ..., channels']`` with the same batch and spatial shape.
    p: the power of the activations, in ``(0, inf)`` (2 in the paper).
    channel_axis: the channel axis of both arrays.
    where: optional boolean mask of shape ``[batch]``.

  Returns:
    The loss per example, shape ``[batch]``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> x = jnp.ones((1, 2, 2, 3))
    >>> loss = jc.distill.attention_transfer_loss(x, 5.0 * jnp.ones((1, 2, 2, 8)))
    >>> [round(v, 6) for v in loss.tolist()]
    [0.0]
  """
  fn = "attention_transfer_loss"
  s, t = jnp.asarray(student), jnp.asarray(teacher)
  if s.ndim != t.ndim or s.ndim < 3:
    raise ValueError(
        f"{fn}: expects activations [batch, spatial..., channels] of equal rank >= 3, got "
        f"student {s.shape} and teacher {t.shape}."
    )
  p = check_number(fn, "p", p, low=0.0, low_open=True, high=math.inf, high_open=True)
  ax = check_int(fn, "channel_axis", channel_axis, low=-s.ndim, high=s.ndim - 1) % s.ndim
  if ax == 0:
    raise ValueError(f"{fn}: channel_axis={channel_axis} is the batch axis; give the channel axis.")
  ss = tuple(d for i, d in enumerate(s.shape) if i != ax)
  ts = tuple(d for i, d in enumerate(t.shape) if i != ax)
  if ss != ts:
    raise ValueError(
        f"{fn}: batch and spatial shapes must agree (channels may differ), got student {s.shape} "
        f"and teacher {t.shape} with channel_axis={channel_axis}. Resize (pool) the larger map first."
    )
  _check_where(fn, where, s.shape[:1])
  _dtype(fn, s, t)
  return _attention_transfer(s, t, float(p), ax, where)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _attention_transfer(s, t, p, ax, where):
  dt = _dtype("attention_transfer_loss", s, t)
  qs = _attention_map(s.astype(dt), p, ax)
  qt = _attention_map(t.astype(dt), p, ax)
  return _masked(jnp.mean((qs - qt) ** 2, axis=-1), where)


# --------------------------------------------------------------------------
# Relational knowledge distillation (Park et al., 2019).
# --------------------------------------------------------------------------


def _flat_pair(fn: str, student, teacher, where):
  s, t = jnp.asarray(student), jnp.asarray(teacher)
  if s.ndim < 1 or t.ndim < 1 or s.shape[0] != t.shape[0]:
    raise ValueError(
        f"{fn}: student {s.shape} and teacher {t.shape} must share the batch (first) axis."
    )
  n = s.shape[0]
  if where is not None and jnp.shape(where) != (n,):
    raise ValueError(f"{fn}: where has shape {jnp.shape(where)}, expected ({n},): one flag per example.")
  dt = _dtype(fn, s, t)
  valid = jnp.ones((n,), bool) if where is None else jnp.asarray(where, bool)
  return s.reshape((n, -1)).astype(dt), t.reshape((n, -1)).astype(dt), valid


def _huber(x: Array, delta: float) -> Array:
  ax = jnp.abs(x)
  return jnp.where(ax <= delta, 0.5 * x * x, delta * (ax - 0.5 * delta))


def _normalized_distances(e: Array, pair_ok: Array) -> Array:
  d = _safe_norm(e[:, None, :] - e[None, :, :])
  d = jnp.where(pair_ok, d, 0.0)
  mean = jnp.sum(d) / jnp.maximum(jnp.sum(pair_ok), 1)
  return d / jnp.where(mean > 0, mean, 1.0)


def rkd_distance_loss(
    student: ArrayLike,
    teacher: ArrayLike,
    *,
    delta: float = 1.0,
    where: ArrayLike | None = None,
) -> Array:
  """RKD distance loss: Huber between normalized pairwise distances.

  ``psi(e_i, e_j) = ||e_i - e_j|| / mu`` with ``mu`` the mean distance over
  pairs ``i != j`` of valid examples; the loss of pair ``(i, j)`` is
  ``huber(psi_s - psi_t)`` (Park et al., 2019, Eq. 4-5). Features are flattened
  per example, so widths may differ. ``loss.mean()`` is the paper code's
  ``RkdDistance``.

  Args:
    student: ``[batch, ...]`` student embeddings.
    teacher: ``[batch, ...]`` teacher embeddings.
    delta: the Huber threshold, in ``(0, inf)`` (1 in the paper: smooth L1).
    where: optional boolean mask ``[batch]``; pairs with a masked example are 0
      and do not count in ``mu``.

  Returns:
    The loss per pair, shape ``[batch, batch]`` (zero on the diagonal).

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> e = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    >>> round(float(jc.distill.rkd_distance_loss(e, 3.0 * e).sum()), 6)
    0.0
  """
  _check_positive("rkd_distance_loss", "delta", delta)
  _flat_pair("rkd_distance_loss", student, teacher, where)
  return _rkd_distance(student, teacher, delta, where)


@jax.jit
def _rkd_distance(student, teacher, delta, where):
  s, t, valid = _flat_pair("rkd_distance_loss", student, teacher, where)
  n = s.shape[0]
  pair_ok = valid[:, None] & valid[None, :] & ~jnp.eye(n, dtype=bool)
  ds = _normalized_distances(s, pair_ok)
  dtt = _normalized_distances(t, pair_ok)
  return jnp.where(pair_ok, _huber(ds - dtt, delta), 0.0)


def _unit_differences(e: Array) -> Array:
  d = e[None, :, :] - e[:, None, :]  # d[a, b] = e_b - e_a
  n = _safe_norm(d)
  return d / jnp.maximum(n, 1e-12)[..., None]


def rkd_angle_loss(
    student: ArrayLike,
    teacher: ArrayLike,
    *,
    delta: float = 1.0,
    where: ArrayLike | None = None,
) -> Array:
  """RKD angle loss: Huber between the cosines of angles of example triplets.

  ``cos(a; b, c) = <u_ab, u_ac>`` with ``u_ab = (e_b - e_a) / ||e_b - e_a||``:
  the angle at vertex ``a`` (Park et al., 2019, Eq. 6-7). The loss of triplet
  ``(a, b, c)`` is ``huber(cos_s - cos_t)``; triplets with a repeated example
  give 0 in both. ``loss.mean()`` is the paper code's ``RKdAngle``. Memory is
  ``O(batch^2 * width)``.

  Args:
    student: ``[batch, ...]`` student embeddings.
    teacher: ``[batch, ...]`` teacher embeddings.
    delta: the Huber threshold, in ``(0, inf)``.
    where: optional boolean mask ``[batch]``; triplets with a masked example are 0.

  Returns:
    The loss per triplet, shape ``[batch, batch, batch]``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> e = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    >>> float(jc.distill.rkd_angle_loss(e, 2.0 * e + 1.0).sum())
    0.0
  """
  _check_positive("rkd_angle_loss", "delta", delta)
  _flat_pair("rkd_angle_loss", student, teacher, where)
  return _rkd_angle(student, teacher, delta, where)


@jax.jit
def _rkd_angle(student, teacher, delta, where):
  s, t, valid = _flat_pair("rkd_angle_loss", student, teacher, where)
  us, ut = _unit_differences(s), _unit_differences(t)
  cs = jnp.einsum("abd,acd->abc", us, us)
  ct = jnp.einsum("abd,acd->abc", ut, ut)
  ok = valid[:, None, None] & valid[None, :, None] & valid[None, None, :]
  return jnp.where(ok, _huber(cs - ct, delta), 0.0)

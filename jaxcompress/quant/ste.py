"""Gradients through quantization: straight-through estimators, LSQ and PACT.

Rounding has a zero derivative almost everywhere, so training through a
quantizer needs an estimator for the backward pass:

- ``fake_quant_ste``: the forward value is exactly
  ``numerics.fake_quant(x, ...)``; the backward pass is the identity
  (``estimator="identity"``) or the identity where the forward pass does not
  clip and zero where it does (``estimator="clipped"``): the scaled value
  ``x / scale + zero_point`` is compared with the rounding range
  ``[qmin - 1/2, qmax + 1/2]`` (``Format.rounding_range``), not with
  ``[qmin, qmax]``. So the weights that set a dynamic or calibrated scale keep
  their gradient: the scale is a rounded product (``range * (1 / qmax)``), and
  their scaled value may land one ulp beyond ``qmax``, which the forward pass
  rounds back to ``qmax`` unchanged. The scale gets no gradient.
- ``lsq_fake_quant``: learned step size quantization (Esser et al., 2020,
  "Learned Step Size Quantization"). The step ``s`` is trained with
  ``d x_q / d s = round(x / s) - x / s`` inside the range and ``qmin`` or
  ``qmax`` outside, its gradient scaled by ``g = 1 / sqrt(N * qmax)`` (``N``:
  elements sharing the step).
- ``pact_quant``: PACT (Choi et al., 2018): activations clipped to a learned
  bound ``alpha`` and quantized on ``[0, alpha]``;
  ``d x_q / d alpha = 1[x >= alpha]`` (the straight-through estimator on the
  rounding).

Non-finite weights (see ``numerics``): NaN and +-inf pass through every
estimator unchanged and take no part in the scale, the step or their
neighbours' gradients.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from jaxcompress.core.checks import check_int
from jaxcompress.quant import numerics
from jaxcompress.quant.numerics import Format, Granularity

Array = jax.Array
Estimator = Literal["identity", "clipped"]
_ESTIMATORS = ("identity", "clipped")


def round_ste(x: Array) -> Array:
  """``round(x)`` forward (half to even), identity backward.

  The forward value is exactly ``jnp.round(x)``: ``x + (round(x) - x)`` is exact
  in floating point because ``round(x)`` is zero or within a factor of two of ``x``.

  Args:
    x: any float array.

  Returns:
    ``jnp.round(x)`` with the gradient of ``x``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> x = jnp.array([0.4, 2.5])
    >>> jc.quant.round_ste(x).tolist(), jax.grad(lambda x: jc.quant.round_ste(x).sum())(x).tolist()
    ([0.0, 2.0], [1.0, 1.0])
  """
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def scale_grad(x: Array, g: float | Array) -> Array:
  """Identity forward; multiplies the gradient by ``g`` backward.

  Args:
    x: any float array.
    g: the gradient factor.

  Returns:
    ``x`` (its value), whose gradient is ``g`` times the incoming one.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxcompress.quant.ste import scale_grad
    >>> float(jax.grad(lambda s: scale_grad(s, 0.25) * 3.0)(jnp.float32(1.0)))
    0.75
  """
  return _scale_grad(x, jnp.asarray(g, jnp.float32))


@jax.custom_vjp
def _scale_grad(x, g):
  return x


def _scale_grad_fwd(x, g):
  return x, g


def _scale_grad_bwd(g, ct):
  return (ct * g).astype(ct.dtype), jnp.zeros_like(g)


_scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


# --------------------------------------------------------------------------
# Straight-through fake quantization.
# --------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fq(fmt, granularity, estimator, rounding, x, scale, zero_point, key):
  del estimator
  return numerics.fake_quant(
      x, fmt, granularity, scale=scale, zero_point=zero_point, rounding=rounding, key=key
  )


def _fq_fwd(fmt, granularity, estimator, rounding, x, scale, zero_point, key):
  out = _fq(fmt, granularity, estimator, rounding, x, scale, zero_point, key)
  return out, (x, scale, zero_point)


def _fq_bwd(fmt, granularity, estimator, rounding, res, g):
  del rounding
  x, scale, zero_point = res
  if estimator == "clipped":
    y = x.astype(jnp.float32) / numerics.expand_scale(scale, x.shape, granularity)
    if zero_point is not None:
      y = y + numerics.expand_scale(zero_point, x.shape, granularity).astype(jnp.float32)
    lo, hi = fmt.rounding_range
    inside = (y >= lo) & (y <= hi)
    g = jnp.where(inside, g, jnp.zeros_like(g))
  return g, jnp.zeros_like(scale), None, None


_fq.defvjp(_fq_fwd, _fq_bwd)


def fake_quant_ste(
    x: Array,
    fmt: Format | None = None,
    granularity: Granularity | None = None,
    *,
    scale: Array | None = None,
    zero_point: Array | None = None,
    estimator: Estimator = "identity",
    rounding: numerics.Rounding = "nearest",
    key: Array | None = None,
) -> Array:
  """Fake quantization with a straight-through gradient.

  Args:
    x: the tensor; the output has its dtype.
    fmt: the format (default int8 symmetric).
    granularity: default ``PerChannel()`` (``PerGroup(size=block_size)`` for a
      block-scaled format).
    scale: a fixed scale; by default the dynamic one of ``x``
      (``numerics.compute_scale``, held constant in the backward pass; for a
      block-scaled format, the float32 decode scale of each block).
    zero_point: with an asymmetric ``scale``.
    estimator: ``"identity"``: the gradient passes unchanged; ``"clipped"``: it
      is zeroed where the forward pass clips, i.e. where ``x / scale +
      zero_point`` lies outside ``fmt.rounding_range`` (``[qmin - 1/2, qmax +
      1/2]`` for integers).
    rounding: ``"nearest"`` or ``"stochastic"``.
    key: PRNG key for stochastic rounding.

  Returns:
    ``numerics.fake_quant(x, ...)`` (bit for bit), with the estimator's gradient.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> f = lambda x: jc.quant.fake_quant_ste(x, jc.quant.Format(bits=4), jc.quant.PerTensor(),
    ...                                       scale=jnp.ones((1,)), estimator="clipped").sum()
    >>> jax.grad(f)(jnp.array([0.3, 7.4, 9.0])).tolist()
    [1.0, 1.0, 0.0]
  """
  fmt = Format() if fmt is None else fmt
  granularity = numerics.default_granularity(fmt) if granularity is None else granularity
  if estimator not in _ESTIMATORS:
    raise ValueError(f"unknown estimator {estimator!r}; use 'identity' or 'clipped'.")
  numerics.check(fmt, granularity, tuple(x.shape))
  if scale is None:
    scale, zero_point = numerics.compute_scale(jax.lax.stop_gradient(x), fmt, granularity)
  scale = jax.lax.stop_gradient(jnp.asarray(scale, jnp.float32))
  if zero_point is not None:
    zero_point = jax.lax.stop_gradient(zero_point)
  return _fq(fmt, granularity, estimator, rounding, x, scale, zero_point, key)


# --------------------------------------------------------------------------
# LSQ.
# --------------------------------------------------------------------------


def lsq_grad_scale(n: int, fmt: Format) -> float:
  """LSQ's step-size gradient scale ``1 / sqrt(N * Qp)``.

  Args:
    n: number of elements that share one step.
    fmt: the format; ``Qp`` is ``fmt.qmax``.

  Returns:
    The factor as a Python float.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.quant.ste import lsq_grad_scale
    >>> lsq_grad_scale(16, jc.quant.Format(bits=2))
    0.25
  """
  return 1.0 / math.sqrt(n * fmt.qmax)


def lsq_init_step(x: Array, fmt: Format, granularity: Granularity) -> Array:
  """LSQ's initial step ``2 * mean(|x|) / sqrt(Qp)`` per block (never zero).

  The mean is over the finite values of the block.

  Args:
    x: the tensor.
    fmt: a symmetric integer format.
    granularity: which elements share a step.

  Returns:
    float32 steps of shape ``granularity.scale_shape(x.shape)``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> from jaxcompress.quant.ste import lsq_init_step
    >>> lsq_init_step(jnp.array([1.0, -3.0]), jc.quant.Format(bits=2), jc.quant.PerTensor()).tolist()
    [4.0]
  """
  xf = x.astype(jnp.float32)
  finite = jnp.isfinite(xf)
  total = numerics.reduce_blocks(jnp.where(finite, jnp.abs(xf), 0.0), granularity, jnp.sum)
  count = numerics.reduce_blocks(finite.astype(jnp.float32), granularity, jnp.sum)
  mean = total / jnp.maximum(count, 1.0)  # of the finite values
  step = 2.0 * mean / jnp.sqrt(jnp.float32(fmt.qmax))
  return jnp.where(step > 0, step, jnp.float32(1.0 / fmt.qmax))


def lsq_fake_quant(
    x: Array,
    step: Array,
    fmt: Format,
    granularity: Granularity,
    *,
    grad_scale: float | None = None,
) -> Array:
  """LSQ fake quantization: ``clip(round(x / s), qmin, qmax) * s``.

  Gradients: with respect to ``x``, 1 inside the range and 0 outside; with
  respect to the step ``s``, ``round(x/s) - x/s`` inside and ``qmin``/``qmax``
  outside, summed over the elements sharing ``s`` and multiplied by
  ``grad_scale``. Non-finite ``x`` pass through (NaN stays NaN, +-inf stays
  +-inf) and add nothing to the step's gradient.

  Args:
    x: the tensor; the output has its dtype.
    step: positive steps of shape ``granularity.scale_shape(x.shape)``.
    fmt: a symmetric integer format.
    granularity: which elements share a step.
    grad_scale: the step-gradient factor; default
      ``lsq_grad_scale(N, fmt)`` with ``N = x.size // step.size``.

  Returns:
    The fake-quantized tensor.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> f = lambda s: jc.quant.lsq_fake_quant(jnp.array([0.25, 9.0]), s, jc.quant.Format(bits=3),
    ...                                       jc.quant.PerTensor(), grad_scale=1.0).sum()
    >>> float(f(jnp.ones((1,)))), jax.grad(f)(jnp.ones((1,))).tolist()
    (3.0, [2.75])
  """
  if fmt.is_float or not fmt.symmetric:
    raise ValueError(
        f"LSQ needs a symmetric integer format, got {fmt!r}; use Format(bits=..., symmetric=True)."
    )
  if grad_scale is None:
    grad_scale = lsq_grad_scale(max(1, math.prod(x.shape) // max(1, math.prod(step.shape))), fmt)
  s = numerics.expand_scale(scale_grad(step.astype(jnp.float32), grad_scale), x.shape, granularity)
  xf = x.astype(jnp.float32)
  finite = jnp.isfinite(xf)
  # Non-finite values are computed as zeros (no NaN reaches the step's
  # gradient) and put back afterwards.
  # Clip before rounding (same value): the clip's kink then sits at qmin/qmax
  # exactly, not on the whole rounding interval of the bounds.
  q = round_ste(jnp.clip(jnp.where(finite, xf, 0.0) / s, fmt.qmin, fmt.qmax))
  return jnp.where(finite, q * s, xf).astype(x.dtype)


# --------------------------------------------------------------------------
# PACT.
# --------------------------------------------------------------------------


def pact_quant(x: Array, alpha: Array, *, bits: int = 8, signed: bool = False) -> Array:
  """PACT: clip activations to a learned bound ``alpha``, then quantize.

  Unsigned (after ReLU): ``y = clip(x, 0, alpha)`` on ``2**bits - 1`` steps of
  ``alpha / (2**bits - 1)``. Signed: ``y = clip(x, -alpha, alpha)`` on the
  symmetric grid ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``. The gradient with
  respect to ``alpha`` is ``1[x >= alpha]`` (``- 1[x <= -alpha]`` when signed),
  with respect to ``x`` it is 1 inside the clip range. Add an L2 penalty on
  ``alpha`` to the loss as the paper does.

  Args:
    x: activations; the output has their dtype.
    alpha: the positive clipping bound (a scalar or broadcastable to ``x``).
    bits: 2 to 8.
    signed: quantize ``[-alpha, alpha]`` instead of ``[0, alpha]``.

  Returns:
    The fake-quantized activations.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> x = jnp.array([-1.0, 0.5, 2.9, 7.0])
    >>> jc.quant.pact_quant(x, jnp.float32(3.0), bits=2).tolist()
    [0.0, 0.0, 3.0, 3.0]
    >>> float(jax.grad(lambda a: jc.quant.pact_quant(x, a, bits=2).sum())(jnp.float32(3.0)))
    1.0
  """
  check_int("pact_quant", "bits", bits, low=2, high=8)
  alpha = jnp.asarray(alpha, jnp.float32)
  xf = x.astype(jnp.float32)
  if signed:
    levels = 2 ** (bits - 1) - 1
    y = jnp.clip(xf, -alpha, alpha)
  else:
    levels = 2**bits - 1
    y = jnp.clip(xf, jnp.zeros_like(alpha), alpha)
  step = jax.lax.stop_gradient(alpha / levels)
  return (round_ste(y / step) * step).astype(x.dtype)


__all__ = [
    "fake_quant_ste",
    "lsq_fake_quant",
    "lsq_grad_scale",
    "lsq_init_step",
    "pact_quant",
    "round_ste",
    "scale_grad",
]

"""SmoothQuant: move activation outliers into the weights before w8a8 quantization.

SmoothQuant (Xiao et al., 2023, "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models"). A few input channels
of a language model's activations are far larger than the rest, so one int8
scale per token wastes most of the grid on them. Dividing each input channel
by a factor ``s_j`` and multiplying the matching kernel row by it leaves the
float layer unchanged,

    x W = (x diag(s)^-1) (diag(s) W) ,

and, with

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(``max|X_j|`` over the calibration tokens, ``max|W_j|`` over the outputs of
input row ``j``), balances the channel's range between the activations and
the weights: ``alpha = 0.5`` splits it evenly, a larger ``alpha`` moves more
of it into the weights. Both maxima are clipped below at ``1e-5``, and so is
``s`` (a channel that is always zero, or a zero kernel row, keeps a finite
scale).

``w8a8_matmul`` simulates the int8 layer the smoothing prepares for: int8
activations with one dynamic scale per token, int8 weights with one scale per
output channel, an int32 product (``jc.quant.int8_dot_general``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

import jaxcompress.quant as jq
from jaxcompress.core.checks import check_number
from jaxcompress.oneshot.common import check_kernel, check_layer

Array = jax.Array

_FLOOR = 1e-5


class Smoothed(NamedTuple):
  """The result of ``smoothquant`` for one kernel.

  Attributes:
    kernel: ``diag(s) W``, shape and dtype of ``W``.
    input_scale: ``s``, float32 ``(in,)``: the kernel's inputs are ``x / s``
      (fold ``1 / s`` into the previous op, e.g. a LayerNorm scale).
  """

  kernel: Array
  input_scale: Array


@functools.partial(jax.jit, static_argnums=(2,))
def _smoothquant(w, x, alpha):
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  w32 = w.astype(jnp.float32)
  act = jnp.maximum(jnp.max(jnp.abs(x2), axis=0), _FLOOR)
  wmax = jnp.maximum(jnp.max(jnp.abs(w32), axis=1), _FLOOR)
  s = jnp.maximum(act**alpha / wmax ** (1.0 - alpha), _FLOOR)
  return Smoothed((w32 * s[:, None]).astype(w.dtype), s)


def smoothquant(w: Array, x: Array, *, alpha: float = 0.5, path: str = "kernel") -> Smoothed:
  """SmoothQuant scales for one kernel ``(in, out)`` from its calibration inputs.

  Args:
    w: the kernel ``(in, out)``, any float dtype.
    x: the layer's calibration inputs ``(..., in)`` (may be sharded over the
      samples; the maxima are reduced under ``jit``).
    alpha: the migration strength, in ``[0, 1]``.
    path: the leaf path, named in error messages.

  Returns:
    ``Smoothed(kernel, input_scale)``: ``x @ w == (x / input_scale) @ kernel``
    up to rounding.

  Raises:
    TypeError: ``w`` or ``x`` is not a float array.
    ValueError: shapes do not fit, NaN/inf in ``w`` or ``x``, or ``alpha``
      outside ``[0, 1]``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> w = jnp.array([[1.0, -1.0], [4.0, 2.0]])
    >>> x = jnp.array([[16.0, 1.0], [-4.0, 0.5]])
    >>> sm = jc.oneshot.smoothquant(w, x, alpha=0.5)
    >>> sm.input_scale.tolist(), sm.kernel.tolist()
    ([4.0, 0.5], [[4.0, -4.0], [2.0, 1.0]])
  """
  check_layer("smoothquant", w, x, path)
  alpha = check_number(f"{path}: smoothquant", "alpha", alpha, low=0, high=1)
  return _smoothquant(w, x, alpha)


def w8a8_matmul(
    x: Array, kernel: Array, *, input_scale: Array | None = None, path: str = "kernel"
) -> Array:
  """``x @ kernel`` with int8 activations and weights: a w8a8 layer, simulated.

  The inputs (divided by ``input_scale`` first, when given) get one absmax
  scale per token (each row of ``x`` over its last axis), the kernel one per
  output channel; both are rounded to ``[-127, 127]`` and multiplied with
  int32 accumulation (``jc.quant.int8_dot_general``). Compare
  ``w8a8_matmul(x, w)`` (naive) with
  ``w8a8_matmul(x, sm.kernel, input_scale=sm.input_scale)`` (smoothed).

  Args:
    x: inputs ``(..., in)``, float.
    kernel: ``(in, out)``, float.
    input_scale: optional ``(in,)`` divisor of the inputs (``Smoothed.input_scale``).
    path: the leaf path, named in error messages.

  Returns:
    ``(..., out)`` in the dtype of ``x @ kernel``.

  Raises:
    TypeError: ``x`` or ``kernel`` is not a float array.
    ValueError: shapes do not fit, or NaN/inf in ``kernel``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> x = jnp.array([[127.0, 1.0]])
    >>> jc.oneshot.w8a8_matmul(x, jnp.array([[1.0], [1.0]])).tolist()
    [[128.0]]
  """
  check_kernel("w8a8_matmul", kernel, path)
  if not hasattr(x, "shape") or x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
    raise ValueError(
        f"{path}: w8a8_matmul: inputs of shape {getattr(x, 'shape', None)} do not fit the kernel "
        f"{tuple(kernel.shape)}; their last axis must be the kernel's input size {kernel.shape[0]}."
    )
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{path}: w8a8_matmul: inputs have dtype {x.dtype}; cast them to a float dtype.")
  if input_scale is not None:
    if tuple(jnp.shape(input_scale)) != (kernel.shape[0],):
      raise ValueError(
          f"{path}: w8a8_matmul: input_scale of shape {tuple(jnp.shape(input_scale))} must be "
          f"({kernel.shape[0]},), one divisor per input channel (Smoothed.input_scale)."
      )
  return _w8a8(x, kernel, input_scale)


@jax.jit
def _w8a8(x, kernel, input_scale):
  if input_scale is not None:
    x = (x / input_scale).astype(x.dtype)
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  return jq.int8_dot_general()(x, kernel, dims)


__all__ = ["Smoothed", "smoothquant", "w8a8_matmul"]

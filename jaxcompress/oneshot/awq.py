"""AWQ: activation-aware weight quantization of a layer.

AWQ (Lin et al., 2024, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration") protects the weights that multiply large
activations by scaling them up before round-to-nearest quantization, and the
inputs down by the same factor, which leaves the float layer unchanged:

    x W = (x / s) (diag(s) W)  ~  (x / s) Q(diag(s) W) .

The per-input-channel scales come from the mean activation magnitude over the
calibration tokens, ``s = mean|x|^a`` (clipped below at ``1e-4``, then divided
by ``sqrt(max(s) * min(s))``, which changes no result: group-wise RTN is
invariant to a common factor), and the exponent ``a`` is searched over
``grid`` evenly spaced points of ``[0, 1]`` for the one that minimizes the
layer's output error on the calibration inputs,

    a* = argmin_a || x W - (x / s_a) Q(diag(s_a) W) ||^2 ,

with ``Q`` group-wise round to nearest (``group_size`` input rows per scale,
asymmetric min/max ranges by default, as the paper). ``a = 0`` is plain RTN,
so the error on the calibration inputs is never above RTN's. The error is
computed from the Gram matrix ``X^T X`` (``jaxcompress.quant.ptq.hessian``),
never from the ``(tokens, out)`` outputs.

With ``clip=True``, the paper's weight clipping search follows: for each group
and output, the quantization range is shrunk by a ratio in ``1.0, 0.95, ...,
0.5``, chosen to minimize that group's contribution to the output error,
``d^T H_gg d`` (``d`` the group's quantization error in the scaled space,
``H_gg`` the group's diagonal block of the scaled inputs' Gram matrix).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxcompress.quant as jq
from jaxcompress.core.checks import check_int
from jaxcompress.oneshot.common import check_layer
from jaxcompress.quant import numerics
from jaxcompress.quant.ptq import hessian

Array = jax.Array

CLIP_RATIOS = tuple(1.0 - 0.05 * k for k in range(11))  # 1.0 down to 0.5


class AWQResult(NamedTuple):
  """The result of ``awq`` for one kernel.

  Attributes:
    kernel: ``Q(diag(s) W) / s[:, None]``, a float kernel with the shape and
      dtype of ``W``, usable in place of it (``x @ kernel``).
    input_scale: ``s``, float32 ``(in,)``: the inputs of the quantized kernel
      are ``x / s`` (fold ``1 / s`` into the previous op, e.g. a LayerNorm
      scale, and use ``quantized`` as the kernel).
    quantized: the ``jc.quant.QArray`` of ``diag(s) W`` (its ``dtype`` that of
      ``W``).
  """

  kernel: Array
  input_scale: Array
  quantized: jq.QArray


def _ranges(ws: Array, gran: jq.Granularity) -> tuple[Array, Array]:
  return numerics.reduce_blocks(ws, gran, jnp.min), numerics.reduce_blocks(ws, gran, jnp.max)


def _fake_quant(ws, lo, hi, fmt, gran):
  scale, zp = jq.scale_from_range(lo, hi, fmt)
  return jq.fake_quant(ws, fmt, gran, scale=scale, zero_point=zp)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _awq(w, x, fmt, gran, groups, grid, clip):
  with jax.default_matmul_precision("highest"):
    n_in, n_out = w.shape
    x2 = x.reshape(-1, n_in)
    act = jnp.mean(jnp.abs(x2.astype(jnp.float32)), axis=0)
    h = hessian(x2)
    w32 = w.astype(jnp.float32)

    def scales(a):
      s = jnp.maximum(act**a, 1e-4)
      return s / jnp.sqrt(jnp.max(s) * jnp.min(s))

    def out_err(a):
      s = scales(a)
      ws = w32 * s[:, None]
      d = w32 - _fake_quant(ws, *_ranges(ws, gran), fmt, gran) / s[:, None]
      return jnp.sum(d * (h @ d))

    alphas = jnp.asarray(np.linspace(0.0, 1.0, grid), jnp.float32)
    errs = jax.lax.map(out_err, alphas)
    s = scales(alphas[jnp.argmin(errs)])
    ws = w32 * s[:, None]
    lo, hi = _ranges(ws, gran)
    if clip:
      g = n_in // groups
      hs = h / (s[:, None] * s[None, :])  # the Gram matrix of the scaled inputs x / s
      idx = np.arange(groups)
      hb = hs.reshape(groups, g, groups, g)[idx, :, idx, :]  # (groups, g, g) diagonal blocks

      def clip_err(r):
        d = (ws - _fake_quant(ws, lo * r, hi * r, fmt, gran)).reshape(groups, g, n_out)
        return jnp.einsum("kio,kij,kjo->ko", d, hb, d)

      ratios = jnp.asarray(CLIP_RATIOS, jnp.float32)
      best = ratios[jnp.argmin(jax.lax.map(clip_err, ratios), axis=0)]  # (groups, out)
      lo, hi = lo * best, hi * best
    scale, zp = jq.scale_from_range(lo, hi, fmt)
    q = jq.quantize(ws, fmt, gran, scale=scale, zero_point=zp)
    kernel = jq.dequantize(q) / s[:, None]
    q = dataclasses.replace(q, dtype=np.dtype(w.dtype))
    return AWQResult(kernel.astype(w.dtype), s, q)


def awq(
    w: Array,
    x: Array,
    *,
    bits: int = 4,
    group_size: int | None = 128,
    grid: int = 20,
    symmetric: bool = False,
    clip: bool = False,
    path: str = "kernel",
) -> AWQResult:
  """AWQ-quantizes one kernel ``(in, out)`` from its calibration inputs.

  See the module docstring for the search.

  Args:
    w: the kernel ``(in, out)``, any float dtype (computed in float32).
    x: the layer's calibration inputs ``(..., in)`` (may be sharded over the
      samples; the statistics are reduced under ``jit``).
    bits: integer width, 2 to 8.
    group_size: input rows per scale (must divide ``in``), or ``None`` for one
      scale per output (``PerChannel()``).
    grid: how many exponents ``a`` are tried, evenly spaced over ``[0, 1]``
      (``np.linspace(0, 1, grid)``; ``grid=1`` tries ``a = 0`` only: RTN).
    symmetric: symmetric absmax grid instead of the asymmetric min/max one.
    clip: also search a clipping ratio of each group's range (see the module
      docstring).
    path: the leaf path, named in error messages.

  Returns:
    ``AWQResult(kernel, input_scale, quantized)``.

  Raises:
    TypeError: ``w`` or ``x`` is not a float array.
    ValueError: shapes do not fit, NaN/inf in ``w`` or ``x``, or an invalid
      setting.

  Example:
    >>> import jax, jaxcompress as jc
    >>> w = jax.random.normal(jax.random.key(0), (16, 4))
    >>> x = jax.random.normal(jax.random.key(1), (32, 16))
    >>> r = jc.oneshot.awq(w, x, bits=4, group_size=8, grid=3)
    >>> r.kernel.shape, r.input_scale.shape, r.quantized.scale.shape
    ((16, 4), (16,), (2, 4))
  """
  check_layer("awq", w, x, path)
  where = f"{path}: awq"
  numerics.check_format_fields(where, dtype="int", bits=bits, symmetric=symmetric, narrow_range=False)
  fmt = jq.Format(bits=int(bits), symmetric=bool(symmetric))
  n_in = w.shape[0]
  if group_size is None:
    gran, groups = jq.PerChannel(), 1
  else:
    check_int(where, "group_size", group_size, low=1)
    gran = jq.PerGroup(size=int(group_size), axis=0)
    numerics.check(fmt, gran, tuple(w.shape), path)
    groups = n_in // int(group_size)
  grid = check_int(where, "grid", grid, low=1)
  if not isinstance(clip, (bool, np.bool_)):
    raise TypeError(f"{where}: clip must be True or False, got {clip!r}.")
  return _awq(w, x, fmt, gran, groups, grid, bool(clip))


__all__ = ["AWQResult", "CLIP_RATIOS", "awq"]

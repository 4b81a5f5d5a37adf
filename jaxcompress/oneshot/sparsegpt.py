"""SparseGPT: one-shot pruning of a layer with error compensation (optionally quantized).

SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can
Be Accurately Pruned in One-Shot") prunes a Dense kernel ``W (in, out)`` so
that the layer's output on calibration inputs ``X`` changes least,
``min ||X W - X W'||^2``, by optimal brain surgeon (OBS) updates taken one
input row at a time. With the Hessian of that error

    H = 2 X^T X / n + damp * mean(diag) * I

and the upper Cholesky factor ``U`` of ``H^-1`` (so ``U[i, i]^2`` is the
diagonal entry of the inverse Hessian restricted to rows ``i, ..., in - 1``),
the rows are visited in order; row ``i`` is replaced by its pruned (and, with
``bits``, fake-quantized) version ``q_i``, and its error, divided by
``U[i, i]``, is pushed onto the rows not yet visited:

    W[j] -= U[i, j] * (W[i] - q_i) / U[i, i]        for j > i.

The mask is chosen as the rows are reached, by the OBS saliency of each weight,

    s_ij = W_ij^2 / U[i, i]^2 ,

on the weights as updated so far ("adaptive mask selection"):

- unstructured: at the start of each block of ``block_size`` rows, the block
  keeps its ``round((1 - sparsity) * block_size * out)`` most salient weights
  (compared across the whole block);
- N:M: at every ``m``-th row, each output keeps the ``n`` most salient of the
  next ``m`` rows.

Updates within a block run row by row; the block's accumulated errors reach the
later rows in one matrix product ("lazy batch" updates, as in GPTQ). With
``bits``, the kept weights are rounded to an integer grid as they are visited
(joint sparsification and quantization): pruned weights are exactly 0, which
every grid holds, and the quantization errors are compensated like the
pruning errors. Scales are those of ``jc.quant.gptq``: per output (or per
tensor) from the whole kernel, or per group of input rows from the group's
weights as updated when the group is reached (pruned ones included).

Inputs whose calibration activations are all zero (``H_ii = 0``) carry no
information: their weights are set to 0 (and pruned first), as GPTQ does.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

import jaxcompress.quant as jq
from jaxcompress.core.checks import check_int, check_number, error_if
from jaxcompress.oneshot.common import Pruned, check_layer, check_pattern, keep_count, nm_mask, topk_mask
from jaxcompress.quant import numerics
from jaxcompress.quant.ptq import hessian

Array = jax.Array


def _largest_divisor(n: int, most: int) -> int:
  return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


def _upper_inverse_cholesky(h: Array, damp: float) -> tuple[Array, Array]:
  """``(U, dead)``: the upper Cholesky factor of the dampened ``H^-1``, and the dead inputs."""
  n = h.shape[0]
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(n, dtype=jnp.float32)
  chol = jnp.linalg.cholesky(h)
  h_inv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(n, dtype=jnp.float32))
  return jnp.linalg.cholesky(h_inv).T, dead


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _sparsegpt(w, x, keep_block, n_m, block, damp, fmt, granularity):
  with jax.default_matmul_precision("highest"):
    return _sparsegpt_body(w, x, keep_block, n_m, block, damp, fmt, granularity)


def _sparsegpt_body(w, x, keep_block, n_m, block, damp, fmt, granularity):
  n_in, n_out = w.shape
  u, dead = _upper_inverse_cholesky(hessian(x), damp)
  w32 = jnp.where(dead[:, None], 0.0, w.astype(jnp.float32))

  group = granularity.size if isinstance(granularity, jq.PerGroup) else None
  row_gran = jq.PerChannel()
  asym = fmt is not None and not fmt.symmetric
  if fmt is not None and group is None:  # one set of scales, from the whole kernel
    s0, z0 = jq.compute_scale(w32, fmt, granularity)
    s0 = jnp.broadcast_to(s0, (1, n_out))
    z0 = jnp.broadcast_to(z0.astype(jnp.float32), (1, n_out)) if asym else None
  else:
    s0 = jnp.ones((1, n_out), jnp.float32)
    z0 = jnp.zeros((1, n_out), jnp.float32) if asym else None

  rows = jnp.arange(block)
  cols = jnp.arange(n_in)

  def block_step(b, carry):
    w, q, mask, s, z = carry
    start = b * block
    w1 = jax.lax.dynamic_slice(w, (start, 0), (block, n_out))
    u1 = jax.lax.dynamic_slice(u, (start, start), (block, block))
    d = jnp.diag(u1)
    if keep_block is not None:
      m1 = topk_mask(((w1 / d[:, None]) ** 2).reshape(-1), keep_block).reshape(block, n_out)
    else:
      m1 = jnp.zeros((block, n_out), jnp.bool_)

    def row_step(i, c):
      w1, m1, q1, e1, s, z = c
      if n_m is not None:
        n, m = n_m

        def pick(m1):
          seg = jax.lax.dynamic_slice(w1, (i, 0), (m, n_out))
          dseg = jax.lax.dynamic_slice(d, (i,), (m,))
          return jax.lax.dynamic_update_slice(m1, nm_mask((seg / dseg[:, None]) ** 2, n, m), (i, 0))

        m1 = jax.lax.cond(i % m == 0, pick, lambda m1: m1, m1)
      if group is not None:

        def rescale(sz):
          seg = jax.lax.dynamic_slice(w1, (i, 0), (group, n_out))
          s1, z1 = jq.compute_scale(seg, fmt, row_gran)
          return s1, (z1.astype(jnp.float32) if asym else None)

        s, z = jax.lax.cond(i % group == 0, rescale, lambda sz: sz, (s, z))
      wi = w1[i]
      qi = wi if fmt is None else jq.fake_quant(wi[None], fmt, row_gran, scale=s, zero_point=z)[0]
      qi = jnp.where(m1[i], qi, 0.0)
      err = (wi - qi) / u1[i, i]
      coef = jnp.where(rows > i, u1[i], 0.0)
      w1 = w1 - coef[:, None] * err[None, :]
      return w1, m1, q1.at[i].set(qi), e1.at[i].set(err), s, z

    zeros = jnp.zeros((block, n_out), jnp.float32)
    _, m1, q1, e1, s, z = jax.lax.fori_loop(0, block, row_step, (w1, m1, zeros, zeros, s, z))
    q = jax.lax.dynamic_update_slice(q, q1, (start, 0))
    mask = jax.lax.dynamic_update_slice(mask, m1, (start, 0))
    u_rows = jax.lax.dynamic_slice(u, (start, 0), (block, n_in))
    u_rows = jnp.where(cols[None, :] >= start + block, u_rows, 0.0)
    w = w - u_rows.T @ e1
    return w, q, mask, s, z

  q = jnp.zeros((n_in, n_out), jnp.float32)
  mask = jnp.zeros((n_in, n_out), jnp.bool_)
  _, q, mask, _, _ = jax.lax.fori_loop(0, n_in // block, block_step, (w32, q, mask, s0, z0))
  return Pruned(q.astype(w.dtype), mask)


def _check_quant(bits, symmetric, granularity, shape, path):
  where = f"{path}: sparsegpt"
  if bits is None:
    if granularity is not None:
      raise ValueError(
          f"{where}: granularity={granularity!r} is given without bits=; granularity sets the "
          "scales of joint quantization: pass bits= too (e.g. bits=4), or drop granularity."
      )
    return None, None
  numerics.check_format_fields(where, dtype="int", bits=bits, symmetric=symmetric, narrow_range=False)
  fmt = jq.Format(bits=int(bits), symmetric=bool(symmetric))
  granularity = jq.PerChannel() if granularity is None else granularity
  numerics.check(fmt, granularity, tuple(shape), path)
  ok = (
      isinstance(granularity, jq.PerTensor)
      or (isinstance(granularity, jq.PerChannel) and granularity.axis in (-1, 1, (-1,), (1,)))
      or (isinstance(granularity, jq.PerGroup) and granularity.axis in (0, -2))
  )
  if not ok:
    raise ValueError(
        f"{where}: the kernel's input rows are quantized one by one, so scales must be shared "
        f"along the input axis; got granularity={granularity!r}. Use PerTensor(), "
        "PerChannel(axis=-1) or PerGroup(size=..., axis=0)."
    )
  return fmt, granularity


def sparsegpt(
    w: Array,
    x: Array,
    *,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    bits: int | None = None,
    granularity: jq.Granularity | None = None,
    symmetric: bool = True,
    path: str = "kernel",
) -> Pruned:
  """SparseGPT-prunes one kernel ``(in, out)`` from its calibration inputs.

  See the module docstring for the algorithm.

  Args:
    w: the kernel ``(in, out)``, any float dtype (computed in float32).
    x: the layer's calibration inputs ``(..., in)`` (may be sharded over the
      samples; the Hessian is reduced under ``jit``).
    sparsity: the fraction of weights removed, in ``[0, 1)``: each block of
      ``block`` input rows keeps ``round((1 - sparsity) * block * out)``.
    n_m: ``(n, m)`` instead of ``sparsity``: each output keeps ``n`` of every
      ``m`` consecutive inputs.
    block_size: rows per block (mask selection and lazy updates). The block
      used is the largest divisor of ``in`` not above ``block_size`` that is a
      multiple of ``m`` and of the quantization group size (when given).
    damp: dampening, a fraction of the mean diagonal of ``H`` added to it.
    bits: ``None``, or an integer width (2 to 8) for joint quantization: kept
      weights are rounded to the grid as the rows are visited.
    granularity: with ``bits``: ``PerChannel()`` (default), ``PerTensor()`` or
      ``PerGroup(size=g, axis=0)``.
    symmetric: with ``bits``: symmetric grid (default, as ``jc.quant.gptq``),
      or asymmetric with a zero point.
    path: the leaf path, named in error messages.

  Returns:
    ``Pruned(kernel, mask)``: the updated kernel (shape and dtype of ``w``),
    exactly 0 where ``mask`` is False and, with ``bits``, on the quantization
    grid where it is True.

  Raises:
    TypeError: ``w`` or ``x`` is not a float array.
    ValueError: shapes do not fit, NaN/inf in ``w`` or ``x``, an invalid
      setting, or a Hessian too singular for ``damp`` (a non-finite result;
      at run time under ``jit``).

  Example:
    >>> import jax, jaxcompress as jc
    >>> w = jax.random.normal(jax.random.key(0), (16, 4))
    >>> x = jax.random.normal(jax.random.key(1), (64, 16))
    >>> p = jc.oneshot.sparsegpt(w, x, sparsity=0.5, bits=4, block_size=8)
    >>> int(p.mask.sum()), bool((p.kernel[~p.mask] == 0).all())
    (32, True)
  """
  check_layer("sparsegpt", w, x, path)
  sparsity, n_m = check_pattern("sparsegpt", sparsity, n_m, w.shape[0], path)
  damp = check_number(f"{path}: sparsegpt", "damp", damp, low=0)
  block_size = check_int(f"{path}: sparsegpt", "block_size", block_size, low=1)
  fmt, granularity = _check_quant(bits, symmetric, granularity, w.shape, path)
  n_in, n_out = w.shape
  unit = math.lcm(n_m[1] if n_m else 1, granularity.size if isinstance(granularity, jq.PerGroup) else 1)
  block = unit * _largest_divisor(n_in // unit, max(block_size, unit) // unit)
  keep_block = None if sparsity is None else keep_count(sparsity, block * n_out)
  out = _sparsegpt(w, x, keep_block, n_m, block, damp, fmt, granularity)
  error_if(
      ~jnp.all(jnp.isfinite(out.kernel)),
      f"{path}: sparsegpt: the dampened Hessian 2 X^T X / n + damp * mean(diag(H)) * I is not "
      f"positive definite in float32 (damp={damp}), so the result is not finite; raise damp "
      "(e.g. 0.01) or give more calibration samples than the kernel has inputs.",
  )
  return out


__all__ = ["sparsegpt"]

"""A Pallas GPU kernel for weight-only products from the integer codes of an ``IntKernel``.

``pallas_matmul(x, kernel)`` computes ``x @ W`` (``W`` the dequantized
``(in, out)`` kernel) in the input's dtype with float32 accumulation, reading
the codes as ``IntKernel`` stores them: no copy of the weights is made, in
float or in int8. It is written for the Triton lowering of
``jax.experimental.pallas`` (NVIDIA H100/H200) and runs on CPU in Pallas's
interpreter (``interpret=True``), where the tests check it; it has not been
timed on a GPU. ``compressed_matmul(..., impl="pallas")`` uses it; the XLA
path (``impl="xla"``) stays the default everywhere.

The four layouts are read as one: int8 codes per channel, ``(out, in)``, are
viewed as one block of ``out`` rows and one group of ``in`` inputs,
``(1, 1, out, in)``; the blocked layouts are ``(nb, G, b, gs)`` int8 codes or
``(nb, G, b/2, gs)`` bytes of two int4 codes (rows ``i`` and ``i + b/2`` of a
block in the low and the high nibble), with ``(nb, G, b)`` float32 scales
(per channel: ``G == 1``, ``gs == in``).

The grid is ``(row tiles of x, blocks of output rows, tiles of block_n rows in
a block)``. A program keeps ``(block_m, block_n)`` float32 accumulators (two
for int4: the low and the high nibbles of the same bytes, so each byte is
loaded once and each tile of ``x`` serves two dots) and loops over the groups
and, inside a group, over chunks of ``block_k`` inputs: it loads a
``(block_n, block_k)`` tile of codes, unpacks int4 in registers
(``byte << 4`` and ``byte & 0xF0``: each code times 16, the 1/16 being in the
scales), converts the codes to the input's dtype (exact: at most 128 in
magnitude), multiplies with float32 accumulation, and scales each group's sum
by its ``block_n`` scales. Rows past the end of a block (blocks whose row
count no power-of-two tile divides) are masked loads, never read. Block sizes
are powers of two of at least 16 (Triton's ``tl.dot``); ``block_k`` must
divide the group size (per channel: ``in``), and the rows of ``x`` are padded
to ``block_m``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxcompress.core.checks import check_int
from jaxcompress.export.inference import IntKernel, check_inputs

#: The smallest tile side of Triton's ``tl.dot``.
_MIN_BLOCK = 16
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def _pow2_block(name: str, value: Any) -> int:
  v = check_int("pallas_matmul", name, value, low=_MIN_BLOCK, high=4096)
  if v & (v - 1):
    raise ValueError(f"pallas_matmul: {name} must be a power of two (Triton block shapes), got {v}; "
                     f"use {1 << (v.bit_length() - 1)} or {1 << v.bit_length()}.")
  return v


def _largest_pow2_divisor(n: int, cap: int) -> int:
  """The largest power of two that divides ``n`` and is at most ``cap``."""
  d = 1
  while d * 2 <= cap and n % (d * 2) == 0:
    d *= 2
  return d


def _geometry(kernel: IntKernel) -> tuple[jax.Array, jax.Array, int]:
  """``(codes (nb, G, rows, gs), scales (nb, G, b), halves)``: every layout as blocks of groups."""
  n_in, n_out = kernel.shape
  if not kernel.blocked:  # int8 per channel: one block of out rows, one group of in inputs
    return kernel.codes.reshape(1, 1, n_out, n_in), kernel.scale.reshape(1, 1, n_out), 1
  return kernel.codes, kernel.scale, 2 if kernel.bits == 4 else 1


def _kernel(x_ref, c_ref, s_ref, o_ref, *, halves: int, rows: int, block_n: int, block_k: int,
            precision: Any):
  """One ``(block_m, halves, block_n)`` tile of the output; see the module docstring."""
  n_groups, _, group = c_ref.shape
  r0 = pl.program_id(2) * block_n
  chunks = group // block_k
  ragged = rows % block_n != 0  # static: masks only where a tile runs past the block's rows
  row_ids = r0 + lax.broadcasted_iota(jnp.int32, (block_n, block_k), 0)
  scale_ids = r0 + lax.broadcasted_iota(jnp.int32, (block_n,), 0)
  dtype = x_ref.dtype

  def load_codes(g, c0):
    ref = c_ref.at[g, pl.ds(r0, block_n), pl.ds(c0, block_k)]
    return plt.load(ref, mask=row_ids < rows, other=0) if ragged else ref[...]

  def load_scale(g, h):
    ref = s_ref.at[g, pl.ds(h * rows + r0, block_n)]
    return plt.load(ref, mask=scale_ids < rows, other=0.0) if ragged else ref[...]

  def dot(a, w):
    return lax.dot_general(a, w.astype(dtype), (((1,), (1,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)

  def chunk(g, c, sums):
    c0 = c * block_k
    a = x_ref[:, pl.ds(g * group + c0, block_k)]
    w = load_codes(g, c0)
    if halves == 1:
      return (sums[0] + dot(a, w),)
    # Two int4 codes per byte: each half's codes times 16 (the 1/16 is in the scales).
    return sums[0] + dot(a, w << 4), sums[1] + dot(a, w & jnp.int8(-16))

  def group_body(g, acc):
    g = jnp.asarray(g, jnp.int32)  # a traced index, also when there is one group
    zero = tuple(jnp.zeros_like(a) for a in acc)
    sums = lax.fori_loop(0, chunks, functools.partial(chunk, g), zero) if chunks > 1 else chunk(g, 0, zero)
    return tuple(a + s * load_scale(g, h)[None, :] for h, (a, s) in enumerate(zip(acc, sums)))

  acc = tuple(jnp.zeros((x_ref.shape[0], block_n), jnp.float32) for _ in range(halves))
  acc = lax.fori_loop(0, n_groups, group_body, acc) if n_groups > 1 else group_body(0, acc)
  for h, a in enumerate(acc):
    o_ref[:, h, :] = a.astype(o_ref.dtype)


def pallas_matmul(
    x: jax.Array,
    kernel: IntKernel,
    *,
    interpret: bool = False,
    block_m: int | None = None,
    block_n: int = 32,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
) -> jax.Array:
  """``x @ W`` from an ``IntKernel``'s codes with a Pallas (Triton) kernel, weight-only.

  Reads all four stored layouts (int8 or int4, per channel or per group)
  as ``serving_kernel`` builds them; see the module docstring. Runs on a GPU,
  or anywhere in Pallas's interpreter (``interpret=True``, slow: for tests).

  Args:
    x: ``(..., in)`` float32, bfloat16 or float16 inputs.
    kernel: an ``IntKernel`` (from ``serving_kernel`` or ``IntKernel.from_codes``).
    interpret: run in Pallas's interpreter instead of compiling for the GPU.
    block_m: rows of ``x`` per program, a power of two of at least 16
      (``None``: the rows rounded up to a power of two, from 16 to 64).
    block_n: output columns per program, a power of two of at least 16.
    block_k: inputs per step, a power of two of at least 16; lowered to the
      largest power of two that divides the group size (per channel: ``in``).
    num_warps: Triton warps per program (GPU only).
    num_stages: Triton software-pipelining stages (GPU only).

  Returns:
    ``(..., out)`` in ``x``'s dtype, accumulated in float32.

  Example:
    >>> import numpy as np, jaxcompress as jc
    >>> codes = np.arange(-8, 8).reshape(16, 1) * np.ones((1, 2), int)  # (in=16, out=2)
    >>> k = jc.export.IntKernel.from_codes(codes, np.full((1, 2), 0.5), bits=4)
    >>> jc.export.pallas_matmul(np.ones((1, 16), np.float32), k, interpret=True).tolist()
    [[-4.0, -4.0]]
  """
  if not isinstance(kernel, IntKernel):
    raise TypeError(
        f"pallas_matmul: kernel is a {type(kernel).__name__}; pass an IntKernel "
        "(jc.export.serving_kernel of a stored int leaf); other served kernels run with impl='xla'."
    )
  if not interpret and jax.default_backend() != "gpu":
    raise ValueError(
        f"pallas_matmul: the Pallas kernel needs a GPU (jax.default_backend() is "
        f"{jax.default_backend()!r}); pass interpret=True to run it in Pallas's interpreter "
        "(slow; for tests), or use the XLA path (compressed_matmul with impl='xla')."
    )
  x = check_inputs("pallas_matmul", x, kernel)
  n_in, n_out = kernel.shape
  if x.dtype not in _FLOATS:
    raise TypeError(f"pallas_matmul: inputs of dtype {x.dtype}; pass float32, bfloat16 or float16 inputs.")
  block_n = _pow2_block("block_n", block_n)
  block_k = _pow2_block("block_k", block_k)
  check_int("pallas_matmul", "num_warps", num_warps, low=1, high=32)
  check_int("pallas_matmul", "num_stages", num_stages, low=1, high=8)
  codes, scale, halves = _geometry(kernel)
  nb, _, rows, group = codes.shape
  bk = _largest_pow2_divisor(group, block_k)
  if bk < _MIN_BLOCK:
    what = f"group size {group}" if kernel.group is not None else f"{n_in} input features"
    raise ValueError(
        f"pallas_matmul: a ({n_in}, {n_out}) kernel with {what}: no power of two from "
        f"{_MIN_BLOCK} to block_k={block_k} divides it (Triton tiles); use a group size or "
        f"input width that is a multiple of {_MIN_BLOCK}, or serve this kernel with impl='xla'."
    )
  lead = x.shape[:-1]
  x2 = x.reshape(-1, n_in)
  m = x2.shape[0]
  if block_m is None:
    block_m = min(64, max(_MIN_BLOCK, 1 << max(m - 1, 0).bit_length()))
  block_m = _pow2_block("block_m", block_m)
  m_pad = -(-max(m, 1) // block_m) * block_m
  if m_pad != m:
    x2 = jnp.pad(x2, ((0, m_pad - m), (0, 0)))
  tiles = -(-rows // block_n)
  precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else lax.Precision.DEFAULT
  body = functools.partial(_kernel, halves=halves, rows=rows, block_n=block_n, block_k=bk,
                           precision=precision)
  y = pl.pallas_call(
      body,
      out_shape=jax.ShapeDtypeStruct((m_pad, nb, halves, tiles * block_n), x.dtype),
      grid=(m_pad // block_m, nb, tiles),
      in_specs=[
          pl.BlockSpec((block_m, n_in), lambda i, q, t: (i, 0)),
          pl.BlockSpec((None,) + codes.shape[1:], lambda i, q, t: (q, 0, 0, 0)),
          pl.BlockSpec((None,) + scale.shape[1:], lambda i, q, t: (q, 0, 0)),
      ],
      out_specs=pl.BlockSpec((block_m, None, halves, block_n), lambda i, q, t: (i, q, 0, t)),
      interpret=interpret,
      compiler_params=None if interpret else plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name="int4_matmul" if kernel.bits == 4 else "int8_matmul",
  )(x2, codes, scale)
  # Drop the rows past each block's end (tiles that overhang it) and the padding.
  y = y[..., :rows].reshape(m_pad, nb * halves * rows)[:m, :n_out]
  return y.reshape(lead + (n_out,))

"""Post-training weight quantization: round to nearest, and GPTQ.

- ``quantize_params``: every leaf whose path matches ``pattern`` becomes a
  ``QArray`` (round to nearest, scales from a calibrator); ``dequantize_params``
  turns such a tree back into ordinary arrays of the original dtypes.
- ``gptq``: GPTQ (Frantar et al., 2023, "GPTQ: Accurate Post-Training
  Quantization for Generative Pre-trained Transformers") for a Dense kernel
  ``(in, out)`` given calibration inputs ``x (..., in)``. With the Hessian of
  the layer's squared output error ``H = 2 X^T X + damp * mean(diag) * I`` and
  the upper Cholesky factor ``U`` of ``H^-1``, the input rows of the kernel are
  quantized one after the other; the error of row ``i``, divided by
  ``U[i, i]``, is pushed onto the rows not yet quantized through ``U[i, i+1:]``
  (lazy batches of ``block_size`` rows). ``gptq_params`` runs it over a tree.

Both take the block-scaled formats (``dtype="mxfp8_e4m3"``, ``"mxfp8_e5m2"``,
``"mxfp4"``, ``"nvfp4"``; ``jaxcompress.quant.blockscaled``), whose scales come
from each block's largest magnitude by the format's rule rather than from a
calibrator. In GPTQ a block of the format is one lazy batch (32 or 16 input
rows): its scale is taken from the rows as GPTQ has updated them, then the rows
are quantized one by one with the error fed forward; NVFP4's tensor scale is
fixed from the whole kernel first.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.checks import is_int
from jaxcompress.core.paths import parent, path_str
from jaxcompress.quant import blockscaled
from jaxcompress.quant import calibration as _cal
from jaxcompress.quant import numerics
from jaxcompress.quant.numerics import Format, Granularity, PerChannel, PerGroup, PerTensor, QArray

Array = jax.Array
PyTree = Any


def _is_qarray(x: Any) -> bool:
  return isinstance(x, QArray)


def _fmt(where: str, bits: int, dtype: str, symmetric: bool, narrow_range: bool) -> Format:
  numerics.check_format_fields(where, dtype=dtype, bits=bits, symmetric=symmetric,
                               narrow_range=narrow_range)
  return Format(dtype=dtype, bits=bits, symmetric=symmetric, narrow_range=narrow_range)


def _settings(where: str, fmt: Format, granularity: Granularity | None,
              calibration: _cal.Calibrator | None) -> tuple[Granularity, _cal.Calibrator | None]:
  """The granularity and calibrator a format gets (block-scaled formats take no calibrator)."""
  granularity = numerics.default_granularity(fmt) if granularity is None else granularity
  numerics.check_block_granularity(fmt, granularity, where)
  if fmt.is_block_scaled:
    if calibration is not None:
      raise ValueError(
          f"{where}: dtype={fmt.dtype!r} takes each block's scale from the block's largest "
          f"magnitude (the format's rule), got calibration={calibration!r}; drop calibration=."
      )
    return granularity, None
  return granularity, _cal.default_calibrator(fmt) if calibration is None else calibration


def quantize_params(
    params: PyTree,
    *,
    pattern: str = r".*kernel",
    bits: int = 8,
    dtype: str = "int",
    symmetric: bool = True,
    narrow_range: bool = False,
    granularity: Granularity | None = None,
    calibration: _cal.Calibrator | None = None,
) -> PyTree:
  """Weight-only round-to-nearest quantization of a whole params tree.

  Args:
    params: any pytree of arrays (linen params, an NNX ``State``, a dict).
    pattern: a regular expression fully matched against leaf paths
      (``Dense_0/kernel``); the leaves it selects are quantized.
    bits, dtype, symmetric, narrow_range: the format (see ``numerics.Format``);
      ``dtype="mxfp4"`` etc. for a block-scaled format.
    granularity: default ``PerChannel()`` (``PerGroup(size=block_size)`` for a
      block-scaled format).
    calibration: default ``AbsMax()`` (``MinMax()`` when asymmetric); ``MSE()``
      searches clipping ratios. None for block-scaled formats.

  Returns:
    The tree with a ``QArray`` at every selected leaf (other leaves unchanged).
    Scales come from the finite weights; a NaN or +-inf weight that the format
    cannot hold (any, for integers) is a ``ValueError`` naming its leaf path
    (at once for concrete params, at run time under ``jit``).

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, -2.0], [0.5, 4.0]]), "bias": jnp.zeros(2)}}
    >>> q = jc.quant.quantize_params(params, bits=8)
    >>> q["Dense_0"]["kernel"].values.dtype
    dtype('int8')
    >>> w = jc.quant.dequantize_params(q)["Dense_0"]["kernel"]
    >>> [[round(v, 2) for v in row] for row in w.tolist()]
    [[1.0, -2.02], [0.5, 4.0]]
  """
  fmt = _fmt("quantize_params", bits, dtype, symmetric, narrow_range)
  granularity, calibration = _settings("quantize_params", fmt, granularity, calibration)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(p) for p, _ in flat]
  selected = [re.fullmatch(pattern, p) is not None for p in paths]
  if not any(selected):
    shown = ", ".join(repr(p) for p in paths[:20]) + (" ..." if len(paths) > 20 else "")
    raise ValueError(
        f"quantize_params: pattern {pattern!r} matches no leaf; it is a regular expression "
        f"fully matched against leaf paths, which are: {shown}."
    )
  out = []
  for path, (_, leaf), sel in zip(paths, flat, selected):
    if not sel:
      out.append(leaf)
      continue
    _check_float(leaf, path, "quantize_params")
    numerics.check(fmt, granularity, tuple(leaf.shape), path)
    if calibration is None:  # block-scaled: the format's own scales
      out.append(numerics.quantize(leaf, fmt, granularity, path=path))
      continue
    scale, zp = calibration.scale(leaf, fmt, granularity)
    out.append(numerics.quantize(leaf, fmt, granularity, scale=scale, zero_point=zp, path=path))
  return treedef.unflatten(out)


def _check_float(a: Any, path: str, where: str, what: str = "weights") -> None:
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise TypeError(
        f"{where}: {path} has {what} of dtype {a.dtype}; only real floating-point {what} "
        "can be quantized. Narrow the pattern, or cast them to a float dtype."
    )


def dequantize_params(tree: PyTree) -> PyTree:
  """Replaces every ``QArray`` of a tree by its dequantized array.

  Args:
    tree: a tree from ``quantize_params`` / ``gptq_params`` (or any tree).

  Returns:
    The tree of ordinary arrays, each ``QArray`` in its original dtype.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> q = jc.quant.quantize_params({"w": jnp.array([[0.5], [-1.0]], jnp.bfloat16)}, pattern="w")
    >>> jc.quant.dequantize_params(q)["w"].dtype
    dtype(bfloat16)
  """
  return jax.tree_util.tree_map(
      lambda x: numerics.dequantize(x) if _is_qarray(x) else x, tree, is_leaf=_is_qarray
  )


# --------------------------------------------------------------------------
# GPTQ.
# --------------------------------------------------------------------------


def _largest_divisor(n: int, most: int) -> int:
  return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


def _check_gptq(w: Any, x: Any, fmt: Format, granularity: Granularity, path: str) -> None:
  if w.ndim != 2:
    raise ValueError(
        f"{path}: GPTQ takes 2-D Dense kernels (in, out), got shape {tuple(w.shape)}; reshape "
        "the kernel to (in, out) first, or use quantize_params for this leaf."
    )
  if x.shape[-1] != w.shape[0]:
    raise ValueError(
        f"{path}: calibration inputs of shape {tuple(x.shape)} do not match the kernel "
        f"{tuple(w.shape)}; their last axis must be the kernel's input size {w.shape[0]}."
    )
  _check_float(w, path, "gptq", "weights")
  _check_float(x, path, "gptq", "calibration inputs")
  numerics.check(fmt, granularity, tuple(w.shape), path)
  ok = (
      isinstance(granularity, PerTensor)
      or (isinstance(granularity, PerChannel) and granularity.scale_shape((2, 3)) == (1, 3))
      or (isinstance(granularity, PerGroup) and granularity.axis in (0, -2))
  )
  if not ok:
    raise ValueError(
        f"{path}: GPTQ quantizes the kernel's input rows one by one, so scales must be shared "
        f"along the input axis; got {granularity!r}. Use PerTensor(), PerChannel(axis=-1) or "
        "PerGroup(size=..., axis=0)."
    )
  numerics.check_finite(
      w, None, path, what="weight",
      why="cannot be quantized by GPTQ (its error feedback would spread them over their column)",
      fix="replace or mask them first (e.g. jnp.nan_to_num), or leave this kernel unquantized.",
  )
  numerics.check_finite(
      x, None, path, what="calibration input", why="would make the GPTQ Hessian non-finite",
      fix="drop or clean the calibration batches that hold them.",
  )


def hessian(x: Array) -> Array:
  """The GPTQ Hessian ``2 X^T X / n`` of calibration inputs (float32).

  Args:
    x: inputs ``(..., in)``; all leading axes are samples.

  Returns:
    ``(in, in)`` float32.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.quant.ptq import hessian
    >>> hessian(jnp.array([[1.0, 0.0], [1.0, 2.0]])).tolist()
    [[2.0, 2.0], [2.0, 4.0]]
  """
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return 2.0 * (x2.T @ x2) / x2.shape[0]


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _gptq(w, h, fmt, granularity, calibration, damp, block, act_order, tensor_scale):
  n_in, n_out = w.shape
  w = w.astype(jnp.float32)
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  w = jnp.where(dead[:, None], 0.0, w)
  if act_order:
    perm = jnp.argsort(-jnp.diag(h))
    w, h = w[perm], h[perm][:, perm]
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(n_in, dtype=jnp.float32)
  chol = jnp.linalg.cholesky(h)
  h_inv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(n_in, dtype=jnp.float32))
  u = jnp.linalg.cholesky(h_inv).T  # upper: h_inv = u.T @ u

  grouped = isinstance(granularity, PerGroup)
  row_gran = PerChannel(axis=-1) if grouped else granularity
  n_blocks = n_in // block
  if fmt.is_block_scaled:
    # The stored block scales, kept as float32 (exact) and cast back at the end.
    scale = jnp.ones((n_blocks, n_out), jnp.float32)
    zp = None
  elif not grouped:
    scale, zp = calibration.scale(w, fmt, granularity)
  else:
    scale = jnp.zeros((n_blocks, n_out), jnp.float32)
    zp = None if fmt.symmetric else jnp.zeros((n_blocks, n_out), fmt.storage_dtype)
  rows = jnp.arange(block)
  all_rows = jnp.arange(n_in)

  def block_step(b, carry):
    w, q, scale, zp = carry
    start = b * block
    w1 = jax.lax.dynamic_slice(w, (start, 0), (block, n_out))
    u1 = jax.lax.dynamic_slice(u, (start, start), (block, block))
    if fmt.is_block_scaled:
      stored, _ = numerics.block_scales(w1, fmt, PerGroup(size=block, axis=0), tensor_scale=tensor_scale)
      scale = jax.lax.dynamic_update_slice(scale, stored.astype(jnp.float32), (b, 0))
      s1, z1 = blockscaled.decode_scale(stored, tensor_scale), None
    elif grouped:
      s1, z1 = calibration.scale(w1, fmt, row_gran)
      scale = jax.lax.dynamic_update_slice(scale, s1, (b, 0))
      if z1 is not None:
        zp = jax.lax.dynamic_update_slice(zp, z1, (b, 0))
    else:
      s1, z1 = scale, zp
    s1 = s1.reshape(-1) if s1.size > 1 else s1.reshape(())
    z1 = None if z1 is None else (z1.reshape(-1) if z1.size > 1 else z1.reshape(())).astype(jnp.float32)

    def row_step(i, c):
      w1, q1, e1 = c
      wi = w1[i]
      if fmt.is_block_scaled:  # as numerics.quantize and dequantize compute it
        wi = blockscaled.flush_subnormals(wi)
      y = wi / s1 if z1 is None else wi / s1 + z1
      qi = numerics.to_grid(y, fmt)
      deq = (qi if z1 is None else qi - z1) * s1
      if fmt.is_block_scaled:
        deq = blockscaled.flush_subnormals(deq)
      err = (wi - deq) / u1[i, i]
      coef = jnp.where(rows > i, u1[i], 0.0)
      w1 = w1 - coef[:, None] * err[None, :]
      return w1, q1.at[i].set(qi), e1.at[i].set(err)

    zeros = jnp.zeros((block, n_out), jnp.float32)
    _, q1, e1 = jax.lax.fori_loop(0, block, row_step, (w1, zeros, zeros))
    q = jax.lax.dynamic_update_slice(q, q1, (start, 0))
    u_rows = jax.lax.dynamic_slice(u, (start, 0), (block, n_in))
    u_rows = jnp.where(all_rows[None, :] >= start + block, u_rows, 0.0)
    w = w - u_rows.T @ e1
    return w, q, scale, zp

  q = jnp.zeros((n_in, n_out), jnp.float32)
  _, q, scale, zp = jax.lax.fori_loop(0, n_blocks, block_step, (w, q, scale, zp))
  if act_order:
    q = q[jnp.argsort(perm)]
  return q, scale, zp


def gptq(
    w: Array,
    x: Array,
    *,
    bits: int = 4,
    dtype: str = "int",
    symmetric: bool = True,
    narrow_range: bool = False,
    granularity: Granularity | None = None,
    calibration: _cal.Calibrator | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    path: str = "kernel",
) -> QArray:
  """GPTQ-quantizes one Dense kernel ``(in, out)`` from its calibration inputs.

  Args:
    w: the kernel ``(in, out)`` (any float dtype; the ``QArray`` remembers it).
    x: calibration inputs of the layer, ``(..., in)``.
    bits, dtype, symmetric, narrow_range: the format (see ``numerics.Format``);
      ``dtype="mxfp4"``, ``"nvfp4"``, ``"mxfp8_e4m3"`` or ``"mxfp8_e5m2"`` for a
      block-scaled format (its blocks of 32 or 16 input rows are the lazy batches).
    granularity: ``PerChannel()`` (default, one scale per output), ``PerTensor()``
      or ``PerGroup(size=g, axis=0)`` (``g`` input rows per scale; each group's
      scale is taken from the rows as GPTQ has updated them). Block-scaled
      formats: ``PerGroup(size=block_size, axis=0)`` (their default).
    calibration: how scales are chosen from the weights (default ``AbsMax()``,
      ``MinMax()`` when asymmetric); none for block-scaled formats.
    damp: dampening, a fraction of the mean diagonal of ``H`` added to it.
    block_size: rows per lazy batch (the group size when grouped; otherwise the
      largest divisor of ``in`` not above it).
    act_order: quantize rows by decreasing ``diag(H)`` (not with ``PerGroup``).
    path: the leaf path, named in error messages.

  Returns:
    A ``QArray`` holding the quantized kernel.

  Raises:
    TypeError: ``w`` or ``x`` is not of a real floating-point dtype.
    ValueError: ``w`` or ``x`` holds NaN or +-inf (named by ``path``; at run
      time when traced), or a setting is invalid.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> w = jax.random.normal(jax.random.key(0), (32, 8))
    >>> x = jax.random.normal(jax.random.key(1), (256, 32))
    >>> q = jc.quant.gptq(w, x, bits=4)
    >>> q.values.dtype, q.scale.shape
    (dtype(int4), (1, 8))
  """
  fmt = _fmt("gptq", bits, dtype, symmetric, narrow_range)
  granularity, calibration = _settings("gptq", fmt, granularity, calibration)
  _check_gptq(w, x, fmt, granularity, path)
  if not 0.0 <= damp:
    raise ValueError(f"{path}: damp={damp!r} must be >= 0 (a fraction of mean(diag(H)), e.g. 0.01).")
  if isinstance(granularity, PerGroup):
    if act_order:
      raise ValueError(
          f"{path}: act_order=True reorders input rows, which breaks contiguous groups of "
          f"{granularity!r}; use act_order=False with PerGroup, or PerChannel()."
      )
    block = granularity.size
  else:
    if not is_int(block_size) or block_size < 1:
      raise ValueError(f"{path}: block_size={block_size!r} must be a positive int, e.g. 128.")
    block = _largest_divisor(w.shape[0], block_size)
  tensor_scale = None
  if fmt.is_block_scaled and fmt.block.tensor_scale:  # NVFP4: from the whole kernel, first
    _, tensor_scale = numerics.block_scales(w, fmt, granularity)
  q, scale, zp = _gptq(
      w, hessian(x), fmt, granularity, calibration, float(damp), block, bool(act_order), tensor_scale
  )
  zp = None if zp is None else zp.astype(fmt.storage_dtype)
  scale = scale.astype(fmt.scale_dtype)
  return QArray(q.astype(fmt.storage_dtype), scale, zp, fmt, granularity, np.dtype(w.dtype),
                tensor_scale)


def gptq_params(
    params: PyTree,
    inputs: Mapping[str, Array],
    **kwargs: Any,
) -> PyTree:
  """GPTQ over a params tree: each kernel with calibration inputs becomes a ``QArray``.

  Each layer is quantized from the inputs given for it (collect them from the
  float model, or layer by layer from the partly quantized model).

  Args:
    params: the params pytree.
    inputs: ``{path: x}``: calibration inputs ``(..., in)`` keyed by the kernel's
      leaf path (``Dense_0/kernel``) or its module path (``Dense_0``).
    **kwargs: any ``gptq`` argument except ``path``.

  Returns:
    The tree with a ``QArray`` at every kernel that has inputs.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (16, 4)),
    ...                       "bias": jnp.zeros(4)}}
    >>> x = jax.random.normal(jax.random.key(1), (64, 16))
    >>> q = jc.quant.gptq_params(params, {"Dense_0": x}, bits=4)
    >>> type(q["Dense_0"]["kernel"]).__name__, type(q["Dense_0"]["bias"]).__name__
    ('QArray', 'ArrayImpl')
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(p) for p, _ in flat]
  used = set()
  out = []
  for path, (_, leaf) in zip(paths, flat):
    key = path if path in inputs else (parent(path) if parent(path) in inputs and leaf.ndim == 2 else None)
    if key is None:
      out.append(leaf)
      continue
    used.add(key)
    out.append(gptq(leaf, inputs[key], path=path, **kwargs))
  unused = sorted(set(inputs) - used)
  if unused:
    shown = ", ".join(repr(p) for p in paths[:20]) + (" ..." if len(paths) > 20 else "")
    raise ValueError(
        f"gptq_params: inputs given for {unused}, which name no 2-D kernel; key them by a "
        f"leaf path or its module path. The paths are: {shown}."
    )
  return treedef.unflatten(out)


__all__ = ["dequantize_params", "gptq", "gptq_params", "hessian", "quantize_params"]

"""Compressed inference: Dense layers computed from the stored codes, never from float weights.

``serving_kernel(leaf)`` turns one stored 2-D kernel into a *served kernel*, a
small pytree that holds what the product needs and nothing else:

- ``IntKernel``: symmetric integer codes (``FakeQuant``/``LSQ``, 2 to 8 bits)
  with their float32 scales, per output channel, per tensor or per group of
  the input axis (``PerGroup(size, axis=0)``). Codes of 4 bits and fewer are
  kept two per byte. Pruned kernels (N:M, unstructured) come here too: the
  kept codes are scattered back into dense codes on load (XLA:CPU has no
  sparse matmul unit; the artifact on disk stays packed).
- ``LowRankKernel``: the two factors of an ``SVD`` kernel, each an
  ``IntKernel`` (low-rank then quantize) or a float array: ``(x @ U) @ V``.
- ``CodebookKernel``: a clustered kernel's centroid indices and codebook.

``serving_params(artifact)`` puts them in place of the ``kernel`` leaves of
linen params (every other leaf is decoded); inside ``with compressed_dense():``
every ``nn.Dense`` holding one computes ``compressed_matmul`` (by
``flax.linen.intercept_methods``; the model code is unchanged). For NNX,
``jaxcompress.export.serving_nnx`` swaps ``nnx.Linear`` layers on a copy of the
model.

How the products run on XLA:CPU (measured on a 2-core Xeon with AVX-512 VNNI
and AMX-INT8, 4096-wide layers; ``benchmarks/serve.py``). An int8 x int8 dot
with int32 accumulation is far faster than a float one when the weight is the
dot's *left* operand (it is then read in place); XLA's elementwise loops, on
the other hand, stream bytes several times slower than the dot, so no
formulation may write an unpacked copy of the whole weight per call:

- Activations: weight-only (``activations="float"``) splits each input row
  exactly enough into two int8 limbs, ``x / s_x = hi + lo / 254`` (``hi`` the
  rounded value, ``lo`` its rounded remainder: a relative error below
  ``2**-15`` of the row's absmax, finer than bfloat16), and both limbs go
  through one int8 dot: ``out = (acc_hi + acc_lo / 254) * s_x``; w8a8
  (``activations="int8"``) keeps ``hi`` only (one scale per row, absmax / 127).
  Rows are padded to a multiple of 4 (the int8 kernels' tile), except for
  per-group products (batched over the groups, where padding measured slower).
- int8 codes per channel or tensor: one int8 dot on the ``(out, in)`` codes.
- Everything else runs *block by block*: a ``lax.scan`` over blocks of output
  rows (at least 128 rows, about 2 MiB of int8 codes; 1 MiB for per-group
  codes) unpacks a block while it is in cache and multiplies it at once
  (unpacking the whole kernel first costs 2-3 float matmuls at batch 1). int4 codes pack rows ``i`` and
  ``i + b/2`` of a block of ``b`` rows into the low and high nibbles of a
  byte; ``byte << 4`` and ``byte & 0xF0`` give each half's codes times 16
  (the 1/16 is folded into the scales): two elementwise byte operations, no
  concatenation, and each half is one int8 dot. (Viewing 4 bytes as an int32
  word to mask 4 at a time measured 2x slower: XLA turns the int32 -> int8
  bitcast into a shift per byte.)
- Per-group scales: each block is one batched int8 dot over the groups, whose
  int32 sums are scaled and summed over the groups by one float dot. From
  ``_FLOAT_ROWS`` input rows on (weight-only), scaling those sums costs more than a float product, so
  each block is dequantized to float32 in cache and multiplied in float32.
- Codebooks: each block of indices is gathered into float32 in cache and
  multiplied in float32 (exact; int8 limbs of the codebook measured slower:
  two gathers per block).

On other backends (GPU), weight-only products dequantize the kernel inside
the jitted function and multiply in the input's dtype, which XLA fuses; w8a8
runs the int8 formulations above. These have not been timed on a GPU.
``impl="pallas"`` (opt-in; ``compressed_matmul``, ``compressed_dense``,
``serving_nnx``) multiplies integer codes with a Pallas GPU kernel instead
(``jaxcompress/export/pallas.py``; not timed on a GPU either).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcompress.export import arrays as _arrays
from jaxcompress.export import artifact as _art
from jaxcompress.export import encodings as _enc
from jaxcompress.quant import numerics as _num

PyTree = Any
_ACTIVATIONS = ("float", "int8")
_IMPLS = ("xla", "pallas")
_PAD = 4
#: Target bytes of unpacked int8 codes per block of the blocked formulations (in L2).
_BLOCK_BYTES = 2 << 20
#: The same for per-group int codes: smaller blocks measured faster at batch 1-4
#: (4096 -> 16384 -> 4096 int4 g128 MLP: 1.04-1.09x float at batch 1 against
#: 0.82-0.92x with 2 MiB blocks; batch 16 and 256 within noise).
_GROUP_BLOCK_BYTES = 1 << 20
#: The fewest rows per block (fewer make the int8 dots of a block inefficient).
_MIN_ROWS = 128
#: From this many input rows on, weight-only per-group products dequantize each
#: block to float32 instead of scaling per-group int32 sums.
_FLOAT_ROWS = 64
#: int32 sums of int8 codes times int8 activations stay exact up to this many terms.
_MAX_TERMS = (2**31 - 1) // (128 * 127)
_HIGH_NIBBLE = np.int8(-16)  # 0xF0


def _static(**kwargs) -> Any:
  return dataclasses.field(metadata={"static": True}, **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IntKernel:
  """A ``(in, out)`` kernel as symmetric integer codes and float32 scales.

  Built by ``serving_kernel`` from a stored leaf; used by ``compressed_matmul``.

  Attributes:
    codes: int8 ``(out, in)`` codes for int8 codes per channel (``group`` is
      ``None``); otherwise int8 blocks of ``b`` output rows, ``(nb, G, b, gs)``
      (``bits == 8``) or ``(nb, G, b/2, gs)`` bytes of two 4-bit codes
      (``bits == 4``: rows ``i`` and ``i + b/2`` of a block in the low and high
      nibbles). ``G`` is the number of groups of ``gs`` inputs (1 per
      channel); ``nb * b`` is ``out`` rounded up.
    scale: float32 ``(out,)`` for int8 per channel; otherwise ``(nb, G, b)``,
      divided by 16 for ``bits == 4`` (the unpacked codes are 16 times the codes).
    shape: ``(in, out)``.
    bits: 8 or 4, the stored width.
    group: the group size along ``in``, or ``None`` (one scale per channel).

  Example:
    >>> import numpy as np, jaxcompress as jc
    >>> k = jc.export.IntKernel.from_codes(np.array([[1, -2], [3, 4]]), np.array([[0.5, 1.0]]), bits=8)
    >>> k.codes.shape, k.shape, jc.export.compressed_matmul(np.ones((1, 2)), k).tolist()
    ((2, 2), (2, 2), [[2.0, 2.0]])
  """

  codes: jax.Array
  scale: jax.Array
  shape: tuple[int, int] = _static()
  bits: int = _static()
  group: int | None = _static()

  @property
  def blocked(self) -> bool:
    return not (self.bits == 8 and self.group is None)

  @classmethod
  def from_codes(cls, codes: np.ndarray, scale: np.ndarray, *, bits: int, group: int | None = None) -> "IntKernel":
    """Packs ``(in, out)`` integer codes with ``(G, out)`` scales (``G = in / group``, 1 per channel).

    Args:
      codes: integer codes, ``-128..127`` (``-8..7`` for ``bits <= 4``).
      scale: float32 scales, one row per group (one row per channel).
      bits: the codes' width; 4 and fewer are packed two per byte.
      group: group size along ``in`` (``None``: one scale per output channel).

    Returns:
      The ``IntKernel``.
    """
    codes = np.asarray(codes)
    scale = np.asarray(scale, np.float32)
    if codes.ndim != 2:
      raise ValueError(f"IntKernel.from_codes: codes of shape {codes.shape}; pass (in, out) codes.")
    n_in, n_out = codes.shape
    gs = n_in if group is None else int(group)
    bits = 8 if bits > 4 else 4
    if gs < 1 or n_in % gs or scale.shape != (n_in // gs, n_out):
      raise ValueError(
          f"IntKernel.from_codes: scales of shape {scale.shape} with group={group} do not fit "
          f"({n_in}, {n_out}) codes; pass ({n_in} // group, {n_out}) scales, (1, {n_out}) per channel."
      )
    lo, hi = (-8, 7) if bits == 4 else (-128, 127)
    if codes.size and (codes.min() < lo or codes.max() > hi):
      raise ValueError(
          f"IntKernel.from_codes: codes in [{codes.min()}, {codes.max()}] do not fit bits={bits} "
          f"([{lo}, {hi}])."
      )
    if bits == 8 and group is None:
      return cls(jnp.asarray(np.ascontiguousarray(codes.T, np.int8)), jnp.asarray(scale[0]), (n_in, n_out), 8, None)
    n_groups = n_in // gs
    b = _block_rows(n_in, n_out, _BLOCK_BYTES if group is None else _GROUP_BLOCK_BYTES)
    nb = -(-n_out // b)
    t = np.zeros((nb * b, n_in), np.int8)
    t[:n_out] = codes.T
    blocks = t.reshape(nb, b, n_groups, gs).transpose(0, 2, 1, 3)  # (nb, G, b, gs)
    s = np.zeros((n_groups, nb * b), np.float32)
    s[:, :n_out] = scale
    s = s.reshape(n_groups, nb, b).transpose(1, 0, 2)
    if bits == 4:
      h = b // 2
      lo = blocks[:, :, :h].astype(np.uint8) & 15
      hi = blocks[:, :, h:].astype(np.uint8) & 15
      blocks = (lo | (hi << 4)).view(np.int8)
      s = s / 16.0
    return cls(jnp.asarray(np.ascontiguousarray(blocks)), jnp.asarray(np.ascontiguousarray(s)),
               (n_in, n_out), bits, group)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRankKernel:
  """A ``(in, out)`` kernel as two factors: ``x @ kernel = (x @ u) @ v``.

  Attributes:
    u: ``(in, r)``: an ``IntKernel`` or a float array.
    v: ``(r, out)``: an ``IntKernel`` or a float array.

  Example:
    >>> import numpy as np, jaxcompress as jc
    >>> k = jc.export.LowRankKernel(np.ones((3, 1), np.float32), np.full((1, 2), 2.0, np.float32))
    >>> k.shape, jc.export.compressed_matmul(np.ones((1, 3)), k).tolist()
    ((3, 2), [[6.0, 6.0]])
  """

  u: Any
  v: Any

  @property
  def shape(self) -> tuple[int, int]:
    return (_shape(self.u)[0], _shape(self.v)[1])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CodebookKernel:
  """A clustered ``(in, out)`` kernel: centroid indices and the codebook.

  Attributes:
    indices: ``(nb, b, in)`` blocks of ``b`` output rows, uint8 (int16 for more
      than 255 centroids); index ``k`` (one past the codebook) stands for 0.
    codebook: ``(k + 1,)`` float32 centroids then 0, or per output channel
      ``(nb, b, k + 1)``.
    shape: ``(in, out)``.

  Example:
    >>> import numpy as np, jaxcompress as jc
    >>> book = np.array([-0.5, 0.5, 0.0], np.float32)  # two centroids, then the zero
    >>> k = jc.export.CodebookKernel(np.array([[[0, 1, 2], [1, 1, 0]]], np.uint8), book, (3, 2))
    >>> k.shape  # 2 outputs, 3 inputs: output 0 is (-0.5, 0.5, 0), output 1 is (0.5, 0.5, -0.5)
    (3, 2)
  """

  indices: jax.Array
  codebook: jax.Array
  shape: tuple[int, int] = _static()


ServedKernel = Union[IntKernel, LowRankKernel, CodebookKernel]


def _shape(k: Any) -> tuple[int, ...]:
  return tuple(k.shape)


def _block_rows(n_in: int, n_out: int, budget: int = _BLOCK_BYTES) -> int:
  """Rows per block: a power of two from ``_MIN_ROWS`` to 1024 with at most ``budget`` bytes of codes."""
  b = _MIN_ROWS
  while b < 1024 and 2 * b * n_in <= budget:
    b *= 2
  return min(b, n_out + (-n_out) % 8)


# --------------------------------------------------------------------------
# From the stored leaf.
# --------------------------------------------------------------------------


def _int_kernel(desc: str, buffers: list[np.ndarray], shape: tuple[int, ...]) -> IntKernel | None:
  """The ``IntKernel`` of a symmetric integer quantized 2-D leaf, else ``None``."""
  parts = _enc.quantized_parts(desc, buffers, shape)
  if parts is None or len(shape) != 2:
    return None
  codes, scale, fmt, gran = parts
  if fmt.is_float or not fmt.symmetric:
    return None
  n_in, n_out = shape
  group = None
  if scale.shape == (1, n_out):
    pass
  elif scale.shape == (1, 1):
    scale = np.broadcast_to(scale, (1, n_out))
  elif isinstance(gran, _num.PerGroup) and gran.axis % 2 == 0:
    group = int(gran.size)
  else:
    return None  # scales along the input axis only: decoded to floats
  if (group or n_in) > _MAX_TERMS:
    return None  # int32 sums could overflow
  return IntKernel.from_codes(codes, scale, bits=8 if fmt.bits > 4 else 4, group=group)


def _factor(part: _enc.FactorPart, dtype: str) -> Any:
  """An ``IntKernel`` of one factor of a low-rank leaf, or its float value."""
  k = _int_kernel(part.encoding, part.buffers, part.shape) if len(part.shape) == 2 else None
  return _enc.decode(part.encoding, part.buffers, part.shape, dtype) if k is None else k


def _codebook_kernel(desc: str, buffers: list[np.ndarray], shape: tuple[int, int], dtype: str) -> CodebookKernel | None:
  parts = _enc.codebook_parts(desc, buffers, shape)
  if parts is None or dtype != "float32":
    return None
  book, idx, axis = parts
  if axis not in (None, 1):
    return None  # a codebook per input row: decoded to floats
  k = book.shape[-1]
  n_in, n_out = shape
  idx = np.where(idx < 0, k, idx)  # index k: the appended zero
  b = _block_rows(n_in, n_out)
  nb = -(-n_out // b)
  t = np.full((nb * b, n_in), k, np.uint8 if k < 256 else np.int16)
  t[:n_out] = idx.T
  if axis is None:
    cb = np.append(book.astype(np.float32), np.float32(0))
  else:
    cb = np.zeros((nb * b, k + 1), np.float32)
    cb[:n_out, :k] = book
    cb = cb.reshape(nb, b, k + 1)
  return CodebookKernel(jnp.asarray(t.reshape(nb, b, n_in)), jnp.asarray(cb), (n_in, n_out))


def serving_kernel(leaf: _art.EncodedLeaf) -> ServedKernel | None:
  """The served kernel of a stored 2-D leaf, or ``None`` where the leaf is served as floats.

  Served: symmetric integer codes per channel, tensor or group of inputs
  (after pruning too: the kept codes scattered back into dense codes),
  ``SVD`` factors (each quantized or float), codebooks (float32 leaves).
  Everything else (float8 and block-scaled formats, zero points, plain or
  pruned float leaves, Tucker-2, scales along the input axis) is ``None``.

  Args:
    leaf: an ``EncodedLeaf`` of an artifact.

  Returns:
    An ``IntKernel``, ``LowRankKernel`` or ``CodebookKernel``, or ``None``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=4)])])
    >>> t, s = spec.init({"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)})
    >>> k = jc.export.serving_kernel(jc.export.export(spec, t, s).leaves[0])
    >>> type(k).__name__, k.bits, k.codes.dtype
    ('IntKernel', 4, dtype('int8'))
  """
  if not isinstance(leaf, _art.EncodedLeaf):
    raise TypeError(f"serving_kernel: expected a jc.export.EncodedLeaf, got {type(leaf).__name__}.")
  r = leaf.record
  if len(r.shape) != 2 or r.fallback is not None:
    return None
  buffers = list(leaf.buffers)
  try:
    factors = _enc.factor_parts(r.encoding, buffers, r.dtype)
    if factors is not None:
      kind, parts = factors
      if kind != "svd":
        return None  # Tucker-2: decoded to floats
      return LowRankKernel(_factor(parts[0], r.dtype), _factor(parts[1], r.dtype))
    if r.encoding.startswith("codebook"):
      return _codebook_kernel(r.encoding, buffers, r.shape, r.dtype)
    return _int_kernel(r.encoding, buffers, r.shape)
  except (KeyError, TypeError, IndexError, ValueError) as e:
    raise ValueError(f"leaf {r.path!r} cannot be read, the artifact is corrupted: {e}") from None


def serving_params(artifact: _art.Artifact) -> PyTree:
  """Linen params for ``compressed_dense``: servable kernels as served kernels, the rest as floats.

  Args:
    artifact: from ``export`` or ``load`` (with the model's structure: ``load(path, like=...)``).

  Returns:
    The params tree, where each ``kernel`` leaf that ``serving_kernel`` serves
    is that served kernel (an ``IntKernel``, ``LowRankKernel`` or
    ``CodebookKernel``) and every other leaf its decoded value.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxcompress as jc
    >>> model = nn.Dense(8)
    >>> x = jax.random.normal(jax.random.key(1), (2, 16))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> spec = jc.Spec([jc.Rule("kernel", [jc.quant.FakeQuant(bits=8)])])
    >>> t, s = spec.init(params)
    >>> served = jc.export.serving_params(jc.export.export(spec, t, s))
    >>> type(served["kernel"]).__name__, served["kernel"].codes.dtype
    ('IntKernel', dtype('int8'))
    >>> with jc.export.compressed_dense():
    ...   y = model.apply({"params": served}, x)
    >>> want = model.apply({"params": spec.apply(t, s)}, x)
    >>> bool(jnp.allclose(y, want, rtol=1e-4, atol=1e-4))
    True
  """
  def convert(node: Any) -> Any:
    if isinstance(node, _art.EncodedLeaf):
      return node.decode()
    if isinstance(node, dict):
      out = {}
      for k, v in node.items():
        kernel = serving_kernel(v) if k == "kernel" and isinstance(v, _art.EncodedLeaf) else None
        out[k] = convert(v) if kernel is None else kernel
      return out
    raise TypeError(
        f"serving_params: the artifact's tree holds a {type(node).__name__}; it needs nested "
        "dicts (linen params): load the artifact with like=params, or use "
        "jc.export.serving_nnx for an NNX model."
    )

  if not isinstance(artifact, _art.Artifact):
    raise TypeError(f"serving_params: expected a jc.export.Artifact, got {type(artifact).__name__}.")
  return convert(artifact.tree)


# --------------------------------------------------------------------------
# The products.
# --------------------------------------------------------------------------


def _backend() -> str:
  return jax.default_backend()


def check_activations(where: str, activations: str) -> None:
  """Raises ``ValueError`` naming ``where`` unless ``activations`` is ``"float"`` or ``"int8"``."""
  if activations not in _ACTIVATIONS:
    raise ValueError(f"{where}: activations={activations!r}; use 'float' or 'int8'.")


def check_impl(where: str, impl: str, activations: str, interpret: bool) -> None:
  """Raises ``ValueError`` naming ``where`` unless ``impl`` can run.

  ``"xla"`` always runs; ``"pallas"`` is weight-only and needs a GPU or ``interpret``.
  """
  if impl not in _IMPLS:
    raise ValueError(f"{where}: impl={impl!r}; use 'xla' (the default) or 'pallas' (a Pallas GPU kernel).")
  if impl != "pallas":
    return
  if activations != "float":
    raise ValueError(
        f"{where}: impl='pallas' with activations={activations!r}; the Pallas kernel is weight-only: "
        "use activations='float', or impl='xla' for w8a8."
    )
  if not interpret and _backend() != "gpu":
    raise ValueError(
        f"{where}: impl='pallas' needs a GPU (jax.default_backend() is {_backend()!r}); use impl='xla', "
        "or pass interpret=True to run the kernel in Pallas's interpreter (slow; for tests)."
    )


def _quantize_rows(x2: jax.Array, activations: str, pad: bool = True) -> tuple[jax.Array, jax.Array]:
  """``(q, s_x)``: int8 limbs of the rows (two per row for weight-only), padded to whole tiles."""
  sx = jnp.max(jnp.abs(x2), axis=1, keepdims=True) * (1.0 / 127.0)
  sx = jnp.where(sx > 0, sx, 1.0)
  y = x2 / sx
  hi = jnp.round(y)
  q = hi if activations == "int8" else jnp.concatenate([hi, jnp.round((y - hi) * 254.0)])
  q = q.astype(jnp.int8)
  extra = (-q.shape[0]) % _PAD if pad else 0
  if extra:
    q = jnp.pad(q, ((0, extra), (0, 0)))
  return q, sx


def _combine(acc: jax.Array, rows: int, sx: jax.Array, activations: str) -> jax.Array:
  """Rows of the products of the limbs -> rows of the product, ``(rows, out)``."""
  if activations == "int8":
    return acc[:rows] * sx
  return (acc[:rows] + acc[rows : 2 * rows] * (1.0 / 254.0)) * sx


def _dot_t(w: jax.Array, a: jax.Array, **kwargs) -> jax.Array:
  """``w @ a.T`` with ``w`` the left operand: ``(m, k) x (n, k) -> (m, n)``."""
  return lax.dot_general(w, a, (((1,), (1,)), ((), ())), **kwargs)


def _nibbles(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Bytes of two 4-bit codes -> the low and the high code of each, times 16 (int8, same shape)."""
  return packed << 4, packed & _HIGH_NIBBLE


def _blocks(k: IntKernel | CodebookKernel, part, extra: tuple = ()) -> jax.Array:
  """Runs ``part(block, scale_block)`` over the blocks of output rows; ``(out_padded, n)``."""
  def body(carry, blk):
    if isinstance(k, CodebookKernel):
      return carry, (part(*blk),)
    w, s = blk
    if k.bits == 4:
      lo, hi = _nibbles(w)
      h = lo.shape[1]
      return carry, (part(lo, s[:, :h]), part(hi, s[:, h:]))
    return carry, (part(w, s),)

  if isinstance(k, CodebookKernel):
    xs = (k.indices, k.codebook) if k.codebook.ndim == 3 else (k.indices,)
  else:
    xs = (k.codes, k.scale)
  _, ys = lax.scan(body, None, xs + extra)
  y = jnp.stack(ys, axis=1)  # (nb, halves, rows per half, n)
  return y.reshape(-1, y.shape[-1])


def _int_blocks(q: jax.Array, k: IntKernel) -> jax.Array:
  """``(out_padded, rows of q)`` float32: the scaled int8 products of each block of codes with ``q``."""
  n_groups = k.codes.shape[1]
  qg = q.reshape(q.shape[0], n_groups, -1).transpose(1, 0, 2)  # (G, rows, gs)

  def part(c, s):
    if n_groups == 1:
      return _dot_t(c[0], q, preferred_element_type=jnp.int32).astype(jnp.float32) * s[0][:, None]
    acc = lax.dot_general(c, qg, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.int32)
    # The per-group scaling as a dot over the groups: a multiply and a sum over
    # the leading axis measured 1.1-1.3x slower at batch 1.
    return jnp.einsum("gbr,gb->br", acc.astype(jnp.float32), s)

  return _blocks(k, part)


def _float_blocks(x2: jax.Array, k: IntKernel | CodebookKernel) -> jax.Array:
  """``(out_padded, rows)`` float32: each block of weights rebuilt in float32 and multiplied."""
  if isinstance(k, CodebookKernel):
    def part(idx, book=None):
      i = idx.astype(jnp.int32)
      w = k.codebook[i] if book is None else jnp.take_along_axis(book, i, axis=1)
      return _dot_t(w, x2)
    return _blocks(k, part)
  def part(c, s):
    w = (c.astype(jnp.float32) * s[:, :, None]).transpose(1, 0, 2).reshape(c.shape[1], -1)
    return _dot_t(w, x2)

  return _blocks(k, part)


def _dequantized(k: IntKernel | CodebookKernel, dtype) -> jax.Array:
  """The ``(in, out)`` weights in ``dtype``, built inside the jitted function (other backends)."""
  n_in, n_out = k.shape
  if isinstance(k, CodebookKernel):
    i = k.indices.astype(jnp.int32)
    w = k.codebook[i] if k.codebook.ndim == 1 else jnp.take_along_axis(k.codebook, i, axis=2)
    return w.reshape(-1, n_in)[:n_out].T.astype(dtype)
  if not k.blocked:
    return (k.codes.T.astype(jnp.float32) * k.scale).astype(dtype)
  c = k.codes
  if k.bits == 4:
    lo, hi = _nibbles(c)
    c = jnp.concatenate([lo, hi], axis=2)
  w = c.astype(jnp.float32) * k.scale[..., None]  # (nb, G, b, gs)
  w = w.transpose(0, 2, 1, 3).reshape(-1, w.shape[1] * w.shape[3])
  return w[:n_out].T.astype(dtype)


def _int_matmul(x2: jax.Array, k: IntKernel, activations: str) -> jax.Array:
  rows = x2.shape[0]
  n_out = k.shape[1]
  if activations == "float" and _backend() != "cpu":
    return jnp.dot(x2, _dequantized(k, x2.dtype)).astype(jnp.float32)
  x2 = x2.astype(jnp.float32)
  if not k.blocked:
    q, sx = _quantize_rows(x2, activations)
    acc = _dot_t(k.codes, q, preferred_element_type=jnp.int32).T.astype(jnp.float32)
    return _combine(acc, rows, sx, activations) * k.scale
  if activations == "float" and k.group is not None and rows >= _FLOAT_ROWS:
    return _float_blocks(x2, k)[:n_out].T
  # Per-group products are batched over the groups, where padding the rows
  # measured slower (1.1-1.2x at batch 1); per-channel blocks keep the tile.
  q, sx = _quantize_rows(x2, activations, pad=k.group is None)
  acc = _int_blocks(q, k)[:n_out].T
  return _combine(acc, rows, sx, activations)


def _matmul2(x2: jax.Array, kernel: Any, activations: str, impl: str = "xla", interpret: bool = False) -> jax.Array:
  if isinstance(kernel, IntKernel) and impl == "pallas":
    from jaxcompress.export.pallas import pallas_matmul  # pallas.py imports this module

    if x2.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
      x2 = x2.astype(jnp.float32)
    return pallas_matmul(x2, kernel, interpret=interpret).astype(jnp.float32)
  if isinstance(kernel, IntKernel):
    return _int_matmul(x2, kernel, activations)
  if isinstance(kernel, LowRankKernel):
    u = _matmul2(x2, kernel.u, activations, impl, interpret)
    return _matmul2(u, kernel.v, activations, impl, interpret)
  if isinstance(kernel, CodebookKernel):
    if _backend() != "cpu":
      return jnp.dot(x2, _dequantized(kernel, x2.dtype)).astype(jnp.float32)
    return _float_blocks(x2.astype(jnp.float32), kernel)[: kernel.shape[1]].T
  return jnp.dot(x2.astype(jnp.float32), jnp.asarray(kernel).astype(jnp.float32))


def compressed_matmul(x: jax.Array, kernel: ServedKernel, *, activations: str = "float", impl: str = "xla",
                      interpret: bool = False) -> jax.Array:
  """``x @ kernel`` computed from a served kernel (see the module docstring for the formulations).

  Args:
    x: ``(..., in)`` float inputs.
    kernel: an ``IntKernel``, ``LowRankKernel`` or ``CodebookKernel`` (from
      ``serving_kernel``).
    activations: ``"float"`` (weight-only) or ``"int8"`` (the inputs of each
      integer product quantized per row: w8a8). Codebook and float factors
      always take float inputs.
    impl: ``"xla"`` (the formulations above) or ``"pallas"``: integer codes
      (``IntKernel``, also as low-rank factors) multiplied by
      ``jaxcompress.export.pallas_matmul``, a Pallas GPU kernel, in the
      inputs' dtype (weight-only; codebooks and float factors keep the XLA
      path). Needs a GPU unless ``interpret``.
    interpret: with ``impl="pallas"``, run the kernel in Pallas's interpreter
      (any backend; slow: for tests).

  Returns:
    ``(..., out)`` float32.

  Example:
    >>> import numpy as np, jaxcompress as jc
    >>> codes = np.array([[1, -2, 0], [3, 4, 5]])  # (in=2, out=3), 4-bit codes
    >>> k = jc.export.IntKernel.from_codes(codes, np.ones((1, 3)), bits=4)
    >>> jc.export.compressed_matmul(np.array([[0.5, -1.0]]), k).round(3).tolist()
    [[-2.5, -5.0, -5.0]]
  """
  check_activations("compressed_matmul", activations)
  check_impl("compressed_matmul", impl, activations, interpret)
  if not isinstance(kernel, (IntKernel, LowRankKernel, CodebookKernel)):
    raise TypeError(
        f"compressed_matmul: kernel is a {type(kernel).__name__}; pass a served kernel "
        "(jc.export.serving_kernel of a stored leaf)."
    )
  x = check_inputs("compressed_matmul", x, kernel)
  n_in, n_out = kernel.shape
  lead = x.shape[:-1]
  y = _matmul2(x.reshape(-1, n_in), kernel, activations, impl, interpret)
  return y.reshape(lead + (n_out,))


def int8_matmul(x: jax.Array, codes_t: jax.Array, scale: jax.Array, *, activations: str = "float") -> jax.Array:
  """``x @ (codes_t.T * scale)`` from int8 codes, computed with int8 dots (see the module docstring).

  Args:
    x: ``(..., in)`` float inputs.
    codes_t: ``(out, in)`` int8 codes of the kernel, transposed.
    scale: ``(out,)`` float32 scales.
    activations: ``"float"`` (weight-only: two int8 limbs of ``x``) or
      ``"int8"`` (``x`` quantized per row: w8a8).

  Returns:
    ``(..., out)`` float32.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> codes = jnp.array([[1, -2], [3, 4], [0, 5]], jnp.int8)  # (out=3, in=2)
    >>> x = jnp.array([[0.5, -1.0]])
    >>> jc.export.int8_matmul(x, codes, jnp.ones(3)).round(3).tolist()
    [[2.5, -2.5, -5.0]]
  """
  check_activations("int8_matmul", activations)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  q, sx = _quantize_rows(x2, activations)
  acc = _dot_t(codes_t, q, preferred_element_type=jnp.int32).T.astype(jnp.float32)
  out = _combine(acc, x2.shape[0], sx, activations) * scale
  return out.reshape(lead + (codes_t.shape[0],))


def check_inputs(where: str, x: Any, kernel: ServedKernel) -> jax.Array:
  """``x`` as an array; raises ``ValueError`` naming ``where`` unless its last axis fits ``kernel``."""
  x = jnp.asarray(x)
  n_in, n_out = kernel.shape
  if x.ndim < 1 or x.shape[-1] != n_in:
    raise ValueError(
        f"{where}: inputs of shape {tuple(x.shape)} do not fit a ({n_in}, {n_out}) kernel; "
        f"the last axis must have {n_in} features."
    )
  return x


def is_served_kernel(value: Any) -> bool:
  """Whether ``value`` is a served kernel (``IntKernel``, ``LowRankKernel``, ``CodebookKernel``)."""
  return isinstance(value, (IntKernel, LowRankKernel, CodebookKernel))


def check_fits(kernel: ServedKernel, n_in: int, n_out: int, layer: str) -> None:
  """Raises ``ValueError`` naming ``layer`` unless the kernel is ``(n_in, n_out)``."""
  if tuple(kernel.shape) != (n_in, n_out):
    raise ValueError(
        f"{layer}: the stored kernel is {tuple(kernel.shape)} (in, out) and does not fit inputs "
        f"with {n_in} features and {n_out} outputs; serve the artifact exported for this model."
    )


# --------------------------------------------------------------------------
# Linen.
# --------------------------------------------------------------------------


def _dense_call(module: nn.Dense, inputs: jax.Array, activations: str, impl: str = "xla",
                interpret: bool = False) -> jax.Array:
  kernel = module.get_variable("params", "kernel")
  check_fits(kernel, inputs.shape[-1], module.features, f"Dense {'/'.join(map(str, module.path))!r}")
  y = compressed_matmul(inputs, kernel, activations=activations, impl=impl, interpret=interpret)
  dtype = module.dtype or jnp.result_type(inputs.dtype, jnp.float32)
  y = y.astype(dtype)
  if module.use_bias:
    bias = module.get_variable("params", "bias")
    y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,)).astype(dtype)
  return y


@contextlib.contextmanager
def compressed_dense(*, activations: str = "float", impl: str = "xla", interpret: bool = False) -> Iterator[None]:
  """Within this context, ``nn.Dense`` layers holding a served kernel compute from it.

  A Dense whose ``kernel`` param is a served kernel (as ``serving_params``
  writes them) computes ``compressed_matmul``; every other module runs as
  usual. Uses ``flax.linen.intercept_methods``; nothing global is patched.

  Args:
    activations: ``"float"`` (weight-only) or ``"int8"`` (w8a8).
    impl: ``"xla"`` (the default) or ``"pallas"`` (integer codes multiplied by
      a Pallas GPU kernel; see ``compressed_matmul``).
    interpret: with ``impl="pallas"``, run the kernel in Pallas's interpreter.

  Returns:
    A context manager (see ``serving_params`` for an example).
  """
  check_activations("compressed_dense", activations)
  check_impl("compressed_dense", impl, activations, interpret)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (
        context.method_name == "__call__"
        and isinstance(module, nn.Dense)
        and module.scope is not None
        and module.has_variable("params", "kernel")
        and is_served_kernel(module.get_variable("params", "kernel"))
    ):
      return _dense_call(module, *args, activations=activations, impl=impl, interpret=interpret, **kwargs)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield

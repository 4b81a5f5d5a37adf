"""Compressed inference: Dense layers run on the stored int8/int4 codes, never on float weights.

``serving_params(artifact)`` turns an artifact into Flax linen params where each
2-D kernel stored as symmetric integer codes (``FakeQuant``/``LSQ``, per output
channel or per tensor, 2 to 8 bits) is kept as its codes: ``kernel_codes``
(int8, transposed to ``(out, in)``) or, for 4 bits and fewer, ``kernel_codes4``
(two codes per byte: row ``i`` of the low nibbles and row ``i + in/2`` of the high
ones), with ``kernel_scale (out,)``. Every other leaf is decoded to its float
value. Inside ``with compressed_dense():`` every ``nn.Dense`` holding such a
kernel computes its product from the codes (by ``flax.linen.intercept_methods``;
the model code is unchanged).

The matmul formulations are chosen for XLA on CPU, where an int8 x int8 dot
with int32 accumulation runs on the VNNI/AMX units (oneDNN) and is far faster
than a float one, but only when the weight is the dot's *left* operand (the
weight is then used in place; as the right operand it is repacked on every
call, which costs more than the product at small batch):

- ``activations="int8"`` (w8a8): the inputs get one scale per row (absmax /
  127), ``out = (W_codes @ x_codes^T)^T * s_x * s_w``;
- ``activations="float"`` (weight-only): the inputs are split exactly enough
  into two int8 limbs, ``x / s_x = hi + lo / 254`` (``hi`` the rounded value,
  ``lo`` its rounded remainder: a relative error below ``2**-15`` of the row's
  absmax, finer than bfloat16), and both limbs go through one int8 dot:
  ``out = (acc_hi + acc_lo / 254) * s_x * s_w``.

Small batches are padded to a multiple of 4 rows (the int8 kernels' tile).
int4 codes are unpacked in the jitted function (two shifts and a concatenation).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcompress.export import artifact as _art
from jaxcompress.export import encodings as _enc

PyTree = Any
_ACTIVATIONS = ("float", "int8")
_PAD = 4


def _codes_of(leaf: _art.EncodedLeaf) -> tuple[np.ndarray, np.ndarray, int] | None:
  """``(codes (in, out) int8, scale (out,) float32, bits)`` of a servable kernel, else None."""
  r = leaf.record
  parts = _enc.quantized_parts(r.encoding, list(leaf.buffers), r.shape)
  if parts is None or len(r.shape) != 2:
    return None
  codes, scale, fmt, gran = parts
  if fmt.is_float or not fmt.symmetric:
    return None
  if scale.shape == (1, r.shape[1]):
    scale = scale[0]
  elif scale.shape == (1, 1):
    scale = np.broadcast_to(scale[0], (r.shape[1],))
  else:
    return None  # per-group scales: decoded to floats
  return codes.astype(np.int8), np.ascontiguousarray(scale, np.float32), fmt.bits


def _pack4(codes_t: np.ndarray) -> np.ndarray:
  """``(out, in)`` int4 codes -> ``(out, in/2)`` bytes: columns ``j`` low, ``j + in/2`` high."""
  half = codes_t.shape[1] // 2
  lo, hi = codes_t[:, :half].astype(np.uint8) & 15, codes_t[:, half:].astype(np.uint8) & 15
  return (lo | (hi << 4)).astype(np.int8)


def serving_params(artifact: _art.Artifact) -> PyTree:
  """Linen params for ``compressed_dense``: integer kernels as codes, the rest as floats.

  Args:
    artifact: from ``export`` or ``load`` (with the model's structure: ``load(path, like=...)``).

  Returns:
    The params tree, where each servable ``kernel`` leaf is replaced by
    ``kernel_codes`` (or ``kernel_codes4``) and ``kernel_scale``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxcompress as jc
    >>> model = nn.Dense(8)
    >>> x = jax.random.normal(jax.random.key(1), (2, 16))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> spec = jc.Spec([jc.Rule("kernel", [jc.quant.FakeQuant(bits=8)])])
    >>> t, s = spec.init(params)
    >>> served = jc.export.serving_params(jc.export.export(spec, t, s))
    >>> sorted(served), served["kernel_codes"].dtype, served["kernel_codes"].shape
    (['bias', 'kernel_codes', 'kernel_scale'], dtype('int8'), (8, 16))
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
        parts = _codes_of(v) if k == "kernel" and isinstance(v, _art.EncodedLeaf) else None
        if parts is None:
          out[k] = convert(v)
          continue
        codes, scale, bits = parts
        codes_t = np.ascontiguousarray(codes.T)
        if bits <= 4 and codes_t.shape[1] % 2 == 0:
          out["kernel_codes4"] = jnp.asarray(_pack4(codes_t))
        else:
          out["kernel_codes"] = jnp.asarray(codes_t)
        out["kernel_scale"] = jnp.asarray(scale)
      return out
    raise TypeError(
        f"serving_params: the artifact's tree holds a {type(node).__name__}; it needs nested "
        "dicts (linen params): load the artifact with like=params."
    )

  if not isinstance(artifact, _art.Artifact):
    raise TypeError(f"serving_params: expected a jc.export.Artifact, got {type(artifact).__name__}.")
  return convert(artifact.tree)


def unpack4(packed: jax.Array) -> jax.Array:
  """``(out, in/2)`` packed bytes -> ``(out, in)`` int8 codes (inverse of the packing above)."""
  return jnp.concatenate([(packed << 4) >> 4, packed >> 4], axis=1)


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
  if activations not in _ACTIVATIONS:
    raise ValueError(f"int8_matmul: activations={activations!r}; use 'float' or 'int8'.")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  rows = x2.shape[0]
  sx = jnp.max(jnp.abs(x2), axis=1, keepdims=True) * (1.0 / 127.0)
  sx = jnp.where(sx > 0, sx, 1.0)
  y = x2 / sx
  hi = jnp.round(y)
  if activations == "int8":
    q = hi
  else:
    q = jnp.concatenate([hi, jnp.round((y - hi) * 254.0)])
  q = q.astype(jnp.int8)
  pad = (-q.shape[0]) % _PAD
  if pad:
    q = jnp.pad(q, ((0, pad), (0, 0)))
  acc = lax.dot_general(codes_t, q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
  acc = acc.T.astype(jnp.float32)
  if activations == "int8":
    out = acc[:rows]
  else:
    out = acc[:rows] + acc[rows : 2 * rows] * (1.0 / 254.0)
  out = out * sx * scale
  return out.reshape(lead + (codes_t.shape[0],))


def _dense_call(module: nn.Dense, inputs: jax.Array, activations: str) -> jax.Array:
  if module.has_variable("params", "kernel_codes4"):
    codes_t = unpack4(module.get_variable("params", "kernel_codes4"))
  else:
    codes_t = module.get_variable("params", "kernel_codes")
  scale = module.get_variable("params", "kernel_scale")
  if codes_t.shape != (module.features, inputs.shape[-1]):
    raise ValueError(
        f"Dense {'/'.join(map(str, module.path))!r}: the stored kernel codes {tuple(codes_t.shape)} (out, in) do not fit "
        f"inputs with {inputs.shape[-1]} features and features={module.features}."
    )
  y = int8_matmul(inputs, codes_t, scale, activations=activations)
  dtype = module.dtype or jnp.result_type(inputs.dtype, jnp.float32)
  y = y.astype(dtype)
  if module.use_bias:
    bias = module.get_variable("params", "bias")
    y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,)).astype(dtype)
  return y


@contextlib.contextmanager
def compressed_dense(*, activations: str = "float") -> Iterator[None]:
  """Within this context, ``nn.Dense`` layers holding kernel codes run on them.

  A Dense whose params hold ``kernel_codes`` or ``kernel_codes4`` and
  ``kernel_scale`` (as ``serving_params`` writes them) computes its product with
  ``int8_matmul``; every other module runs as usual. Uses
  ``flax.linen.intercept_methods``; nothing global is patched.

  Args:
    activations: ``"float"`` (weight-only) or ``"int8"`` (w8a8).

  Returns:
    A context manager (see ``serving_params`` for an example).
  """
  if activations not in _ACTIVATIONS:
    raise ValueError(f"compressed_dense: activations={activations!r}; use 'float' or 'int8'.")

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (
        context.method_name == "__call__"
        and isinstance(module, nn.Dense)
        and module.scope is not None
        and (module.has_variable("params", "kernel_codes") or module.has_variable("params", "kernel_codes4"))
    ):
      return _dense_call(module, *args, activations=activations, **kwargs)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


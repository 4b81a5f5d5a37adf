"""Leaf encodings, the encoders that build them from stages, and their decoders.

An *encoding* says how one leaf is stored. It is built by walking the leaf's
stage chain as ``spec.apply`` does: each stage's encoder sees the value it gets,
its params and state, the value it gives, and the encoding of the value it got
(``previous``), and returns the encoding of the value it gives:

- ``Plain``: the array as it is, stored sparsely when it has zeros (pruning
  leaves exact zeros; an N:M mask is kept as 2-bit positions for 2:4);
- ``Quantized``: integer codes bit-packed at the format's width (``int4``: two
  per byte; ``int2``/``int3`` packed) or float8 bytes, with the scales and zero
  points of the granularity; after pruning only the kept codes are stored;
- ``Clustered``: a codebook and per-entry indices at ``ceil(log2 k)`` bits,
  zeros stored as positions;
- ``Factorized``: low-rank factors, each itself encoded by the stages after
  the factorization.

Every encoding becomes a JSON node plus ``uint8`` buffers; ``decode_node``
rebuilds the float array from them with the same operations, in the same
order and dtype, as the stage's ``apply``, so the result is bit for bit what
``spec.apply`` gives. Encoders are looked up by stage type (subclasses
included); ``register_encoder`` adds one for a stage of your own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import cluster as _cluster
from jaxcompress import lowrank as _lowrank
from jaxcompress import prune as _prune
from jaxcompress import quant as _quant
from jaxcompress.core.stage import Stage
from jaxcompress.export import arrays as _arrays
from jaxcompress.quant import calibration as _cal
from jaxcompress.quant import numerics as _num

Buffers = dict[str, np.ndarray]


# --------------------------------------------------------------------------
# Encodings.
# --------------------------------------------------------------------------


class Encoding:
  """Base class of leaf encodings: ``write`` stores it and returns its JSON node."""

  def write(self, bufs: Buffers, name: str, huffman: bool) -> dict:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True, eq=False)
class Plain(Encoding):
  """An array stored as it is (bit for bit), sparsely where it has zeros.

  Attributes:
    values: the array (any numeric dtype).
    kept: optional keep-mask of a pruning structure that holds every nonzero
      (the N:M layout needs it).
    nm: ``(n, m, axis)`` of an N:M structure, with ``kept``.

  Example:
    >>> import numpy as np
    >>> from jaxcompress.export.encodings import Plain, decode_node
    >>> bufs = {}
    >>> node = Plain(np.array([0.0, 2.5, 0.0, 0.0], np.float32)).write(bufs, "", False)
    >>> decode_node(node, bufs).tolist()
    [0.0, 2.5, 0.0, 0.0]
  """

  values: np.ndarray
  kept: np.ndarray | None = None
  nm: tuple[int, int, int] | None = None

  def write(self, bufs, name, huffman):
    x = np.asarray(self.values)
    array = _arrays.store(bufs, name, x, fill=0, kept=self.kept, nm=self.nm)
    return {"kind": "plain", "dtype": x.dtype.name, "array": array}


@dataclasses.dataclass(frozen=True, eq=False)
class Quantized(Encoding):
  """Quantization codes with their scales: decodes to ``dequantize(QArray(...))``.

  Attributes:
    qarray: the ``jc.quant.QArray`` (codes, float32 scale, zero point, format,
      granularity, output dtype).
    kept: optional keep-mask of the pruning before it (codes outside are the
      zero code).
    nm: ``(n, m, axis)`` of an N:M structure, with ``kept``.
  """

  qarray: _num.QArray
  kept: np.ndarray | None = None
  nm: tuple[int, int, int] | None = None

  def write(self, bufs, name, huffman):
    q = self.qarray
    fmt = q.fmt
    values = np.asarray(q.values)
    zp = None if q.zero_point is None else np.asarray(q.zero_point).astype(np.int64)
    node: dict[str, Any] = {
        "kind": "quant",
        "dtype": np.dtype(q.dtype).name,
        "format": {"dtype": fmt.dtype, "bits": fmt.bits, "symmetric": fmt.symmetric,
                   "narrow_range": fmt.narrow_range},
        "granularity": granularity_to_json(q.granularity),
        "scale": _arrays.store(bufs, name + "s", np.asarray(q.scale, np.float32), dense=True),
    }
    if zp is not None:
      node["zero_point"] = _arrays.store(
          bufs, name + "z", zp, int_range=(int(fmt.qmin), int(fmt.qmax)), dense=True
      )
    if fmt.is_float:
      node["codes"] = _arrays.store(bufs, name, values, fill=0, kept=self.kept, nm=self.nm)
      return node
    codes = values.astype(np.int64)
    lo, hi = int(fmt.qmin), int(fmt.qmax)
    if zp is not None and self.kept is not None:
      # Codes relative to the zero point: a pruned entry is 0, so it need not be stored.
      codes = codes - np.asarray(_num.expand_scale(zp, codes.shape, q.granularity)).astype(np.int64)
      lo, hi = lo - hi, hi - lo
      node["relative"] = True
    node["codes"] = _arrays.store(
        bufs, name, codes, fill=0, int_range=(lo, hi), kept=self.kept, nm=self.nm, huffman=huffman
    )
    return node


@dataclasses.dataclass(frozen=True, eq=False)
class Clustered(Encoding):
  """Weight sharing: ``where(index >= 0, codebook[index], 0)``.

  Attributes:
    indices: int, the leaf's shape: the centroid index of each entry, ``-1``
      where the entry is zero.
    codebook: ``(k,)`` or, per channel, ``(channels, k)``, in the leaf's dtype.
    channel_axis: ``None`` (one codebook) or the channel axis (non-negative).
    kept, nm: an N:M pruning mask that holds every nonzero, as for ``Plain``.
  """

  indices: np.ndarray
  codebook: np.ndarray
  channel_axis: int | None = None
  kept: np.ndarray | None = None
  nm: tuple[int, int, int] | None = None

  def write(self, bufs, name, huffman):
    k = self.codebook.shape[-1]
    return {
        "kind": "codebook",
        "channel_axis": self.channel_axis,
        "codebook": _arrays.store(bufs, name + "c", np.asarray(self.codebook), dense=True),
        "indices": _arrays.store(
            bufs, name, np.asarray(self.indices, np.int64), fill=-1, int_range=(-1, k - 1),
            kept=self.kept, nm=self.nm, huffman=huffman,
        ),
    }


@dataclasses.dataclass(frozen=True, eq=False)
class Factorized(Encoding):
  """Low-rank factors, each with its own encoding; decodes to their product.

  Attributes:
    kind: ``"svd"`` (``Factors(u, v, shape)``) or ``"tucker2"``
      (``Tucker2Factors(core, u_in, u_out)``).
    parts: the encodings of the factors, in that order.
    shape: the kernel's shape.
  """

  kind: str
  parts: tuple[Encoding, ...]
  shape: tuple[int, ...]

  def write(self, bufs, name, huffman):
    names = _FACTOR_PARTS[self.kind]
    node = {"kind": self.kind, "shape": list(self.shape)}
    for part_name, part in zip(names, self.parts):
      node[part_name] = part.write(bufs, name + part_name + ".", huffman)
    return node


_FACTOR_PARTS = {"svd": ("u", "v"), "tucker2": ("core", "u_in", "u_out")}


# --------------------------------------------------------------------------
# Granularities as JSON.
# --------------------------------------------------------------------------


def granularity_to_json(g: _num.Granularity) -> dict:
  """A granularity as a JSON-able dict (``PerTensor``, ``PerChannel``, ``PerGroup``)."""
  if isinstance(g, _num.PerTensor):
    return {"type": "tensor"}
  if isinstance(g, _num.PerChannel):
    return {"type": "channel", "axis": list(g.axis) if isinstance(g.axis, tuple) else g.axis}
  if isinstance(g, _num.PerGroup):
    return {"type": "group", "size": g.size, "axis": g.axis}
  raise TypeError(f"granularity {g!r} has no stored form; use PerTensor, PerChannel or PerGroup.")


def granularity_from_json(d: dict) -> _num.Granularity:
  if d["type"] == "tensor":
    return _num.PerTensor()
  if d["type"] == "channel":
    axis = d["axis"]
    return _num.PerChannel(axis=tuple(axis) if isinstance(axis, list) else axis)
  if d["type"] == "group":
    return _num.PerGroup(size=d["size"], axis=d["axis"])
  raise ValueError(f"unknown granularity {d!r}.")


# --------------------------------------------------------------------------
# Decoding.
# --------------------------------------------------------------------------


def decode_node(node: dict, bufs: Buffers) -> jax.Array:
  """The float array of a node, computed as the stage's ``apply`` computes it.

  Args:
    node: a node written by an encoding's ``write``.
    bufs: the leaf's buffers.

  Returns:
    A ``jax.Array``.
  """
  kind = node["kind"]
  if kind == "plain":
    dtype = _arrays.np_dtype(node["dtype"])
    return jnp.asarray(_arrays.load(node["array"], bufs, dtype))
  if kind == "quant":
    f = node["format"]
    fmt = _num.Format(dtype=f["dtype"], bits=f["bits"], symmetric=f["symmetric"],
                      narrow_range=f["narrow_range"])
    gran = granularity_from_json(node["granularity"])
    scale = jnp.asarray(_arrays.load(node["scale"], bufs, np.dtype(np.float32)))
    zp = None
    if "zero_point" in node:
      zp_np = _arrays.load(node["zero_point"], bufs)
      zp = jnp.asarray(zp_np.astype(np.int8)).astype(fmt.storage_dtype)
    codes = _arrays.load(node["codes"], bufs)
    shape = codes.shape
    if fmt.is_float:
      values = jnp.asarray(codes.astype(fmt.storage_dtype))
    else:
      if node.get("relative"):
        codes = codes + np.asarray(_num.expand_scale(zp_np, shape, gran)).astype(np.int64)
      if codes.size and (codes.min() < fmt.qmin or codes.max() > fmt.qmax):
        raise ValueError(f"quantization codes fall outside [{fmt.qmin}, {fmt.qmax}].")
      values = jnp.asarray(codes.astype(np.int8)).astype(fmt.storage_dtype)
    q = _num.QArray(values, scale, zp, fmt, gran, _arrays.np_dtype(node["dtype"]))
    return _num.dequantize(q)
  if kind == "codebook":
    codebook = jnp.asarray(_arrays.load(node["codebook"], bufs))
    idx = _arrays.load(node["indices"], bufs)
    k = codebook.shape[-1]
    if idx.size and idx.max() >= k:
      raise ValueError(f"a cluster index is {int(idx.max())}, the codebook has {k} entries.")
    nonzero = jnp.asarray(idx >= 0)
    a = jnp.asarray(np.maximum(idx, 0).astype(np.int32))
    axis = node["channel_axis"]
    if axis is not None:
      channel = jax.lax.broadcasted_iota(jnp.int32, a.shape, axis)
      a = channel * k + a
    shared = codebook.reshape(-1)[a]
    return jnp.where(nonzero, shared, jnp.zeros(a.shape, codebook.dtype))
  if kind == "svd":
    u, v = (decode_node(node[p], bufs) for p in _FACTOR_PARTS["svd"])
    return _lowrank.Factors(u, v, tuple(node["shape"])).materialize()
  if kind == "tucker2":
    core, u_in, u_out = (decode_node(node[p], bufs) for p in _FACTOR_PARTS["tucker2"])
    return _lowrank.Tucker2Factors(core, u_in, u_out).materialize()
  raise ValueError(f"unknown encoding kind {kind!r}.")


def describe_node(node: dict) -> str:
  """A short name of a node's encoding, e.g. ``int4 nm2:4 + scales``."""
  kind = node["kind"]
  if kind == "plain":
    return _arrays.describe(node["array"])
  if kind == "quant":
    f = node["format"]
    name = f["dtype"] if f["dtype"] != "int" else f"int{f['bits']}"
    codes = _arrays.describe(node["codes"])
    g = node["granularity"]
    gran = {"tensor": "per-tensor", "channel": "per-channel"}.get(g["type"], f"group{g.get('size')}")
    zp = "+zp" if "zero_point" in node else ""
    return f"{name}{zp} {gran}: {codes}"
  if kind == "codebook":
    k = node["codebook"]["shape"][-1]
    per = "/ch" if node["channel_axis"] is not None else ""
    return f"codebook{k}{per}: {_arrays.describe(node['indices'])}"
  if kind in _FACTOR_PARTS:
    return f"{kind}(" + "; ".join(describe_node(node[p]) for p in _FACTOR_PARTS[kind]) + ")"
  return kind


# --------------------------------------------------------------------------
# Encoders.
# --------------------------------------------------------------------------


class EncodeContext(NamedTuple):
  """What an encoder gets for one leaf (or one factor of it).

  Attributes:
    path: the leaf path.
    value: the value the stage gets (``None`` for a stage that replaces the weight).
    params: the stage's trainable params for this leaf (or ``None``).
    state: the stage's state for this leaf (or ``None``).
    output: the value the stage gives: ``stage.apply(value, params, state)``.
    previous: the encoding of ``value`` built by the stages before, or ``None``
      when ``value`` is the trainable weight itself.
  """

  path: str
  value: Any
  params: Any
  state: Any
  output: Any
  previous: Encoding | None


Encoder = Callable[[Stage, EncodeContext], Encoding]
_ENCODERS: dict[type, Encoder] = {}


def register_encoder(stage_type: type, encoder: Encoder) -> None:
  """Registers how leaves of a stage type are stored.

  The encoder is called as ``encoder(stage, ctx)`` with an ``EncodeContext`` and
  returns an encoding (``Plain``, ``Quantized``, ``Clustered``, ``Factorized``)
  whose decoded value equals ``ctx.output`` bit for bit; ``export`` checks that.
  Subclasses of ``stage_type`` use it too, unless they have their own.

  Args:
    stage_type: a ``jc.Stage`` subclass.
    encoder: the function.

  Example:
    >>> import dataclasses, jax.numpy as jnp, numpy as np, jaxcompress as jc
    >>> from typing import ClassVar
    >>> @dataclasses.dataclass(frozen=True, kw_only=True)
    ... class Halve(jc.Stage):
    ...   name: ClassVar[str] = "halve"
    ...   def apply(self, value, params, state):
    ...     return value * 0.5
    >>> jc.export.register_encoder(Halve, lambda stage, ctx: jc.export.Plain(np.asarray(ctx.output)))
    >>> spec = jc.Spec([jc.Rule("w", [Halve()])])
    >>> t, s = spec.init({"w": jnp.array([1.0, 3.0])})
    >>> jc.export.export(spec, t, s).leaves[0].record.encoding
    'float32'
  """
  if not (isinstance(stage_type, type) and issubclass(stage_type, Stage)):
    raise TypeError(f"register_encoder: stage_type must be a jc.Stage subclass, got {stage_type!r}.")
  if not callable(encoder):
    raise TypeError(f"register_encoder: encoder must be callable, got {encoder!r}.")
  _ENCODERS[stage_type] = encoder


def find_encoder(stage: Stage) -> Encoder | None:
  """The encoder registered for the stage's type or its nearest base class."""
  for cls in type(stage).__mro__:
    if cls in _ENCODERS:
      return _ENCODERS[cls]
  return None


def _hints(previous: Encoding | None) -> dict:
  if isinstance(previous, (Plain, Quantized, Clustered)):
    return {"kept": previous.kept, "nm": previous.nm}
  return {"kept": None, "nm": None}


def _encode_mask(stage, ctx: EncodeContext) -> Encoding:
  out = np.asarray(ctx.output)
  mask = np.asarray(ctx.state.mask, bool)
  nm = None
  structure = getattr(stage, "structure", None)
  if isinstance(structure, _prune.NM) and out.ndim:
    axis = out.ndim - 2 if structure.axis is None else structure.axis
    if -out.ndim <= axis < out.ndim:
      nm = (structure.n, structure.m, axis % out.ndim)
  return Plain(out, kept=mask, nm=nm)


def _encode_fake_quant(stage, ctx: EncodeContext) -> Encoding:
  value, state = ctx.value, ctx.state
  fmt, gran = stage.fmt, stage.granularity
  if state is None or state.scale is None:
    cal = _cal.default_calibrator(fmt) if stage.calibration is None else stage.calibration
    scale, zp = _num.scale_from_range(*cal(value, fmt, gran), fmt)
  else:
    scale, zp = state.scale, state.zero_point
  key = None if state is None or state.key is None else jax.random.wrap_key_data(state.key)
  q = _num.quantize(value, fmt, gran, scale=jnp.asarray(scale, jnp.float32), zero_point=zp,
                    rounding=stage.rounding, key=key)
  return Quantized(q, **_hints(ctx.previous))


def _encode_lsq(stage, ctx: EncodeContext) -> Encoding:
  value = ctx.value
  fmt, gran = stage.fmt, stage.granularity
  step = jnp.maximum(ctx.params, jnp.float32(stage.min_step)).astype(jnp.float32)
  s = _num.expand_scale(step, value.shape, gran)
  codes = jnp.round(jnp.clip(value.astype(jnp.float32) / s, fmt.qmin, fmt.qmax))
  q = _num.QArray(codes.astype(jnp.int8), step, None, fmt, gran, np.dtype(value.dtype))
  return Quantized(q, **_hints(ctx.previous))


def _encode_cluster(stage, ctx: EncodeContext) -> Encoding:
  if not bool(ctx.state.clustered):  # before begin_step the value passes through
    return ctx.previous if ctx.previous is not None else Plain(np.asarray(ctx.output))
  value = np.asarray(ctx.value)
  assignments = np.asarray(ctx.state.assignments).astype(np.int64)
  indices = np.where(value != 0, assignments, -1)
  axis = None if stage.channel_axis is None else stage.channel_axis % value.ndim
  return Clustered(indices, np.asarray(ctx.params), axis, **_hints(ctx.previous))


def _encode_factors(stage, ctx: EncodeContext) -> Encoding:
  f = ctx.output
  if isinstance(f, _lowrank.Factors):
    return Factorized("svd", (Plain(np.asarray(f.u)), Plain(np.asarray(f.v))), tuple(f.shape))
  if isinstance(f, _lowrank.Tucker2Factors):
    parts = tuple(Plain(np.asarray(a)) for a in (f.core, f.u_in, f.u_out))
    return Factorized("tucker2", parts, tuple(f.shape))
  raise TypeError(f"{type(stage).__name__} gave {type(f).__name__}, which has no stored form.")


register_encoder(_prune.Prune, _encode_mask)
register_encoder(_prune.DynamicSparse, _encode_mask)
register_encoder(_quant.FakeQuant, _encode_fake_quant)
register_encoder(_quant.LSQ, _encode_lsq)
register_encoder(_cluster.Cluster, _encode_cluster)
register_encoder(_lowrank.SVD, _encode_factors)
register_encoder(_lowrank.Tucker2, _encode_factors)

"""Leaf encodings, the encoders that build them from stages, and their decoders.

An *encoding* says how one leaf is stored. It is built by walking the leaf's
stage chain as ``spec.apply`` does: each stage's encoder sees the value it gets,
its params and state, the value it gives, and the encoding of the value it got
(``previous``), and returns the encoding of the value it gives:

- ``Plain``: the array as it is, stored sparsely when it has zeros (pruning
  leaves exact zeros; an N:M mask is kept as 2-bit positions for 2:4);
- ``Quantized``: integer codes bit-packed at the format's width (``int4``: two
  per byte; ``int2``/``int3`` packed) or float8 bytes, with the scales and zero
  points of the granularity; after pruning only the kept codes are stored.
  Block-scaled formats store their elements (``float4_e2m1fn``: the 4-bit
  patterns, two per byte; float8: one byte each), their block scales one byte
  per block (``float8_e8m0fnu`` or ``float8_e4m3fn``) and NVFP4's float32
  tensor scale (``nvfp4 group16@-2 dense:float8_e4m3fn dense:float32 dense:u4``);
- ``Clustered``: a codebook and per-entry indices at ``ceil(log2 k)`` bits,
  zeros stored as positions;
- ``Factorized``: low-rank factors, each itself encoded by the stages after
  the factorization.

Every encoding becomes ``uint8`` buffers and a descriptor, a short string that
names the stored form and is all a decoder needs besides the buffers (e.g.
``int4 channel@-1 dense:float32 nm2/4@0:u4-8`` (format, granularity, scales,
codes), ``codebook32 dense:xfloat32 runs3x3706(h8):h32`` (codebook, indices),
``svd[16x4 int8 channel@-1 ...][4x32 ...]``; see ``jaxcompress.export.arrays``
for the ``layout:stream`` part). ``decode`` rebuilds the float array from them
with the same operations, in the same order and dtype, as the stage's
``apply``, so the result is bit for bit what ``spec.apply`` gives. Encoders are looked up by stage type (subclasses
included); ``register_encoder`` adds one for a stage of your own.
"""

from __future__ import annotations

import dataclasses
import math
import re
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
from jaxcompress.export import bits as _bits
from jaxcompress.quant import blockscaled as _blockscaled
from jaxcompress.quant import numerics as _num

Buffers = list[np.ndarray]


# --------------------------------------------------------------------------
# Encodings.
# --------------------------------------------------------------------------


class Encoding:
  """Base class of leaf encodings: ``write`` appends its buffers and returns its descriptor."""

  def write(self, bufs: Buffers, huffman: bool) -> str:
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
    >>> import numpy as np, jaxcompress as jc
    >>> from jaxcompress.export.encodings import decode
    >>> bufs = []
    >>> desc = jc.export.Plain(np.array([0.0, 2.5, 0.0, 0.0], np.float32)).write(bufs, False)
    >>> desc, decode(desc, bufs, (4,), "float32").tolist()
    ('plain bitmask:float32', [0.0, 2.5, 0.0, 0.0])
  """

  values: np.ndarray
  kept: np.ndarray | None = None
  nm: tuple[int, int, int] | None = None

  def write(self, bufs, huffman):
    return "plain " + _arrays.store(bufs, np.asarray(self.values), fill=0, kept=self.kept, nm=self.nm)


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

  def write(self, bufs, huffman):
    q = self.qarray
    fmt = q.fmt
    if fmt.is_block_scaled:
      return self._write_block_scaled(bufs, huffman)
    if fmt.is_float:
      head = fmt.dtype
    else:
      head = f"int{fmt.bits}" + ("n" if fmt.narrow_range else "") + ("" if fmt.symmetric else "+zp")
    words = [head, granularity_name(q.granularity)]
    words.append(_arrays.store(bufs, np.asarray(q.scale, np.float32), dense=True))
    values = np.asarray(q.values)
    if fmt.is_float:
      return " ".join(words + [_arrays.store(bufs, values, fill=0, kept=self.kept, nm=self.nm)])
    lo, hi = int(fmt.qmin), int(fmt.qmax)
    codes = values.astype(np.int64)
    if q.zero_point is not None:
      zp = np.asarray(q.zero_point).astype(np.int64)
      bufs.append(_bits.pack(zp - lo, _bits.width(hi - lo + 1)))
      if self.kept is not None:
        # Codes relative to the zero point: a pruned entry is 0, so it need not be stored.
        codes = codes - np.asarray(_num.expand_scale(zp, codes.shape, q.granularity)).astype(np.int64)
        lo, hi = lo - hi, hi - lo
        words.append("rel")
    array = _arrays.store(bufs, codes, fill=0, int_range=(lo, hi), kept=self.kept, nm=self.nm,
                          huffman=huffman)
    return " ".join(words + [array])

  def _write_block_scaled(self, bufs, huffman):
    """``<format> <granularity> <block scales> [<tensor scale>] <elements>``."""
    q = self.qarray
    fmt = q.fmt
    words = [fmt.dtype, granularity_name(q.granularity)]
    words.append(_arrays.store(bufs, np.asarray(q.scale).astype(fmt.scale_dtype), dense=True))
    if fmt.block.tensor_scale:
      words.append(_arrays.store(bufs, np.asarray(q.tensor_scale, np.float32).reshape(1), dense=True))
    values = np.asarray(q.values)
    if _num.num_bits(fmt) == 4:  # the e2m1 bit patterns, packed two per byte
      codes = (_arrays.raw_bits(values) & 0xF).astype(np.int64)
      array = _arrays.store(bufs, codes, fill=0, int_range=(0, 15), kept=self.kept, nm=self.nm,
                            huffman=huffman)
    else:
      array = _arrays.store(bufs, values, fill=0, kept=self.kept, nm=self.nm)
    return " ".join(words + [array])


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

  def write(self, bufs, huffman):
    codebook = np.asarray(self.codebook)
    indices = np.asarray(self.indices, np.int64)
    if self.channel_axis is None:
      # Keep only the centroids in use, sorted by value (neighbours then share their
      # leading bits, which the XOR coding of the codebook saves); same values, renumbered.
      used = np.unique(indices[indices >= 0])
      order = used[np.argsort(codebook[used].astype(np.float64), kind="stable")]
      codebook = codebook[order]
      rank = np.zeros(max(int(used.max(initial=0)) + 1, 1), np.int64)
      rank[order] = np.arange(order.size)
      indices = np.where(indices >= 0, rank[np.maximum(indices, 0)], -1)
    k = codebook.shape[-1]
    book = _arrays.store(bufs, codebook, dense=True)
    array = _arrays.store(bufs, indices, fill=-1, int_range=(-1, max(k - 1, 0)), kept=self.kept,
                          nm=self.nm, huffman=huffman)
    axis = "" if self.channel_axis is None else f"@{self.channel_axis}"
    return f"codebook{k}{axis} {book} {array}"


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

  def write(self, bufs, huffman):
    parts = []
    for part in self.parts:
      shape = "x".join(str(d) for d in part_shape(part))
      parts.append(f"[{shape} {part.write(bufs, huffman)}]")
    return self.kind + "".join(parts)


def part_shape(encoding: Encoding) -> tuple[int, ...]:
  """The shape of the array an encoding stands for."""
  if isinstance(encoding, Plain):
    return tuple(np.shape(encoding.values))
  if isinstance(encoding, Quantized):
    return tuple(encoding.qarray.shape)
  if isinstance(encoding, Clustered):
    return tuple(np.shape(encoding.indices))
  raise TypeError(f"{type(encoding).__name__} cannot be a factor.")


_FACTOR_PARTS = {"svd": ("u", "v"), "tucker2": ("core", "u_in", "u_out")}


# --------------------------------------------------------------------------
# Granularities as JSON.
# --------------------------------------------------------------------------


def granularity_name(g: _num.Granularity) -> str:
  """``tensor``, ``channel@-1`` (``channel@0,1``) or ``group32@-2``."""
  if isinstance(g, _num.PerTensor):
    return "tensor"
  if isinstance(g, _num.PerChannel):
    axes = g.axis if isinstance(g.axis, tuple) else (g.axis,)
    return "channel@" + ",".join(str(int(a)) for a in axes)
  if isinstance(g, _num.PerGroup):
    return f"group{int(g.size)}@{int(g.axis)}"
  raise TypeError(f"granularity {g!r} has no stored form; use PerTensor, PerChannel or PerGroup.")


def granularity_from_name(name: str) -> _num.Granularity:
  if name == "tensor":
    return _num.PerTensor()
  m = re.fullmatch(r"channel@(-?\d+(?:,-?\d+)*)", name)
  if m:
    axes = tuple(int(a) for a in m.group(1).split(","))
    return _num.PerChannel(axis=axes[0] if len(axes) == 1 else axes)
  m = re.fullmatch(r"group(\d+)@(-?\d+)", name)
  if m:
    return _num.PerGroup(size=int(m.group(1)), axis=int(m.group(2)))
  raise ValueError(f"unknown granularity {name!r}.")


# --------------------------------------------------------------------------
# Decoding.
# --------------------------------------------------------------------------


_QUANT = re.compile(r"(int(\d)(n?)(\+zp)?|float8_e4m3fn|float8_e5m2)$")
_BLOCK_SCALED = tuple(_blockscaled.FORMATS)
_CODEBOOK = re.compile(r"codebook(\d+)(?:@(\d+))?$")


def _split_parts(desc: str) -> list[str]:
  """``kind[a][b]`` -> ``[a, b]`` (brackets nest)."""
  parts, depth, start = [], 0, None
  for i, c in enumerate(desc):
    if c == "[":
      depth += 1
      if depth == 1:
        start = i + 1
    elif c == "]":
      depth -= 1
      if depth == 0:
        parts.append(desc[start:i])
      elif depth < 0:
        break
  if depth:
    raise ValueError(f"unbalanced brackets in {desc!r}.")
  return parts


def decode(desc: str, buffers: list[np.ndarray], shape: tuple[int, ...], dtype: str) -> jax.Array:
  """The float array an encoding describes, computed as the stage's ``apply`` computes it.

  Args:
    desc: the encoding's descriptor (the manifest's ``encoding``).
    buffers: the leaf's buffers, in order.
    shape: the array's shape.
    dtype: the array's dtype name.

  Returns:
    A ``jax.Array``.
  """
  reader = _arrays.Reader(buffers)
  out = _decode(desc, reader, tuple(shape), _arrays.np_dtype(dtype))
  reader.done()
  return out


def _quant_parts(desc: str, bufs: _arrays.Reader, shape: tuple[int, ...]):
  """``(codes, scale, zero_point, fmt, granularity)`` of a quantization descriptor (numpy)."""
  head, _, rest = desc.partition(" ")
  m = _QUANT.match(head)
  if m.group(2):
    fmt = _num.Format(bits=int(m.group(2)), narrow_range=bool(m.group(3)), symmetric=not m.group(4))
  else:
    fmt = _num.Format(dtype=head)
  gran_name, _, rest = rest.partition(" ")
  gran = granularity_from_name(gran_name)
  scale_shape = gran.scale_shape(shape)
  scale_desc, _, rest = rest.partition(" ")
  scale = _arrays.load(scale_desc, bufs, scale_shape)
  if scale.dtype != np.float32:
    raise ValueError(f"scales are float32, the stored ones are {scale.dtype}.")
  zp = None
  lo, hi = int(fmt.qmin), int(fmt.qmax)
  if not fmt.symmetric:
    zp = _bits.unpack(bufs.next(), _bits.width(hi - lo + 1), math.prod(scale_shape)) + lo
    zp = zp.reshape(scale_shape)
  relative = rest.startswith("rel ")
  if relative:
    rest = rest[4:]
  codes = _arrays.load(rest, bufs, shape, fill=0)
  if not fmt.is_float:
    if relative:
      codes = codes + np.asarray(_num.expand_scale(zp, shape, gran)).astype(np.int64)
    if codes.size and (codes.min() < lo or codes.max() > hi):
      raise ValueError(f"quantization codes fall outside [{lo}, {hi}].")
  return codes, scale, zp, fmt, gran


def _block_scaled_qarray(desc: str, bufs: _arrays.Reader, shape: tuple[int, ...], dtype: np.dtype):
  """The ``QArray`` of a block-scaled descriptor (see ``Quantized``)."""
  head, _, rest = desc.partition(" ")
  fmt = _num.Format(dtype=head)
  gran_name, _, rest = rest.partition(" ")
  gran = granularity_from_name(gran_name)
  _num.check(fmt, gran, shape, "the stored leaf")
  scale_desc, _, rest = rest.partition(" ")
  scale = _arrays.load(scale_desc, bufs, gran.scale_shape(shape))
  if scale.dtype != fmt.scale_dtype:
    raise ValueError(f"{fmt.dtype} block scales are {fmt.scale_dtype}, the stored ones are {scale.dtype}.")
  tensor_scale = None
  if fmt.block.tensor_scale:
    tensor_desc, _, rest = rest.partition(" ")
    tensor_scale = _arrays.load(tensor_desc, bufs, (1,))
    if tensor_scale.dtype != np.float32:
      raise ValueError(f"the {fmt.dtype} tensor scale is float32, the stored one is {tensor_scale.dtype}.")
    tensor_scale = jnp.asarray(tensor_scale.reshape(()))
  values = _arrays.load(rest, bufs, shape, fill=0)
  if _num.num_bits(fmt) == 4:
    if values.size and (values.min() < 0 or values.max() > 15):
      raise ValueError("4-bit element codes fall outside [0, 15].")
    values = values.astype(np.uint8).view(fmt.storage_dtype)
  elif values.dtype != fmt.storage_dtype:
    raise ValueError(f"{fmt.dtype} elements are {fmt.storage_dtype}, the stored ones are {values.dtype}.")
  return _num.QArray(jnp.asarray(values), jnp.asarray(scale), None, fmt, gran, dtype, tensor_scale)


def quantized_parts(desc: str, buffers: list[np.ndarray], shape: tuple[int, ...]):
  """``(codes, scale, format, granularity)`` of a symmetric quantized leaf, else ``None``.

  For compressed inference: the integer (or float8) codes and the float32
  scales, as numpy arrays, without dequantizing.
  """
  head = desc.partition(" ")[0]
  m = _QUANT.match(head)
  if m is None or m.group(4):
    return None
  reader = _arrays.Reader(buffers)
  codes, scale, _, fmt, gran = _quant_parts(desc, reader, tuple(shape))
  reader.done()
  return codes, scale, fmt, gran


class FactorPart(NamedTuple):
  """One factor of a low-rank leaf: its shape, its own descriptor and its buffers."""

  shape: tuple[int, ...]
  encoding: str
  buffers: list[np.ndarray]


def factor_parts(desc: str, buffers: list[np.ndarray], dtype: str) -> tuple[str, list[FactorPart]] | None:
  """``(kind, parts)`` of a low-rank leaf (``svd`` or ``tucker2``), else ``None``.

  Each part is a ``FactorPart`` that ``decode`` (or ``quantized_parts``)
  reads on its own: the factor's shape, its descriptor and the buffers it
  uses, in the order of ``Factorized.parts``.

  Args:
    desc: the leaf's descriptor (the manifest's ``encoding``).
    buffers: the leaf's buffers, in order.
    dtype: the leaf's dtype name.

  Returns:
    ``("svd", [u, v])``, ``("tucker2", [core, u_in, u_out])`` or ``None``
    for a leaf of another encoding.

  Raises:
    ValueError: a descriptor or buffers that do not fit each other.

  Example:
    >>> import jax, jaxcompress as jc
    >>> from jaxcompress.export.encodings import factor_parts
    >>> spec = jc.Spec([jc.Rule("w", [jc.lowrank.svd(rank=2), jc.quant.FakeQuant(bits=8)])])
    >>> t, s = spec.init({"w": jax.random.normal(jax.random.key(0), (8, 6))})
    >>> leaf = jc.export.export(spec, t, s).leaves[0]
    >>> kind, parts = factor_parts(leaf.record.encoding, leaf.buffers, "float32")
    >>> kind, [p.shape for p in parts], parts[0].encoding.split()[0]
    ('svd', [(8, 2), (2, 6)], 'int8')
  """
  head = desc.partition(" ")[0]
  kind = head.split("[")[0]
  if kind not in _FACTOR_PARTS or not head.startswith(kind + "["):
    return None
  reader = _arrays.Reader(buffers)
  out = []
  for part in _split_parts(desc):
    dims, _, sub = part.partition(" ")
    shape = tuple(int(d) for d in dims.split("x"))
    start = reader.position
    _decode(sub, reader, shape, _arrays.np_dtype(dtype))
    out.append(FactorPart(shape, sub, list(buffers[start:reader.position])))
  reader.done()
  if len(out) != len(_FACTOR_PARTS[kind]):
    raise ValueError(f"{kind} needs {len(_FACTOR_PARTS[kind])} factors, got {len(out)}.")
  return kind, out


def codebook_parts(desc: str, buffers: list[np.ndarray], shape: tuple[int, ...]):
  """``(codebook, indices, axis)`` of a clustered leaf, else ``None``.

  For compressed inference: the centroids and the centroid index of every
  entry, as numpy arrays, without building the float leaf.

  Args:
    desc: the leaf's descriptor (the manifest's ``encoding``).
    buffers: the leaf's buffers, in order.
    shape: the leaf's shape.

  Returns:
    ``codebook``: ``(k,)``, or ``(shape[axis], k)`` with a codebook per
    channel; ``indices``: integers of ``shape``, ``-1`` where the entry is
    zero; ``axis``: the channel axis or ``None``. ``None`` for a leaf of
    another encoding.

  Raises:
    ValueError: a descriptor or buffers that do not fit each other, or an
      index outside the codebook.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> from jaxcompress.export.encodings import codebook_parts
    >>> spec = jc.Spec([jc.Rule("w", [jc.cluster.kmeans(bits=1)])])
    >>> t, s = spec.init({"w": jnp.array([[-1.0, 0.0], [1.0, -1.0]])})
    >>> leaf = jc.export.export(spec, t, s).leaves[0]
    >>> book, idx, axis = codebook_parts(leaf.record.encoding, leaf.buffers, (2, 2))
    >>> book.tolist(), idx.tolist(), axis
    ([-1.0, 1.0], [[0, -1], [1, 0]], None)
  """
  head, _, rest = desc.partition(" ")
  m = _CODEBOOK.match(head)
  if m is None:
    return None
  k = int(m.group(1))
  axis = None if m.group(2) is None else int(m.group(2))
  reader = _arrays.Reader(buffers)
  book_desc, _, rest = rest.partition(" ")
  codebook = _arrays.load(book_desc, reader, (k,) if axis is None else (shape[axis], k))
  indices = _arrays.load(rest, reader, tuple(shape), fill=-1)
  reader.done()
  if indices.size and (indices.max() >= k or indices.min() < -1):
    raise ValueError(f"a cluster index lies outside the codebook of {k} entries.")
  return codebook, indices, axis


def _decode(desc: str, bufs: _arrays.Reader, shape: tuple[int, ...], dtype: np.dtype) -> jax.Array:
  head, _, rest = desc.partition(" ")
  if head == "plain":
    x = _arrays.load(rest, bufs, shape, fill=0)
    if x.dtype != dtype:
      raise ValueError(f"a {dtype} array stores {x.dtype} values.")
    return jnp.asarray(x)
  if head in _FACTOR_PARTS or head.startswith(tuple(k + "[" for k in _FACTOR_PARTS)):
    kind = head.split("[")[0]
    parts = []
    for part in _split_parts(desc):
      dims, _, sub = part.partition(" ")
      parts.append(_decode(sub, bufs, tuple(int(d) for d in dims.split("x")), dtype))
    if len(parts) != len(_FACTOR_PARTS[kind]):
      raise ValueError(f"{kind} needs {len(_FACTOR_PARTS[kind])} factors, got {len(parts)}.")
    if kind == "svd":
      return _lowrank.Factors(parts[0], parts[1], shape).materialize()
    return _lowrank.Tucker2Factors(*parts).materialize()
  m = _CODEBOOK.match(head)
  if m:
    k = int(m.group(1))
    axis = None if m.group(2) is None else int(m.group(2))
    book_shape = (k,) if axis is None else (shape[axis], k)
    book, _, rest = rest.partition(" ")
    codebook = _arrays.load(book, bufs, book_shape)
    if codebook.dtype != dtype:
      raise ValueError(f"a {dtype} leaf has a {codebook.dtype} codebook.")
    codebook = jnp.asarray(codebook)
    idx = _arrays.load(rest, bufs, shape, fill=-1)
    if idx.size and (idx.max() >= k or idx.min() < -1):
      raise ValueError(f"a cluster index lies outside the codebook of {k} entries.")
    if k == 0:  # every entry is zero
      return jnp.zeros(shape, dtype)
    nonzero = jnp.asarray(idx >= 0)
    a = jnp.asarray(np.maximum(idx, 0).astype(np.int32))
    if axis is not None:
      channel = jax.lax.broadcasted_iota(jnp.int32, a.shape, axis)
      a = channel * k + a
    shared = codebook.reshape(-1)[a]
    return jnp.where(nonzero, shared, jnp.zeros(a.shape, codebook.dtype))
  if head in _BLOCK_SCALED:
    return _num.dequantize(_block_scaled_qarray(desc, bufs, shape, dtype))
  if _QUANT.match(head):
    codes, scale, zp, fmt, gran = _quant_parts(desc, bufs, shape)
    scale = jnp.asarray(scale)
    if zp is not None:
      zp = jnp.asarray(zp.astype(np.int8)).astype(fmt.storage_dtype)
    if fmt.is_float:
      values = jnp.asarray(codes.astype(fmt.storage_dtype))
    else:
      values = jnp.asarray(codes.astype(np.int8)).astype(fmt.storage_dtype)
    return _num.dequantize(_num.QArray(values, scale, zp, fmt, gran, dtype))
  raise ValueError(f"unknown encoding {desc!r}.")


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
    'plain dense:float32'
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
  return Quantized(stage.quantize(ctx.value, ctx.state, path=ctx.path), **_hints(ctx.previous))


def _encode_lsq(stage, ctx: EncodeContext) -> Encoding:
  return Quantized(stage.quantize(ctx.value, ctx.params, path=ctx.path), **_hints(ctx.previous))


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

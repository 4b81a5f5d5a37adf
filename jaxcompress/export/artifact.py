"""The artifact: every leaf of a compressed model in its stored form, plus a manifest.

``export(spec, trainable, state)`` walks each leaf's stage chain as
``spec.apply`` does, asks each stage's encoder for the leaf's stored form, and
checks, leaf by leaf, that decoding gives back ``spec.apply``'s value bit for bit.
``decode(artifact)`` gives the float params; no spec is needed.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import jax
import numpy as np

from jaxcompress.core.paths import path_str
from jaxcompress.core.spec import Compressed, LeafState, Spec
from jaxcompress.export import arrays as _arrays
from jaxcompress.export import encodings as _enc

PyTree = Any

#: Version of the stored format that this code writes (and the newest it reads).
FORMAT_VERSION = 1
FORMAT_NAME = "jaxcompress.export"


@dataclasses.dataclass(frozen=True)
class LeafRecord:
  """The manifest entry of one leaf.

  Attributes:
    path: the leaf path (``Dense_0/kernel``).
    chain: the names of the stages that compressed it, in order (``("Prune",
      "FakeQuant")``); empty for a leaf no rule selects.
    shape: the leaf's shape.
    dtype: the leaf's dtype name (what ``decode`` gives).
    encoding: the stored form, e.g. ``int4 channel@-1 dense:u4-8`` (int4 codes,
      per-channel scales) or ``codebook32 runs5x900(h32):h32``; it says all a
      decoder needs besides the bytes (``jaxcompress.export.encodings``).
    nbytes: bytes stored for the leaf (every buffer: values, positions,
      scales, codebooks, Huffman tables).
    crc32: CRC-32 of the stored bytes, 8 hex digits.
    fallback: why the leaf is stored as its float value, or ``None``.
  """

  path: str
  chain: tuple[str, ...]
  shape: tuple[int, ...]
  dtype: str
  encoding: str
  nbytes: int
  crc32: str
  fallback: str | None = None

  @property
  def float_nbytes(self) -> int:
    """Bytes of the leaf as a dense array of its dtype."""
    return math.prod(self.shape) * _arrays.np_dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedLeaf:
  """One stored leaf: its manifest record and its buffers.

  Attributes:
    record: the ``LeafRecord``; ``record.encoding`` says how to decode the buffers.
    buffers: ``uint8`` arrays, in storage order.
  """

  record: LeafRecord
  buffers: tuple[np.ndarray, ...]

  def blob(self) -> np.ndarray:
    """The buffers back to back (what goes to disk)."""
    if not self.buffers:
      return np.zeros(0, np.uint8)
    return np.concatenate([b.reshape(-1) for b in self.buffers]).astype(np.uint8)

  def decode(self) -> jax.Array:
    """The leaf's value."""
    r = self.record
    try:
      out = _enc.decode(r.encoding, list(self.buffers), r.shape, r.dtype)
    except (KeyError, TypeError, IndexError, ValueError) as e:
      raise ValueError(f"leaf {r.path!r} cannot be decoded, the artifact is corrupted: {e}") from None
    if tuple(out.shape) != r.shape or np.dtype(out.dtype).name != r.dtype:
      raise ValueError(
          f"leaf {r.path!r} decodes to shape {tuple(out.shape)} {out.dtype}, but the manifest "
          f"says {r.shape} {r.dtype}: the artifact is corrupted."
      )
    return out

  def manifest_entry(self) -> dict:
    r = self.record
    entry = {
        "path": r.path, "chain": list(r.chain), "shape": list(r.shape), "dtype": r.dtype,
        "encoding": r.encoding, "bytes": r.nbytes, "crc32": r.crc32,
        "buffers": [int(b.size) for b in self.buffers],
    }
    if r.fallback is not None:
      entry["fallback"] = r.fallback
    return entry


@dataclasses.dataclass(frozen=True, eq=False)
class Artifact:
  """A compressed model in its stored form.

  Attributes:
    tree: the params' structure with an ``EncodedLeaf`` at every leaf.

  ``print(artifact)`` shows the size table; ``artifact.manifest`` is the JSON
  manifest that ``save`` writes.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> params = {"w": jnp.arange(-8.0, 8.0).reshape(4, 4), "b": jnp.ones(4)}
    >>> spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=4)])])
    >>> t, s = spec.init(params)
    >>> art = jc.export.export(spec, t, s)
    >>> art.leaves[1].record.encoding, art.leaves[1].record.nbytes
    ('int4 channel@-1 dense:xfloat32 dense:u4-8', 23)
  """

  tree: PyTree

  @property
  def leaves(self) -> list[EncodedLeaf]:
    """The encoded leaves, in tree order."""
    return jax.tree_util.tree_leaves(self.tree, is_leaf=lambda x: isinstance(x, EncodedLeaf))

  @property
  def records(self) -> list[LeafRecord]:
    """The manifest records, in tree order."""
    return [leaf.record for leaf in self.leaves]

  @property
  def nbytes(self) -> int:
    """Stored bytes of every leaf."""
    return sum(r.nbytes for r in self.records)

  @property
  def float_nbytes(self) -> int:
    """Bytes of the dense params."""
    return sum(r.float_nbytes for r in self.records)

  @property
  def manifest(self) -> dict:
    """The JSON manifest: format, version and one entry per leaf."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "leaves": [leaf.manifest_entry() for leaf in self.leaves],
    }

  def table(self) -> str:
    """The size table: path, shape, stages, encoding, bytes dense and stored, ratio."""
    head = ("path", "shape", "stages", "encoding", "dense B", "stored B", "ratio")
    rows = [head]
    for r in self.records:
      stages = " -> ".join(r.chain) or "-"
      enc = r.encoding if r.fallback is None else f"{r.encoding} (float fallback)"
      rows.append((r.path, str(r.shape), stages, enc, str(r.float_nbytes), str(r.nbytes),
                   f"{r.float_nbytes / max(r.nbytes, 1):.1f}x"))
    rows.append(("total", "", "", "", str(self.float_nbytes), str(self.nbytes),
                 f"{self.float_nbytes / max(self.nbytes, 1):.1f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    right = {4, 5, 6}
    return "\n".join(
        "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    )

  def __str__(self) -> str:
    return self.table()


# --------------------------------------------------------------------------
# Export.
# --------------------------------------------------------------------------


def _is_node(x: Any) -> bool:
  return isinstance(x, (Compressed, LeafState))


def _is_array(v: Any) -> bool:
  return hasattr(v, "shape") and hasattr(v, "dtype") and not hasattr(v, "materialize")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
  """Equal bit for bit (NaNs equal whatever their payload)."""
  if a.shape != b.shape or a.dtype != b.dtype:
    return False
  if not np.issubdtype(a.dtype, np.inexact) and a.dtype.kind != "V":
    return bool(np.array_equal(a, b))
  both_nan = np.isnan(a.astype(np.float32)) & np.isnan(b.astype(np.float32))
  return bool(np.all((_arrays.raw_bits(a) == _arrays.raw_bits(b)) | both_nan))


def _stage_encodings(rule, t: Any, s: LeafState, path: str) -> _enc.Encoding:
  """Walks a leaf's stage chain as ``spec.apply`` does; returns the last stage's encoding.

  Raises ``LookupError`` naming the stage when a stage has no encoder.
  """
  params = t.params if isinstance(t, Compressed) else {}
  value = t.weight if isinstance(t, Compressed) else t
  enc: _enc.Encoding | None = None
  for stage, key in zip(rule.stages, rule.keys):
    encoder = _enc.find_encoder(stage)
    if encoder is None:
      raise LookupError(stage.describe())
    p, st = params.get(key), s.stages[key]
    if stage.replaces_weight:
      out = stage.apply(None, p, st)
      enc = encoder(stage, _enc.EncodeContext(path, None, p, st, out, None))
    elif _is_array(value):
      out = stage.apply(value, p, st)
      enc = encoder(stage, _enc.EncodeContext(path, value, p, st, out, enc))
    else:  # factors: the stage applies to each factor
      parts, treedef = jax.tree_util.tree_flatten(value)
      ps = list(p) if p is not None else [None] * len(parts)
      ss = list(st) if st is not None else [None] * len(parts)
      outs = [stage.apply(v, pp, sp) for v, pp, sp in zip(parts, ps, ss)]
      prev = enc.parts if isinstance(enc, _enc.Factorized) else [None] * len(parts)
      new = tuple(
          encoder(stage, _enc.EncodeContext(path, v, pp, sp, o, e))
          for v, pp, sp, o, e in zip(parts, ps, ss, outs, prev)
      )
      enc = dataclasses.replace(enc, parts=new)
      out = treedef.unflatten(outs)
    value = out
  return enc


def _leaf(path, chain, reference, encoding, huffman, fallback=None) -> EncodedLeaf:
  bufs: list[np.ndarray] = []
  desc = encoding.write(bufs, huffman)
  bufs = [np.asarray(b, np.uint8).reshape(-1) for b in bufs]
  blob = np.concatenate(bufs) if bufs else np.zeros(0, np.uint8)
  record = LeafRecord(
      path=path, chain=chain, shape=tuple(reference.shape), dtype=reference.dtype.name,
      encoding=desc, nbytes=int(blob.size), crc32=f"{zlib.crc32(blob.tobytes()):08x}",
      fallback=fallback,
  )
  return EncodedLeaf(record, tuple(bufs))


def export(
    spec: Spec,
    trainable: PyTree,
    state: PyTree,
    *,
    huffman: bool = False,
    float_fallback: bool = False,
) -> Artifact:
  """The compressed model in its stored form: real low-bit arrays and a manifest.

  Each leaf is stored as its stages say: quantized leaves as packed integer
  codes (``int8``; ``int4`` two per byte; ``int2``/``int3`` bit-packed) or
  float8 bytes with their scales and zero points; pruned leaves as their kept
  values with N:M positions, a bit mask, CSR indices or relative indices,
  whichever is smallest; clustered leaves as a codebook and packed indices;
  low-rank leaves as their factors, each stored as the stages after the
  factorization say. Leaves no rule selects are stored as they are. Every leaf
  is checked: decoding it gives ``spec.apply``'s value bit for bit.

  Args:
    spec: the spec.
    trainable, state: from ``spec.init``/``spec.update`` (concrete arrays).
    huffman: Huffman-code the integer streams (codes, cluster indices,
      relative indices) where that is smaller: Deep Compression's last step.
      Decoding is slower; compressed inference reads packed codes only.
    float_fallback: store a leaf whose stage has no encoder as its float value
      (``spec.apply``'s), marked in the manifest, instead of raising.

  Returns:
    An ``Artifact``.

  Raises:
    ValueError: a stage has no encoder (the message names the leaf and the
      stage), or a leaf does not decode to its ``spec.apply`` value.
    TypeError: for traced inputs (call it outside ``jax.jit``).

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
    >>> spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.75), jc.quant.FakeQuant(bits=8)])])
    >>> t, s = spec.init(params)
    >>> art = jc.export.export(spec, t, s)
    >>> print(art)
    path   shape     stages              encoding                                             dense B  stored B  ratio
    w      (64, 32)  Prune -> FakeQuant  int8 channel@-1 dense:xfloat32 runs3x592(u3):u8-128     8192       844   9.7x
    total                                                                                        8192       844   9.7x
    >>> bool((jc.export.decode(art)["w"] == spec.apply(t, s)["w"]).all())
    True
  """
  if not isinstance(spec, Spec):
    raise TypeError(f"export: spec must be a jc.Spec, got {type(spec).__name__}.")
  flat, treedef = jax.tree_util.tree_flatten_with_path(trainable, is_leaf=_is_node)
  paths = [path_str(p) for p, _ in flat]
  t_leaves = [v for _, v in flat]
  try:
    s_leaves = treedef.flatten_up_to(state)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "export: state does not have the structure of trainable; pass the pair that "
        f"spec.init/spec.update returned ({e})."
    ) from None
  for path, v in zip(paths, jax.tree_util.tree_leaves(trainable)):
    if isinstance(v, jax.core.Tracer):
      raise TypeError(
          f"export: leaf {path!r} is a traced array; export runs on the host over concrete "
          "arrays. Call it outside jax.jit."
      )
  reference = treedef.flatten_up_to(spec.apply(trainable, state))
  out = []
  for path, t, s, ref in zip(paths, t_leaves, s_leaves, reference):
    ref = np.asarray(ref)
    if not isinstance(s, LeafState):
      raise ValueError(
          f"export: the state of leaf {path!r} is {type(s).__name__}, not a LeafState; pass "
          "the state returned by spec.init/spec.update."
      )
    if not s.stages:
      out.append(_leaf(path, (), ref, _enc.Plain(ref), huffman))
      continue
    rule = spec.rules[s.rule]
    chain = tuple(type(stage).__name__ for stage in rule.stages)
    try:
      encoding = _stage_encodings(rule, t, s, path)
    except LookupError as e:
      if not float_fallback:
        raise ValueError(
            f"export: leaf {path!r} is compressed by {e.args[0]}, which has no encoder, so "
            "it cannot be stored in compressed form. Register one with "
            "jc.export.register_encoder(StageType, fn), or pass float_fallback=True to store "
            "this leaf as its float value."
        ) from None
      out.append(_leaf(path, chain, ref, _enc.Plain(ref), huffman,
                       fallback=f"no encoder for {e.args[0]}"))
      continue
    leaf = _leaf(path, chain, ref, encoding, huffman)
    if leaf.record.nbytes > ref.nbytes:  # a tiny leaf: its codebook or scales outweigh it
      out.append(_leaf(path, chain, ref, _enc.Plain(ref), huffman))
      continue
    got = np.asarray(leaf.decode())
    if not _same_bits(got, ref):
      differ = int(np.sum(~((got == ref) | (np.isnan(got.astype(np.float32)) & np.isnan(ref.astype(np.float32))))))
      if not float_fallback:
        raise ValueError(
            f"export: leaf {path!r} ({' -> '.join(chain)}) decodes to a value that differs "
            f"from spec.apply at {differ} of {ref.size} entries, so its encoding would "
            "change the model. Pass float_fallback=True to store this leaf as its float value."
        )
      leaf = _leaf(path, chain, ref, _enc.Plain(ref), huffman,
                   fallback=f"decoded value differs from spec.apply at {differ} entries")
    out.append(leaf)
  return Artifact(treedef.unflatten(out))


def decode(artifact: Artifact) -> PyTree:
  """The float params of an artifact: exactly ``spec.apply(trainable, state)``.

  Args:
    artifact: from ``export`` or ``load``.

  Returns:
    The params, with the artifact's structure, shapes and dtypes.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=4)])])
    >>> t, s = spec.init({"w": jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)})
    >>> params = jc.export.decode(jc.export.export(spec, t, s))
    >>> bool((params["w"] == spec.apply(t, s)["w"]).all())
    True
  """
  if not isinstance(artifact, Artifact):
    raise TypeError(f"decode: expected a jc.export.Artifact, got {type(artifact).__name__}.")
  return jax.tree_util.tree_map(
      lambda leaf: leaf.decode(), artifact.tree, is_leaf=lambda x: isinstance(x, EncodedLeaf)
  )


def check(artifact: Artifact, like: PyTree) -> None:
  """Raises ``ValueError`` unless the artifact has the structure of ``like``.

  Compares leaf paths, shapes and dtypes, and names every difference.

  Args:
    artifact: the artifact.
    like: params (or ``jax.eval_shape`` output) of the model it is for.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> art = jc.export.export(jc.Spec([]), {"w": jnp.ones(3)}, jc.Spec([]).init({"w": jnp.ones(3)})[1])
    >>> jc.export.check(art, {"w": jnp.ones(4)})
    Traceback (most recent call last):
    ...
    ValueError: the artifact does not fit the model: leaf 'w' has shape (3,) float32 in the artifact, (4,) float32 in the model.
  """
  records = {r.path: r for r in artifact.records}
  model = {
      path_str(p): (tuple(np.shape(v)), np.dtype(getattr(v, "dtype", np.asarray(v).dtype)).name)
      for p, v in jax.tree_util.tree_flatten_with_path(like)[0]
  }
  problems = []
  for p in model:
    if p not in records:
      problems.append(f"leaf {p!r} of the model is missing from the artifact")
  for p, r in records.items():
    if p not in model:
      problems.append(f"leaf {p!r} of the artifact is not in the model")
    elif model[p] != (r.shape, r.dtype):
      problems.append(
          f"leaf {p!r} has shape {r.shape} {r.dtype} in the artifact, "
          f"{model[p][0]} {model[p][1]} in the model"
      )
  if problems:
    shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
    raise ValueError(f"the artifact does not fit the model: {shown}.")


def with_structure(artifact: Artifact, like: PyTree) -> Artifact:
  """The artifact with its leaves arranged in the structure of ``like`` (checked)."""
  check(artifact, like)
  by_path = {leaf.record.path: leaf for leaf in artifact.leaves}
  flat, treedef = jax.tree_util.tree_flatten_with_path(like)
  return Artifact(treedef.unflatten([by_path[path_str(p)] for p, _ in flat]))


__all__ = [
    "Artifact", "EncodedLeaf", "FORMAT_VERSION", "LeafRecord", "check", "decode", "export",
    "with_structure",
]

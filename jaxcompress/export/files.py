"""Artifacts on disk: one safetensors file, or an Orbax checkpoint directory.

safetensors: one ``uint8`` tensor, ``data``, holds every leaf's bytes
back to back in manifest order (a tensor per leaf would cost a header entry of
about 60 bytes each, as much as a small compressed layer); the metadata holds
``format``, ``version`` and ``manifest``: the leaf entries of the JSON manifest
(each leaf's ``bytes`` left out: it is the sum of its ``buffers``), compressed
with raw deflate and base85-encoded (a manifest in plain JSON, escaped inside the
header's JSON, would take a quarter of a Deep-Compression-sized model). ``jc.export.load(path).manifest``
or ``read_manifest(path)`` give it as JSON. The file is exactly

    8 bytes (header length) + header + the leaves' bytes (``artifact.nbytes``)

and the header takes about 150 bytes plus the compressed manifest (roughly 100
to 150 bytes per leaf); ``save`` returns the sizes.

Orbax: a checkpoint directory with two items: ``data`` (one ``uint8`` array,
the leaves' bytes in manifest order) and ``manifest`` (plain JSON).

Loading checks everything before any weight is used: the file parses, the
format version is one this code reads, every leaf's bytes are there with the
size and CRC-32 the manifest gives, and (``like=``) the leaves match the model's
paths, shapes and dtypes. Each failure is a ``ValueError`` that says what is wrong.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import zlib
from typing import Any, NamedTuple

import numpy as np

from jaxcompress.export import artifact as _art

PyTree = Any
_TENSOR = "data"


class SavedFile(NamedTuple):
  """What ``save`` wrote.

  Attributes:
    path: the file or directory.
    nbytes: bytes on disk (the file's size; a directory's total).
    data_nbytes: bytes of the leaves (``artifact.nbytes``).
  """

  path: pathlib.Path
  nbytes: int
  data_nbytes: int

  @property
  def overhead(self) -> int:
    """Bytes on disk beyond the leaves' bytes: headers, manifest, index."""
    return self.nbytes - self.data_nbytes


def _data(artifact: _art.Artifact) -> np.ndarray:
  blobs = [leaf.blob() for leaf in artifact.leaves]
  return np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)


def _stored_leaves(artifact: _art.Artifact) -> list[dict]:
  """The manifest's leaf entries as stored: ``bytes`` is the sum of ``buffers``."""
  return [{k: v for k, v in e.items() if k != "bytes"} for e in artifact.manifest["leaves"]]


def _pack_manifest(manifest: Any) -> str:
  raw = json.dumps(manifest, separators=(",", ":")).encode()
  deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: no zlib header
  return base64.b85encode(deflate.compress(raw) + deflate.flush()).decode("ascii")


def _unpack_manifest(text: str, source: str) -> Any:
  try:
    return json.loads(zlib.decompress(base64.b85decode(text), -15))
  except (ValueError, zlib.error) as e:
    raise ValueError(f"load: the manifest in {source!r} is corrupted ({e}).") from None


def save(artifact: _art.Artifact, path: str | os.PathLike, *, format: str = "safetensors") -> SavedFile:
  """Writes an artifact to disk.

  Args:
    artifact: from ``export``.
    path: the file (``format="safetensors"``) or directory (``"orbax"``);
      an existing one is overwritten.
    format: ``"safetensors"`` (one file, manifest in its metadata) or
      ``"orbax"`` (a checkpoint directory).

  Returns:
    A ``SavedFile``: the path, the bytes on disk and the leaves' bytes.

  Example:
    >>> import os, tempfile, jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=8)])])
    >>> t, s = spec.init({"w": jnp.ones((256, 4))})
    >>> saved = jc.export.save(jc.export.export(spec, t, s), os.path.join(tempfile.mkdtemp(), "m.safetensors"))
    >>> saved.nbytes == saved.overhead + saved.data_nbytes, saved.data_nbytes > 256 * 4  # int8 codes
    (True, True)
  """
  if not isinstance(artifact, _art.Artifact):
    raise TypeError(f"save: expected a jc.export.Artifact, got {type(artifact).__name__}.")
  path = pathlib.Path(path)
  if format == "safetensors":
    from safetensors.numpy import save_file

    metadata = {
        "format": _art.FORMAT_NAME,
        "version": str(_art.FORMAT_VERSION),
        "manifest": _pack_manifest(_stored_leaves(artifact)),
    }
    save_file({_TENSOR: _data(artifact)}, str(path), metadata=metadata)
    return SavedFile(path, path.stat().st_size, artifact.nbytes)
  if format == "orbax":
    import orbax.checkpoint as ocp

    data = _data(artifact)
    if data.size == 0:  # Orbax does not store empty arrays
      data = np.zeros(1, np.uint8)
    ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    ckpt.save(
        path.absolute(),
        args=ocp.args.Composite(
            data=ocp.args.StandardSave({"data": data}),
            manifest=ocp.args.JsonSave(artifact.manifest),
        ),
        force=True,
    )
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return SavedFile(path, size, artifact.nbytes)
  raise ValueError(f"save: format={format!r}; use 'safetensors' (one file) or 'orbax' (a directory).")


def load(path: str | os.PathLike, *, like: PyTree | None = None) -> _art.Artifact:
  """Reads an artifact written by ``save``, checking it before anything is used.

  Args:
    path: a safetensors file or an Orbax checkpoint directory.
    like: optional params (or ``jax.eval_shape`` output) of the model the
      artifact is for: the artifact must have the same leaf paths, shapes and
      dtypes, and comes back in that structure. Without it, the structure is
      nested dicts from the leaf paths.

  Returns:
    The ``Artifact``.

  Raises:
    ValueError: the file is missing, truncated or corrupted, was written by a
      newer format version, lacks a leaf, fails a leaf's checksum, or does not
      fit ``like``; the message names the file and what is wrong.

  Example:
    >>> import os, tempfile, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    >>> spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=4)])])
    >>> t, s = spec.init(params)
    >>> file = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> _ = jc.export.save(jc.export.export(spec, t, s), file)
    >>> restored = jc.export.decode(jc.export.load(file, like=params))
    >>> bool((restored["w"] == spec.apply(t, s)["w"]).all())
    True
  """
  path = pathlib.Path(path)
  if path.is_dir():
    manifest, data = _read_orbax(path)
  elif path.is_file():
    manifest, data = _read_safetensors(path)
  else:
    raise ValueError(f"load: {str(path)!r} does not exist; give the file or directory that save wrote.")
  artifact = _from_manifest(manifest, data, str(path))
  return artifact if like is None else _art.with_structure(artifact, like)


# --------------------------------------------------------------------------
# Readers.
# --------------------------------------------------------------------------


def _read_safetensors(path: pathlib.Path) -> tuple[Any, np.ndarray]:
  from safetensors import safe_open

  source = str(path)
  try:
    with safe_open(source, framework="numpy") as f:
      metadata = f.metadata() or {}
      names = list(f.keys())
      data = f.get_tensor(_TENSOR) if _TENSOR in names else None
  except Exception as e:  # safetensors raises its own error types
    raise ValueError(
        f"load: {source!r} is not a readable safetensors file (truncated or corrupted?): {e}"
    ) from None
  if metadata.get("format") != _art.FORMAT_NAME or "manifest" not in metadata:
    raise ValueError(
        f"load: {source!r} is a safetensors file without a jaxcompress manifest; it was not "
        "written by jc.export.save."
    )
  _check_version(metadata.get("version"), source)
  if data is None or names != [_TENSOR]:
    raise ValueError(
        f"load: {source!r} should hold the one tensor {_TENSOR!r}, it holds {names}: the "
        "file was edited or is corrupted."
    )
  leaves = _unpack_manifest(metadata["manifest"], source)
  if not isinstance(leaves, list) or not all(isinstance(e, dict) for e in leaves):
    raise ValueError(f"load: the manifest in {source!r} is malformed.")
  for e in leaves:
    if isinstance(e.get("buffers"), list):
      e["bytes"] = sum(int(n) for n in e["buffers"] if isinstance(n, int))
  manifest = {"format": metadata["format"], "version": int(metadata["version"]), "leaves": leaves}
  return manifest, data


def _read_orbax(path: pathlib.Path) -> tuple[Any, np.ndarray]:
  import orbax.checkpoint as ocp

  try:
    ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    restored = ckpt.restore(
        path.absolute(),
        args=ocp.args.Composite(data=ocp.args.StandardRestore(), manifest=ocp.args.JsonRestore()),
    )
    data = np.asarray(restored["data"]["data"], np.uint8)
    manifest = restored["manifest"]
  except Exception as e:  # Orbax and tensorstore raise many error types
    raise ValueError(
        f"load: {str(path)!r} is not a readable jaxcompress Orbax checkpoint: {e}"
    ) from None
  if isinstance(manifest, dict) and sum(int(e.get("bytes", 0)) for e in manifest.get("leaves", [])) == 0:
    data = data[:0]  # the placeholder byte of an empty artifact
  return manifest, data


def _check_version(version: Any, source: str) -> None:
  try:
    v = int(version)
  except (TypeError, ValueError):
    raise ValueError(f"load: {source!r} has an invalid format version {version!r}.") from None
  if v < 1:
    raise ValueError(f"load: {source!r} has an invalid format version {version!r}.")
  if v > _art.FORMAT_VERSION:
    raise ValueError(
        f"load: {source!r} was written in format version {v}, newer than this jaxcompress "
        f"reads (up to {_art.FORMAT_VERSION}). Upgrade jaxcompress to load it."
    )


def _from_manifest(manifest: Any, data: np.ndarray, source: str) -> _art.Artifact:
  if not isinstance(manifest, dict) or manifest.get("format") != _art.FORMAT_NAME:
    raise ValueError(f"load: {source!r} does not hold a {_art.FORMAT_NAME} manifest.")
  _check_version(manifest.get("version"), source)
  entries = manifest.get("leaves")
  if not isinstance(entries, list):
    raise ValueError(f"load: the manifest of {source!r} has no list of leaves.")
  data = np.asarray(data, np.uint8).reshape(-1)
  leaves, paths, offset = [], [], 0
  for entry in entries:
    try:
      path = entry["path"]
      record = _art.LeafRecord(
          path=path, chain=tuple(entry["chain"]), shape=tuple(entry["shape"]),
          dtype=entry["dtype"], encoding=entry["encoding"], nbytes=int(entry["bytes"]),
          crc32=entry["crc32"], fallback=entry.get("fallback"),
      )
      sizes = [int(n) for n in entry["buffers"]]
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"load: a leaf entry of the manifest of {source!r} is malformed ({e!r}).") from None
    if offset + record.nbytes > data.size:
      raise ValueError(
          f"load: leaf {path!r} is in the manifest of {source!r} but its data is missing "
          f"(the file holds {data.size} bytes of leaf data, the manifest lists "
          f"{sum(int(e.get('bytes', 0)) for e in entries)}): the file was cut or edited."
      )
    blob = data[offset : offset + record.nbytes]
    offset += record.nbytes
    if sum(sizes) != record.nbytes or min(sizes, default=0) < 0:
      raise ValueError(f"load: the manifest entry of leaf {path!r} in {source!r} is inconsistent.")
    crc = f"{zlib.crc32(blob.tobytes()):08x}"
    if crc != record.crc32:
      raise ValueError(
          f"load: leaf {path!r} in {source!r} fails its checksum (CRC-32 {crc}, the manifest "
          f"says {record.crc32}): its bytes are corrupted."
      )
    starts = np.cumsum([0] + sizes)
    buffers = tuple(blob[a:b] for a, b in zip(starts[:-1], starts[1:]))
    leaves.append(_art.EncodedLeaf(record, buffers))
    paths.append(path)
  if offset != data.size:
    raise ValueError(
        f"load: {source!r} holds {data.size - offset} bytes of leaf data beyond what the "
        "manifest lists: the file was edited or is corrupted."
    )
  return _art.Artifact(_nest(paths, leaves, source))


def read_manifest(path: str | os.PathLike) -> dict:
  """The manifest of a saved artifact, as JSON (checked like ``load`` does).

  Args:
    path: a safetensors file or an Orbax directory written by ``save``.

  Returns:
    ``{"format", "version", "leaves": [{"path", "chain", "shape", "dtype",
    "encoding", "bytes", "crc32", "buffers"}, ...]}`` (``buffers``: the sizes of
    the leaf's buffers, in order).
  """
  return load(path).manifest


def _nest(paths: list[str], leaves: list, source: str) -> dict:
  tree: dict = {}
  for path, leaf in zip(paths, leaves):
    *parents, last = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"load: leaf paths in {source!r} conflict at {path!r}.")
    if last in node:
      raise ValueError(f"load: leaf {path!r} appears twice in {source!r}.")
    node[last] = leaf
  return tree

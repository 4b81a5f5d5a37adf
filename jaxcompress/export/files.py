"""Artifacts on disk: one safetensors file, or an Orbax checkpoint directory.

safetensors: one ``uint8`` tensor per leaf, named by the leaf path, holding
the leaf's buffers back to back; the manifest (JSON) is the file's metadata
under the key ``jaxcompress``. The file is exactly

    8 bytes (header length) + header (tensor index and manifest) + sum of the leaves' bytes

so its data bytes match the manifest's accounting; the header costs about
``100 + 60 * leaves`` bytes plus the manifest's JSON (``save`` returns both).

Orbax: a checkpoint directory with two items: ``data`` (one ``uint8`` array,
the leaves' bytes in manifest order) and ``manifest`` (JSON).

Loading checks everything before any weight is used: the file parses, the
format version is one this code reads, every leaf's bytes are there with the
size and CRC-32 the manifest gives, and (``like=``) the leaves match the model's
paths, shapes and dtypes. Each failure is a ``ValueError`` that says what is wrong.
"""

from __future__ import annotations

import json
import os
import pathlib
import zlib
from typing import Any, NamedTuple

import numpy as np

from jaxcompress.export import artifact as _art

PyTree = Any
_META_KEY = "jaxcompress"


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


def _manifest_json(artifact: _art.Artifact) -> str:
  return json.dumps(artifact.manifest, separators=(",", ":"))


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
    >>> saved.data_nbytes, saved.nbytes - saved.overhead
    (1040, 1040)
  """
  if not isinstance(artifact, _art.Artifact):
    raise TypeError(f"save: expected a jc.export.Artifact, got {type(artifact).__name__}.")
  path = pathlib.Path(path)
  if format == "safetensors":
    from safetensors.numpy import save_file

    tensors = {leaf.record.path: leaf.blob() for leaf in artifact.leaves}
    save_file(tensors, str(path), metadata={_META_KEY: _manifest_json(artifact)})
    return SavedFile(path, path.stat().st_size, artifact.nbytes)
  if format == "orbax":
    import orbax.checkpoint as ocp

    blobs = [leaf.blob() for leaf in artifact.leaves]
    data = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)
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
    manifest, blobs = _read_orbax(path)
  elif path.is_file():
    manifest, blobs = _read_safetensors(path)
  else:
    raise ValueError(f"load: {str(path)!r} does not exist; give the file or directory that save wrote.")
  artifact = _from_manifest(manifest, blobs, str(path))
  return artifact if like is None else _art.with_structure(artifact, like)


# --------------------------------------------------------------------------
# Readers.
# --------------------------------------------------------------------------


def _read_safetensors(path: pathlib.Path) -> tuple[Any, dict[str, np.ndarray]]:
  from safetensors import safe_open

  try:
    with safe_open(str(path), framework="numpy") as f:
      metadata = f.metadata() or {}
      blobs = {name: f.get_tensor(name) for name in f.keys()}
  except Exception as e:  # safetensors raises its own error types
    raise ValueError(
        f"load: {str(path)!r} is not a readable safetensors file (truncated or corrupted?): {e}"
    ) from None
  if _META_KEY not in metadata:
    raise ValueError(
        f"load: {str(path)!r} is a safetensors file without a jaxcompress manifest (metadata "
        f"key {_META_KEY!r}); it was not written by jc.export.save."
    )
  try:
    manifest = json.loads(metadata[_META_KEY])
  except json.JSONDecodeError as e:
    raise ValueError(f"load: the manifest in {str(path)!r} is not valid JSON: {e}.") from None
  return manifest, blobs


def _read_orbax(path: pathlib.Path) -> tuple[Any, dict[str, np.ndarray]]:
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
  # Split the one data array into leaves, in manifest order.
  blobs = {}
  offset = 0
  leaves = manifest.get("leaves", []) if isinstance(manifest, dict) else []
  for entry in leaves:
    n = int(entry.get("bytes", 0)) if isinstance(entry, dict) else 0
    if offset + n > data.size:
      break  # a missing leaf: reported by _from_manifest
    blobs[entry["path"]] = data[offset : offset + n]
    offset += n
  return manifest, blobs


def _from_manifest(manifest: Any, blobs: dict[str, np.ndarray], source: str) -> _art.Artifact:
  if not isinstance(manifest, dict) or manifest.get("format") != _art.FORMAT_NAME:
    raise ValueError(f"load: {source!r} does not hold a {_art.FORMAT_NAME} manifest.")
  version = manifest.get("version")
  if not isinstance(version, int) or version < 1:
    raise ValueError(f"load: {source!r} has a manifest with an invalid format version {version!r}.")
  if version > _art.FORMAT_VERSION:
    raise ValueError(
        f"load: {source!r} was written in format version {version}, newer than this "
        f"jaxcompress reads (up to {_art.FORMAT_VERSION}). Upgrade jaxcompress to load it."
    )
  entries = manifest.get("leaves")
  if not isinstance(entries, list):
    raise ValueError(f"load: the manifest of {source!r} has no list of leaves.")
  leaves, paths = [], []
  for entry in entries:
    try:
      path = entry["path"]
      record = _art.LeafRecord(
          path=path, chain=tuple(entry["chain"]), shape=tuple(entry["shape"]),
          dtype=entry["dtype"], encoding=entry["encoding"], nbytes=int(entry["bytes"]),
          crc32=entry["crc32"], fallback=entry.get("fallback"),
      )
      sizes = [(name, int(n)) for name, n in entry["buffers"]]
      node = entry["node"]
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"load: a leaf entry of the manifest of {source!r} is malformed ({e!r}).") from None
    if path not in blobs:
      raise ValueError(
          f"load: leaf {path!r} is in the manifest of {source!r} but its data is missing "
          "(the file was cut or edited)."
      )
    blob = np.asarray(blobs[path], np.uint8).reshape(-1)
    if blob.size != record.nbytes or sum(n for _, n in sizes) != record.nbytes:
      raise ValueError(
          f"load: leaf {path!r} in {source!r} has {blob.size} bytes, the manifest says "
          f"{record.nbytes}: the file is corrupted."
      )
    crc = f"{zlib.crc32(blob.tobytes()):08x}"
    if crc != record.crc32:
      raise ValueError(
          f"load: leaf {path!r} in {source!r} fails its checksum (CRC-32 {crc}, the manifest "
          f"says {record.crc32}): its bytes are corrupted."
      )
    buffers, offset = {}, 0
    for name, n in sizes:
      buffers[name] = blob[offset : offset + n]
      offset += n
    leaves.append(_art.EncodedLeaf(record, node, buffers))
    paths.append(path)
  extra = sorted(set(blobs) - set(paths))
  if extra:
    raise ValueError(f"load: {source!r} holds data for leaves the manifest does not list: {extra[:5]}.")
  return _art.Artifact(_nest(paths, leaves, source))


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

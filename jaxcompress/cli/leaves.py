"""What is stored, leaf by leaf: ``jaxcompress inspect``.

``summarize(path)`` reads an artifact written by ``jc.export.save`` (a
``.safetensors`` file or an Orbax directory; its manifest through
``jc.export.load``) or a plain Orbax checkpoint of params, and gives one
``LeafInfo`` per leaf:

- ``chain``: the stages that compressed it (the manifest's ``chain``);
- ``bits``: bits per stored value: the integer width of quantization codes
  (``int4`` -> 4, float8 -> 8), the index width of a codebook of ``k``
  entries (``ceil(log2 k)``), the dtype's width for values stored as they are;
  for low-rank factors, those of the factors;
- ``sparsity``: the fraction of zeros in the decoded leaf;
- ``rank``: the rank of low-rank factors;
- ``nbytes``: bytes stored for the leaf (the manifest's; for a plain
  checkpoint the array's).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxcompress as jc
from jaxcompress.core.paths import path_str

_QUANT = re.compile(r"int(\d)")
_CODEBOOK = re.compile(r"codebook(\d+)")
_PARTS = re.compile(r"\[([\dx]+) ([^\[\]]*)\]")


@dataclasses.dataclass(frozen=True)
class LeafInfo:
  """One leaf of an artifact or checkpoint.

  Attributes:
    path: the leaf path (``Dense_0/kernel``).
    shape: its shape.
    dtype: its dtype name.
    chain: the stage names that compressed it (empty: stored as it is).
    bits: bits per stored value (see the module docstring), as text (``"4"``,
      ``"8/8"`` for two factors).
    sparsity: the fraction of zeros of its value.
    rank: the rank of low-rank factors, else ``None``.
    nbytes: bytes stored.
    dense_nbytes: bytes of the dense array.
    encoding: the manifest's encoding (``""`` for a plain checkpoint).
  """

  path: str
  shape: tuple[int, ...]
  dtype: str
  chain: tuple[str, ...]
  bits: str
  sparsity: float
  rank: str | None
  nbytes: int
  dense_nbytes: int
  encoding: str = ""


@dataclasses.dataclass(frozen=True)
class Summary:
  """Every leaf of a file, and the file.

  Attributes:
    path: the file or directory.
    kind: ``"artifact"`` or ``"checkpoint"``.
    leaves: a ``LeafInfo`` per leaf.
    file_nbytes: bytes on disk (a directory's total).
  """

  path: str
  kind: str
  leaves: tuple[LeafInfo, ...]
  file_nbytes: int

  @property
  def nbytes(self) -> int:
    """Bytes stored for the leaves."""
    return sum(leaf.nbytes for leaf in self.leaves)

  @property
  def dense_nbytes(self) -> int:
    """Bytes of the dense arrays."""
    return sum(leaf.dense_nbytes for leaf in self.leaves)

  @property
  def size(self) -> int:
    """Number of values of the leaves."""
    return sum(math.prod(leaf.shape) for leaf in self.leaves)

  @property
  def sparsity(self) -> float:
    """The fraction of zeros over all leaves."""
    zeros = sum(leaf.sparsity * math.prod(leaf.shape) for leaf in self.leaves)
    return zeros / max(self.size, 1)

  def as_json(self) -> dict:
    """The summary as JSON-ready data."""
    return {
        "path": self.path, "kind": self.kind, "file_bytes": self.file_nbytes,
        "stored_bytes": self.nbytes, "dense_bytes": self.dense_nbytes, "values": self.size,
        "sparsity": self.sparsity,
        "leaves": [
            {**dataclasses.asdict(leaf), "shape": list(leaf.shape), "chain": list(leaf.chain)}
            for leaf in self.leaves
        ],
    }

  def table(self) -> str:
    """The per-leaf table with a totals row."""
    head = ("path", "shape", "dtype", "chain", "bits", "sparsity", "rank", "bytes", "dense B", "ratio")
    rows = [head]
    for leaf in self.leaves:
      rows.append((
          leaf.path, "x".join(map(str, leaf.shape)) or "()", leaf.dtype,
          " -> ".join(leaf.chain) or "-", leaf.bits, f"{leaf.sparsity:.1%}", leaf.rank or "-",
          str(leaf.nbytes), str(leaf.dense_nbytes), _ratio(leaf.dense_nbytes, leaf.nbytes),
      ))
    rows.append(("total", f"{self.size} values", "", "", "", f"{self.sparsity:.1%}", "",
                 str(self.nbytes), str(self.dense_nbytes), _ratio(self.dense_nbytes, self.nbytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    right = {4, 5, 6, 7, 8, 9}
    lines = [
        "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    ]
    kind = "artifact" if self.kind == "artifact" else "params checkpoint"
    lines.append(
        f"{self.path}: {kind}, {self.file_nbytes} bytes on disk "
        f"({_ratio(self.dense_nbytes, self.file_nbytes)} smaller than the dense leaves)"
    )
    return "\n".join(lines)


def _ratio(a: int, b: int) -> str:
  return f"{a / b:.1f}x" if b else "-"


def _bits(encoding: str, dtype: str) -> tuple[str, str | None]:
  """``(bits, rank)`` from an encoding descriptor."""
  parts = _PARTS.findall(encoding)
  if encoding.startswith(("svd[", "tucker2[")) and parts:
    bits = [_bits(desc, dtype)[0] for _, desc in parts]
    shapes = [tuple(int(d) for d in dims.split("x")) for dims, _ in parts]
    if encoding.startswith("svd["):
      rank = str(shapes[0][-1])
    else:  # core, u_in, u_out
      rank = f"{shapes[1][-1]}x{shapes[2][-1]}"
    return ("/".join(bits) if len(set(bits)) > 1 else bits[0]), rank
  head = encoding.partition(" ")[0]
  m = _QUANT.fullmatch(re.sub(r"n?(\+zp)?$", "", head))
  if m:
    return m.group(1), None
  if head.startswith("float8"):
    return "8", None
  m = _CODEBOOK.match(head)
  if m:
    return str(max(math.ceil(math.log2(int(m.group(1)))), 0) if int(m.group(1)) else 0), None
  return str(jnp.dtype(dtype).itemsize * 8), None


def _disk_size(path: pathlib.Path) -> int:
  if path.is_file():
    return path.stat().st_size
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _zeros(value: Any) -> float:
  a = np.asarray(value)
  return float(np.mean(a == 0)) if a.size else 0.0


def is_artifact(path: str | os.PathLike) -> bool:
  """Whether ``path`` is an artifact written by ``jc.export.save`` (by its form, not checked)."""
  path = pathlib.Path(path)
  return path.is_file() or (path / "manifest").is_dir()


def read_params(path: str | os.PathLike) -> Any:
  """The params of a plain Orbax checkpoint (a linen ``{"params": ...}`` is unwrapped).

  Args:
    path: the checkpoint directory (as ``orbax.checkpoint.StandardCheckpointer`` writes it).

  Returns:
    The params tree (arrays on the default device).

  Raises:
    ValueError: the directory is missing or is not a readable checkpoint.
  """
  import orbax.checkpoint as ocp

  path = pathlib.Path(path)
  if not path.is_dir():
    raise ValueError(
        f"{str(path)!r} is not a directory; give an Orbax checkpoint of params (as "
        "orbax.checkpoint.StandardCheckpointer().save(path, params) writes it)."
    )
  try:
    params = ocp.StandardCheckpointer().restore(path.absolute())
  except Exception as e:  # Orbax and tensorstore raise many error types
    raise ValueError(f"{str(path)!r} is not a readable Orbax checkpoint of params: {e}") from None
  if isinstance(params, dict) and set(params) == {"params"}:
    params = params["params"]
  return params


def summarize(path: str | os.PathLike) -> Summary:
  """Reads an artifact or a params checkpoint and describes every leaf.

  Args:
    path: a ``.safetensors`` artifact, an Orbax artifact directory, or an
      Orbax checkpoint of params.

  Returns:
    A ``Summary``.

  Raises:
    ValueError: the path is missing, damaged, or neither kind of file.

  Example:
    >>> import os, tempfile, numpy as np, jaxcompress as jc
    >>> from jaxcompress.cli.leaves import summarize
    >>> spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=4)])])
    >>> t, s = spec.init({"w": np.linspace(-1, 1, 64, dtype=np.float32).reshape(16, 4)})
    >>> file = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> _ = jc.export.save(jc.export.export(spec, t, s), file)
    >>> leaf = summarize(file).leaves[0]
    >>> leaf.chain, leaf.bits, leaf.rank
    (('FakeQuant',), '4', None)
    >>> leaf.nbytes <= 16 * 4 // 2 + 4 * 4  # int4 codes, a float32 scale per output
    True
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f"{str(path)!r} does not exist.")
  if is_artifact(path):
    artifact = jc.export.load(path)
    leaves = []
    for leaf in artifact.leaves:
      r = leaf.record
      bits, rank = _bits(r.encoding, r.dtype)
      leaves.append(LeafInfo(r.path, tuple(r.shape), r.dtype, tuple(r.chain), bits,
                             _zeros(leaf.decode()), rank, r.nbytes, r.float_nbytes, r.encoding))
    return Summary(str(path), "artifact", tuple(leaves), _disk_size(path))
  params = read_params(path)
  leaves = []
  for p, v in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.asarray(v)
    leaves.append(LeafInfo(path_str(p), tuple(a.shape), a.dtype.name, (), str(a.dtype.itemsize * 8),
                           _zeros(a), None, int(a.nbytes), int(a.nbytes)))
  return Summary(str(path), "checkpoint", tuple(leaves), _disk_size(path))


__all__ = ["LeafInfo", "Summary", "is_artifact", "read_params", "summarize"]

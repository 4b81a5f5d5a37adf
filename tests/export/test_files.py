"""Files: the bytes on disk match the manifest, and every damaged file is refused by name."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import jaxcompress as jc
from jaxcompress.export import files


def params():
  k = jax.random.split(jax.random.key(0), 2)
  return {
      "Dense_0": {"kernel": jax.random.normal(k[0], (64, 32)), "bias": jnp.zeros(32)},
      "Dense_1": {"kernel": jax.random.normal(k[1], (32, 8)), "bias": jnp.ones(8)},
  }


@pytest.fixture(scope="module")
def artifact():
  spec = jc.Spec([jc.Rule(r".*kernel", [jc.quant.FakeQuant(bits=4)])])
  t, s = spec.init(params())
  return jc.export.export(spec, t, s)


@pytest.fixture
def saved(artifact, tmp_path):
  return jc.export.save(artifact, tmp_path / "model.safetensors")


def header(path):
  raw = path.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  return n, json.loads(raw[8 : 8 + n])


def rewrite(path, *, metadata=None, data=None):
  """Re-saves a file with its metadata or data replaced (a valid safetensors file)."""
  with safe_open(str(path), framework="numpy") as f:
    meta, tensor = dict(f.metadata()), f.get_tensor("data")
  meta.update(metadata or {})
  save_file({"data": tensor if data is None else data}, str(path), metadata=meta)


def test_file_is_header_plus_the_manifests_bytes(artifact, saved):
  n, head = header(saved.path)
  assert saved.nbytes == saved.path.stat().st_size == 8 + n + artifact.nbytes
  assert saved.overhead == 8 + n
  assert saved.overhead <= 200 + 150 * len(artifact.leaves)  # the bound files.py states
  assert head["data"]["data_offsets"] == [0, artifact.nbytes]
  assert head["__metadata__"]["version"] == str(jc.export.FORMAT_VERSION)
  manifest = jc.export.read_manifest(saved.path)
  assert manifest == artifact.manifest
  assert sum(e["bytes"] for e in manifest["leaves"]) == artifact.nbytes
  entry = next(e for e in manifest["leaves"] if e["path"] == "Dense_0/kernel")
  assert entry["chain"] == ["FakeQuant"] and entry["shape"] == [64, 32]
  assert entry["buffers"][-1] == 64 * 32 // 2  # int4 codes, two per byte
  assert entry["bytes"] <= 64 * 32 // 2 + 32 * 4  # and 32 float32 scales (XOR-coded if smaller)
  assert entry["encoding"].startswith("int4 channel@-1 ")


def test_truncated_file_is_refused(saved):
  raw = saved.path.read_bytes()
  saved.path.write_bytes(raw[:-10])
  with pytest.raises(ValueError, match="not a readable safetensors file .truncated or corrupted"):
    jc.export.load(saved.path)


def test_garbage_header_is_refused(saved):
  saved.path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  with pytest.raises(ValueError, match="not a readable safetensors file"):
    jc.export.load(saved.path)


def test_flipped_byte_fails_the_leafs_checksum(artifact, saved):
  raw = bytearray(saved.path.read_bytes())
  first = artifact.leaves[0]
  raw[-artifact.nbytes + first.record.nbytes + 3] ^= 0x40  # inside the second leaf
  saved.path.write_bytes(bytes(raw))
  second = artifact.leaves[1].record.path
  with pytest.raises(ValueError, match=f"leaf '{second}' .* fails its checksum"):
    jc.export.load(saved.path)


def test_newer_format_version_is_refused(saved):
  rewrite(saved.path, metadata={"version": str(jc.export.FORMAT_VERSION + 1)})
  with pytest.raises(ValueError, match="format version 2, newer than this jaxcompress reads"):
    jc.export.load(saved.path)


def test_missing_leaf_data_is_refused(artifact, saved):
  with safe_open(str(saved.path), framework="numpy") as f:
    data = f.get_tensor("data")
  last = artifact.leaves[-1].record
  rewrite(saved.path, data=data[: -last.nbytes])
  with pytest.raises(ValueError, match=f"leaf '{last.path}' is in the manifest .* data is missing"):
    jc.export.load(saved.path)


def test_extra_data_is_refused(saved):
  with safe_open(str(saved.path), framework="numpy") as f:
    data = f.get_tensor("data")
  rewrite(saved.path, data=np.concatenate([data, np.zeros(5, np.uint8)]))
  with pytest.raises(ValueError, match="5 bytes of leaf data beyond what the manifest lists"):
    jc.export.load(saved.path)


def test_corrupted_manifest_is_refused(saved):
  rewrite(saved.path, metadata={"manifest": "not base85 ~~~"})
  with pytest.raises(ValueError, match="the manifest in .* is corrupted"):
    jc.export.load(saved.path)


def test_plain_safetensors_file_is_refused(tmp_path):
  path = tmp_path / "weights.safetensors"
  save_file({"w": np.ones(3, np.float32)}, str(path))
  with pytest.raises(ValueError, match="without a jaxcompress manifest"):
    jc.export.load(path)


def test_missing_path_is_refused(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    jc.export.load(tmp_path / "nothing.safetensors")


def test_artifact_of_another_model_is_refused(saved):
  other = params()
  other["Dense_1"]["kernel"] = jnp.zeros((32, 16))
  del other["Dense_0"]["bias"]
  with pytest.raises(ValueError, match="does not fit the model") as e:
    jc.export.load(saved.path, like=other)
  msg = str(e.value)
  assert "'Dense_1/kernel' has shape (32, 8) float32 in the artifact, (32, 16) float32 in the model" in msg
  assert "'Dense_0/bias' of the artifact is not in the model" in msg


def test_load_like_gives_the_models_structure(artifact, saved):
  p = params()
  loaded = jc.export.load(saved.path, like=p)
  assert jax.tree_util.tree_structure(jc.export.decode(loaded)) == jax.tree_util.tree_structure(p)
  jc.export.check(loaded, jax.eval_shape(lambda: p))  # abstract params work too


def test_corrupted_encoding_is_refused_on_decode(artifact, saved):
  leaves = files._stored_leaves(artifact)
  leaves[1]["encoding"] = "int4 channel@-1 dense:float32 csr:u4-8"
  rewrite(saved.path, metadata={"manifest": files._pack_manifest(leaves)})
  loaded = jc.export.load(saved.path)
  with pytest.raises(ValueError, match=f"leaf '{leaves[1]['path']}' cannot be decoded"):
    jc.export.decode(loaded)


def test_save_rejects_unknown_format(artifact, tmp_path):
  with pytest.raises(ValueError, match="format='npz'; use 'safetensors' .* or 'orbax'"):
    jc.export.save(artifact, tmp_path / "m", format="npz")

"""Export of block-scaled leaves (MXFP8, MXFP4, NVFP4): the stored bytes and the round trip.

The buffers hold exactly the reference's elements and scales (``ml_dtypes``
bit patterns: e2m1 nibbles two per byte, one e8m0 or e4m3 byte per block,
NVFP4's float32 tensor scale), the manifest counts exactly those bytes, and
``decode`` (also after saving and loading the file) gives ``spec.apply`` bit
for bit.
"""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxcompress as jc
import jaxcompress.quant as jq
from tests.export.test_roundtrip import assert_bit_equal
from tests.quant.test_blockscaled import FORMATS, SPECS, make_data, reference

pytestmark = pytest.mark.slow  # each case compiles the stage and runs export


def exported(stages, w, **kwargs):
  spec = jc.Spec([jc.Rule("Dense_0/kernel", stages)])
  params = {"Dense_0": {"kernel": jnp.asarray(w), "bias": jnp.zeros(w.shape[1], w.dtype)}}
  t, s = spec.init(params)
  artifact = jc.export.export(spec, t, s, **kwargs)
  want = spec.apply(t, s)
  assert_bit_equal(jc.export.decode(artifact), want)
  leaf = next(x for x in artifact.leaves if x.record.path == "Dense_0/kernel")
  return artifact, leaf, want, params


def nibbles(buffer, count):
  """The 4-bit entries of a buffer packed two per byte, low nibble first."""
  b = np.asarray(buffer, np.uint8)
  return np.stack([b & 15, b >> 4], -1).reshape(-1)[:count]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", FORMATS)
def test_stored_bytes_are_the_reference_and_the_manifest_counts_them(name, dtype, tmp_path):
  np_dtype = np.dtype(getattr(ml_dtypes, dtype, dtype))
  rng = np.random.default_rng(7)
  size = SPECS[name][1]
  w = rng.normal(size=(4 * size, 24)).astype(np_dtype)  # dense: no zero entry
  w[: size, :3] *= 1e3  # blocks of different ranges
  artifact, leaf, want, params = exported([jq.FakeQuant(dtype=name)], w)
  ref = reference(w, name)
  words = leaf.record.encoding.split()
  tail = ["dense:float8_e4m3fn", "dense:float32"] if name == "nvfp4" else ["dense:float8_e8m0fnu"]
  elements = "dense:u4" if SPECS[name][0] == ml_dtypes.float4_e2m1fn else f"dense:{np.dtype(SPECS[name][0]).name}"
  assert words == [name, f"group{size}@-2"] + tail + [elements], leaf.record.encoding
  bufs = [np.asarray(b) for b in leaf.buffers]
  scale_bytes = np.ascontiguousarray(ref["scale"]).view(np.uint8).reshape(-1)
  np.testing.assert_array_equal(bufs[0], scale_bytes)  # one byte per block, row-major
  code_bits = np.ascontiguousarray(ref["codes"]).view(np.uint8).reshape(-1)
  if name == "nvfp4":
    np.testing.assert_array_equal(bufs[1], np.float32(ref["tensor_scale"]).reshape(1).view(np.uint8))
  if SPECS[name][0] == ml_dtypes.float4_e2m1fn:
    assert bufs[-1].size == w.size // 2
    np.testing.assert_array_equal(nibbles(bufs[-1], w.size), code_bits)
  else:
    np.testing.assert_array_equal(bufs[-1], code_bits)
  bits = 4 if SPECS[name][0] == ml_dtypes.float4_e2m1fn else 8
  expected = w.size * bits // 8 + w.size // size + (4 if name == "nvfp4" else 0)
  assert leaf.record.nbytes == sum(b.size for b in bufs) == expected
  assert leaf.record.nbytes < leaf.record.float_nbytes
  # Saved and loaded without the spec: the same values, bit for bit.
  saved = jc.export.save(artifact, tmp_path / "model.safetensors")
  loaded = jc.export.load(saved.path, like=params)
  assert loaded.records == artifact.records
  assert_bit_equal(jc.export.decode(loaded), want)


@pytest.mark.parametrize("name", FORMATS)
def test_special_values_and_pruned_zeros_round_trip(name):
  # Zero blocks, ties, saturation, subnormals and extreme ranges, Huffman-coded.
  w = make_data(name, np.float32, seed=11)
  _, leaf, want, _ = exported([jq.FakeQuant(dtype=name)], w, huffman=True)
  assert_bit_equal(want["Dense_0"]["kernel"], reference(w, name)["decoded"])
  # After pruning, only the kept elements are stored (with their positions).
  w = make_data(name, np.float32, seed=12)
  _, pruned, want, _ = exported([jc.prune.magnitude(sparsity=0.75), jq.FakeQuant(dtype=name)], w)
  size, bits = SPECS[name][1], (4 if SPECS[name][0] == ml_dtypes.float4_e2m1fn else 8)
  dense_bytes = w.size * bits // 8 + w.size // size + (4 if name == "nvfp4" else 0)
  assert pruned.record.nbytes < 0.75 * dense_bytes, (pruned.record.encoding, pruned.record.nbytes)
  assert (np.asarray(want["Dense_0"]["kernel"]) == 0).mean() >= 0.75


def _spec_state(name, w):
  spec = jc.Spec([jc.Rule("Dense_0/kernel", [jq.FakeQuant(dtype=name)])])
  t, s = spec.init({"Dense_0": {"kernel": jnp.asarray(w)}})
  return spec, t, s


def test_non_finite_weights_stay_where_the_elements_hold_them():
  w = np.random.default_rng(3).normal(size=(32, 4)).astype(np.float32)
  w[2, 1] = np.nan
  _, leaf, want, _ = exported([jq.FakeQuant(dtype="mxfp8_e4m3")], w)  # e4m3 holds NaN
  assert np.isnan(np.asarray(want["Dense_0"]["kernel"])[2, 1])
  w5 = w.copy()
  w5[0, 0], w5[1, 1] = np.inf, -np.inf
  _, leaf, want, _ = exported([jq.FakeQuant(dtype="mxfp8_e5m2")], w5)  # e5m2 holds both
  got = np.asarray(want["Dense_0"]["kernel"])
  assert got[0, 0] == np.inf and got[1, 1] == -np.inf and np.isnan(got[2, 1])
  for name in ("mxfp4", "nvfp4"):
    spec, t, s = _spec_state(name, w)
    with pytest.raises(ValueError, match=r"Dense_0/kernel: 1 non-finite value\(s\) \(first nan at index "
                       rf"\(2, 1\)\) cannot be encoded in {name}"):
      jc.export.export(spec, t, s)
  spec, t, s = _spec_state("mxfp8_e4m3", np.where(np.isnan(w), -np.inf, w))
  with pytest.raises(ValueError, match=r"Dense_0/kernel: .*first -inf .* cannot be encoded in mxfp8_e4m3"):
    jc.export.export(spec, t, s)

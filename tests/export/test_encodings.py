"""Encodings: bit packing and Huffman streams, the stored form each stage gets, and its errors."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
import jaxcompress.quant as jq
from jaxcompress.export import bits
from tests.export.test_roundtrip import assert_bit_equal


def kernel(shape=(64, 32), seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def exported(stages, w, **kwargs):
  spec = jc.Spec([jc.Rule("w", stages)])
  t, s = spec.init({"w": w}, key=jax.random.key(1))
  artifact = jc.export.export(spec, t, s, **kwargs)
  assert_bit_equal(jc.export.decode(artifact), spec.apply(t, s))
  return artifact.leaves[0].record


# --------------------------------------------------------------------------
# Bits.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("width", range(1, 9))
def test_pack_unpack_round_trip(width):
  v = np.random.default_rng(width).integers(0, 2**width, 101)
  packed = bits.pack(v, width)
  assert packed.size == (101 * width + 7) // 8
  np.testing.assert_array_equal(bits.unpack(packed, width, 101), v)


def test_pack_rejects_values_too_wide():
  with pytest.raises(ValueError, match="value 16 does not fit in 4 bits"):
    bits.pack(np.array([16]), 4)


def test_huffman_round_trip_and_truncation():
  s = np.random.default_rng(0).geometric(0.3, 2000).clip(1, 20) - 1
  lengths = bits.huffman_lengths(s, 20)
  stream, table = bits.huffman_encode(s, lengths)
  assert stream.size * 8 >= bits.huffman_bits(s, lengths) > stream.size * 8 - 8
  np.testing.assert_array_equal(bits.huffman_decode(stream, table, s.size, 20), s)
  with pytest.raises(ValueError, match="ends or breaks after"):
    bits.huffman_decode(stream[: stream.size // 2], table, s.size, 20)


def test_xor_coding_round_trip_with_special_values():
  x = np.array([0.0, -0.0, np.nan, np.inf, 1.0, 1.0000001, -3.5], np.float32)
  words = x.view(np.uint32)
  out = bits.xor_decode(bits.xor_encode(words, 32), x.size, 32).astype(np.uint32)
  np.testing.assert_array_equal(out, words)


# --------------------------------------------------------------------------
# What each stage is stored as.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("b", [2, 3, 4, 8])
def test_integer_codes_are_bit_packed(b):
  k = jax.random.split(jax.random.key(0))
  away_from_zero = jax.random.uniform(k[0], (64, 32), minval=0.8) * jnp.sign(jax.random.normal(k[1], (64, 32)))
  r = exported([jq.FakeQuant(bits=b, granularity=jq.PerTensor())], away_from_zero)
  assert r.encoding == f"int{b} tensor dense:float32 dense:u{b}{-(2 ** (b - 1)):+d}"
  assert r.nbytes == 4 + 64 * 32 * b // 8  # one scale, b bits per code


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_codes_take_a_byte(dtype):
  r = exported([jq.FakeQuant(dtype=dtype)], kernel())
  assert r.encoding.startswith(f"{dtype} channel@-1 ") and r.encoding.endswith(f"dense:{dtype}")
  assert 64 * 32 < r.nbytes <= 64 * 32 + 32 * 4


def test_nm_pruning_then_int4_stores_kept_codes_with_2_bit_positions():
  r = exported([jc.prune.Prune(structure=jc.prune.NM(2, 4)), jq.FakeQuant(bits=4)], kernel())
  assert " nm2/4@0:u4-8" in r.encoding
  codes = 64 * 32 // 2  # kept half
  assert r.nbytes <= 32 * 4 + codes * 2 // 8 + codes * 4 // 8


def test_asymmetric_codes_after_pruning_are_stored_relative_to_the_zero_point():
  stages = [jc.prune.magnitude(sparsity=0.9),
            jq.FakeQuant(bits=8, symmetric=False, granularity=jq.PerGroup(size=16))]
  r = exported(stages, kernel())
  assert r.encoding.startswith("int8+zp group16@-2 ") and " rel " in r.encoding
  assert r.nbytes < 64 * 32  # below the dense int8 codes alone


def test_sparse_layouts_are_chosen_by_size():
  w = np.zeros((64, 64), np.float32)
  w[np.arange(64), (np.arange(64) * 7) % 64] = 1.5  # one entry per row: CSR-like
  spec = jc.Spec([])
  art = jc.export.export(spec, {"w": w}, spec.init({"w": w})[1])
  r = art.leaves[0].record
  assert r.nbytes < 64 * 64 // 8 + 64 * 4  # below a bit mask
  assert_bit_equal(jc.export.decode(art), {"w": w})


def test_unmatched_leaves_keep_every_bit():
  x = np.array([0.0, -0.0, np.nan, -np.inf, 1e-45, 3.0], np.float32)
  tree = {"f": x, "i": np.arange(5, dtype=np.int32), "h": jnp.asarray(x, jnp.bfloat16)}
  spec = jc.Spec([])
  art = jc.export.export(spec, tree, spec.init(tree)[1])
  assert [r.chain for r in art.records] == [(), (), ()]
  assert_bit_equal(jc.export.decode(art), tree)


def test_clustering_stores_a_codebook_and_packed_indices():
  r = exported([jc.prune.magnitude(sparsity=0.5), jc.cluster.kmeans(bits=3)], kernel())
  assert r.encoding.startswith("codebook8 dense:")
  r_h = exported([jc.prune.magnitude(sparsity=0.5), jc.cluster.kmeans(bits=3)], kernel(), huffman=True)
  assert r_h.nbytes <= r.nbytes < 64 * 32 * 4 // 6


@pytest.mark.slow
def test_tucker2_factors_then_int8():
  w = kernel((3, 3, 8, 16))
  r = exported([jc.lowrank.tucker2(rank=(4, 6)), jq.LSQ(bits=8)], w)
  assert r.encoding.startswith("tucker2[3x3x4x6 int8 ") and "][8x4 int8 " in r.encoding
  assert r.nbytes < 3 * 3 * 8 * 16


def test_tiny_leaf_is_stored_plain_when_smaller():
  # 16 centroids per channel for 2 values a channel: the codebooks outweigh the leaf.
  r = exported([jc.cluster.kmeans(bits=4, channel_axis=-1)], kernel((2, 3)))
  assert r.encoding == "plain dense:float32" and r.nbytes == 24 and r.chain == ("Cluster",)


# --------------------------------------------------------------------------
# Stages without an encoder, user encoders, bad inputs.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Negate(jc.Stage):
  name: ClassVar[str] = "negate"

  def apply(self, value, params, state):
    return -value


def test_stage_without_encoder_is_an_error_naming_leaf_and_stage():
  spec = jc.Spec([jc.Rule("w", [Negate()])])
  t, s = spec.init({"w": jnp.ones(4)})
  with pytest.raises(ValueError, match=r"leaf 'w' is compressed by Negate\(\), which has no encoder"):
    jc.export.export(spec, t, s)
  art = jc.export.export(spec, t, s, float_fallback=True)
  assert art.leaves[0].record.fallback == "no encoder for Negate()"
  assert "float fallback" in art.table()
  assert_bit_equal(jc.export.decode(art), spec.apply(t, s))


def test_a_wrong_encoder_is_caught_not_stored():
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Twice(jc.Stage):
    name: ClassVar[str] = "twice"

    def apply(self, value, params, state):
      return value * 2

  jc.export.register_encoder(Twice, lambda stage, ctx: jc.export.Plain(np.asarray(ctx.value)))
  spec = jc.Spec([jc.Rule("w", [Twice()])])
  t, s = spec.init({"w": jnp.arange(4.0)})
  with pytest.raises(ValueError, match=r"leaf 'w' \(Twice\) decodes to a value that differs from spec.apply at 3 of 4"):
    jc.export.export(spec, t, s)
  art = jc.export.export(spec, t, s, float_fallback=True)
  assert "differs from spec.apply" in art.leaves[0].record.fallback


def test_register_encoder_checks_its_arguments():
  with pytest.raises(TypeError, match="stage_type must be a jc.Stage subclass"):
    jc.export.register_encoder(int, lambda s, c: None)
  with pytest.raises(TypeError, match="encoder must be callable"):
    jc.export.register_encoder(Negate, "plain")


def test_export_checks_its_inputs():
  spec = jc.Spec([jc.Rule("w", [jq.FakeQuant(bits=8)])])
  t, s = spec.init({"w": jnp.ones((4, 4))})
  with pytest.raises(TypeError, match="spec must be a jc.Spec"):
    jc.export.export("spec", t, s)
  with pytest.raises(ValueError, match="state does not have the structure of trainable"):
    jc.export.export(spec, t, {"other": s["w"]})
  with pytest.raises(TypeError, match="leaf 'w' is a traced array"):
    jax.jit(lambda t: jc.export.export(spec, t, s).nbytes)(t)
  with pytest.raises(TypeError, match="decode: expected a jc.export.Artifact"):
    jc.export.decode({"w": 1})


def test_nonfinite_weights_are_refused_at_export_naming_the_leaf():
  import jax.numpy as jnp
  import numpy as np
  import pytest

  import jaxcompress as jc

  w = np.ones((4, 4), np.float32)
  w[1, 2] = np.nan
  for stage in (jc.quant.FakeQuant(bits=8), jc.quant.LSQ(bits=8)):
    spec = jc.Spec([jc.Rule("layer/w", [stage])])
    t, s = spec.init({"layer": {"w": jnp.asarray(w)}})
    with pytest.raises(ValueError, match="layer/w"):
      jc.export.export(spec, t, s)


# --------------------------------------------------------------------------
# Descriptor accessors.
# --------------------------------------------------------------------------


def test_factor_parts_read_each_factor_on_its_own():
  from jaxcompress.export import encodings

  w = kernel((12, 10))
  spec = jc.Spec([jc.Rule("w", [jc.lowrank.svd(rank=3),
                                jc.quant.FakeQuant(bits=4)])])
  t, s = spec.init({"w": w})
  leaf = jc.export.export(spec, t, s).leaves[0]
  kind, parts = encodings.factor_parts(leaf.record.encoding, leaf.buffers, "float32")
  assert kind == "svd" and [p.shape for p in parts] == [(12, 3), (3, 10)]
  assert sum(len(p.buffers) for p in parts) == len(leaf.buffers)
  u, v = (np.asarray(encodings.decode(p.encoding, p.buffers, p.shape, "float32"), np.float64) for p in parts)
  want = np.asarray(spec.apply(t, s)["w"], np.float64)
  np.testing.assert_allclose(u @ v, want, rtol=1e-5, atol=1e-6)
  assert encodings.factor_parts("plain f32", [], "float32") is None
  with pytest.raises(ValueError, match="more buffers"):
    encodings.factor_parts(leaf.record.encoding, leaf.buffers[:-1], "float32")


def test_codebook_parts_give_indices_and_centroids():
  from jaxcompress.export import encodings

  w = jnp.array([[0.5, 0.0, -0.5], [0.5, 0.5, 0.0]])
  spec = jc.Spec([jc.Rule("w", [jc.cluster.kmeans(bits=1)])])
  t, s = spec.init({"w": w})
  leaf = jc.export.export(spec, t, s).leaves[0]
  book, idx, axis = encodings.codebook_parts(leaf.record.encoding, leaf.buffers, (2, 3))
  assert axis is None and book.tolist() == [-0.5, 0.5]
  assert idx.tolist() == [[1, -1, 0], [1, 1, -1]]
  assert encodings.codebook_parts("plain f32", [], (2, 3)) is None

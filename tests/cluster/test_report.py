"""The size report against sizes worked out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
import jaxcompress.cluster  # noqa: F401


def test_dense_codebook_by_hand():
  # 16 entries, 5 distinct values counted 8, 4, 2, 1, 1: Huffman lengths 1, 2, 3, 4, 4.
  w = np.array([1] * 8 + [2] * 4 + [3] * 2 + [4, 5], np.float32).reshape(4, 4)
  leaf = jc.cluster.compressed_size({"w": w}).leaves[0]
  # indices 8*1 + 4*2 + 2*3 + 4 + 4 = 30 bits; codebook 5 * 32; table (zero + 5 symbols) * 8.
  assert leaf.bits == 30 + 5 * 32 + 6 * 8
  assert leaf.format == "dense, codebook 5"
  assert (leaf.dense_bytes, leaf.compressed_bytes, leaf.nonzeros) == (64, 30, 16)


def test_sparse_relative_index_by_hand():
  w = np.zeros(64, np.float32)
  w[[0, 3, 9, 19]] = 1.5
  leaf = jc.cluster.compressed_size({"w": w}, index_bits=2).leaves[0]
  # Zeros skipped: 0, 2, 5, 9 -> runs 0 | 2 | filler 3, 1 | filler 3, filler 3, 1.
  # Runs 0:1, 1:2, 2:1, 3:3 -> Huffman lengths 3, 2, 3, 1 = 13 bits, + 4 * 8 table.
  positions = 13 + 4 * 8
  # Values: 3 fillers (zero) and 4 times the one centroid: 1 bit each + 2 * 8 table.
  values = 7 + 2 * 8 + 32
  assert leaf.bits == positions + values
  assert leaf.format == "sparse idx2, codebook 1"
  assert leaf.sparsity == 60 / 64
  assert leaf.compressed_bytes == 13 and leaf.dense_bytes == 256


def test_per_channel_codebook_by_hand():
  # Two columns of 256 distinct values each, each value twice: 512 values in all is
  # too many for one 8-bit codebook, 256 per channel is not.
  col = np.repeat(np.arange(1, 257, dtype=np.float32), 2)
  w = np.stack([0.5 * col, -0.25 * col], axis=1)
  leaf = jc.cluster.compressed_size({"k": w}).leaves[0]
  # 256 pooled symbols of count 4: 8 bits each; codebooks 2 * 256 * 32; table 257 * 8.
  assert leaf.bits == 1024 * 8 + 512 * 32 + 257 * 8
  assert leaf.format == "dense, codebook 2x<=256"


def test_unique_floats_stay_float():
  w = np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32)
  leaf = jc.cluster.compressed_size({"w": w}).leaves[0]
  assert leaf.format == "dense, float" and leaf.bits == 32 * 32 * 32 and leaf.ratio == 1.0


@pytest.mark.slow
def test_report_of_a_pruned_clustered_model():
  k = jax.random.split(jax.random.key(0), 2)
  params = {
      "Dense_0": {"kernel": jax.random.normal(k[0], (64, 32)), "bias": jnp.zeros(32)},
      "Dense_1": {"kernel": jax.random.normal(k[1], (32, 10)), "bias": jnp.ones(10)},
  }
  spec = jc.Spec([jc.Rule(r".*kernel", [jc.prune.magnitude(sparsity=0.8), jc.cluster.kmeans(bits=3)])])
  report = jc.cluster.compressed_size(spec.apply(*spec.init(params)), index_bits=5)
  rows = {l.path: l for l in report.leaves}
  kernel = rows["Dense_0/kernel"]
  assert kernel.format.startswith("sparse idx5, codebook ") and int(kernel.format.split()[-1]) <= 8
  assert kernel.sparsity == pytest.approx(0.8, abs=1 / 2048)
  assert rows["Dense_0/bias"].bits < 64  # all zeros: almost nothing to store
  assert report.dense_bytes == 4 * (64 * 32 + 32 + 32 * 10 + 10)
  assert report.compressed_bytes == sum(l.compressed_bytes for l in report.leaves)
  assert report.ratio == report.dense_bytes / report.compressed_bytes > 5
  lines = str(report).splitlines()
  assert len(lines) == 2 + len(report.leaves)
  assert lines[0].split()[:3] == ["path", "shape", "sparsity"]
  assert lines[-1].startswith("total") and lines[-1].endswith(f"{report.ratio:.1f}x")


def test_bfloat16_leaf_costs_as_its_values():
  w = np.zeros((16, 16), np.float32)
  w[::3, ::2] = np.tile([0.5, -1.25], 24).reshape(6, 8)
  a = jc.cluster.compressed_size({"w": w}).leaves[0]
  b = jc.cluster.compressed_size({"w": jnp.asarray(w, jnp.bfloat16)}).leaves[0]
  assert (a.bits, a.format) == (b.bits, b.format)


def test_bad_arguments():
  with pytest.raises(ValueError, match="index_bits must be an int in 1..16 or None .* got 0"):
    jc.cluster.compressed_size({"w": jnp.ones(3)}, index_bits=0)
  with pytest.raises(ValueError, match="float_bits must be a positive int, got 0"):
    jc.cluster.compressed_size({"w": jnp.ones(3)}, float_bits=0)
  with pytest.raises(TypeError, match="leaf 'w' is a traced array"):
    jax.jit(lambda p: jc.cluster.compressed_size(p).ratio)({"w": jnp.ones(3)})

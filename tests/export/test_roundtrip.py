"""Every registered stage: export, save, load and decode give spec.apply bit for bit.

For each case of the invariant suite's registry (f32; bf16 for the cases that
compile little): init, two updates, export (packed, and Huffman-coded), write
one safetensors file, load it against the model's params, decode, and compare
with ``spec.apply`` exactly (``np.array_equal`` with NaNs equal, and the same
bits, so ``-0.0`` counts).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from tests.test_invariants import CASES, params_of, run, setup


def assert_bit_equal(got, want):
  g_leaves, g_tree = jax.tree_util.tree_flatten(got)
  w_leaves, w_tree = jax.tree_util.tree_flatten(want)
  assert g_tree == w_tree
  for g, w in zip(g_leaves, w_leaves):
    g, w = np.asarray(g), np.asarray(w)
    assert g.dtype == w.dtype and g.shape == w.shape
    assert np.array_equal(g.astype(np.float32), w.astype(np.float32), equal_nan=True)
    bits = np.dtype(f"u{g.dtype.itemsize}")
    nan = np.isnan(w.astype(np.float32))
    assert np.array_equal(g.view(bits)[~nan], w.view(bits)[~nan])


def trained(case, dtype):
  spec, params, key, grads, stats = setup(case, dtype)
  t, s, _ = run(spec, params, key, grads, stats, jit=False, steps=2)
  return spec, params, t, s


# bf16 where it is cheap: the stages that compile little (pruning's selection
# and k-means compile per stage and dtype, and are covered in f32).
BF16 = [c for c in CASES if c.name.startswith(("quant_", "lowrank_"))]


def round_trip(case, dtype, tmp_path):
  spec, params, t, s = trained(case, dtype)
  want = spec.apply(t, s)
  packed = jc.export.export(spec, t, s)
  assert_bit_equal(jc.export.decode(packed), want)
  huffman = jc.export.export(spec, t, s, huffman=True)
  assert huffman.nbytes <= packed.nbytes
  saved = jc.export.save(huffman, tmp_path / "model.safetensors")
  loaded = jc.export.load(saved.path, like=params)
  assert_bit_equal(jc.export.decode(loaded), want)
  assert loaded.records == huffman.records
  for r in packed.records:  # compressed leaves never take more than their float bytes
    assert r.nbytes <= r.float_nbytes, r


FAST = {"prune_nm_2_4", "quant_fq_int4_asym_per_group_static", "cluster_per_channel_density"}


@pytest.mark.parametrize("case", params_of(CASES, fast=FAST))
def test_export_save_load_decode_is_spec_apply(case, tmp_path):
  round_trip(case, jnp.float32, tmp_path)


@pytest.mark.parametrize("case", params_of(BF16, "-bf16", fast={"quant_lsq_int4"}))
def test_bf16_export_save_load_decode_is_spec_apply(case, tmp_path):
  round_trip(case, jnp.bfloat16, tmp_path)


def test_orbax_directory_round_trip(tmp_path):
  case = next(c for c in CASES if c.name == "quant_prune_then_fq_int4")
  spec, params, t, s = trained(case, jnp.float32)
  artifact = jc.export.export(spec, t, s)
  saved = jc.export.save(artifact, tmp_path / "ckpt", format="orbax")
  assert saved.path.is_dir() and saved.data_nbytes == artifact.nbytes
  assert_bit_equal(jc.export.decode(jc.export.load(saved.path, like=params)), spec.apply(t, s))

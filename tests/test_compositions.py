"""Compositions across techniques, checked against numpy."""

import jax
import jax.numpy as jnp
import numpy as np

import jaxcompress as jc


def np_fake_quant_per_channel(a, bits):
  qmax = 2 ** (bits - 1) - 1
  scale = np.max(np.abs(a), axis=0, keepdims=True) / qmax
  scale = np.where(scale == 0, 1.0, scale)
  return np.clip(np.round(a / scale), -qmax, qmax) * scale


def test_lowrank_then_quantize_quantizes_each_factor():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(12, 10)).astype(np.float32)
  spec = jc.Spec([jc.Rule("w", [jc.lowrank.svd(rank=3), jc.quant.FakeQuant(bits=8)])])
  t, s = spec.init({"w": jnp.asarray(w)})
  out = np.asarray(spec.apply(t, s)["w"], np.float64)
  # numpy: truncated SVD with the singular values split evenly, then int8 per
  # output channel on each factor, then the product.
  u, sv, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
  uf = u[:, :3] * np.sqrt(sv[:3])
  vf = np.sqrt(sv[:3])[:, None] * vt[:3]
  ref = np_fake_quant_per_channel(uf, 8) @ np_fake_quant_per_channel(vf, 8)
  # Factors' signs are not unique: compare the products, which are.
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
  best = (u[:, :3] * sv[:3]) @ vt[:3]
  assert not np.allclose(out, best, atol=1e-6)  # quantization really happened
  assert t["w"].weight is None  # the factors replace the dense weight
  assert len(jax.tree_util.tree_leaves(t["w"].params["lowrank"])) == 2


def test_prune_then_quantize_keeps_exact_zeros():
  w = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.75), jc.quant.FakeQuant(bits=4)])])
  t, s = spec.init({"w": jnp.asarray(w)})
  out = np.asarray(spec.apply(t, s)["w"])
  mask = np.asarray(s["w"].stages["prune"].mask)
  assert np.all(out[~mask] == 0)
  np.testing.assert_allclose(out, np_fake_quant_per_channel(np.where(mask, w, 0), 4), rtol=1e-6, atol=1e-6)

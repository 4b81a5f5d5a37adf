"""Offline distillation: the top-k cache round trip and training from it."""

import json
import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc
from jaxcompress import distill

V, K, T = 12, 3, 2.0


def teacher_logits(p, x):
  return jnp.tanh(x @ p["w1"]) @ p["w2"]


def make_teacher(seed=0):
  rng = np.random.default_rng(seed)
  return {"w1": jnp.asarray(rng.normal(size=(5, 16)), jnp.float32),
          "w2": jnp.asarray(rng.normal(size=(16, V)) * 2, jnp.float32)}


def test_round_trip_matches_numpy_top_k(tmp_path):
  p = make_teacher()
  x = np.random.default_rng(1).normal(size=(37, 4, 5)).astype(np.float32)  # 37 examples, 4 positions
  cache = distill.write_topk_cache(tmp_path, lambda b: teacher_logits(p, b), x, k=K, temperature=T, batch_size=16)
  assert isinstance(cache.values, np.memmap) and cache.values.shape == (37, 4, K)
  z = np.tanh(x.astype(np.float64) @ np.asarray(p["w1"], np.float64)) @ np.asarray(p["w2"], np.float64)
  idx = np.argsort(-z, axis=-1)[..., :K]
  loaded = distill.load_topk_cache(tmp_path)
  np.testing.assert_array_equal(loaded.indices, idx)
  np.testing.assert_allclose(loaded.values, np.take_along_axis(z, idx, -1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(loaded.logsumexp, np.log(np.exp(z / T).sum(-1)), rtol=1e-5)
  assert (loaded.k, loaded.vocab_size, loaded.temperature) == (K, V, T)
  with open(os.path.join(tmp_path, "meta.json")) as f:
    meta = json.load(f)
  assert meta["num_examples"] == 37 and meta["positions"] == [4] and meta["version"] == 1
  half = distill.write_topk_cache(tmp_path / "f16", lambda b: teacher_logits(p, b), x, k=K, dtype=np.float16)
  assert half.values.dtype == np.float16
  np.testing.assert_allclose(half.values, loaded.values, rtol=1e-3, atol=1e-2)


def test_training_from_cache_equals_training_from_live_teacher(tmp_path):
  p = make_teacher(2)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(48, 5)).astype(np.float32)
  cache = distill.write_topk_cache(tmp_path, lambda b: teacher_logits(p, b), x, k=K, temperature=T, batch_size=32)

  def loss_fn(params, batch, topk, step):
    return distill.topk_distillation_loss(batch["x"] @ params["w"], *topk, temperature=T).mean()

  spec, opt = jc.Spec([]), optax.adam(0.05)
  w0 = rng.normal(size=(5, V)) * 0.1  # each state gets its own buffers (the step donates them)
  live = distill.make_distill_step(
      loss_fn, lambda tp, b: distill.topk_logits(teacher_logits(tp, b["x"]), K, temperature=T), spec, opt
  )
  offline = distill.make_distill_step(loss_fn, lambda _, b: b["topk"], spec, opt)
  ts_live = jc.init_train_state(spec, opt, {"w": jnp.asarray(w0, jnp.float32)})
  ts_off = jc.init_train_state(spec, opt, {"w": jnp.asarray(w0, jnp.float32)})
  order = np.random.default_rng(4).permutation(48)
  for i in range(6):
    ids = np.sort(order[(i % 3) * 16 : (i % 3 + 1) * 16])
    ts_live, m_live = live(ts_live, p, {"x": x[ids]})
    ts_off, m_off = offline(ts_off, None, {"x": x[ids], "topk": cache.topk(ids)})
    np.testing.assert_allclose(m_off["loss"], m_live["loss"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(ts_off.trainable["w"], ts_live.trainable["w"], rtol=1e-5, atol=1e-6)
  assert float(m_off["loss"]) > 0


def test_bad_caches_and_arguments_are_rejected(tmp_path):
  x = np.ones((4, 5), np.float32)
  with pytest.raises(ValueError, match=r"write_topk_cache: k \(at most the vocabulary of the teacher's logits\) must be an integer in \[1, 12\], got 13"):
    distill.write_topk_cache(tmp_path, lambda b: jnp.ones((b.shape[0], 12)), x, k=13)
  with pytest.raises(ValueError, match=r"write_topk_cache: temperature must be a number in \(0, inf\), got 0.0"):
    distill.write_topk_cache(tmp_path, lambda b: jnp.ones((b.shape[0], 12)), x, k=2, temperature=0.0)
  with pytest.raises(ValueError, match="holds no meta.json; write the cache with write_topk_cache"):
    distill.load_topk_cache(tmp_path / "nothing")
  distill.write_topk_cache(tmp_path, lambda b: b @ jnp.ones((5, 12)), x, k=2)
  np.save(tmp_path / "values.npy", np.zeros((3, 2), np.float32))
  with pytest.raises(ValueError, match=r"values.npy .* has shape \(3, 2\), but meta.json says \(4, 2\)"):
    distill.load_topk_cache(tmp_path)
  with open(tmp_path / "meta.json") as f:
    meta = json.load(f)
  with open(tmp_path / "meta.json", "w") as f:
    json.dump(dict(meta, version=99), f)
  with pytest.raises(ValueError, match="version 99; this version reads"):
    distill.load_topk_cache(tmp_path)

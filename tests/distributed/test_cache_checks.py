"""The top-k teacher cache's sharded writer in one process, and the caches it refuses.

The two-process writer is tested in ``test_multiprocess.py`` (slow); these are
the cheap checks.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxcompress import distill


def _teacher(x):
  return jnp.tanh(x) @ jnp.linspace(-1.0, 1.0, 5 * 12).reshape(5, 12)


def test_sharded_writer_equals_the_plain_one_and_refuses_mismatched_caches(tmp_path):
  x = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float32)
  plain = distill.write_topk_cache(tmp_path / "plain", _teacher, x, k=3, temperature=2.0, batch_size=4)
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  sharded = distill.write_topk_cache(
      tmp_path / "sharded", _teacher, x, k=3, temperature=2.0, batch_size=8,
      batch_sharding=NamedSharding(mesh, P("data", "model")),
  )
  for a, b in zip(plain[:3], sharded[:3]):  # 10 examples: the last batch padded, the padding dropped
    np.testing.assert_array_equal(a, b)
  z = np.tanh(x.astype(np.float64)) @ np.linspace(-1.0, 1.0, 60).reshape(5, 12)
  np.testing.assert_array_equal(sharded.indices, np.argsort(-z, axis=-1)[:, :3])

  d = tmp_path / "sharded"
  with pytest.raises(ValueError, match=r"has temperature=2.0, but temperature=1.0 was asked for; its logsumexp "
                     r"belongs to temperature 2.0: train at temperature=2.0"):
    distill.load_topk_cache(d, temperature=1.0)
  with pytest.raises(ValueError, match=r"has k=3, but k=4 was asked for; write the cache again with k=4"):
    distill.load_topk_cache(d, k=4)
  with pytest.raises(ValueError, match=r"has vocab_size=12, but vocab_size=10 was asked for; the cache comes "
                     r"from a teacher with another vocabulary"):
    distill.load_topk_cache(d, vocab_size=10)
  assert distill.load_topk_cache(d, k=3, vocab_size=12, temperature=2.0).k == 3

  np.save(d / "logsumexp.npy", np.zeros(10, np.float64))
  with pytest.raises(ValueError, match=r"logsumexp.npy .* has dtype float64, but meta.json says float32"):
    distill.load_topk_cache(d)
  with open(d / "meta.json") as f:
    assert json.load(f)["processes"] == 1
  (d / "meta.json").unlink()  # what a write that did not finish leaves
  with pytest.raises(ValueError, match=r"holds no meta.json; .* \(a cache whose writing did not finish has none\)"):
    distill.load_topk_cache(d)


def test_bad_batch_shardings_are_refused(tmp_path):
  x = np.ones((4, 5), np.float32)
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  with pytest.raises(ValueError, match=r"batch_size=6 does not split into the 8 shards of the example axis "
                     r"\(mesh axes \('data', 'model'\)\); use a multiple of 8"):
    distill.write_topk_cache(tmp_path, _teacher, x, k=2, batch_size=6,
                             batch_sharding=NamedSharding(mesh, P(("data", "model"))))
  with pytest.raises(TypeError, match="batch_sharding must be a jax.sharding.NamedSharding"):
    distill.write_topk_cache(tmp_path, _teacher, x, k=2, batch_sharding=jax.devices()[0])

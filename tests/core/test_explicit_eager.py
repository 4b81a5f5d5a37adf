"""Explicit-axis meshes without jit and without ``jax.set_mesh``: eager calls work too.

Stages create small arrays eagerly (scales, codebooks, keys) on one device; on
an Explicit mesh their results must still land on the mesh with the derived
shardings (the jitted paths are covered by the invariant suite).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxcompress as jc

pytestmark = pytest.mark.slow  # Explicit meshes also run in the invariant suite's fast subset

STAGES = {
    "fq_static": lambda: [jc.quant.FakeQuant(bits=8, ranges="static")],
    "stochastic": lambda: [jc.quant.FakeQuant(bits=4, rounding="stochastic")],
    "prune_then_kmeans": lambda: [
        jc.prune.magnitude(sparsity=0.5), jc.cluster.kmeans(bits=3, begin_step=1)
    ],
    "svd": lambda: [jc.lowrank.svd(rank=4)],
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_eager_calls_on_an_explicit_mesh_match_one_device(name):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  w = jnp.asarray(np.random.default_rng(0).normal(size=(16, 32)), jnp.float32)
  spec = jc.Spec([jc.Rule("kernel", STAGES[name]())])
  key = jax.random.key(0)
  sharded = {"kernel": jax.device_put(w, NamedSharding(mesh, P(None, "model")))}
  t, s = spec.init(sharded, key=key)
  t, s = spec.update(t, s, 1, key=key)
  out = spec.apply(t, s)["kernel"]
  assert out.sharding.spec == P(None, "model")
  t1, s1 = spec.init({"kernel": w}, key=key)
  t1, s1 = spec.update(t1, s1, 1, key=key)
  np.testing.assert_allclose(np.asarray(out), np.asarray(spec.apply(t1, s1)["kernel"]), atol=1e-5)

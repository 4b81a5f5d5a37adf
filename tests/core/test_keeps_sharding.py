"""Explicit meshes: stages that work on shards never hold the whole leaf.

``Stage.keeps_sharding`` says whether a stage's init and update run on a leaf
as an Explicit mesh shards it; the others run with the mesh's Explicit axes
made Auto, so XLA partitions them (sharded SVD and column k-means included)
instead of handing them a replicated copy. Measured on the compiled
per-device program: no temporary as large as the whole kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxcompress as jc

SHAPE = (256, 1024)  # 1 MiB float32, 128 KiB per device on 8
FULL = SHAPE[0] * SHAPE[1] * 4


def compiled_temp_bytes(stage, program, shape=SHAPE):
  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:8])
  spec = jc.Spec([jc.Rule("kernel", [stage])])
  sh = {"kernel": NamedSharding(mesh, P(None, "model"))}
  params = {"kernel": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh["kernel"])}
  with jax.set_mesh(mesh):
    t_sh, s_sh = spec.shardings(params, sh)
    if program == "init":
      fn = jax.jit(spec.init, out_shardings=(t_sh, s_sh))
      lowered = fn.lower(params)
    else:
      t, s = jax.eval_shape(spec.init, params)
      as_sharded = lambda tree, shs: jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shs)
      fn = jax.jit(lambda t, s, g: spec.update(t, s, jnp.int32(1), grads=g), out_shardings=(t_sh, s_sh))
      lowered = fn.lower(as_sharded(t, t_sh), as_sharded(s, s_sh), params)
  return lowered.compile().memory_analysis().temp_size_in_bytes


SHARD_STAGES = {
    "magnitude": lambda: jc.prune.magnitude(sparsity=0.9),
    "nm_2_4": lambda: jc.prune.Prune(structure=jc.prune.NM(2, 4)),
    "fake_quant_int8": lambda: jc.quant.FakeQuant(bits=8),
    "rigl": lambda: jc.prune.RigL(sparsity=0.8, end_step=10),
}
WHOLE_STAGES = {
    "svd": lambda: jc.lowrank.svd(rank=8),
    "block": lambda: jc.prune.Prune(sparsity=0.5, structure=jc.prune.Block((4, 4))),
    "per_group": lambda: jc.quant.FakeQuant(bits=4, granularity=jc.quant.PerGroup(size=32, axis=0)),
    "percentile": lambda: jc.quant.FakeQuant(bits=8, calibration=jc.quant.Percentile(q=99.0)),
    "kmeans": lambda: jc.cluster.kmeans(bits=3),
}


def test_each_stage_says_whether_it_needs_whole_leaves():
  assert all(make().keeps_sharding for make in SHARD_STAGES.values())
  assert not any(make().keeps_sharding for make in WHOLE_STAGES.values())
  assert jc.Stage.keeps_sharding is False  # user stages run with the axes made Auto unless they say so


@pytest.mark.parametrize("program", ["init", "update"])
@pytest.mark.parametrize("name", sorted(SHARD_STAGES))
def test_sharded_stages_hold_no_whole_kernel(name, program):
  assert compiled_temp_bytes(SHARD_STAGES[name](), program) < FULL // 2


@pytest.mark.parametrize("program", ["init", "update"])
def test_svd_is_partitioned_on_explicit_axes(program):
  # The randomized SVD enters the kernel only through products; it was handed
  # a replicated copy (init temporaries 26x the shard in benchmarks/memory.py).
  assert compiled_temp_bytes(WHOLE_STAGES["svd"](), program) < FULL // 2


def test_column_kmeans_is_partitioned_on_explicit_axes():
  # 2**20 entries: the per-column sort (cluster.kmeans1d.Columns), which XLA
  # partitions; before, the whole leaf was replicated and sorted on every device.
  shape = (1024, 1024)
  assert compiled_temp_bytes(WHOLE_STAGES["kmeans"](), "init", shape) < shape[0] * shape[1] * 4


@pytest.mark.parametrize("name", ["block", "per_group", "percentile"])
def test_other_whole_leaf_stages_match_one_device_on_explicit_axes(name):
  # They reshape or sort the whole leaf; XLA may gather what it must, but the
  # result is the single-device one, laid out as the kernel. Percentile
  # calibration (a jnp quantile in apply) failed on Explicit axes.
  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:8])
  spec = jc.Spec([jc.Rule("kernel", [WHOLE_STAGES[name]()])])
  w = {"kernel": jax.random.normal(jax.random.key(0), SHAPE)}
  t1, s1 = spec.init(w)
  with jax.set_mesh(mesh):
    sh = {"kernel": NamedSharding(mesh, P(None, "model"))}
    t_sh, s_sh = spec.shardings(w, sh)
    t8, s8 = jax.jit(spec.init, out_shardings=(t_sh, s_sh))(jax.device_put(w, sh))
    out8 = jax.jit(spec.apply)(t8, s8)["kernel"]
  assert out8.sharding.spec == P(None, "model")
  np.testing.assert_allclose(jax.device_get(out8), jax.jit(spec.apply)(t1, s1)["kernel"], rtol=1e-6, atol=1e-6)

"""Explicit meshes: stages that work on shards never hold the whole leaf.

``Stage.keeps_sharding`` says whether a stage's init and update run on a leaf
as an Explicit mesh shards it; the chain replicates leaves only for the stages
that say no. Measured on the compiled per-device program: a stage that keeps
the sharding needs no temporary as large as the whole kernel.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxcompress as jc

SHAPE = (256, 1024)  # 1 MiB float32, 128 KiB per device on 8
FULL = SHAPE[0] * SHAPE[1] * 4


def compiled_temp_bytes(stage, program):
  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:8])
  spec = jc.Spec([jc.Rule("kernel", [stage])])
  sh = {"kernel": NamedSharding(mesh, P(None, "model"))}
  params = {"kernel": jax.ShapeDtypeStruct(SHAPE, jnp.float32, sharding=sh["kernel"])}
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
  assert jc.Stage.keeps_sharding is False  # user stages are replicated unless they say so


@pytest.mark.parametrize("program", ["init", "update"])
@pytest.mark.parametrize("name", sorted(SHARD_STAGES))
def test_sharded_stages_hold_no_whole_kernel(name, program):
  assert compiled_temp_bytes(SHARD_STAGES[name](), program) < FULL // 2


def test_a_whole_leaf_stage_is_still_given_the_whole_leaf():
  assert compiled_temp_bytes(WHOLE_STAGES["svd"](), "init") >= FULL

"""The shared invariant suite, run over every registered compression stage.

For each case: same result with and without jit; init under ``jax.eval_shape``;
dtypes kept (f32 and bf16); sharded on an 8-device CPU mesh equals single
device (every case on Auto axes, one case of each kind on Explicit axes); no
retracing across steps; state structure stable across updates.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxcompress as jc
from tests.registry import cluster, lowrank, prune, quant

CASES = prune.CASES + quant.CASES + lowrank.CASES + cluster.CASES
IDS = [c.name for c in CASES]


def make_params(dtype=jnp.float32, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return {
      "Dense_0": {
          "kernel": jax.random.normal(k[0], (16, 32), dtype),
          "bias": jax.random.normal(k[1], (32,), dtype),
      },
      "Dense_1": {
          "kernel": jax.random.normal(k[2], (32, 8), dtype),
          "bias": jax.random.normal(k[3], (8,), dtype),
      },
  }


def setup(case, dtype=jnp.float32):
  spec = jc.Spec([jc.Rule(case.pattern, case.stages())])
  params = make_params(dtype)
  key = jax.random.key(1) if case.needs_key else None
  grads = make_params(dtype, seed=2) if case.needs_grads else None
  stats = case.stats() if case.stats else None
  return spec, params, key, grads, stats


def run(spec, params, key, grads, stats, jit, steps=3):
  init = jax.jit(spec.init) if jit else spec.init
  apply = jax.jit(spec.apply) if jit else spec.apply
  update = jax.jit(spec.update) if jit else spec.update
  t, s = init(params, key=key)
  outs = [apply(t, s)]
  for step in range(steps):
    t, s = update(t, s, step, grads=grads, stats=stats, key=key)
    outs.append(apply(t, s))
  return t, s, outs


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_allclose(
        np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jit_matches_eager(case):
  spec, params, key, grads, stats = setup(case)
  *_, eager = run(spec, params, key, grads, stats, jit=False)
  *_, jitted = run(spec, params, key, grads, stats, jit=True)
  assert_trees_close(eager, jitted)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_init_under_eval_shape(case):
  spec, params, key, *_ = setup(case)
  abstract = jax.eval_shape(spec.init, params, key=key)
  concrete = spec.init(params, key=key)
  assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(concrete)
  for a, c in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(concrete)):
    assert a.shape == c.shape and a.dtype == c.dtype


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dtypes_kept(case, dtype):
  spec, params, key, grads, stats = setup(case, dtype)
  t, s, outs = run(spec, params, key, grads, stats, jit=True, steps=2)
  for out in outs:
    for p, o in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(out)):
      assert o.dtype == p.dtype and o.shape == p.shape


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_structure_stable_and_no_retrace(case):
  spec, params, key, grads, stats = setup(case)
  traces = []

  def update(t, s, step):
    traces.append(1)
    return spec.update(t, s, step, grads=grads, stats=stats, key=key)

  update = jax.jit(update)
  t, s = spec.init(params, key=key)
  struct = jax.tree_util.tree_structure((t, s))
  avals = [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves((t, s))]
  for step in range(4):
    t, s = update(t, s, jnp.int32(step))
    assert jax.tree_util.tree_structure((t, s)) == struct
    assert [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves((t, s))] == avals
  assert len(traces) == 1


# Explicit meshes take the same code path for every stage (whole-leaf work on a
# replicated copy, resharded after), so they run over one case of each kind of
# computation rather than all of them, to keep the suite short.
EXPLICIT = {
    "prune_magnitude_global", "prune_straight_through", "prune_per_output", "prune_block",
    "prune_nm_2_4", "prune_rigl", "quant_fq_int4_asym_per_group_static",
    "quant_fq_int4_stochastic_static", "quant_lowrank_then_lsq_int8", "lowrank_svd_per_leaf",
    "cluster_per_channel_density", "prune_then_cluster_at_step",
}
assert EXPLICIT <= set(IDS), EXPLICIT - set(IDS)
SHARDED = [pytest.param(c, AxisType.Auto, id=f"{c.name}-auto") for c in CASES] + [
    pytest.param(c, AxisType.Explicit, id=f"{c.name}-explicit") for c in CASES if c.name in EXPLICIT
]


@pytest.mark.parametrize("case, axis_type", SHARDED)
def test_sharded_matches_single_device(case, axis_type):
  assert len(jax.devices()) == 8
  spec, params, key, grads, stats = setup(case)
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
  with jax.set_mesh(mesh):
    _check_sharded(spec, params, key, grads, stats, mesh)


def _check_sharded(spec, params, key, grads, stats, mesh):
  pspecs = {
      "Dense_0": {"kernel": P("data", "model"), "bias": P("model")},
      "Dense_1": {"kernel": P("model", "data"), "bias": P()},
  }
  p_sh = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), pspecs)
  params_sharded = jax.device_put(params, p_sh)
  t_sh, s_sh = spec.shardings(params, p_sh, key=key)
  init = jax.jit(spec.init, out_shardings=(t_sh, s_sh))
  t, s = init(params_sharded, key=key)
  for x, sh in zip(jax.tree_util.tree_leaves((t, s)), jax.tree_util.tree_leaves((t_sh, s_sh))):
    assert x.sharding.is_equivalent_to(sh, x.ndim)
  update = jax.jit(spec.update, out_shardings=(t_sh, s_sh))
  outs = [jax.jit(spec.apply)(t, s)]
  for step in range(3):
    t, s = update(t, s, step, grads=grads, stats=stats, key=key)
    outs.append(jax.jit(spec.apply)(t, s))
  *_, single = run(spec, params, key, grads, stats, jit=True)
  assert_trees_close(outs, single)

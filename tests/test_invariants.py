"""The shared invariant suite: every registered stage through ``jaxcompress.testing``.

For each case (``tests/registry``): same result with and without jit; init
under ``jax.eval_shape``; dtypes kept (f32 and bf16); sharded on an 8-device
CPU mesh equals single device (every case on Auto and on Explicit axes); no retracing across steps; state structure stable across
updates.

One jitted single-device run per case (init, apply and three updates) is
compiled once and shared by the jit/eager, eval_shape, f32 dtype, retrace,
structure and sharded checks. The behavioural checks, which compile a
gradient or a whole training step, run on a representative subset
(``TRAINED``): gradients reach every trainable, a short training run reduces a
loss, and masked Adam keeps its moments at zero under the stage's mask.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType

import jaxcompress.testing as jt
from tests.registry import cluster, lora, lowrank, prune, quant

CASES = prune.CASES + quant.CASES + lowrank.CASES + lora.CASES + cluster.CASES
IDS = [c.name for c in CASES]
BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES), "two registry cases share a name"

# README's test command runs every check on one case of each kind of
# computation (this set); the rest of the registry runs under the `slow`
# marker, which CI runs after it.
REPRESENTATIVE = {
    "prune_magnitude", "prune_rigl", "quant_fq_int4_asym_per_group_static", "quant_lsq_int4",
    "quant_lowrank_then_lsq_int8", "cluster_per_channel_density",
}
assert REPRESENTATIVE <= set(IDS), REPRESENTATIVE - set(IDS)


def params_of(cases, suffix="", fast=REPRESENTATIVE):
  """One pytest.param per case, marked slow unless the case is in ``fast``."""
  return [
      pytest.param(c, id=c.name + suffix, marks=() if c.name in fast else pytest.mark.slow)
      for c in cases
  ]


def kit_case(case, dtype=jnp.float32):
  """The registry case as a ``jaxcompress.testing.Case``."""
  return jt.make_case(
      case.stages(),
      dtype=dtype,
      pattern=case.pattern,
      needs_grads=case.needs_grads,
      needs_key=case.needs_key,
      stats=case.stats() if case.stats else None,
      name=case.name,
  )


@functools.cache
def jitted(name):
  """The case (f32) and its jitted run, compiled once for every check that reads it."""
  case = kit_case(BY_NAME[name])
  return case, jt.run(case)


@functools.cache
def trained(name):
  """The case (f32) and its training run, shared by the loss and moments checks."""
  case = kit_case(BY_NAME[name])
  return case, jt.train(case)


# Kept for tests/export/test_roundtrip.py, which runs the registry through export.
def setup(case, dtype=jnp.float32):
  c = kit_case(case, dtype)
  return c.spec, c.params, c.key, c.grads, c.stats


def run(spec, params, key, grads, stats, jit, steps=3):
  c = jt.Case("", spec, params, key, grads, stats, None)
  r = jt.run(c, jit=jit, steps=steps)
  return r.trainables[-1], r.states[-1], r.outputs


@pytest.mark.parametrize("case", params_of(CASES))
def test_jit_matches_eager(case):
  c, r = jitted(case.name)
  jt.assert_jit_matches_eager(c, jitted=r)


@pytest.mark.parametrize("case", params_of(CASES))
def test_init_under_eval_shape(case):
  c, r = jitted(case.name)
  jt.assert_init_under_eval_shape(c, jitted=r)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", params_of(CASES))
def test_dtypes_kept(case, dtype):
  if dtype == jnp.float32:
    c, r = jitted(case.name)
    jt.assert_dtypes_kept(c, jitted=r)
  else:
    jt.assert_dtypes_kept(kit_case(case, dtype))


@pytest.mark.parametrize("case", params_of(CASES))
def test_state_structure_stable_and_no_retrace(case):
  c, r = jitted(case.name)
  jt.assert_state_structure_stable(c, jitted=r)
  jt.assert_no_retrace(c, jitted=r)


# Explicit meshes: a stage that keeps the sharding (``Stage.keeps_sharding``)
# runs on the shards, the others with the axes made Auto; every case runs on
# them, one of each path in README's command and the rest under `slow`.
FAST_EXPLICIT = {"prune_rigl", "quant_lowrank_then_lsq_int8"}
SHARDED = [
    pytest.param(c, AxisType.Auto, id=f"{c.name}-auto", marks=() if c.name in REPRESENTATIVE else pytest.mark.slow)
    for c in CASES
] + [
    pytest.param(c, AxisType.Explicit, id=f"{c.name}-explicit", marks=() if c.name in FAST_EXPLICIT else pytest.mark.slow)
    for c in CASES
]


@pytest.mark.parametrize("case, axis_type", SHARDED)
def test_sharded_matches_single_device(case, axis_type):
  assert len(jax.devices()) == 8
  c, r = jitted(case.name)
  jt.assert_sharded_matches_single_device(c, axis_type=axis_type, jitted=r)


# The behavioural checks compile a gradient or a training step per case: they
# run on one case of each kind of trainable (weight, learned step, factors,
# centroids) and of mask (fixed, gradual, regrown, before a later stage).
TRAINED = [
    "prune_magnitude", "prune_straight_through", "prune_rigl",
    "quant_fq_int4_asym_per_group_static", "quant_lsq_int4", "quant_prune_then_lsq_int8",
    "quant_lowrank_then_lsq_int8", "cluster_per_channel_density", "prune_then_cluster_at_step",
]
# The subset whose first stage has an update_mask (the optimizer holds its zeros).
MASKED = ["prune_magnitude", "prune_rigl", "quant_prune_then_lsq_int8", "prune_then_cluster_at_step"]
assert set(MASKED) <= set(TRAINED) <= set(IDS), set(MASKED + TRAINED) - set(IDS)


def names_of(names):
  return [pytest.param(n, id=n, marks=() if n in REPRESENTATIVE else pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", names_of(TRAINED))
def test_grads_reach_trainables(name):
  c, r = jitted(name)
  jt.assert_grads_reach_trainables(c, jitted=r, where=BY_NAME[name].trains)


@pytest.mark.parametrize("name", names_of(TRAINED))
def test_training_reduces_loss(name):
  c, t = trained(name)
  jt.assert_training_reduces_loss(c, trained=t)


@pytest.mark.parametrize("name", names_of(MASKED))
def test_masked_moments_zero(name):
  c, t = trained(name)
  jt.assert_masked_moments_zero(c, trained=t)

"""The stage test kit catches broken stages, each with the matching check.

Each broken stage below has one bug a stage author could write; the check
for that bug must fail with a message naming the check, the leaf and the fix,
and the good stage must pass every check.
"""

import dataclasses
import unittest
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc
import jaxcompress.testing as jt


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gain(jc.Stage):
  """Good: a trainable gain per output channel."""

  name: ClassVar[str] = "gain"

  def init(self, value, *, path, key):
    return jnp.ones(value.shape[-1:], value.dtype), None

  def apply(self, value, params, state):
    return value * params


@dataclasses.dataclass(frozen=True, kw_only=True)
class Promotes(Gain):
  """Bug: a float32 constant promotes a bfloat16 weight to float32."""

  def apply(self, value, params, state):
    return value * params * jnp.asarray(0.5, jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GrowsState(Gain):
  """Bug: update adds a state entry that init did not create."""

  def init(self, value, *, path, key):
    return jnp.ones(value.shape[-1:], value.dtype), {"count": jnp.zeros((), jnp.int32)}

  def update(self, value, params, state, ctx):
    return value, params, {"count": state["count"] + 1, "mean": jnp.mean(value)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Counted:
  total: jax.Array
  calls: int = dataclasses.field(metadata=dict(static=True))  # a Python-side counter


@dataclasses.dataclass(frozen=True, kw_only=True)
class CountsInPython(Gain):
  """Bug: the number of updates is kept as a Python int (static data): every
  update hands jit a new state structure, so it traces again at every step."""

  def init(self, value, *, path, key):
    return jnp.ones(value.shape[-1:], value.dtype), Counted(jnp.zeros((), jnp.float32), 0)

  def update(self, value, params, state, ctx):
    return value, params, Counted(state.total + 1.0, state.calls + 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeakTotal(Gain):
  """Bug: init keeps a weakly typed scalar, update returns a strongly typed one."""

  def init(self, value, *, path, key):
    return jnp.ones(value.shape[-1:], value.dtype), jnp.asarray(0.0)

  def update(self, value, params, state, ctx):
    return value, params, state + jnp.sum(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Detached(Gain):
  """Bug: apply stops the gradient of the gain."""

  def apply(self, value, params, state):
    return jax.lax.stop_gradient(value * params)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BranchesOnValue(Gain):
  """Bug: init branches on a value in Python (no eval_shape, no jit)."""

  def init(self, value, *, path, key):
    scale = 2.0 if float(jnp.max(value)) > 0 else 1.0
    return jnp.full(value.shape[-1:], scale, value.dtype), None


@dataclasses.dataclass(frozen=True, kw_only=True)
class KnowsItIsTraced(Gain):
  """Bug: apply behaves differently when traced."""

  def apply(self, value, params, state):
    if isinstance(value, jax.core.Tracer):
      return value * params * 2
    return value * params


def test_good_stage_passes_every_check():
  report = jt.check_stage(Gain())
  assert report["masked_moments_zero"].startswith("skipped: masked_moments_zero (Gain()): the stages have no update_mask")
  assert report["export_round_trip"].startswith("skipped")
  assert {k for k, v in report.items() if v == "ok"} == set(jt.CHECKS) - {"masked_moments_zero", "export_round_trip"}


def test_dtype_change():
  case = jt.make_case(Promotes(), dtype=jnp.bfloat16)
  with pytest.raises(
      AssertionError,
      match=r"dtypes_kept \(Promotes\(\)\): spec.apply after init gives leaf 'Dense_0/kernel' "
      r"shape \(16, 32\) and dtype float32, but the param has shape \(16, 32\) and dtype "
      r"bfloat16\. .*astype\(value.dtype\)",
  ):
    jt.assert_dtypes_kept(case)
  jt.assert_dtypes_kept(jt.make_case(Promotes()))  # float32 is fine


def test_state_that_grows():
  jitted = jt.run(jt.make_case(GrowsState()), steps=2)
  with pytest.raises(
      AssertionError,
      match=r"state_structure_stable \(GrowsState\(\)\): update 0 changed \(trainable, state\) "
      r"from what spec.init gave: leaves \[\] are gone and leaves \['state/Dense_0/kernel/"
      r"stages/gain/mean', 'state/Dense_1/kernel/stages/gain/mean'\] appeared\. spec.update "
      r"must return the structure",
  ):
    jt.assert_state_structure_stable(jt.make_case(GrowsState()), jitted=jitted)


def test_retrace_every_step():
  case = jt.make_case(CountsInPython())
  jitted = jt.run(case, steps=3)
  assert jitted.traces["update"] == 3
  with pytest.raises(
      AssertionError,
      match=r"no_retrace \(CountsInPython\(\)\): jitted spec.update was traced 3 times in 3 "
      r"steps \(once expected\): \(trainable, state\) changed from step 0 to step 1, the same "
      r"leaves, but the pytree nodes or their static data differ: .*keep counters in int32 arrays",
  ):
    jt.assert_no_retrace(case, jitted=jitted)


def test_retrace_on_a_weak_type():
  case = jt.make_case(WeakTotal())
  jitted = jt.run(case, steps=3)
  jt.assert_state_structure_stable(case, jitted=jitted)  # same shapes and dtypes
  with pytest.raises(
      AssertionError,
      match=r"no_retrace \(WeakTotal\(\)\): jitted spec.update was traced 2 times in 3 steps "
      r"\(once expected\): \(trainable, state\) changed from step 0 to step 1, leaf "
      r"'state/Dense_0/kernel/stages/gain' was shape \(\) float32 \(weak type\) and is now "
      r"shape \(\) float32",
  ):
    jt.assert_no_retrace(case, jitted=jitted)


def test_no_retrace_needs_a_jitted_run():
  case = jt.make_case(Gain())
  with pytest.raises(ValueError, match="needs a jitted run"):
    jt.assert_no_retrace(case, jitted=jt.run(case, jit=False, steps=1))


def test_gradient_blocked():
  with pytest.raises(
      AssertionError,
      match=r"grads_reach_trainables \(Detached\(\)\): no gradient reaches trainable leaf "
      r"'Dense_0/kernel/weight': it is zero everywhere",
  ):
    jt.assert_grads_reach_trainables(jt.make_case(Detached()))
  # where= names the leaves that must train: the biases alone still do.
  jt.assert_grads_reach_trainables(jt.make_case(Detached()), where=r".*bias")


def test_training_that_does_not_reduce_the_loss():
  case = jt.make_case(Detached())
  with pytest.raises(
      AssertionError,
      match=r"training_reduces_loss \(Detached\(\)\): 5 steps of masked Adam took the loss "
      r"from (\S+) to \1 .*at most 0.5 x the first loss was expected",
  ):
    jt.assert_training_reduces_loss(case, trained=jt.train(case, steps=5))


def test_init_that_needs_concrete_values():
  with pytest.raises(
      AssertionError,
      match=r"init_under_eval_shape \(BranchesOnValue\(\)\): spec.init reads the value of a "
      r"traced array",
  ):
    jt.assert_init_under_eval_shape(jt.make_case(BranchesOnValue()))


def test_jit_differs_from_eager():
  with pytest.raises(
      AssertionError,
      match=r"jit_matches_eager \(KnowsItIsTraced\(\)\): spec.apply after init and each "
      r"update differs between eager and jitted runs",
  ):
    jt.assert_jit_matches_eager(jt.make_case(KnowsItIsTraced()), steps=1)


def test_moments_left_under_a_mask():
  # Plain Adam, not masked: its moments fill in where the mask is False.
  case = jt.make_case(jc.prune.magnitude(sparsity=0.5))
  params = {"w": jnp.ones((2, 4))}
  masks = {"w": jnp.array([[True, False, True, False]] * 2)}
  opt = optax.adam(0.1)
  _, opt_state = opt.update({"w": jnp.ones((2, 4))}, opt.init(params), params)
  trained = jt.Training(np.zeros(1, np.float32), [masks], [opt_state], None, opt)
  with pytest.raises(
      AssertionError,
      match=r"masked_moments_zero \(Prune\(sparsity=0.5\)\): after training step 0, optimizer "
      r"state '0/mu/w' is non-zero at 4 of the 4 entries its update_mask holds at zero",
  ):
    jt.assert_masked_moments_zero(case, trained=trained)


def test_skips_say_why(monkeypatch):
  case = jt.make_case(Gain())
  with pytest.raises(unittest.SkipTest, match="no update_mask"):
    jt.assert_masked_moments_zero(case, trained=jt.train(case, steps=1))
  with pytest.raises(unittest.SkipTest, match=r"export_round_trip \(Gain\(\)\): .*Gain\(\), which has no encoder"):
    jt.assert_export_round_trip(case, jitted=jt.run(case, steps=0))
  devices = jax.devices()
  monkeypatch.setattr(jax, "devices", lambda *a: devices[:4])
  with pytest.raises(unittest.SkipTest, match="needs 8 devices, found 4.*device_count=8"):
    jt.assert_sharded_matches_single_device(case)


def test_check_stage_lists_every_failure():
  with pytest.raises(AssertionError) as info:
    jt.check_stage(Promotes(), skip=["sharded_matches_single_device", "training_reduces_loss"])
  msg = str(info.value)
  assert msg.startswith("check_stage (Promotes()): 1 of 8 checks failed:\n- dtypes_kept (Promotes()):"), msg
  with pytest.raises(ValueError, match=r"unknown checks \['retrace'\]"):
    jt.check_stage(Gain(), skip=["retrace"])


def test_custom_params_and_pattern():
  params = {"enc": {"w": jnp.ones((4, 8)), "b": jnp.zeros(8)}, "head": jnp.ones((8, 3))}
  case = jt.make_case(Gain(), params=params, pattern=(r"enc/w", lambda path, leaf: path == "head"))
  assert case.param_specs["enc"]["w"] == jax.sharding.PartitionSpec("data", "model")
  assert case.param_specs["head"] == jax.sharding.PartitionSpec("data", None)
  jitted = jt.run(case, steps=1)
  jt.assert_sharded_matches_single_device(case, jitted=jitted)
  jt.assert_grads_reach_trainables(case, jitted=jitted)

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from tests.prune.reference import keep_topk, n_keep


def per_output_reference(scores, sparsity, axis=-1):
  """numpy: in every slice along ``axis``, keep the round((1 - s) * fan) highest scores."""
  s = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
  fan = s.size // s.shape[-1]
  keep = np.zeros(s.shape, bool)
  for c in range(s.shape[-1]):
    keep[..., c] = keep_topk(s[..., c], n_keep(fan, sparsity))
  return np.moveaxis(keep, -1, axis)


def _mask(state, *path):
  for p in path:
    state = state[p]
  return np.asarray(state.stages["prune"].mask)


def test_every_output_channel_keeps_its_largest_weights():
  rng = np.random.default_rng(0)
  params = {
      "dense": {"kernel": rng.normal(size=(40, 12)).astype(np.float32)},  # (in, out)
      "conv": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32)},  # (h, w, in, out)
  }
  params["dense"]["kernel"][:, 3] *= 100.0  # a large column does not take the others' share
  params["conv"]["kernel"][..., :2] = np.round(params["conv"]["kernel"][..., :2])  # ties
  stage = jc.prune.magnitude(sparsity=0.7, distribution=jc.prune.PerOutput())
  spec = jc.Spec([jc.Rule(r".*kernel", [stage])])
  _, s = jax.jit(spec.init)(jax.tree.map(jnp.asarray, params))
  for name, fan in (("dense", 40), ("conv", 36)):
    w = params[name]["kernel"]
    got = _mask(s, name, "kernel")
    per_channel = got.reshape(-1, w.shape[-1]).sum(axis=0)
    assert (per_channel == n_keep(fan, 0.7)).all(), per_channel
    np.testing.assert_array_equal(got, per_output_reference(np.abs(w), 0.7))


def test_other_output_axis_and_the_guess_on_updates():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(6, 20)).astype(np.float32)  # (out, in): channels along axis 0
  stage = jc.prune.magnitude(sparsity=0.5, distribution=jc.prune.PerOutput(axis=0))
  spec = jc.Spec([jc.Rule("w", [stage])])
  t, s = jax.jit(spec.init)({"w": jnp.asarray(w)})
  np.testing.assert_array_equal(_mask(s, "w"), per_output_reference(np.abs(w), 0.5, axis=0))
  update = jax.jit(spec.update)
  t, s = update(t, s, 0)  # the pruned weights are zeros now: the guess is exact
  np.testing.assert_array_equal(_mask(s, "w"), per_output_reference(np.abs(w), 0.5, axis=0))
  moved = np.asarray(t["w"]) + rng.normal(size=w.shape).astype(np.float32)  # revive some
  t, s = update({"w": jnp.asarray(moved)}, s, 1)
  np.testing.assert_array_equal(_mask(s, "w"), per_output_reference(np.abs(moved), 0.5, axis=0))


def test_wanda_with_per_output_is_the_papers_rule():
  """Sun et al. 2024: per output, drop the lowest |W_ij| * ||X_j||; computed here by argsort."""
  w = np.array(
      [[1.0, -8.0, 0.3], [-2.0, 7.0, 0.2], [3.0, 6.0, -0.1], [-4.0, 5.0, 0.4]], np.float32
  )  # (in=4, out=3)
  x = np.random.default_rng(2).normal(size=(32, 4)).astype(np.float32) * [1.0, 3.0, 0.5, 2.0]
  norms = np.linalg.norm(x, axis=0)
  metric = np.abs(w) * norms[:, None]
  expected = np.zeros(w.shape, bool)
  for j in range(w.shape[1]):  # each output keeps its 2 highest of 4
    expected[np.argsort(-metric[:, j], kind="stable")[:2], j] = True
  stage = jc.prune.Prune(
      sparsity=0.5, criterion=jc.prune.Wanda(), distribution=jc.prune.PerOutput()
  )
  spec = jc.Spec([jc.Rule(r".*kernel", [stage])])
  t, s = spec.init({"dense": {"kernel": jnp.asarray(w)}})
  t, s = spec.update(t, s, 0, stats={"dense": jnp.asarray(norms)})
  np.testing.assert_array_equal(_mask(s, "dense", "kernel"), expected)
  # Ranked across the layer instead (the default Uniform), the small third output
  # would lose every weight: the example tells the two rules apart.
  assert not keep_topk(metric, 6)[:, 2].any()


def test_follows_a_sparsity_schedule():
  rng = np.random.default_rng(3)
  w = rng.normal(size=(16, 5)).astype(np.float32)
  sched = jc.schedules.linear(0.0, 0.75, end_step=3)
  stage = jc.prune.magnitude(sparsity=sched, distribution=jc.prune.PerOutput())
  spec = jc.Spec([jc.Rule("w", [stage])])
  t, s = jax.jit(spec.init)({"w": jnp.asarray(w)})
  assert _mask(s, "w").all()
  update = jax.jit(spec.update)
  for step, sparsity in enumerate([0.0, 0.25, 0.5, 0.75, 0.75]):
    t, s = update(t, s, step)
    got = _mask(s, "w")
    assert (got.sum(axis=0) == n_keep(16, sparsity)).all()
    np.testing.assert_array_equal(got, per_output_reference(np.abs(w), sparsity))


def test_errors_name_the_problem_and_the_fix():
  params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))}}
  stage = jc.prune.magnitude(sparsity=0.5, distribution=jc.prune.PerOutput())
  one_d = r"PerOutput at 'dense/bias': a leaf of shape \(3,\) has no output-channel groups.*select kernels only"
  with pytest.raises(ValueError, match=one_d):
    jc.Spec([jc.Rule(r"dense/.*", [stage])]).init(params)
  bad_axis = jc.prune.magnitude(sparsity=0.5, distribution=jc.prune.PerOutput(axis=2))
  with pytest.raises(ValueError, match=r"PerOutput at 'dense/kernel': axis=2 is out of range for a leaf of shape \(4, 3\)"):
    jc.Spec([jc.Rule(r".*kernel", [bad_axis])]).init(params)
  with pytest.raises(TypeError, match=r"PerOutput: axis must be an integer in \[-inf, inf\], got 'out' of type str"):
    jc.prune.PerOutput(axis="out")
  for structure in (jc.prune.Block((2, 2)), jc.prune.Channel(), jc.prune.NM(2, 4)):
    fix = r"cannot take the structure .*leave structure as the default Unstructured\(\)"
    with pytest.raises(ValueError, match=fix):
      jc.prune.Prune(sparsity=0.5, structure=structure, distribution=jc.prune.PerOutput())

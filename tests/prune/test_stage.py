import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from tests.prune.reference import channel_scores, keep_topk, keep_topk_many, n_keep, nm_mask
from tests.registry.prune import CASES as REGISTRY


def rand(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_schedule_begin_end_and_update_every():
  w = rand((10, 10))
  sched = lambda step: jnp.asarray(step, jnp.float32) / 10.0  # 0.1 per step
  stage = jc.prune.magnitude(sparsity=sched, begin_step=2, end_step=7, update_every=2)
  spec = jc.Spec([jc.Rule("w", [stage])])
  t, s = jax.jit(spec.init)({"w": jnp.asarray(w)})
  update = jax.jit(spec.update)
  kept = [int(s["w"].stages["prune"].mask.sum())]
  for step in range(10):
    t, s = update(t, s, step)
    kept.append(int(s["w"].stages["prune"].mask.sum()))
  # init: sparsity(begin_step = 2); recomputed at steps 2, 4, 6 only.
  last = 2
  expected = [n_keep(100, 0.2)]
  for step in range(10):
    if 2 <= step < 7 and (step - 2) % 2 == 0:
      last = step
    expected.append(n_keep(100, last / 10.0))
  assert kept == expected
  # The kept weights are the largest, and the trainable holds exact zeros elsewhere.
  mask = np.asarray(s["w"].stages["prune"].mask)
  np.testing.assert_array_equal(mask, keep_topk(np.abs(w), n_keep(100, 0.6)))
  np.testing.assert_array_equal(np.asarray(t["w"]), np.where(mask, w, 0.0))


def test_end_step_equal_to_begin_keeps_the_init_mask():
  w = rand((6, 6), 1)
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5, end_step=0)])])
  t, s = jax.jit(spec.init)({"w": jnp.asarray(w)})
  init_mask = np.asarray(s["w"].stages["prune"].mask)
  t, s = jax.jit(spec.update)({"w": jnp.asarray(rand((6, 6), 2))}, s, 0)
  np.testing.assert_array_equal(np.asarray(s["w"].stages["prune"].mask), init_mask)


@pytest.mark.parametrize("straight_through", [False, True])
def test_straight_through_gradient(straight_through):
  w = rand((5, 4), 3)
  c = rand((5, 4), 4)
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.6, straight_through=straight_through)])])
  t, s = jax.jit(spec.init)({"w": jnp.asarray(w)})
  mask = keep_topk(np.abs(w), 8)
  out = spec.apply(t, s)["w"]
  np.testing.assert_array_equal(np.asarray(out), np.where(mask, w, 0.0))  # forward masked either way
  g = jax.grad(lambda tr: jnp.sum(spec.apply(tr, s)["w"] * c))(t)["w"]
  np.testing.assert_array_equal(np.asarray(g), c if straight_through else np.where(mask, c, 0.0))
  masks = spec.update_masks(t, s)
  assert (masks["w"] is None) == straight_through
  t, s = jax.jit(spec.update)(t, s, 0)
  np.testing.assert_array_equal(np.asarray(t["w"]), w if straight_through else np.where(mask, w, 0.0))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_masks_are_bool_for_every_variant(dtype):
  p = {"Dense_0": {"kernel": jax.ShapeDtypeStruct((16, 32), dtype)}}
  for case in REGISTRY:
    spec = jc.Spec([jc.Rule(case.pattern, case.stages())])
    key = jax.random.key(0) if case.needs_key else None
    _, s = jax.eval_shape(lambda p: spec.init(p, key=key), p)
    for st in s["Dense_0"]["kernel"].stages.values():
      assert st.mask.dtype == jnp.bool_ and st.mask.shape == (16, 32), case.name


def test_nan_and_inf_weights_counts_exact_nan_pruned_inf_kept():
  w = rand((8, 8), 6)
  w[0, :3] = np.nan
  w[1, 1] = np.inf
  w[2, 2] = -np.inf
  w[3, :] = np.nan  # more NaN than a single group can hide
  p = {"w": jnp.asarray(w), "v": jnp.asarray(rand((8, 4), 7))}
  nan = np.isnan(w)
  # Uniform: exact count, every NaN pruned (there are fewer NaN than pruned), inf kept.
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5)])])
  t, s = jax.jit(spec.init)(p)
  m = np.asarray(s["w"].stages["prune"].mask)
  assert m.sum() == 32 and not m[nan].any() and m[1, 1] and m[2, 2]
  np.testing.assert_array_equal(m, keep_topk(np.abs(w), 32))
  assert not np.isnan(np.asarray(spec.apply(t, s)["w"])).any()
  # Pruning more weights than are finite keeps exactly k, NaN ones last.
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.1)])])
  _, s = jax.jit(spec.init)(p)
  m = np.asarray(s["w"].stages["prune"].mask)
  assert m.sum() == n_keep(64, 0.1)
  np.testing.assert_array_equal(m, keep_topk(np.abs(w), n_keep(64, 0.1)))
  # Global over two leaves, N:M, Channel: no crash, exact counts, same reference order.
  spec = jc.Spec([jc.Rule("w|v", [jc.prune.magnitude(sparsity=0.7, distribution=jc.prune.Global())])])
  _, s = jax.jit(spec.init)(p)
  ew, ev = keep_topk_many([np.abs(w), np.abs(np.asarray(p["v"]))], n_keep(96, 0.7))
  np.testing.assert_array_equal(np.asarray(s["w"].stages["prune"].mask), ew)
  np.testing.assert_array_equal(np.asarray(s["v"].stages["prune"].mask), ev)
  spec = jc.Spec([jc.Rule("w", [jc.prune.Prune(structure=jc.prune.NM(2, 4, axis=1))])])
  _, s = jax.jit(spec.init)(p)
  np.testing.assert_array_equal(np.asarray(s["w"].stages["prune"].mask), nm_mask(np.abs(w), 2, 4, axis=1))
  wc = rand((4, 8), 8) * 100.0
  wc[1, 0] = np.nan
  wc[2, 5] = np.inf
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5, structure=jc.prune.Channel())])])
  _, s = jax.jit(spec.init)({"w": jnp.asarray(wc)})
  m = np.asarray(s["w"].stages["prune"].mask)
  assert m.sum() == 4 * 4 and not m[:, 0].any() and m[:, 5].all()  # NaN channel pruned, inf kept
  np.testing.assert_array_equal(m, np.broadcast_to(keep_topk(channel_scores(np.abs(wc)), 4), wc.shape))


def _primitives(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr or Jaxpr
        if hasattr(inner, "eqns"):
          yield from _primitives(inner)


@pytest.mark.parametrize(
    "stage",
    [
        jc.prune.magnitude(sparsity=0.9),
        jc.prune.magnitude(sparsity=0.9, distribution=jc.prune.Global()),
        jc.prune.magnitude(sparsity=0.9, distribution=jc.prune.ERK()),
        jc.prune.Prune(structure=jc.prune.NM(2, 4)),
        jc.prune.magnitude(sparsity=0.5, structure=jc.prune.Block((2, 2))),
        jc.prune.magnitude(sparsity=0.5, structure=jc.prune.Channel()),
        jc.prune.RigL(sparsity=0.9, end_step=10),
    ],
    ids=["uniform", "global", "erk", "nm", "block", "channel", "rigl"],
)
def test_mask_updates_use_no_sort(stage):
  spec = jc.Spec([jc.Rule("a|b", [stage])])
  p = {"a": jnp.ones((8, 8)), "b": jnp.ones((8, 4))}
  t, s = jax.eval_shape(spec.init, p)
  jaxpr = jax.make_jaxpr(lambda t, s: spec.update(t, s, 1, grads=p))(t, s)
  prims = set(_primitives(jaxpr.jaxpr))
  assert "cond" in prims and not prims & {"sort", "top_k", "argsort"}


def test_prune_argument_errors():
  with pytest.raises(ValueError, match=r"sparsity is required.*Prune\(sparsity=0.9\)"):
    jc.prune.Prune()
  with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\) or a schedule, got 1.5"):
    jc.prune.magnitude(sparsity=1.5)
  with pytest.raises(TypeError, match=r"criterion must be a Criterion instance such as jc.prune.Magnitude\(\), got 'magnitude'"):
    jc.prune.Prune(sparsity=0.5, criterion="magnitude")
  with pytest.raises(TypeError, match=r"structure must be a Structure instance.*got <class"):
    jc.prune.Prune(sparsity=0.5, structure=jc.prune.Channel)
  with pytest.raises(TypeError, match=r"distribution must be a Distribution instance.*got 'global'"):
    jc.prune.Prune(sparsity=0.5, distribution="global")
  with pytest.raises(ValueError, match=r"Prune: update_every must be an integer in \[1, inf\], got 0"):
    jc.prune.magnitude(sparsity=0.5, update_every=0)
  with pytest.raises(ValueError, match=r"end_step \(2\) is before begin_step \(5\)"):
    jc.prune.magnitude(sparsity=0.5, begin_step=5, end_step=2)


def test_describe_shows_the_composed_parts():
  spec = jc.Spec([jc.Rule("w", [jc.prune.Prune(sparsity=0.5, structure=jc.prune.Block((2, 2)), distribution=jc.prune.ERK())])])
  text = spec.describe({"w": jnp.ones((4, 4))})
  assert "Prune(sparsity=0.5, structure=Block(shape=(2, 2)), distribution=ERK(power=1.0))" in text


@pytest.mark.parametrize(
    "sparsity, match",
    [
        (jc.schedules.linear(0.0, 1.0, end_step=10), r"Prune: sparsity must stay in \[0, 1\), but its schedule ranges over \[0, 1\]"),
        (jc.schedules.polynomial(0.0, 1.5, end_step=10), r"ranges over \[0, 1.5\]"),
        (jc.schedules.piecewise([4], [0.5, -0.5]), r"ranges over \[-0.5, 0.5\]"),
        (lambda step: jnp.where(step >= 6, jnp.nan, 0.5), r"the schedule gives nan at step 6\. Make the schedule stay in \[0, 1\)"),
        (lambda step: 0.1 * jnp.asarray(step, jnp.float32), r"the schedule gives 1.0\d* at step 10\."),
        (-0.25, r"Prune: sparsity must be a number in \[0, 1\) or a schedule, got -0.25"),
        (float("nan"), r"sparsity must be a number in \[0, 1\) or a schedule, got nan"),
    ],
)
def test_sparsity_out_of_range_is_refused_at_build(sparsity, match):
  with pytest.raises(ValueError, match=match):
    jc.prune.Prune(sparsity=sparsity, end_step=20)


def test_sparsity_accepts_numpy_scalars_and_valid_callables():
  w = {"w": jnp.asarray(rand((6, 6), 5))}
  masks = []
  for sparsity in (0.5, np.float32(0.5), np.float64(0.5), lambda step: jnp.float32(0.5)):
    spec = jc.Spec([jc.Rule("w", [jc.prune.Prune(sparsity=sparsity)])])
    masks.append(np.asarray(jax.jit(spec.init)(w)[1]["w"].stages["prune"].mask))
  for m in masks:
    np.testing.assert_array_equal(m, keep_topk(np.abs(np.asarray(w["w"])), 18))
  assert type(jc.prune.Prune(sparsity=np.float32(0.5)).sparsity) is float
  with pytest.raises(TypeError, match=r"Prune: sparsity must be a number in \[0, 1\) or a schedule .*got '0.5' of type str"):
    jc.prune.Prune(sparsity="0.5")


def test_straight_through_gives_zero_for_a_pruned_nan():
  w = np.array([np.nan, 1.0, -2.0, 3.0, np.inf, 0.5], np.float32)
  c = rand((6,), 7)
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5, straight_through=True)])])
  t, s = jax.jit(spec.init)({"w": jnp.asarray(w)})
  mask = np.asarray(s["w"].stages["prune"].mask)
  np.testing.assert_array_equal(mask, [False, False, True, True, True, False])  # NaN pruned first
  out = np.asarray(jax.jit(spec.apply)(t, s)["w"])
  np.testing.assert_array_equal(out, np.where(mask, w, 0.0))  # 0, not NaN, where pruned
  g = jax.jit(jax.grad(lambda tr: jnp.sum(spec.apply(tr, s)["w"] * c)))(t)["w"]
  np.testing.assert_array_equal(np.asarray(g), c)  # the identity to every weight, as before


@pytest.mark.parametrize("distribution", [jc.prune.Uniform(), jc.prune.ERK()])
def test_magnitude_masks_hold_no_copy_of_the_weight(distribution):
  # The select recomputes |w| in each counting pass (LazyScores): init and a
  # mask update hold no uint32 image of the scores (one weight's worth before).
  # (Global's min_kept check counts each mask with a full reduction, whose
  # operand XLA:CPU materializes: it still holds one int32 copy.)
  w = {"w": jax.random.normal(jax.random.key(0), (256, 1024))}
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.8, distribution=distribution)])])
  unit = 256 * 1024 * 4
  init = jax.jit(spec.init).lower(w).compile().memory_analysis()
  assert init.temp_size_in_bytes < 0.5 * unit, init.temp_size_in_bytes / unit
  t, s = spec.init(w)
  update = jax.jit(lambda t, s: spec.update(t, s, jnp.int32(1))).lower(t, s).compile().memory_analysis()
  assert update.temp_size_in_bytes < 0.75 * unit, update.temp_size_in_bytes / unit
  # The masks are the exact top-k of |w| (numpy).
  a = np.abs(np.asarray(w["w"])).reshape(-1)
  kept = np.asarray(s["w"].stages["prune"].mask).reshape(-1)
  assert kept.sum() == round(0.2 * a.size) and a[kept].min() > a[~kept].max()

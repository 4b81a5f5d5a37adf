import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc
import jaxcompress.quant as jq
from tests.quant import reference as ref

RNG = np.random.default_rng(3)
W0 = RNG.normal(size=(16, 8)).astype(np.float32)
W1 = RNG.normal(size=(8, 4)).astype(np.float32)


def params(dtype=jnp.float32):
  return {
      "Dense_0": {"kernel": jnp.asarray(W0, dtype), "bias": jnp.zeros((8,), dtype)},
      "Dense_1": {"kernel": jnp.asarray(W1, dtype), "bias": jnp.zeros((4,), dtype)},
  }


@pytest.mark.parametrize(
    "stage,kw",
    [
        (jq.FakeQuant(bits=8), dict(bits=8)),
        (jq.FakeQuant(bits=4, symmetric=False), dict(bits=4, symmetric=False)),
        (jq.FakeQuant(bits=3, granularity=jq.PerGroup(size=4)), dict(bits=3, kind="group", axis=0, size=4)),
    ],
    ids=["int8", "int4_asym", "int3_group"],
)
def test_fake_quant_matches_numpy_and_gradient_is_straight_through(stage, kw):
  spec = jc.Spec([jc.Rule(r".*kernel", [stage])])
  t, s = spec.init(params())
  out = jax.jit(spec.apply)(t, s)
  np.testing.assert_array_equal(np.asarray(out["Dense_0"]["kernel"]), ref.fake_quant_int(W0, **kw))
  np.testing.assert_array_equal(np.asarray(out["Dense_0"]["bias"]), 0.0)
  g = jax.jit(jax.grad(lambda t: sum(jnp.sum(x * 1.5) for x in jax.tree_util.tree_leaves(spec.apply(t, s)))))(t)
  np.testing.assert_array_equal(np.asarray(g["Dense_1"]["kernel"]), 1.5)


def test_static_scales_fixed_or_recalibrated_with_ema():
  fixed = jq.FakeQuant(bits=8, ranges="static", update_every=0)
  ema = jq.FakeQuant(bits=8, ranges="static", update_every=1, decay=0.5)
  spec = jc.Spec([jc.Rule(r"Dense_0/kernel", [fixed]), jc.Rule(r"Dense_1/kernel", [ema])])
  t, s = spec.init(params())
  s0 = np.abs(W0).max(0, keepdims=True) * np.float32(1 / 127)
  np.testing.assert_array_equal(np.asarray(s["Dense_0"]["kernel"].stages["quant"].scale), s0)
  t = jax.tree_util.tree_map(lambda x: x * 2.0, t)
  t, s = jax.jit(spec.update)(t, s, 0)
  # Fixed: the scale from init; values beyond the old range clip.
  np.testing.assert_array_equal(np.asarray(s["Dense_0"]["kernel"].stages["quant"].scale), s0)
  out = spec.apply(t, s)["Dense_0"]["kernel"]
  expect = ref.dequantize_int(ref.quantize_int(2 * W0, s0, None, 8), s0, None)
  np.testing.assert_array_equal(np.asarray(out), expect)
  assert np.abs(np.asarray(out)).max() < 2 * np.abs(W0).max()  # clipped
  # EMA: 0.5 * old absmax + 0.5 * new absmax.
  r = np.abs(W1).max(0, keepdims=True)
  st = s["Dense_1"]["kernel"].stages["quant"]
  np.testing.assert_allclose(np.asarray(st.ranges.hi), 0.5 * r + 0.5 * 2 * r, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(st.scale), 1.5 * r / 127, rtol=1e-6)


QUANTS = [
    jq.FakeQuant(bits=4),
    jq.FakeQuant(bits=4, symmetric=False),
    jq.FakeQuant(bits=3, symmetric=False, granularity=jq.PerGroup(size=4), calibration=jq.MSE(num=8)),
    jq.FakeQuant(dtype="float8_e5m2"),
    jq.FakeQuant(bits=8, symmetric=False, ranges="static"),
    jq.LSQ(bits=4),
]


@pytest.mark.parametrize(
    "dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)], ids=["f32", "bf16"]
)
def test_prune_then_quantize_keeps_exact_zeros(dtype):
  # One leaf per quantizer; shifted weights so asymmetric ranges are lopsided.
  p = {f"k{i}": jnp.asarray(W0 + 0.8 * i / len(QUANTS), dtype) for i in range(len(QUANTS))}
  spec = jc.Spec([
      jc.Rule(f"k{i}", [jc.prune.magnitude(sparsity=0.5), q]) for i, q in enumerate(QUANTS)
  ])
  t, s = jax.jit(spec.init)(p)
  update, apply = jax.jit(spec.update), jax.jit(spec.apply)
  for step in range(2):
    t, s = update(t, s, step)
    out = apply(t, s)
    for name in p:
      mask = np.asarray(s[name].stages["prune"].mask)
      w = np.asarray(out[name], np.float32)
      assert out[name].dtype == dtype
      assert (~mask).sum() == mask.size // 2
      np.testing.assert_array_equal(w[~mask], 0.0)
      assert np.count_nonzero(w[mask]) > 0.5 * mask.sum()


def test_lsq_steps_are_trainable_leaves_and_learn():
  x = jnp.asarray(RNG.normal(size=(64, 16)).astype(np.float32))
  y = x @ jnp.asarray(W0)
  spec = jc.Spec([jc.Rule(r"Dense_0/kernel", [jq.LSQ(bits=3)])])
  p = {"Dense_0": {"kernel": jnp.asarray(W0) * 1.3}}
  loss = lambda mp, b: jnp.mean((b[0] @ mp["Dense_0"]["kernel"] - b[1]) ** 2)
  opt = optax.adam(3e-2)
  ts = jc.init_train_state(spec, opt, p)
  step0 = np.asarray(ts.trainable["Dense_0"]["kernel"].params["step_size"])
  np.testing.assert_allclose(step0[0], 2 * np.abs(W0 * 1.3).mean(0) / np.sqrt(3), rtol=1e-6)
  train = jc.make_train_step(loss, spec, opt)
  first = None
  for _ in range(40):
    ts, m = train(ts, (x, y))
    first = float(m["loss"]) if first is None else first
  assert float(m["loss"]) < 0.5 * first
  assert not np.allclose(np.asarray(ts.trainable["Dense_0"]["kernel"].params["step_size"]), step0)
  out = spec.apply(ts.trainable, ts.spec_state)["Dense_0"]["kernel"]
  steps = np.asarray(ts.trainable["Dense_0"]["kernel"].params["step_size"])
  levels = np.asarray(out) / steps
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  assert levels.min() >= -4 - 1e-4 and levels.max() <= 3 + 1e-4


def test_mixed_precision_per_rule():
  spec = jc.Spec([
      jc.Rule(r"Dense_0/kernel", [jq.FakeQuant(bits=8)]),
      jc.Rule(r"Dense_1/kernel", [jq.FakeQuant(bits=2, granularity=jq.PerTensor())]),
  ])
  t, s = spec.init(params())
  out = spec.apply(t, s)
  assert len(np.unique(np.asarray(out["Dense_1"]["kernel"]))) <= 4
  np.testing.assert_array_equal(np.asarray(out["Dense_0"]["kernel"]), ref.fake_quant_int(W0, 8))
  np.testing.assert_array_equal(
      np.asarray(out["Dense_1"]["kernel"]), ref.fake_quant_int(W1, 2, kind="tensor")
  )
  assert "FakeQuant(bits=2" in spec.describe(params())


def test_leaf_dependent_stage_config_names_leaf_path():
  stage = jq.FakeQuant(granularity=jq.PerGroup(size=5))
  spec = jc.Spec([jc.Rule(r".*kernel", [stage])])
  with pytest.raises(
      ValueError, match=r"Dense_0/kernel: PerGroup\(size=5\) does not divide axis -2 of size 16.*\[2, 4, 8, 16\]"
  ):
    spec.init(params())


def test_bad_stage_arguments():
  with pytest.raises(ValueError, match="ranges='sometimes'"):
    jq.FakeQuant(ranges="sometimes")
  with pytest.raises(ValueError, match="estimator='none'"):
    jq.FakeQuant(estimator="none")
  with pytest.raises(TypeError, match="calibration must be a Calibrator"):
    jq.FakeQuant(calibration="absmax")
  with pytest.raises(ValueError, match="LSQ learns the step of a symmetric integer grid"):
    jq.LSQ(symmetric=False)


@pytest.mark.parametrize("ranges", ["dynamic", "static"])
def test_stochastic_rounding_stage_is_unbiased_and_redraws_every_step(ranges):
  """Every output is one of the two grid points around w/scale, up with probability frac."""
  stage = jq.FakeQuant(bits=4, granularity=jq.PerTensor(), ranges=ranges, rounding="stochastic")
  spec = jc.Spec([jc.Rule(r".*kernel", [stage])])
  t, s = spec.init(params(), key=jax.random.key(0))
  w = W0.astype(np.float64)
  scale = np.abs(w).max() / 7  # int4 symmetric per tensor, absmax
  lower = np.clip(np.floor(w / scale), -8, 7) * scale
  upper = np.clip(np.floor(w / scale) + 1, -8, 7) * scale
  apply, update = jax.jit(spec.apply), jax.jit(spec.update)
  outs = []
  for step in range(300):
    outs.append(np.asarray(apply(t, s)["Dense_0"]["kernel"], np.float64))
    t, s = update(t, s, step)
  outs = np.stack(outs)
  on_grid = np.isclose(outs, lower, atol=1e-6) | np.isclose(outs, upper, atol=1e-6)
  assert on_grid.all()
  assert not np.array_equal(outs[0], outs[1])  # fresh noise on the next step
  # Unbiased: the mean over steps approaches w (binomial std of the mean < scale / 30).
  np.testing.assert_allclose(outs.mean(0), w, atol=4 * scale / np.sqrt(4 * 300))
  # The bias stays untouched and the gradient is straight through.
  g = jax.grad(lambda t: jnp.sum(spec.apply(t, s)["Dense_0"]["kernel"] * 2.0))(t)
  np.testing.assert_array_equal(np.asarray(g["Dense_0"]["kernel"]), 2.0)


def test_stochastic_rounding_takes_the_update_key_and_needs_an_init_key():
  stage = jq.FakeQuant(bits=4, rounding="stochastic")
  spec = jc.Spec([jc.Rule(r".*kernel", [stage])])
  with pytest.raises(ValueError, match=r"Dense_0/kernel.*pass key=jax.random.key"):
    spec.init(params())
  t, s = spec.init(params(), key=jax.random.key(1))
  a = spec.update(t, s, 3, key=jax.random.key(5))[1]
  b = spec.update(t, s, 3, key=jax.random.key(5))[1]
  c = spec.update(t, s, 3, key=jax.random.key(6))[1]
  ka, kb, kc = (x["Dense_0"]["kernel"].stages["quant"].key for x in (a, b, c))
  np.testing.assert_array_equal(np.asarray(ka), np.asarray(kb))
  assert not np.array_equal(np.asarray(ka), np.asarray(kc))
  with pytest.raises(ValueError, match="rounding='up'"):
    jq.FakeQuant(rounding="up")
  with pytest.raises(ValueError, match=r"'Dense_0/kernel': the key's PRNG implementation rbg"):
    spec.init(params(), key=jax.random.key(0, impl="rbg"))

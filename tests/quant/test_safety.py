"""Safety of the quantization code: non-finite weights, the clipped estimator at
the range ends, settings checked when built, states from another spec, and
the cost of static ranges.

Expected values come from the numpy reference (``tests/quant/reference.py``)
or from closed forms, computed on the finite values only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
import jaxcompress.quant as jq
from jaxcompress.quant import numerics as qn
from tests.quant import reference as ref

RNG = np.random.default_rng(11)
W = RNG.normal(size=(8, 4)).astype(np.float32)
# One NaN, one +inf and one -inf, each in its own channel (column); column 3 stays clean.
BAD = {(1, 0): np.nan, (2, 1): np.inf, (5, 2): -np.inf}
WBAD = W.copy()
for ij, v in BAD.items():
  WBAD[ij] = v
FINITE = np.isfinite(WBAD)


def finite_fake_quant(w, bits, symmetric):
  """Per-channel (last axis) fake quantization of each column's finite values, NaN elsewhere."""
  out = np.full(w.shape, np.nan, np.float32)
  for c in range(w.shape[1]):
    ok = np.isfinite(w[:, c])
    col = w[ok, c][:, None]
    out[ok, c] = ref.fake_quant_int(col, bits, symmetric)[:, 0]
  return out


def assert_nonfinite_kept(out):
  out = np.asarray(out, np.float32)
  for ij, v in BAD.items():
    if np.isnan(v):
      assert np.isnan(out[ij]), (ij, out[ij])
    else:
      assert out[ij] == v, (ij, out[ij])


def no_callback(fn, *args):
  text = str(jax.make_jaxpr(fn)(*args))
  return "callback" not in text


# --------------------------------------------------------------------------
# 1. NaN and inf in a quantization channel.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, False)], ids=["int8", "int4_asym"])
@pytest.mark.parametrize("ranges", ["dynamic", "static"])
def test_fake_quant_stage_keeps_nonfinite_and_spares_neighbours(bits, symmetric, ranges):
  spec = jc.Spec([jc.Rule("w", [jq.FakeQuant(bits=bits, symmetric=symmetric, ranges=ranges)])])
  t, s = spec.init({"w": jnp.asarray(WBAD)})
  out = np.asarray(jax.jit(spec.apply)(t, s)["w"])
  assert_nonfinite_kept(out)
  np.testing.assert_array_equal(out[FINITE], finite_fake_quant(WBAD, bits, symmetric)[FINITE])
  assert no_callback(spec.apply, t, s)  # the hot path makes no host call


def test_stochastic_rounding_keeps_nonfinite_and_rounds_neighbours_on_their_grid():
  stage = jq.FakeQuant(bits=4, rounding="stochastic")
  spec = jc.Spec([jc.Rule("w", [stage])])
  t, s = spec.init({"w": jnp.asarray(WBAD)}, key=jax.random.key(0))
  out = np.asarray(jax.jit(spec.apply)(t, s)["w"])
  assert_nonfinite_kept(out)
  for c in range(4):
    ok = FINITE[:, c]
    scale = np.abs(WBAD[ok, c]).max() / np.float32(7)
    lower = np.floor(WBAD[ok, c] / scale) * scale
    np.testing.assert_allclose(
        np.minimum(np.abs(out[ok, c] - lower), np.abs(out[ok, c] - lower - scale)), 0.0, atol=1e-6
    )


def test_lsq_keeps_nonfinite_and_its_steps_and_gradients_stay_finite():
  spec = jc.Spec([jc.Rule("w", [jq.LSQ(bits=4)])])
  t, s = spec.init({"w": jnp.asarray(WBAD)})
  step = np.asarray(t["w"].params["step_size"])[0]
  mean = np.array([np.abs(WBAD[FINITE[:, c], c]).mean() for c in range(4)])
  np.testing.assert_allclose(step, 2 * mean / np.sqrt(7), rtol=1e-6)
  out = np.asarray(jax.jit(spec.apply)(t, s)["w"])
  assert_nonfinite_kept(out)
  expect = np.clip(np.round(WBAD / step), -8, 7) * step
  np.testing.assert_allclose(out[FINITE], expect[FINITE], rtol=1e-6)
  g = jax.jit(jax.grad(lambda t: jnp.sum(jnp.where(FINITE, spec.apply(t, s)["w"], 0.0))))(t)
  assert np.all(np.isfinite(np.asarray(g["w"].params["step_size"])))


def test_prune_then_quantize_keeps_inf_and_spares_neighbours():
  w = W.copy()
  w[2, 1], w[5, 2] = np.inf, -np.inf  # magnitude pruning keeps them (largest)
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5), jq.FakeQuant(bits=8)])])
  t, s = spec.init({"w": jnp.asarray(w)})
  mask = np.asarray(s["w"].stages["prune"].mask)
  out = np.asarray(spec.apply(t, s)["w"])
  assert out[2, 1] == np.inf and out[5, 2] == -np.inf
  kept = np.where(mask, w, 0.0)
  ok = np.isfinite(kept)
  np.testing.assert_array_equal(out[ok], finite_fake_quant(kept, 8, True)[ok])
  np.testing.assert_array_equal(out[~mask], 0.0)


def test_quantize_refuses_what_the_encoding_cannot_hold_naming_the_path():
  x = jnp.asarray(WBAD)
  with pytest.raises(ValueError, match=r"Dense_0/kernel: 3 non-finite value\(s\) \(first nan at index \(1, 0\)\) cannot be encoded in int8"):
    qn.quantize(x, path="Dense_0/kernel")
  with pytest.raises(ValueError, match=r"Dense_0/kernel: 3 non-finite .* cannot be encoded in int4.*nan_to_num"):
    jq.quantize_params({"Dense_0": {"kernel": x}}, bits=4)
  with pytest.raises(ValueError, match=r"w: 2 non-finite .*first inf.* cannot be encoded in float8_e4m3fn"):
    qn.quantize(x, qn.Format(dtype="float8_e4m3fn"), path="w")
  # float8_e5m2 holds NaN and inf: they are encoded as such, and the scale ignores them.
  q = qn.quantize(x, qn.Format(dtype="float8_e5m2"))
  assert_nonfinite_kept(qn.dequantize(q))
  _, s = ref.quantize_fp8(np.where(FINITE, WBAD, 0.0), "float8_e5m2")
  np.testing.assert_array_equal(np.asarray(q.scale), s)


def test_quantize_params_under_jit_checks_at_run_time():
  f = jax.jit(lambda p: jq.dequantize_params(jq.quantize_params(p, pattern="k", bits=8)))
  np.testing.assert_array_equal(np.isfinite(np.asarray(f({"k": jnp.asarray(W)})["k"])), True)
  with pytest.raises(Exception, match=r"k: non-finite values cannot be encoded in int8"):
    jax.block_until_ready(f({"k": jnp.asarray(WBAD)}))


@pytest.mark.parametrize(
    "cal,lo_hi",
    [
        (jq.AbsMax(), lambda f: (-np.abs(f).max(), np.abs(f).max())),
        (jq.MinMax(), lambda f: (f.min(), f.max())),
        (jq.Percentile(q=90.0), lambda f: (-np.percentile(np.abs(f), 90.0), np.percentile(np.abs(f), 90.0))),
    ],
    ids=["absmax", "minmax", "percentile"],
)
def test_calibrators_read_finite_values_only(cal, lo_hi):
  lo, hi = cal(jnp.asarray(WBAD), qn.Format(bits=8), qn.PerChannel())
  for c in range(4):
    elo, ehi = lo_hi(WBAD[FINITE[:, c], c])
    np.testing.assert_allclose([lo[0, c], hi[0, c]], [elo, ehi], rtol=1e-6)
  lo, hi = cal(jnp.full((3, 2), jnp.nan), qn.Format(bits=8), qn.PerChannel())
  np.testing.assert_array_equal(np.asarray(hi), 0.0)  # no finite value: an empty range


def test_mse_calibration_reads_finite_values_only():
  mse = jq.MSE(num=8)
  _, hi = mse(jnp.asarray(WBAD), qn.Format(bits=3), qn.PerChannel())
  for c in range(4):
    f = WBAD[FINITE[:, c], c][:, None]
    r = np.abs(f).max()
    errs = []
    for ratio in mse.ratios():
      s = np.float32(r * ratio) * np.float32(1 / 3)
      d = ref.dequantize_int(ref.quantize_int(f, s, None, 3), s, None) - f
      errs.append(float(np.sum(d * d)))
    np.testing.assert_allclose(float(hi[0, c]), r * mse.ratios()[int(np.argmin(errs))], rtol=1e-6)


def test_gptq_refuses_nonfinite_and_non_float_inputs_naming_the_leaf():
  w = jnp.asarray(RNG.normal(size=(8, 4)).astype(np.float32))
  x = RNG.normal(size=(16, 8)).astype(np.float32)
  with pytest.raises(ValueError, match=r"Dense_0/kernel: 1 non-finite weight\(s\) .*GPTQ"):
    jq.gptq(jnp.asarray(WBAD[:, :4]).at[2, 1].set(0.0).at[5, 2].set(0.0), x, path="Dense_0/kernel")
  xbad = x.copy()
  xbad[3, 2] = np.nan
  with pytest.raises(ValueError, match=r"Dense_0/kernel: 1 non-finite calibration input\(s\) \(first nan at index \(3, 2\)\)"):
    jq.gptq_params({"Dense_0": {"kernel": w}}, {"Dense_0": jnp.asarray(xbad)})
  with pytest.raises(TypeError, match=r"gptq: Dense_0/kernel has weights of dtype int32"):
    jq.gptq_params({"Dense_0": {"kernel": w.astype(jnp.int32)}}, {"Dense_0": jnp.asarray(x)})
  with pytest.raises(TypeError, match=r"gptq: k has calibration inputs of dtype complex64"):
    jq.gptq(w, jnp.asarray(x, jnp.complex64), path="k")


# --------------------------------------------------------------------------
# 2. The clipped estimator keeps the gradient of the weights that set the range.
# --------------------------------------------------------------------------


def test_clipped_ste_minimal_case():
  g = jax.grad(lambda v: jq.fake_quant_ste(v, jq.Format(bits=8), jq.PerTensor(), estimator="clipped").sum())(
      jnp.array([0.3, 0.15, -0.1])
  )
  np.testing.assert_array_equal(np.asarray(g), 1.0)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    "fmt",
    [qn.Format(bits=8), qn.Format(bits=8, symmetric=False), qn.Format(bits=4),
     qn.Format(bits=4, symmetric=False), qn.Format(dtype="float8_e4m3fn")],
    ids=["int8", "int8_asym", "int4", "int4_asym", "fp8"],
)
def test_clipped_ste_keeps_gradient_of_range_defining_weights(fmt, jit):
  x = jnp.asarray(np.random.default_rng(5).normal(size=(16, 256)).astype(np.float32))
  f = lambda x: jnp.sum(jq.fake_quant_ste(x, fmt, qn.PerChannel(), estimator="clipped"))
  g = np.asarray((jax.jit(jax.grad(f)) if jit else jax.grad(f))(x))
  xn = np.asarray(x)
  cols = np.arange(256)
  if fmt.symmetric:
    np.testing.assert_array_equal(g[np.abs(xn).argmax(0), cols], 1.0)
  else:
    np.testing.assert_array_equal(g[xn.argmax(0), cols], 1.0)
    np.testing.assert_array_equal(g[xn.argmin(0), cols], 1.0)
  np.testing.assert_array_equal(g, 1.0)  # nothing is clipped by a dynamic range


def test_clipped_ste_with_calibrated_static_range_keeps_all_gradients_at_init():
  w = jnp.asarray(np.random.default_rng(6).normal(size=(16, 64)).astype(np.float32))
  spec = jc.Spec([jc.Rule("w", [jq.FakeQuant(bits=8, symmetric=False, ranges="static", estimator="clipped")])])
  t, s = spec.init({"w": w})
  grad = jax.jit(jax.grad(lambda t: jnp.sum(spec.apply(t, s)["w"])))
  np.testing.assert_array_equal(np.asarray(grad(t)["w"]), 1.0)
  # Beyond the range (half a step past the last grid point) the gradient is zero.
  g2 = grad({"w": w * 2.0})
  assert np.asarray(g2["w"]).min() == 0.0


# --------------------------------------------------------------------------
# 3. Settings checked when built; dtypes.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,err,msg",
    [
        (lambda: jq.FakeQuant(bits=9), ValueError, r"FakeQuant: bits=9 is not supported.*2 to 8.*float8"),
        (lambda: jq.FakeQuant(bits=1), ValueError, r"FakeQuant: bits=1 is not supported"),
        (lambda: jq.LSQ(bits=9), ValueError, r"LSQ: bits=9 is not supported"),
        (lambda: jq.FakeQuant(bits=4.0), TypeError, r"FakeQuant: bits must be an integer .* got 4.0"),
        (lambda: jq.FakeQuant(dtype="int16"), ValueError, r"FakeQuant: unknown quantization dtype 'int16'"),
        (lambda: jq.FakeQuant(granularity="per_group"), ValueError, r"FakeQuant: unknown granularity 'per_group'"),
        (lambda: jq.LSQ(min_step=0.0), ValueError, r"LSQ: min_step must be a number in \(0, inf\), got 0.0"),
        (lambda: jq.LSQ(min_step=-1e-3), ValueError, r"LSQ: min_step must be a number in \(0, inf\)"),
        (lambda: jq.LSQ(grad_scale=0.0), ValueError, r"LSQ: grad_scale must be a number in \(0, inf\)"),
        (lambda: jq.FakeQuant(update_every=-1), ValueError, r"FakeQuant: update_every must be an integer in \[0, inf\]"),
        (lambda: jq.FakeQuant(decay=1.0), ValueError, r"FakeQuant: decay must be a number in \[0, 1\)"),
        (lambda: jq.FakeQuant(estimator="none"), ValueError, r"estimator='none'"),
        (lambda: jq.FakeQuant(rounding="up"), ValueError, r"rounding='up'"),
        (lambda: jq.FakeQuant(ranges="sometimes"), ValueError, r"ranges='sometimes'"),
        (lambda: qn.Format(bits=9), ValueError, r"Format: bits=9 is not supported"),
        (lambda: qn.PerGroup(size=0), ValueError, r"PerGroup: size must be an integer in \[1, inf\], got 0"),
        (lambda: qn.PerChannel(axis="last"), TypeError, r"PerChannel: axis must be an int"),
    ],
)
def test_settings_rejected_when_built(build, err, msg):
  with pytest.raises(err, match=msg):
    build()


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.int32])
@pytest.mark.parametrize("stage", [jq.FakeQuant(bits=8), jq.LSQ(bits=8)], ids=["fq", "lsq"])
def test_stages_refuse_non_real_float_leaves_naming_the_path(stage, dtype):
  with pytest.raises(TypeError, match=rf"Dense_0/kernel: {type(stage).__name__} quantizes real floating-point weights, got dtype {jnp.dtype(dtype).name}"):
    stage.init(jnp.ones((4, 2), dtype), path="Dense_0/kernel", key=None)


def test_quantize_params_refuses_complex_leaves():
  with pytest.raises(TypeError, match=r"quantize_params: k has weights of dtype complex64"):
    jq.quantize_params({"k": jnp.ones((4, 2), jnp.complex64)}, pattern="k")


# --------------------------------------------------------------------------
# 4. A state made for another spec is refused when traced.
# --------------------------------------------------------------------------


def test_state_from_another_format_or_granularity_is_refused():
  p = {"w": jnp.asarray(W)}
  spec8 = jc.Spec([jc.Rule("w", [jq.FakeQuant(bits=8, ranges="static")])])
  spec4 = jc.Spec([jc.Rule("w", [jq.FakeQuant(bits=4, ranges="static")])])
  spec4t = jc.Spec([jc.Rule("w", [jq.FakeQuant(bits=8, ranges="static", granularity=jq.PerTensor())])])
  dyn = jc.Spec([jc.Rule("w", [jq.FakeQuant(bits=8)])])
  t, s8 = spec8.init(p)
  for other in (spec4, spec4t):
    with pytest.raises(ValueError, match=r"got a state made for Format\(.*bits=8.*at 'w'.*re-run spec.init with this spec"):
      other.apply(t, s8)
    with pytest.raises(ValueError, match=r"re-run spec.init with this spec"):
      jax.jit(other.update)(t, s8, 0)
  with pytest.raises(ValueError, match=r"got a state made for .*ranges='static'.*re-run spec.init"):
    dyn.apply(t, s8)
  _, sd = dyn.init(p)
  with pytest.raises(ValueError, match=r"got a state made for no quantization state.*re-run spec.init"):
    jax.jit(spec8.apply)(t, sd)
  # The check is static: the compiled step holds nothing for it.
  assert no_callback(spec8.apply, t, s8)


def test_lsq_steps_from_another_granularity_are_refused():
  p = {"w": jnp.asarray(W)}
  tc, sc = jc.Spec([jc.Rule("w", [jq.LSQ(bits=4)])]).init(p)
  spec_t = jc.Spec([jc.Rule("w", [jq.LSQ(bits=4, granularity=jq.PerTensor())])])
  with pytest.raises(ValueError, match=r"trainable steps have shape \(1, 4\).*needs \(1, 1\).*re-run spec.init"):
    spec_t.apply(tc, sc)


# --------------------------------------------------------------------------
# 5. The cost of static ranges.
# --------------------------------------------------------------------------


def test_eager_static_range_updates_compile_once():
  spec = jc.Spec([jc.Rule("w", [jq.FakeQuant(bits=8, ranges="static", update_every=1)])])
  t, s = spec.init({"w": jnp.asarray(W)})
  t, s = spec.update(t, s, 0)  # compiles what an update needs, once
  compiles = []
  listener = lambda name, *a, **k: compiles.append(name) if name.endswith("backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for step in (1, 2, 3):
      t, s = spec.update(t, s, step)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []


def test_static_mse_calibrates_once_at_init_by_default():
  stage = jq.FakeQuant(bits=4, ranges="static", calibration=jq.MSE(num=4))
  assert stage.update_every == 0
  spec = jc.Spec([jc.Rule("w", [stage])])
  t, s = spec.init({"w": jnp.asarray(W)})
  s0 = np.asarray(s["w"].stages["quant"].scale)
  t, s = spec.update({"w": jnp.asarray(W) * 3.0}, s, 1)
  np.testing.assert_array_equal(np.asarray(s["w"].stages["quant"].scale), s0)
  # Asked for, it re-calibrates: the new weights are 3x larger.
  spec1 = jc.Spec([jc.Rule("w", [jq.FakeQuant(bits=4, ranges="static", calibration=jq.MSE(num=4), update_every=1)])])
  t, s = spec1.init({"w": jnp.asarray(W)})
  t, s = spec1.update({"w": jnp.asarray(W) * 3.0}, s, 1)
  np.testing.assert_allclose(np.asarray(s["w"].stages["quant"].scale), 3.0 * s0, rtol=1e-5)

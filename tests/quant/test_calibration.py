import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.quant import calibration as cal
from jaxcompress.quant import numerics as qn
from tests.quant import reference as ref

RNG = np.random.default_rng(2)
X = RNG.standard_t(df=3, size=(64, 8)).astype(np.float32)  # heavy tails: clipping pays


@pytest.mark.parametrize(
    "gran,kw",
    [(qn.PerChannel(), dict(kind="channel")), (qn.PerGroup(size=16), dict(kind="group", axis=0, size=16))],
    ids=["channel", "group"],
)
def test_absmax_and_minmax_match_numpy(gran, kw):
  lo, hi = cal.AbsMax()(jnp.asarray(X), qn.Format(), gran)
  r = ref.reduce(np.abs(X), fn=np.max, **kw)
  np.testing.assert_array_equal(np.asarray(hi), r)
  np.testing.assert_array_equal(np.asarray(lo), -r)
  lo, hi = cal.MinMax()(jnp.asarray(X), qn.Format(), gran)
  np.testing.assert_array_equal(np.asarray(lo), ref.reduce(X, fn=np.min, **kw))
  np.testing.assert_array_equal(np.asarray(hi), ref.reduce(X, fn=np.max, **kw))


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_matches_numpy(symmetric):
  fmt = qn.Format(symmetric=symmetric)
  lo, hi = cal.Percentile(q=99.0)(jnp.asarray(X), fmt, qn.PerChannel())
  if symmetric:
    p = np.percentile(np.abs(X), 99.0, axis=0, keepdims=True)
    np.testing.assert_allclose(np.asarray(hi), p, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lo), -p, rtol=1e-5)
  else:
    np.testing.assert_allclose(np.asarray(lo), np.percentile(X, 1.0, axis=0, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(hi), np.percentile(X, 99.0, axis=0, keepdims=True), rtol=1e-5)


def _np_mse_ratio(x, ratios, bits, symmetric):
  """Brute-force search per column; first minimum wins."""
  best = []
  qmin, qmax = ref.grid(bits)
  for c in range(x.shape[1]):
    col = x[:, c : c + 1]
    errs = []
    for r in ratios:
      if symmetric:
        a = np.float32(np.abs(col).max() * r)
        s = np.float32(a * np.float32(1.0 / qmax))
        q = np.clip(np.round(col / s), qmin, qmax) * s
      else:
        lo = np.float32(min(col.min(), 0) * r)
        hi = np.float32(max(col.max(), 0) * r)
        s = np.float32((hi - lo) * np.float32(1.0 / (qmax - qmin)))
        zp = np.clip(np.round(np.float32(qmin) - lo / s), qmin, qmax)
        q = (np.clip(np.round(col / s + zp), qmin, qmax) - zp) * s
      errs.append(np.sum((q.astype(np.float64) - col) ** 2))
    best.append(ratios[int(np.argmin(errs))])
  return np.array(best, np.float32)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_picks_the_same_ratio_as_brute_force(symmetric):
  fmt = qn.Format(bits=4, symmetric=symmetric)
  mse = cal.MSE(num=16, min_ratio=0.3)
  lo, hi = jax.jit(lambda x: mse(x, fmt, qn.PerChannel()))(jnp.asarray(X))
  ratios = mse.ratios()
  np.testing.assert_allclose(ratios, np.linspace(1.0, 0.3, 16), rtol=1e-6)
  best = _np_mse_ratio(X, ratios, 4, symmetric)
  if symmetric:
    base = np.abs(X).max(0)
  else:
    base = X.max(0)
  np.testing.assert_allclose(np.asarray(hi)[0], base * best, rtol=1e-6)
  # Clipping helps on heavy-tailed data: some column chose a ratio below 1.
  assert (best < 1).any()


def test_mse_error_not_above_absmax_error():
  fmt, gran = qn.Format(bits=3), qn.PerChannel()
  x = jnp.asarray(X)
  err = lambda c: float(jnp.sum((qn.fake_quant(x, fmt, gran, scale=c.scale(x, fmt, gran)[0]) - x) ** 2))
  assert err(cal.MSE()) <= err(cal.AbsMax())


def test_ema_matches_closed_form():
  obs = [(-1.0, 2.0), (-3.0, 4.0), (-2.0, 0.5)]
  e = cal.ema_init(())
  for lo, hi in obs:
    e = jax.jit(cal.ema_update, static_argnums=3)(e, jnp.float32(lo), jnp.float32(hi), 0.9)
  expect_hi = 0.9 * (0.9 * 2.0 + 0.1 * 4.0) + 0.1 * 0.5
  expect_lo = 0.9 * (0.9 * -1.0 + 0.1 * -3.0) + 0.1 * -2.0
  assert float(e.hi) == pytest.approx(expect_hi, rel=1e-6)
  assert float(e.lo) == pytest.approx(expect_lo, rel=1e-6)
  assert int(e.count) == 3


def test_bad_calibrator_arguments():
  with pytest.raises(ValueError, match=r"Percentile: q must be a number in \(0, 100\], got 0"):
    cal.Percentile(q=0)
  with pytest.raises(ValueError, match=r"MSE: num must be an integer in \[1, inf\], got 0"):
    cal.MSE(num=0)
  with pytest.raises(ValueError, match=r"MSE: min_ratio must be a number in \(0, 1\], got 1.5"):
    cal.MSE(min_ratio=1.5)
  with pytest.raises(ValueError, match=r"decay=1.0"):
    cal.ema_update(cal.ema_init(()), 0.0, 1.0, 1.0)

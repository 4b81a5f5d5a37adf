"""Feature losses against numpy references (FitNets, attention transfer, RKD)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import distill


def rand(seed, shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_mse_and_cosine_match_numpy_and_mask():
  s, t = rand(0, (3, 5, 8)), rand(1, (3, 5, 8))
  np.testing.assert_allclose(distill.feature_mse_loss(s, t), ((s - t) ** 2).mean(-1), rtol=1e-6)
  cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
  np.testing.assert_allclose(distill.feature_cosine_loss(s, t), 1.0 - cos, rtol=1e-5, atol=1e-6)
  where = np.arange(15).reshape(3, 5) % 2 == 0
  out = distill.feature_cosine_loss(s, t, where=where)
  np.testing.assert_allclose(out, np.where(where, 1.0 - cos, 0.0), rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda z: distill.feature_cosine_loss(z, jnp.asarray(t)).sum())(jnp.zeros_like(s))
  assert np.all(np.isfinite(g))


def test_projection_is_trainable_and_matches_numpy_gradient():
  s, t = rand(2, (6, 4)), rand(3, (6, 10))
  p = distill.init_projection(jax.random.key(0), 4, 10)
  assert p["kernel"].shape == (4, 10) and p["bias"].shape == (10,)
  np.testing.assert_array_equal(p["bias"], np.zeros(10))
  big = distill.init_projection(jax.random.key(1), 400, 300)
  assert abs(float(jnp.var(big["kernel"])) - 1 / 400) < 0.2 / 400  # LeCun normal
  w, b = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
  np.testing.assert_allclose(distill.apply_projection(p, s), s @ w + b, rtol=1e-5, atol=1e-6)

  def loss(params):
    return distill.feature_mse_loss(distill.apply_projection(params, s), t).sum()

  g = jax.grad(loss)(p)
  r = s @ w + b - t  # d/dW sum_i mean_j r_ij^2 = s^T (2 r / d)
  np.testing.assert_allclose(g["kernel"], s.T @ (2 * r / 10), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g["bias"], (2 * r / 10).sum(0), rtol=1e-4, atol=1e-6)


def test_width_mismatch_points_to_projection():
  with pytest.raises(ValueError, match=r"widths differ \(4 vs 10\).*init_projection\(key, 4, 10\)"):
    distill.feature_mse_loss(jnp.ones((2, 4)), jnp.ones((2, 10)))
  with pytest.raises(ValueError, match=r"student features have shape \(3, 4\) but teacher features \(2, 4\)\.$"):
    distill.feature_cosine_loss(jnp.ones((3, 4)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"apply_projection: features of width \(5,\) do not fit a kernel of shape \(4, 10\)"):
    distill.apply_projection(distill.init_projection(jax.random.key(0), 4, 10), jnp.ones((2, 5)))


def np_at(x):
  """The paper's code: at(x) = normalize(x.pow(2).mean(1).view(n, -1)), NCHW."""
  a = (x.astype(np.float64) ** 2).mean(1).reshape(x.shape[0], -1)
  return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_attention_transfer_matches_paper_code():
  s_nchw, t_nchw = rand(4, (2, 3, 4, 5)), rand(5, (2, 7, 4, 5))
  ref = ((np_at(s_nchw) - np_at(t_nchw)) ** 2).mean(1)
  out = distill.attention_transfer_loss(s_nchw, t_nchw, channel_axis=1)
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  nhwc = distill.attention_transfer_loss(s_nchw.transpose(0, 2, 3, 1), t_nchw.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(nhwc, ref, rtol=1e-5)
  assert nhwc.shape == (2,)
  masked = distill.attention_transfer_loss(s_nchw, t_nchw, channel_axis=1, where=jnp.array([False, True]))
  np.testing.assert_allclose(masked, [0.0, ref[1]], rtol=1e-5)
  with pytest.raises(ValueError, match=r"batch and spatial shapes must agree \(channels may differ\)"):
    distill.attention_transfer_loss(jnp.ones((2, 4, 4, 3)), jnp.ones((2, 2, 2, 3)))


def np_pdist(e):
  d2 = (e**2).sum(1)[:, None] + (e**2).sum(1)[None] - 2 * e @ e.T
  d = np.sqrt(np.maximum(d2, 1e-12))
  np.fill_diagonal(d, 0.0)
  return d


def np_smooth_l1(x):
  return np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5)


def test_rkd_distance_matches_paper_code():
  s, t = rand(6, (7, 5)).astype(np.float64), rand(7, (7, 3, 2)).reshape(7, 6).astype(np.float64)
  ds, dt = np_pdist(s), np_pdist(t)
  ds, dt = ds / ds[ds > 0].mean(), dt / dt[dt > 0].mean()
  ref = np_smooth_l1(ds - dt)
  out = distill.rkd_distance_loss(s.astype(np.float32), rand(7, (7, 3, 2)))
  assert out.shape == (7, 7)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out.mean(), ref.mean(), rtol=1e-4)


def test_rkd_angle_matches_paper_code():
  s, t = rand(8, (6, 4)).astype(np.float64), rand(9, (6, 9)).astype(np.float64)

  def angles(e):
    d = e[None, :, :] - e[:, None, :]
    n = np.linalg.norm(d, axis=2, keepdims=True)
    u = d / np.maximum(n, 1e-12)
    return np.einsum("abd,acd->abc", u, u)

  ref = np_smooth_l1(angles(s) - angles(t))
  out = distill.rkd_angle_loss(s.astype(np.float32), t.astype(np.float32))
  assert out.shape == (6, 6, 6)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)


def test_rkd_invariant_to_similarity_transforms_with_finite_gradients():
  s = rand(10, (5, 3))
  q, _ = np.linalg.qr(rand(11, (3, 3)))
  t = 2.5 * s @ q + 1.0  # rotated, scaled and shifted: same distances up to scale, same angles
  np.testing.assert_allclose(distill.rkd_distance_loss(s, t), np.zeros((5, 5)), atol=1e-6)
  np.testing.assert_allclose(distill.rkd_angle_loss(s, t), np.zeros((5, 5, 5)), atol=1e-6)
  dup = jnp.asarray(s).at[1].set(s[0])  # a repeated example: zero distance
  for fn in (distill.rkd_distance_loss, distill.rkd_angle_loss):
    g = jax.grad(lambda z: fn(z, jnp.asarray(rand(12, (5, 4)))).mean())(dup)
    assert np.all(np.isfinite(g))


def test_rkd_where_equals_the_loss_on_the_kept_examples():
  s, t = rand(13, (6, 4)), rand(14, (6, 5))
  where = np.array([True, False, True, True, False, True])
  for fn in (distill.rkd_distance_loss, distill.rkd_angle_loss):
    full = np.asarray(fn(s, t, where=jnp.asarray(where)))
    sub = np.asarray(fn(s[where], t[where]))
    np.testing.assert_allclose(full.sum(), sub.sum(), rtol=1e-5)
  with pytest.raises(ValueError, match=r"must share the batch \(first\) axis"):
    distill.rkd_distance_loss(jnp.ones((3, 2)), jnp.ones((4, 2)))


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_feature_loss_hyperparameters_are_checked(value):
  e = jnp.ones((3, 4))
  shown = str(value)
  with pytest.raises(ValueError, match=rf"rkd_distance_loss: delta must be a number in \(0, inf\), got {shown}"):
    distill.rkd_distance_loss(e, e, delta=value)
  with pytest.raises(ValueError, match=rf"rkd_angle_loss: delta must be a number in \(0, inf\), got {shown}"):
    distill.rkd_angle_loss(e, e, delta=value)
  with pytest.raises(ValueError, match=rf"feature_cosine_loss: epsilon must be a number in \(0, inf\), got {shown}"):
    distill.feature_cosine_loss(e, e, epsilon=value)
  x = jnp.ones((1, 2, 2, 3))
  with pytest.raises(ValueError, match=rf"attention_transfer_loss: p must be a number in \(0, inf\), got {shown}"):
    distill.attention_transfer_loss(x, x, p=value)


def test_attention_channel_axis_is_checked():
  x = jnp.ones((1, 2, 2, 3))
  with pytest.raises(ValueError, match=r"attention_transfer_loss: channel_axis must be an integer in \[-4, 3\], got 4"):
    distill.attention_transfer_loss(x, x, channel_axis=4)

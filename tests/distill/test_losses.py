"""Logit losses against numpy references and closed-form gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress import distill


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_kl(log_p, log_q):
  p = np.exp(log_p)
  with np.errstate(invalid="ignore"):
    return np.sum(np.where(p > 0, p * (log_p - log_q), 0.0), -1)


def logits(seed, shape=(3, 4, 7), scale=2.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergences_match_numpy(temperature):
  s, t = logits(0), logits(1)
  log_q, log_p = np_log_softmax(s / temperature), np_log_softmax(t / temperature)
  t2 = temperature**2
  log_m = np.log(0.5 * (np.exp(log_p) + np.exp(log_q)))
  refs = {
      distill.soft_target_loss: t2 * np_kl(log_p, log_q),
      distill.reverse_kl_loss: t2 * np_kl(log_q, log_p),
      distill.jensen_shannon_loss: t2 * 0.5 * (np_kl(log_p, log_m) + np_kl(log_q, log_m)),
  }
  for fn, ref in refs.items():
    out = fn(s, t, temperature=temperature)
    assert out.shape == (3, 4) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [distill.soft_target_loss, distill.reverse_kl_loss, distill.jensen_shannon_loss])
def test_zero_loss_and_zero_gradient_when_student_equals_teacher(fn):
  s = jnp.asarray(logits(2))
  loss = fn(s, s, temperature=3.0)
  np.testing.assert_array_equal(loss, np.zeros((3, 4)))
  g = jax.grad(lambda z: fn(z, s, temperature=3.0).sum())(s)
  np.testing.assert_allclose(g, np.zeros_like(s), atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_target_gradient_is_closed_form(temperature):
  s, t = logits(3), logits(4)
  g = jax.grad(lambda z: distill.soft_target_loss(z, t, temperature=temperature).sum())(jnp.asarray(s))
  q, p = np.exp(np_log_softmax(s / temperature)), np.exp(np_log_softmax(t / temperature))
  # d/ds of T^2 KL(p || q): (q - p) / T, times T^2.
  np.testing.assert_allclose(g, (q - p) / temperature * temperature**2, rtol=1e-4, atol=1e-6)


def test_teacher_zero_probabilities_give_finite_loss_and_gradient():
  s = jnp.asarray(logits(5, (2, 5)))
  t = jnp.asarray(logits(6, (2, 5))).at[:, 0].set(-jnp.inf)
  for fn in (distill.soft_target_loss, distill.jensen_shannon_loss):
    out, g = jax.value_and_grad(lambda z: fn(z, t).sum())(s)
    assert np.isfinite(out) and np.all(np.isfinite(g))
  log_q, log_p = np_log_softmax(np.asarray(s)), np_log_softmax(np.asarray(t))
  np.testing.assert_allclose(distill.soft_target_loss(s, t), np_kl(log_p, log_q), rtol=1e-5)


def test_where_masks_positions_to_zero_loss_and_gradient():
  s, t = jnp.asarray(logits(7)), jnp.asarray(logits(8))
  where = np.random.default_rng(0).random((3, 4)) > 0.5
  full = distill.soft_target_loss(s, t, temperature=2.0)
  masked = distill.soft_target_loss(s, t, temperature=2.0, where=where)
  np.testing.assert_allclose(masked, np.where(where, full, 0.0), rtol=1e-6)
  g = jax.grad(lambda z: distill.soft_target_loss(z, t, temperature=2.0, where=where).sum())(s)
  assert np.all(np.asarray(g)[~where] == 0) and np.any(np.asarray(g)[where] != 0)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distillation_loss_mixes_soft_and_hard_targets(alpha):
  s, t = logits(9, (6, 5)), logits(10, (6, 5))
  labels = np.arange(6) % 5
  T = 3.0
  soft = T * T * np_kl(np_log_softmax(t / T), np_log_softmax(s / T))
  hard = -np_log_softmax(s)[np.arange(6), labels]
  out = distill.distillation_loss(s, t, jnp.asarray(labels), alpha=alpha, temperature=T)
  np.testing.assert_allclose(out, alpha * soft + (1 - alpha) * hard, rtol=1e-5, atol=1e-6)
  js = distill.distillation_loss(
      s, t, jnp.asarray(labels), alpha=alpha, temperature=T, divergence=distill.jensen_shannon_loss
  )
  np.testing.assert_allclose(
      js, alpha * distill.jensen_shannon_loss(s, t, temperature=T) + (1 - alpha) * hard, rtol=1e-5, atol=1e-6
  )


def test_temperature_and_alpha_follow_a_schedule_under_jit():
  s, t = logits(11, (4, 6)), logits(12, (4, 6))
  labels = jnp.arange(4)
  temp = jc.schedules.linear(1.0, 5.0, end_step=10)
  alpha = jc.schedules.piecewise([5], [0.0, 0.8])

  @jax.jit
  def loss(step):
    return distill.distillation_loss(s, t, labels, alpha=alpha(step), temperature=temp(step)).mean()

  for step, T, a in ((0, 1.0, 0.0), (5, 3.0, 0.8), (20, 5.0, 0.8)):
    soft = T * T * np_kl(np_log_softmax(t / T), np_log_softmax(s / T))
    hard = -np_log_softmax(s)[np.arange(4), np.arange(4)]
    np.testing.assert_allclose(loss(step), np.mean(a * soft + (1 - a) * hard), rtol=1e-5)
  assert loss._cache_size() == 1


def test_bf16_logits_compute_in_float32():
  s, t = logits(13, (2, 9)), logits(14, (2, 9))
  sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  out = distill.soft_target_loss(sb, tb, temperature=2.0)
  assert out.dtype == jnp.float32
  s32, t32 = np.asarray(sb, np.float32), np.asarray(tb, np.float32)
  ref = 4.0 * np_kl(np_log_softmax(t32 / 2.0), np_log_softmax(s32 / 2.0))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Top-k.
# --------------------------------------------------------------------------


def np_topk_loss(s, t, k, T):
  """Independent reference: KL over the teacher's top-k classes plus one rest bucket."""
  log_q, log_p = np_log_softmax(s / T), np_log_softmax(t / T)
  idx = np.argsort(-t, axis=-1)[..., :k]
  q_top = np.take_along_axis(np.exp(log_q), idx, -1)
  p_top = np.take_along_axis(np.exp(log_p), idx, -1)
  p_rest, q_rest = 1.0 - p_top.sum(-1), 1.0 - q_top.sum(-1)
  kl = np.sum(p_top * np.log(p_top / q_top), -1)
  kl += np.where(p_rest > 0, p_rest * np.log(np.maximum(p_rest, 1e-300) / q_rest), 0.0)
  return T * T * kl


def test_topk_logits_match_numpy():
  t = logits(15, (3, 2, 11))
  tk = distill.topk_logits(t, 4, temperature=2.0)
  idx = np.argsort(-t, axis=-1)[..., :4]
  np.testing.assert_array_equal(tk.indices, idx)
  assert tk.indices.dtype == jnp.int32
  np.testing.assert_allclose(tk.values, np.take_along_axis(t, idx, -1))
  lse = np.log(np.exp(t.astype(np.float64) / 2.0).sum(-1))
  np.testing.assert_allclose(tk.logsumexp, lse, rtol=1e-6)


@pytest.mark.parametrize("k,T", [(1, 1.0), (3, 1.0), (5, 2.0)])
def test_topk_loss_matches_numpy_bucket_kl(k, T):
  s, t = logits(16, (4, 3, 12)), logits(17, (4, 3, 12))
  tk = distill.topk_logits(t, k, temperature=T)
  out = distill.topk_distillation_loss(s, *tk, temperature=T)
  np.testing.assert_allclose(out, np_topk_loss(s, t, k, T), rtol=1e-4, atol=1e-6)


def test_topk_over_whole_vocabulary_equals_soft_target_loss():
  s, t = logits(18, (5, 8)), logits(19, (5, 8))
  tk = distill.topk_logits(t, 8, temperature=1.5)
  np.testing.assert_allclose(
      distill.topk_distillation_loss(s, *tk, temperature=1.5),
      distill.soft_target_loss(s, t, temperature=1.5),
      rtol=1e-5,
      atol=1e-6,
  )


def test_topk_gradient_is_closed_form_with_rest_spread_by_student():
  s, t, k, T = logits(20, (3, 10)), logits(21, (3, 10)), 4, 2.0
  tk = distill.topk_logits(t, k, temperature=T)
  g = jax.grad(lambda z: distill.topk_distillation_loss(z, *tk, temperature=T).sum())(jnp.asarray(s))
  q, p = np.exp(np_log_softmax(s / T)), np.exp(np_log_softmax(t / T))
  idx = np.argsort(-t, axis=-1)[..., :k]
  top = np.zeros_like(q, bool)
  np.put_along_axis(top, idx, True, -1)
  p_rest = 1.0 - np.where(top, p, 0).sum(-1, keepdims=True)
  q_rest = 1.0 - np.where(top, q, 0).sum(-1, keepdims=True)
  target = np.where(top, p, p_rest * q / q_rest)
  np.testing.assert_allclose(g, T * (q - target), rtol=1e-4, atol=1e-6)


def test_topk_loss_zero_when_student_matches_teacher_and_where_masks():
  t = jnp.asarray(logits(22, (2, 3, 9)))
  tk = distill.topk_logits(t, 3)
  np.testing.assert_allclose(distill.topk_distillation_loss(t, *tk), np.zeros((2, 3)), atol=1e-6)
  s = jnp.asarray(logits(23, (2, 3, 9)))
  where = np.array([[True, False, True], [False, False, True]])
  out = distill.topk_distillation_loss(s, *tk, where=where)
  full = distill.topk_distillation_loss(s, *tk)
  np.testing.assert_allclose(out, np.where(where, full, 0.0))


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [distill.soft_target_loss, distill.reverse_kl_loss, distill.jensen_shannon_loss])
@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_temperature_must_be_positive(fn, temperature):
  s = jnp.ones((2, 3))
  with pytest.raises(ValueError, match=r"temperature must be a number in \(0, inf\), got " + str(temperature)):
    fn(s, s, temperature=temperature)


def test_temperature_errors_for_topk_and_mix():
  s = jnp.ones((2, 3))
  with pytest.raises(ValueError, match=r"topk_logits: temperature must be a number in \(0, inf\)"):
    distill.topk_logits(s, 2, temperature=0.0)
  tk = distill.topk_logits(s, 2)
  with pytest.raises(ValueError, match=r"topk_distillation_loss: temperature must be a number in \(0, inf\), got -2.0"):
    distill.topk_distillation_loss(s, *tk, temperature=-2.0)
  with pytest.raises(ValueError, match=r"soft_target_loss: temperature must be a number in \(0, inf\)"):
    distill.distillation_loss(s, s, jnp.zeros(2, jnp.int32), temperature=0.0)
  with pytest.raises(TypeError, match=r"evaluate it at the step: temperature=schedule\(step\)"):
    distill.soft_target_loss(s, s, temperature=jc.schedules.constant(2.0))
  with pytest.raises(ValueError, match=r"distillation_loss: alpha must be a number in \[0, 1\], got 1.5"):
    distill.distillation_loss(s, s, jnp.zeros(2, jnp.int32), alpha=1.5)


def test_mismatched_logit_shapes_are_rejected():
  with pytest.raises(ValueError, match=r"student_logits has shape \(2, 3\) but teacher_logits has shape \(2, 4\)"):
    distill.soft_target_loss(jnp.ones((2, 3)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"labels has shape \(3,\), expected \(2,\)"):
    distill.distillation_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match=r"where has shape \(2, 3\) but the loss has shape \(2,\)"):
    distill.soft_target_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), where=jnp.ones((2, 3), bool))
  tk = distill.topk_logits(jnp.ones((2, 5)), 2)
  with pytest.raises(ValueError, match=r"must both have shape \(3,\) \+ \(k,\)"):
    distill.topk_distillation_loss(jnp.ones((3, 5)), *tk)
  with pytest.raises(ValueError, match=r"teacher_logsumexp has shape \(1,\), expected \(2,\)"):
    distill.topk_distillation_loss(jnp.ones((2, 5)), tk.values, tk.indices, jnp.ones(1))


def test_k_larger_than_vocabulary_is_rejected():
  with pytest.raises(ValueError, match=r"topk_logits: k=6 is larger than the vocabulary \(5 classes"):
    distill.topk_logits(jnp.ones((2, 5)), 6)
  with pytest.raises(ValueError, match=r"topk_logits: k must be an integer in \[1, inf\], got 0"):
    distill.topk_logits(jnp.ones((2, 5)), 0)
  idx = jnp.tile(jnp.arange(6, dtype=jnp.int32), (2, 1))
  with pytest.raises(ValueError, match=r"topk_distillation_loss: k=6 is larger than the vocabulary \(5"):
    distill.topk_distillation_loss(jnp.ones((2, 5)), jnp.ones((2, 6)), idx, jnp.ones(2))


# --------------------------------------------------------------------------
# Classes masked with -inf, invalid labels and top-k indices.
# --------------------------------------------------------------------------


def _softmax64(z):
  return np.exp(np_log_softmax(z))


def _closed_forms(s, t, temperature):
  """numpy float64 losses and student gradients on a vocabulary without the masked class."""
  T = temperature
  q, p = _softmax64(s / T), _softmax64(t / T)
  lq, lp = np.log(q), np.log(p)
  m = 0.5 * (p + q)
  fwd = T * T * np.sum(p * (lp - lq), -1)
  rev = T * T * np.sum(q * (lq - lp), -1)
  js = T * T * 0.5 * np.sum(p * np.log(p / m) + q * np.log(q / m), -1)
  g_fwd = T * (q - p)
  r = lq - lp
  g_rev = T * q * (r - np.sum(q * r, -1, keepdims=True))
  l = np.log(q / m)
  g_js = 0.5 * T * q * (l - np.sum(q * l, -1, keepdims=True))
  return {
      distill.soft_target_loss: (fwd, g_fwd),
      distill.reverse_kl_loss: (rev, g_rev),
      distill.jensen_shannon_loss: (js, g_js),
  }


@pytest.mark.parametrize("fn", [distill.soft_target_loss, distill.reverse_kl_loss, distill.jensen_shannon_loss])
def test_classes_masked_in_both_give_finite_loss_and_gradients(fn):
  s, t = logits(10, (2, 5)), logits(11, (2, 5))
  dead = 2
  s_inf, t_inf = s.copy(), t.copy()
  s_inf[:, dead] = t_inf[:, dead] = -np.inf
  temperature = 2.0
  loss, ref_grad = _closed_forms(np.delete(s, dead, -1), np.delete(t, dead, -1), temperature)[fn]

  total = jax.jit(lambda a, b: fn(a, b, temperature=temperature).sum())
  value, (gs, gt) = jax.value_and_grad(total, argnums=(0, 1))(jnp.asarray(s_inf), jnp.asarray(t_inf))
  np.testing.assert_allclose(float(value), loss.sum(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(fn(s_inf, t_inf, temperature=temperature)), loss, rtol=1e-5)
  gs, gt = np.asarray(gs), np.asarray(gt)
  assert np.isfinite(gs).all() and np.isfinite(gt).all()
  np.testing.assert_array_equal(gs[:, dead], 0.0)
  np.testing.assert_array_equal(gt[:, dead], 0.0)
  np.testing.assert_allclose(np.delete(gs, dead, -1), ref_grad, rtol=1e-4, atol=1e-6)


def test_labels_out_of_range_are_refused_or_nan():
  s, t = logits(12, (3, 4)), logits(13, (3, 4))
  for bad, shown in [(-1, "-1"), (4, "4")]:
    labels = np.array([0, bad, 2], np.int32)
    with pytest.raises(ValueError, match=rf"distillation_loss: labels must be class indices in \[0, 4\), got {shown} at position \(1,\).*False in where="):
      distill.distillation_loss(s, t, labels)
    # Padding: an out-of-range label where `where` is False is fine and gives 0.
    where = np.array([True, False, True])
    out = np.asarray(distill.distillation_loss(s, t, labels, where=where))
    ok = np.asarray(distill.distillation_loss(s, t, np.array([0, 0, 2], np.int32), where=where))
    np.testing.assert_array_equal(out, ok)
    # Traced: that position's loss is NaN (visible), the others unchanged.
    traced = np.asarray(jax.jit(distill.distillation_loss)(s, t, jnp.asarray(labels)))
    full = np.asarray(distill.distillation_loss(s, t, np.array([0, 0, 2], np.int32)))
    assert np.isnan(traced[1])
    np.testing.assert_allclose(traced[[0, 2]], full[[0, 2]], rtol=1e-6)


def test_topk_indices_must_be_distinct_and_in_range():
  s, t = logits(14, (2, 6)), logits(15, (2, 6))
  tk = distill.topk_logits(t, 3)
  dup = np.asarray(tk.indices).copy()
  dup[1, 2] = dup[1, 0]
  with pytest.raises(ValueError, match=rf"teacher_topk_indices repeat class {dup[1, 0]} at position \(1,\); the k indices of a position must be distinct"):
    distill.topk_distillation_loss(s, tk.values, dup, tk.logsumexp)
  far = np.asarray(tk.indices).copy()
  far[0, 1] = -1
  with pytest.raises(ValueError, match=r"teacher_topk_indices must be class indices in \[0, 6\), got -1 at \(0, 1\)"):
    distill.topk_distillation_loss(s, tk.values, far, tk.logsumexp)
  loss = jax.jit(distill.topk_distillation_loss)
  good = np.asarray(loss(s, *tk))
  for bad in (dup, far):
    out = np.asarray(loss(s, tk.values, jnp.asarray(bad), tk.logsumexp))
    row = 1 if bad is dup else 0
    assert np.isnan(out[row]) and np.isfinite(out[1 - row])
    np.testing.assert_allclose(out[1 - row], good[1 - row], rtol=1e-6)

"""The project's own bad-input suite: properties that keep the safety fixes fixed.

Shapes are fixed and only values vary, so each property compiles once. Every
reference is computed here with numpy, not with the library.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import jaxcompress as jc

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
FEW = settings(max_examples=8, deadline=None, derandomize=True)  # each example compiles
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
nonfinite = st.sampled_from([np.nan, np.inf, -np.inf])


def numpy_fake_quant_per_channel(w: np.ndarray, bits: int = 8) -> np.ndarray:
  """Symmetric per-output-channel (last axis) fake quantization, finite values only."""
  qmax = 2 ** (bits - 1) - 1
  finite_w = np.where(np.isfinite(w), w, 0.0)
  amax = np.abs(finite_w).max(axis=0, keepdims=True)
  scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
  q = np.clip(np.round(finite_w / scale), -qmax, qmax)
  return np.where(np.isfinite(w), q * scale, w)


@SETTINGS
@given(
    w=hnp.arrays(np.float32, (6, 4), elements=finite),
    row=st.integers(0, 5),
    col=st.integers(0, 3),
    bad=nonfinite,
)
def test_a_nonfinite_weight_stays_visible_and_spares_its_channel(w, row, col, bad):
  w = w.copy()
  w[row, col] = bad
  spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=8)])])
  t, s = spec.init({"w": jnp.asarray(w)})
  out = np.asarray(spec.apply(t, s)["w"])
  ref = numpy_fake_quant_per_channel(w)
  np.testing.assert_array_equal(np.isnan(out), np.isnan(w))
  np.testing.assert_array_equal(out[np.isinf(w)], w[np.isinf(w)])
  ok = np.isfinite(w)
  np.testing.assert_allclose(out[ok], ref[ok], rtol=1e-6, atol=1e-6 * np.abs(ref[ok]).max(initial=0.0) + 1e-30)


@pytest.mark.slow
@FEW
@given(w=hnp.arrays(np.float32, (8, 8), elements=finite), sparsity=st.floats(0.0, 0.95))
def test_prune_then_quant_keeps_exact_zeros_and_kept_count(w, sparsity):
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=sparsity), jc.quant.FakeQuant(bits=4)])])
  t, s = spec.init({"w": jnp.asarray(w)})
  mask = np.asarray(s["w"].stages["prune"].mask)
  out = np.asarray(spec.apply(t, s)["w"])
  assert np.all(out[~mask] == 0)
  assert mask.sum() == max(1, int(np.round(w.size * (1 - sparsity))))
  assert np.all(np.isfinite(out))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: jc.quant.FakeQuant(bits=9), "bits"),
        (lambda: jc.quant.FakeQuant(bits=1), "bits"),
        (lambda: jc.quant.LSQ(bits=4, min_step=0.0), "min_step"),
        (lambda: jc.prune.magnitude(sparsity=1.0), "sparsity"),
        (lambda: jc.prune.magnitude(sparsity=-0.1), "sparsity"),
        (lambda: jc.prune.magnitude(sparsity=float("nan")), "sparsity"),
        (lambda: jc.prune.magnitude(sparsity=jc.schedules.polynomial(0.0, 1.5, end_step=10)), "sparsity"),
        (lambda: jc.cluster.kmeans(bits=20), "bits"),
        (lambda: jc.lowrank.svd(rank=0), "rank"),
    ],
    ids=["fq_bits9", "fq_bits1", "lsq_min_step", "sparsity_1", "sparsity_neg", "sparsity_nan",
         "schedule_1p5", "kmeans_bits20", "svd_rank0"],
)
def test_bad_settings_are_refused_when_the_stage_is_built(build, match):
  with pytest.raises((ValueError, TypeError), match=match):
    build()


def test_numpy_scalar_settings_are_accepted():
  jc.prune.magnitude(sparsity=np.float32(0.5))
  jc.quant.FakeQuant(bits=np.int64(4))


@SETTINGS
@given(label=st.sampled_from([-1, 5, 100]))
def test_labels_outside_the_classes_are_refused(label):
  logits = jnp.zeros((3, 5))
  labels = jnp.array([0, 1, label])
  with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 5\)"):
    jc.distill.distillation_loss(logits, logits, labels, temperature=2.0, alpha=0.5)


@SETTINGS
@given(t=st.floats(-10, 0))
def test_nonpositive_temperatures_are_refused(t):
  x = jnp.zeros((2, 4))
  with pytest.raises(ValueError, match="temperature"):
    jc.distill.soft_target_loss(x, x, temperature=t)


@SETTINGS
@given(s=hnp.arrays(np.float32, (2, 5), elements=finite), t=hnp.arrays(np.float32, (2, 5), elements=finite))
def test_classes_masked_in_both_models_give_finite_losses_and_gradients(s, t):
  s, t = s.copy(), t.copy()
  s[:, 2] = t[:, 2] = -np.inf
  for loss in (jc.distill.soft_target_loss, jc.distill.reverse_kl_loss, jc.distill.jensen_shannon_loss):
    value, grad = jax.value_and_grad(lambda x: loss(x, jnp.asarray(t), temperature=1.0).sum())(jnp.asarray(s))
    assert np.isfinite(value), loss.__name__
    assert np.all(np.isfinite(np.asarray(grad))), loss.__name__


def test_state_of_another_tree_is_refused():
  spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=8, ranges="static")])])
  t8, s8 = spec.init({"w": jnp.ones((8, 8))})
  _, s_small = spec.init({"w": jnp.ones((8, 1))})
  with pytest.raises(ValueError, match="w"):
    spec.apply(t8, s_small)
  spec4 = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=4, ranges="static")])])
  with pytest.raises(ValueError, match="spec.init"):
    spec4.apply(t8, s8)


def test_pruning_mask_of_another_shape_is_refused():
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5)])])
  t, _ = spec.init({"w": jnp.ones((8, 8))})
  _, s_small = spec.init({"w": jnp.ones((1, 8))})
  with pytest.raises(ValueError, match=r"'w' has shape \(8, 8\), but its compression state was made for shape \(1, 8\)"):
    spec.apply(t, s_small)


def test_train_step_with_plain_optimizer_and_nan_gradient_step_keeps_scores_finite():
  # A step whose gradient is NaN (skipped by optax.apply_if_finite) must not
  # poison movement-pruning scores.
  spec = jc.Spec([jc.Rule("w", [jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Movement(), end_step=4)])])
  t, s = spec.init({"w": jnp.arange(1.0, 17.0).reshape(4, 4)})
  g = jnp.full((4, 4), jnp.nan)
  t, s = spec.update(t, s, 0, grads={"w": g})
  t, s = spec.update(t, s, 1, grads={"w": jnp.ones((4, 4))})
  leaves = jax.tree_util.tree_leaves(s)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))

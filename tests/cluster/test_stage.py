"""The clustering stage against numpy references: inits, Lloyd, zeros, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc
import jaxcompress.cluster  # noqa: F401

KEY = "cluster"


def np_lloyd(x, centroids, iters):
  """Plain Lloyd in float64 with an (n, k) distance matrix, to a fixed point or ``iters``.

  An empty cluster is re-seeded (the first one, per iteration) at the end farther
  from its mean of the cluster with the largest squared error among those of two
  or more distinct values.
  """
  x = np.asarray(x, np.float64)
  c = np.sort(np.asarray(centroids, np.float64))
  for _ in range(iters):
    a = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
    new = c.copy()
    sse = np.full(c.size, -1.0)
    for j in range(c.size):
      if np.any(a == j):
        new[j] = x[a == j].mean()
        if np.ptp(x[a == j]) > 0:
          sse[j] = np.sum((x[a == j] - new[j]) ** 2)
    empty = [j for j in range(c.size) if not np.any(a == j)]
    if empty and np.max(sse) >= 0:
      big = int(np.argmax(sse))
      lo, hi = x[a == big].min(), x[a == big].max()
      new[empty[0]] = lo if new[big] - lo > hi - new[big] else hi
    new = np.sort(new)
    if np.array_equal(new, c):
      break
    c = new
  return c, np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)


def np_linear(x, k):
  lo, hi = np.min(x).astype(np.float64), np.max(x).astype(np.float64)
  return lo + (hi - lo) * np.arange(k) / (k - 1)


def np_density(x, k):
  return np.quantile(np.asarray(x, np.float64), (np.arange(k) + 0.5) / k, method="inverted_cdf")


def weights(shape=(24, 6), seed=0, zero_frac=0.3):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape).astype(np.float32)
  w[rng.random(shape) < zero_frac] = 0.0
  return w


def clustered(w, key=None, **kwargs):
  spec = jc.Spec([jc.Rule("w", [jc.cluster.kmeans(**kwargs)])])
  t, s = spec.init({"w": jnp.asarray(w)}, key=key)
  st = s["w"].stages[KEY]
  return spec, t, s, np.asarray(t["w"].params[KEY]), np.asarray(st.assignments)


def groups(w, channel_axis):
  """(values of group g, flat positions of group g) for the nonzeros of each group."""
  if channel_axis is None:
    return [w.reshape(-1)]
  moved = np.moveaxis(w, channel_axis, 0)
  return [moved[c].reshape(-1) for c in range(moved.shape[0])]


def test_linear_init_is_exact():
  w = weights()
  *_, c, _ = clustered(w, bits=3, iters=0, centroid_init="linear")
  nz = w[w != 0]
  # Exact up to float32 rounding of lo + (hi - lo) * j / (k - 1).
  np.testing.assert_allclose(c, np_linear(nz, 8), rtol=0, atol=1e-6 * np.ptp(nz))
  *_, c, _ = clustered(w, bits=2, iters=0, channel_axis=-1, centroid_init="linear")
  for j in range(w.shape[1]):
    col = w[:, j][w[:, j] != 0]
    np.testing.assert_allclose(c[j], np_linear(col, 4), rtol=0, atol=1e-6 * np.ptp(col))


def test_density_init_is_inverse_cdf():
  w = weights(shape=(40, 5), seed=1)
  *_, c, _ = clustered(w, bits=3, iters=0, centroid_init="density")
  np.testing.assert_array_equal(c, np_density(w[w != 0], 8).astype(np.float32))


@pytest.mark.parametrize(
    "init,channel_axis", [("linear", None), ("density", -1), ("linear", 0)]
)
def test_lloyd_matches_numpy(init, channel_axis):
  w = weights(seed=2)
  bits, iters = 2, 12
  spec, t, s, c, a = clustered(w, bits=bits, iters=iters, centroid_init=init, channel_axis=channel_axis)
  ref_init = np_linear if init == "linear" else np_density
  cs = c.reshape(-1, 2**bits)
  out = np.asarray(spec.apply(t, s)["w"])
  for g, (vals, assign, outs) in enumerate(
      zip(groups(w, channel_axis), groups(a, channel_axis), groups(out, channel_axis))
  ):
    nz = vals != 0
    ref_c, ref_a = np_lloyd(vals[nz], ref_init(vals[nz], 2**bits), iters)
    np.testing.assert_allclose(cs[g], ref_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(assign[nz], ref_a)
    np.testing.assert_allclose(outs[nz], ref_c[ref_a], rtol=1e-5, atol=1e-6)
    assert np.all(outs[~nz] == 0)


def test_kmeans_pp_seeds_from_data_then_lloyd_matches_numpy():
  w = weights(shape=(30, 4), seed=3)
  nz = w[w != 0]
  *_, c0, _ = clustered(w, key=jax.random.key(0), bits=3, iters=0, centroid_init="kmeans++")
  *_, c0_again, _ = clustered(w, key=jax.random.key(0), bits=3, iters=0, centroid_init="kmeans++")
  *_, c0_other, _ = clustered(w, key=jax.random.key(1), bits=3, iters=0, centroid_init="kmeans++")
  assert np.all(np.isin(c0, nz)) and np.unique(c0).size == 8
  np.testing.assert_array_equal(c0, c0_again)
  assert not np.array_equal(c0, c0_other)
  *_, c, a = clustered(w, key=jax.random.key(0), bits=3, iters=10, centroid_init="kmeans++")
  ref_c, ref_a = np_lloyd(nz, c0, 10)
  np.testing.assert_allclose(c, ref_c, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(a[w != 0], ref_a)


def test_pruned_zeros_are_excluded_and_stay_zero():
  w = weights(shape=(32, 8), seed=4, zero_frac=0.0)
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.75), jc.cluster.kmeans(bits=2, iters=10, centroid_init="linear")])])
  t, s = spec.init({"w": jnp.asarray(w)})
  out = np.asarray(spec.apply(t, s)["w"])
  mask = np.asarray(s["w"].stages["prune"].mask)
  kept = w[mask]
  assert np.all(out[~mask] == 0)
  # Clustered over the kept weights only: linear init over their range, then Lloyd.
  ref_c, ref_a = np_lloyd(kept, np_linear(kept, 4), 10)
  np.testing.assert_allclose(np.asarray(t["w"].params[KEY]), ref_c, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[mask], ref_c[ref_a], rtol=1e-5, atol=1e-6)
  assert np.all(out[mask] != 0)


@pytest.mark.parametrize("channel_axis,bits", [(None, 2), (-1, 2), (0, 2), (None, 5), (-1, 5)])
def test_centroid_gradient_is_sum_of_weight_gradients(channel_axis, bits):
  # 5 bits: 32 centroids, two passes of the gradient's reduction.
  k = 2**bits
  w = weights(shape=(96, 6), seed=5, zero_frac=0.1)
  g = np.random.default_rng(6).normal(size=w.shape).astype(np.float32)
  spec, t, s, c, a = clustered(w, bits=bits, channel_axis=channel_axis)
  grads = jax.grad(lambda t: jnp.sum(spec.apply(t, s)["w"] * g))(t)
  gc = np.asarray(grads["w"].params[KEY]).reshape(-1, k)
  for j, (gg, aa, ww) in enumerate(zip(groups(g, channel_axis), groups(a, channel_axis), groups(w, channel_axis))):
    nz = ww != 0
    np.testing.assert_allclose(gc[j], np.bincount(aa[nz], weights=gg[nz], minlength=k), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(grads["w"].weight) == 0)


def test_training_step_holds_one_gradient_copy_less():
  # Autodiff of the gather and selects was a scatter-add fed with a masked
  # copy of the gradient and int32 indices (3 weights' worth of temporaries in
  # an Adam step); the custom gradient feeds it uint8 indices (2.25).
  import optax

  w = {"w": jax.random.normal(jax.random.key(0), (512, 1024))}
  spec = jc.Spec([jc.Rule("w", [jc.cluster.kmeans(bits=4, centroid_init="linear", iters=2)])])
  opt = optax.adam(1e-3)
  ts = jc.init_train_state(spec, opt, w)
  step = jc.make_train_step(lambda p, x: jnp.mean((x @ p["w"]) ** 2), spec, opt)
  temp = step.lower(ts, jnp.ones((16, 512))).compile().memory_analysis().temp_size_in_bytes
  assert temp < 2.5 * w["w"].size * 4, temp / (w["w"].size * 4)


def test_clusters_at_begin_step_from_the_pruned_weight():
  w = weights(shape=(16, 8), seed=7, zero_frac=0.0)
  stages = [
      jc.prune.magnitude(sparsity=jc.schedules.linear(0.0, 0.5, end_step=2)),
      jc.cluster.kmeans(bits=2, iters=8, begin_step=2, centroid_init="linear"),
  ]
  spec = jc.Spec([jc.Rule("w", stages)])
  t, s = spec.init({"w": jnp.asarray(w)})
  np.testing.assert_array_equal(np.asarray(spec.apply(t, s)["w"]), w)  # passes through
  grads = jax.grad(lambda t: jnp.sum(spec.apply(t, s)["w"]))(t)
  np.testing.assert_array_equal(np.asarray(grads["w"].weight), np.ones_like(w))
  update = jax.jit(spec.update)
  for step in range(2):
    t, s = update(t, s, step)
    assert not bool(s["w"].stages[KEY].clustered)
  t, s = update(t, s, 2)
  assert bool(s["w"].stages[KEY].clustered)
  before = np.asarray(t["w"].weight)  # pruned to 50% by the same update, before clustering
  nz = before != 0
  assert nz.sum() == w.size // 2
  ref_c, ref_a = np_lloyd(before[nz], np_linear(before[nz], 4), 8)
  out = np.asarray(spec.apply(t, s)["w"])
  np.testing.assert_allclose(out[nz], ref_c[ref_a], rtol=1e-5, atol=1e-6)
  assert np.all(out[~nz] == 0)


@pytest.mark.slow
def test_train_step_fine_tunes_centroids_only():
  w = weights(shape=(8, 4), seed=8, zero_frac=0.0)
  spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5), jc.cluster.kmeans(bits=2)])])
  opt = jc.masked_optimizer(optax.adam(1e-2))
  x = jnp.asarray(np.random.default_rng(9).normal(size=(16, 8)), jnp.float32)
  y = x @ jnp.asarray(w)
  loss = lambda p, b: jnp.mean((b[0] @ p["w"] * 1.1 - b[1]) ** 2)
  ts = jc.init_train_state(spec, opt, {"w": jnp.asarray(w)})
  c0 = np.asarray(ts.trainable["w"].params[KEY])
  a0 = np.asarray(ts.spec_state["w"].stages[KEY].assignments)
  out0 = np.asarray(spec.apply(ts.trainable, ts.spec_state)["w"])
  step = jc.make_train_step(loss, spec, opt)
  for _ in range(5):
    ts, _ = step(ts, (x, y))
  c = np.asarray(ts.trainable["w"].params[KEY])
  out = np.asarray(spec.apply(ts.trainable, ts.spec_state)["w"])
  assert np.all(np.abs(c - c0) > 1e-3)
  np.testing.assert_array_equal(np.asarray(ts.spec_state["w"].stages[KEY].assignments), a0)
  np.testing.assert_array_equal(out == 0, out0 == 0)
  np.testing.assert_allclose(out[out0 != 0], c[a0[out0 != 0]])


@pytest.mark.parametrize("bits", [0, 9, 20])
def test_bits_out_of_range_fails_when_the_stage_is_built(bits):
  with pytest.raises(ValueError, match=rf"bits must be an integer in \[1, 8\], got {bits}\..*uint8.*Use bits in 1\.\.8"):
    jc.cluster.kmeans(bits=bits)


def test_bad_arguments():
  with pytest.raises(TypeError, match="bits must be an integer in \\[1, 8\\], got 4.0 of type float"):
    jc.cluster.kmeans(bits=4.0)
  with pytest.raises(ValueError, match="centroid_init must be one of .* got 'kmeans'.*Use 'optimal'"):
    jc.cluster.kmeans(bits=4, centroid_init="kmeans")
  with pytest.raises(ValueError, match=r"iters must be an integer in \[0, inf\], got -1"):
    jc.cluster.kmeans(bits=4, iters=-1)
  with pytest.raises(TypeError, match=r"begin_step must be an integer in \[0, inf\], got 1.5"):
    jc.cluster.kmeans(bits=4, begin_step=1.5)
  with pytest.raises(TypeError, match="channel_axis must be None .* got '-1'"):
    jc.cluster.kmeans(bits=4, channel_axis="-1")
  spec = jc.Spec([jc.Rule("w", [jc.cluster.kmeans(bits=2, channel_axis=2)])])
  with pytest.raises(ValueError, match=r"'w': channel_axis=2 is out of range for a weight of shape \(4, 4\)"):
    spec.init({"w": jnp.ones((4, 4))})


def test_kmeans_pp_without_a_key_names_the_path():
  spec = jc.Spec([jc.Rule("w", [jc.cluster.kmeans(bits=2, centroid_init="kmeans++")])])
  with pytest.raises(ValueError, match=r"'w': centroid_init='kmeans\+\+' .* spec.init got key=None"):
    spec.init({"w": jnp.ones((4, 4))})
  spec = jc.Spec([jc.Rule("w", [jc.cluster.kmeans(bits=2, centroid_init="kmeans++", begin_step=1)])])
  t, s = spec.init({"w": jnp.ones((4, 4))})
  with pytest.raises(ValueError, match=r"'w': .* spec.update got key=None"):
    spec.update(t, s, 0)

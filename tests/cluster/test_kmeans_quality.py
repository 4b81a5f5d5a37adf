"""k-means quality against independent references: scikit-learn, an exact numpy DP; NaN checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans

import jaxcompress as jc
import jaxcompress.cluster  # noqa: F401

KEY = "cluster"


def inertia(x, centroids):
  x = np.asarray(x, np.float64)
  c = np.asarray(centroids, np.float64)
  return float(np.sum(np.min((x[:, None] - c[None, :]) ** 2, axis=1)))


def np_optimal_inertia(x, k):
  """Exact 1-D k-means optimum, O(k n^2) dynamic programme over sorted values (float64)."""
  x = np.sort(np.asarray(x, np.float64))
  n = x.size
  s1 = np.concatenate([[0.0], np.cumsum(x)])
  s2 = np.concatenate([[0.0], np.cumsum(x * x)])
  lo, hi = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
  w = np.maximum(hi - lo, 1)
  cost = s2[hi] - s2[lo] - (s1[hi] - s1[lo]) ** 2 / w
  cost = np.where(hi > lo, cost, np.inf)  # cost[l, i]: one cluster over x[l:i]
  e = cost[0].copy()
  for _ in range(k - 1):
    e = np.minimum(e, np.min(e[:, None] + cost, axis=0))
  return float(e[n])


def sample(dist, n, seed, sparsity=0.0):
  rng = np.random.default_rng(seed)
  w = (rng.standard_normal(n) if dist == "gauss" else rng.laplace(size=n)).astype(np.float32)
  if sparsity:
    w[np.abs(w) <= np.quantile(np.abs(w), sparsity)] = 0.0
  return w


def cluster(w, **kwargs):
  spec = jc.Spec([jc.Rule("w", [jc.cluster.kmeans(**kwargs)])])
  t, s = spec.init({"w": jnp.asarray(w)})
  return np.asarray(t["w"].params[KEY]), np.asarray(s["w"].stages[KEY].assignments)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 5])
def test_inertia_within_5_percent_of_sklearn(bits):
  k = 2**bits
  for dist, n, sparsity in [("gauss", 8192, 0.0), ("laplace", 8192, 0.0), ("gauss", 8192, 0.9), ("laplace", 8192, 0.9)]:
    w = sample(dist, n, seed=bits, sparsity=sparsity)
    kept = w[w != 0].astype(np.float64)
    ref = KMeans(n_clusters=k, n_init=10, random_state=0).fit(kept[:, None]).inertia_
    c, _ = cluster(w, bits=bits)
    ratio = inertia(kept, c) / ref
    assert ratio <= 1.05, (dist, n, sparsity, k, ratio)


@pytest.mark.parametrize("n,k", [(40, 4), (90, 8), (300, 16)])
def test_optimal_init_is_the_exact_optimum(n, k):
  w = sample("laplace", n, seed=n)
  c, a = cluster(w, bits=int(np.log2(k)), iters=0)
  np.testing.assert_allclose(inertia(w, c), np_optimal_inertia(w, k), rtol=1e-5)
  # Each entry is assigned its nearest centroid.
  np.testing.assert_array_equal(a, np.argmin(np.abs(w[:, None] - c[None, :].astype(np.float64)), axis=1))


@pytest.mark.slow
def test_pruned_weights_use_every_level_also_from_linear_init():
  # After 90% pruning, linear centroids over [-max, max] fall into the gap around
  # zero; Lloyd with re-seeding must still use all 16 levels, near the optimum.
  w = sample("gauss", 4096, seed=3, sparsity=0.9)
  kept = w[w != 0]
  for init in ("linear", "optimal"):
    c, a = cluster(w, bits=4, centroid_init=init)
    assert np.unique(a[w != 0]).size == 16, init
    assert np.all(np.abs(c) >= np.min(np.abs(kept))), init  # no level in the gap
  ref = KMeans(n_clusters=16, n_init=10, random_state=0).fit(kept[:, None].astype(np.float64)).inertia_
  c, _ = cluster(w, bits=4, centroid_init="linear")
  assert inertia(kept, c) <= 1.1 * ref


def test_fewer_distinct_values_than_centroids():
  w = np.array([1.0, 1.0, 2.0, 2.0, 2.0, -3.0, 0.0], np.float32)
  c, a = cluster(w, bits=3)
  assert np.all(np.isfinite(c)) and np.all(np.diff(c) >= 0)
  np.testing.assert_array_equal(c[a[w != 0]], w[w != 0])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight_names_the_leaf(bad):
  w = sample("gauss", 64, seed=0)
  w[5] = bad
  params = {"Dense_0": {"kernel": jnp.asarray(w.reshape(8, 8))}}
  spec = jc.Spec([jc.Rule(r".*kernel", [jc.cluster.kmeans(bits=2)])])
  with pytest.raises(ValueError, match=r"Cluster on leaf 'Dense_0/kernel': the weight holds NaN or inf"):
    spec.init(params)
  with pytest.raises(Exception, match=r"Cluster on leaf 'Dense_0/kernel': the weight holds NaN or inf"):
    jax.block_until_ready(jax.jit(spec.init)(params))


def test_non_finite_weight_at_begin_step_names_the_leaf():
  w = sample("gauss", 64, seed=1).reshape(8, 8)
  spec = jc.Spec([jc.Rule("w", [jc.cluster.kmeans(bits=2, begin_step=1)])])
  t, s = spec.init({"w": jnp.asarray(w)})
  t, s = spec.update(t, s, 0)  # no clustering yet: no check
  t = jax.tree_util.tree_map(lambda x: x.at[0, 0].set(jnp.nan) if x.shape == (8, 8) else x, t)
  with pytest.raises(Exception, match=r"Cluster on leaf 'w': the weight holds NaN or inf"):
    jax.block_until_ready(jax.jit(spec.update)(t, s, 1))

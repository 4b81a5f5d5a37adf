"""k-means from a leaf's sorted columns (no gather of a sharded leaf) against the whole-leaf
sort and against numpy float64 Lloyd; XLA's buffer assignment of a compiled sharded init."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxcompress as jc
from jaxcompress.cluster import kmeans1d, stage as cluster_stage
from tests.cluster.test_stage import np_density, np_linear, np_lloyd


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _kmeans(x, columns: bool, init: str, k: int):
  """k-means of every nonzero entry of the matrix ``x``, sorted by columns or whole."""
  v = x if columns else x.reshape(-1)
  c, a = kmeans1d.kmeans(v, v != 0, k, init=init, iters=300, key=None, cuts=kmeans1d.num_cuts(x.size, k, 1))
  return c, a.reshape(x.shape)


def _data(kind):
  rng = np.random.default_rng(0)
  if kind == "pruned":  # zeros take no part; a column with none valid
    w = rng.standard_normal((40, 24)).astype(np.float32)
    w[rng.random(w.shape) < 0.4] = 0.0
    w[:, 3] = 0.0
    return w
  if kind == "ties":  # few distinct values (5 nonzero, more than the 4 centroids), many ties
    return rng.choice(np.float32([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0]), size=(30, 9)).astype(np.float32)
  if kind == "heavy":  # a sparse tail: the equal-width cuts matter (n > cuts)
    return (rng.standard_t(2, size=(700, 3)) * (rng.random((700, 3)) < 0.9)).astype(np.float32)
  return np.zeros((8, 4), np.float32)


def _same(columns, whole):
  np.testing.assert_allclose(np.asarray(columns[0]), np.asarray(whole[0]), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(columns[1]), np.asarray(whole[1]))


def test_optimal_from_columns_equals_the_whole_sort():
  x = jnp.asarray(_data("pruned"))
  _same(_kmeans(x, True, "optimal", 8), _kmeans(x, False, "optimal", 8))


@pytest.mark.slow
@pytest.mark.parametrize("init", ["optimal", "density", "linear"])
@pytest.mark.parametrize("kind", ["pruned", "ties", "heavy", "empty"])
def test_every_init_from_columns_equals_the_whole_sort(init, kind):
  # With fewer distinct values than centroids, the duplicated centroids are equal only
  # up to rounding, and which duplicate an entry takes follows that rounding.
  k = 4 if kind == "ties" else 16
  x = jnp.asarray(_data(kind))
  _same(_kmeans(x, True, init, k), _kmeans(x, False, init, k))


@pytest.mark.slow
@pytest.mark.parametrize("init, ref_init", [("linear", np_linear), ("density", np_density)])
def test_columns_lloyd_matches_numpy(init, ref_init):
  w = _data("pruned")
  c, a = _kmeans(jnp.asarray(w), True, init, 8)
  nz = w[w != 0]
  ref_c, ref_a = np_lloyd(nz, ref_init(nz, 8), 300)
  np.testing.assert_allclose(np.asarray(c), ref_c, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(a)[w != 0], ref_a)


def test_compiled_sharded_init_holds_no_full_size_temporary():
  # 2**21 entries (the stage clusters from columns from 2**20 on), split 8 ways
  # over the output axis: sorting by columns stays sharded.
  shape = (2048, 1024)
  assert shape[0] * shape[1] >= cluster_stage.COLUMNS_MIN_SIZE
  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
  p_sh = {"w": NamedSharding(mesh, P(None, "model"))}
  params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=p_sh["w"])}
  spec = jc.Spec([jc.Rule("w", [jc.cluster.kmeans(bits=4)])])
  t_sh, s_sh = spec.shardings(params, p_sh)
  compiled = jax.jit(spec.init, in_shardings=(p_sh,), out_shardings=(t_sh, s_sh)).lower(params).compile()
  full = shape[0] * shape[1] * 4
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < full, temp / full  # the whole-leaf sort needed 15 times the kernel's shard
  # One sorted copy of the shard, and the dynamic programme's (cuts, cuts)
  # costs (1.6 shards here, a fixed size); full prefix sums of the values and
  # their squares, and the operands XLA:CPU materializes for plain (not
  # variadic) reductions, made it 4.6 shards.
  assert temp < 3 * full / 8, temp / (full / 8)


@pytest.mark.slow
def test_sharded_stage_init_equals_the_whole_sort():
  shape = (512, 2048)
  rng = np.random.default_rng(3)
  w = rng.standard_normal(shape).astype(np.float32)
  w[rng.random(shape) < 0.5] = 0.0
  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
  p_sh = {"w": NamedSharding(mesh, P(None, "model"))}
  spec = jc.Spec([jc.Rule("w", [jc.cluster.kmeans(bits=4)])])
  t_sh, s_sh = spec.shardings({"w": w}, p_sh)
  t, s = jax.jit(spec.init, out_shardings=(t_sh, s_sh))({"w": jax.device_put(jnp.asarray(w), p_sh["w"])})
  assert s["w"].stages["cluster"].assignments.sharding.spec == P(None, "model")
  c, a = _kmeans(jnp.asarray(w), False, "optimal", 16)
  np.testing.assert_allclose(np.asarray(t["w"].params["cluster"]), np.asarray(c), rtol=1e-5, atol=1e-6)
  # Entries on a boundary between two centroids may flip with the last float bit.
  same = np.asarray(s["w"].stages["cluster"].assignments) == np.where(w != 0, np.asarray(a), 0)
  assert same.mean() > 1 - 1e-5

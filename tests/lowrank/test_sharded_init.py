"""The randomized SVD keeps a sharded kernel sharded: checked against numpy's float64 SVD
and against XLA's buffer assignment of a compiled sharded init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxcompress as jc
from jaxcompress.lowrank import linalg


def _with_spectrum(s, m, n, seed):
  rng = np.random.default_rng(seed)
  u = np.linalg.qr(rng.standard_normal((m, s.size)))[0]
  v = np.linalg.qr(rng.standard_normal((n, s.size)))[0]
  return (u * s) @ v.T


_randomized_svd = jax.jit(linalg.randomized_svd, static_argnums=1)


def _check_triplets(a64, u, s, vt, r):
  """Singular values, and the singular vectors up to sign, against numpy float64."""
  u64, s64, vt64 = np.linalg.svd(a64, full_matrices=False)
  u, s, vt = (np.asarray(x, np.float64) for x in (u, s, vt))
  np.testing.assert_allclose(s, s64[:r], rtol=1e-4)
  # Each pair (u_i, v_i) equals numpy's up to one common sign.
  signs = np.sign(np.sum(u * u64[:, :r], axis=0))
  np.testing.assert_allclose(u * signs, u64[:, :r], atol=2e-3)
  np.testing.assert_allclose(vt * signs[:, None], vt64[:r], atol=2e-3)


@pytest.mark.slow
def test_randomized_svd_triplets_match_numpy_float64():
  # A spectrum with a gap after the rank, so the leading triplets are well defined.
  s = np.concatenate([np.linspace(10.0, 5.0, 8), np.linspace(1.0, 0.1, 112)])
  a64 = _with_spectrum(s, 300, 260, seed=0)
  u, s_got, vt = _randomized_svd(jnp.asarray(a64, jnp.float32), 8)
  _check_triplets(a64, u, s_got, vt, 8)


@pytest.mark.slow
def test_rank_deficient_kernel_takes_the_rank_revealing_path_and_matches_numpy():
  # Rank 6 below the sketch's 20 columns: the Cholesky passes break down, the
  # eigendecomposition path finds the 6 directions.
  s = np.array([9.0, 7.0, 5.0, 3.0, 2.0, 1.0])
  a64 = _with_spectrum(s, 200, 150, seed=1)
  a = jnp.asarray(a64, jnp.float32)
  q = jax.jit(linalg.orthonormalize)(a @ jax.random.normal(jax.random.key(0), (150, 20)))
  assert not bool(linalg._is_orthonormal(q))  # the path the fallback exists for
  u, s_got, vt = _randomized_svd(a, 6 + 4)  # l = 20: 4 triplets beyond the rank
  _check_triplets(a64, u[:, :6], s_got[:6], vt[:6], 6)
  np.testing.assert_allclose(np.asarray(s_got[6:]), 0.0, atol=1e-4)
  np.testing.assert_allclose(np.asarray((u * s_got) @ vt), a64, atol=1e-4)


@pytest.mark.parametrize("layout", [P(None, "model"), P("model", None)])
def test_compiled_sharded_init_holds_no_full_size_temporary(layout):
  # A kernel split 8 ways over either axis: the randomized path's products stay
  # sharded, only (l, l) matrices are replicated. Split over its input axis,
  # the (n, l) sketch and products were replicated (and the threefry state of
  # the Gaussian test matrix held several uint32 copies of it): 1.5 kernels.
  m, n, r = 256, 2048, 16
  assert linalg.uses_randomized((m, n), r)
  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
  p_sh = {"w": NamedSharding(mesh, layout)}
  params = {"w": jax.ShapeDtypeStruct((m, n), jnp.float32, sharding=p_sh["w"])}
  spec = jc.Spec([jc.Rule("w", [jc.lowrank.svd(rank=r)])])
  t_sh, s_sh = spec.shardings(params, p_sh)
  compiled = jax.jit(spec.init, in_shardings=(p_sh,), out_shardings=(t_sh, s_sh)).lower(params).compile()
  full = m * n * 4
  temp = compiled.memory_analysis().temp_size_in_bytes
  # l = 32: a replicated (n, l) sketch is 1/8 of the kernel; a gathered kernel would be 1.
  with jax.set_mesh(mesh):  # the context mesh lets the tall matrices be split over their rows
    compiled = jax.jit(spec.init, in_shardings=(p_sh,), out_shardings=(t_sh, s_sh)).lower(params).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  # Split over its input axis, each device's partial product a^T q is a whole
  # (n, l) matrix before its reduction: 1/8 of the kernel, twice.
  assert temp < (full / 4 if layout == P(None, "model") else 0.4 * full), temp / full


@pytest.mark.slow
def test_sharded_init_runs_and_matches_numpy():
  m, n, r = 256, 2048, 16
  s = np.concatenate([np.linspace(8.0, 4.0, r), np.linspace(1.0, 0.01, 240)])
  w64 = _with_spectrum(s, m, n, seed=2)
  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
  p_sh = {"w": NamedSharding(mesh, P(None, "model"))}
  params = {"w": jax.device_put(jnp.asarray(w64, jnp.float32), p_sh["w"])}
  spec = jc.Spec([jc.Rule("w", [jc.lowrank.svd(rank=r)])])
  t_sh, s_sh = spec.shardings(params, p_sh)
  t, st = jax.jit(spec.init, out_shardings=(t_sh, s_sh))(params)
  f = t["w"].params["lowrank"]
  assert f.v.sharding.spec == P(None, "model")
  u64, s64, vt64 = np.linalg.svd(w64, full_matrices=False)
  best = (u64[:, :r] * s64[:r]) @ vt64[:r]
  approx = np.asarray(spec.apply(t, st)["w"], np.float64)
  np.testing.assert_allclose(approx, best, atol=1e-4 * np.abs(best).max())

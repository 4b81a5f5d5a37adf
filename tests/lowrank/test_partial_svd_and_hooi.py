"""Randomized truncated SVD vs numpy's float64 optimum; Tucker-2 HOOI vs a numpy HOOI; NaN checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress import lowrank
from jaxcompress.lowrank import linalg


def _orthonormal(n, k, rng):
  return np.linalg.qr(rng.standard_normal((n, k)))[0]


def _kernel(kind, m, n, seed):
  rng = np.random.default_rng(seed)
  if kind == "gaussian":  # the flattest spectrum: the hardest for subspace iteration
    return rng.standard_normal((m, n)).astype(np.float32)
  s = np.arange(1, min(m, n) + 1) ** -0.5  # slowly decaying, as in trained layers
  return ((_orthonormal(m, s.size, rng) * s) @ _orthonormal(n, s.size, rng).T).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gaussian", "power_law"])
def test_small_rank_uses_randomized_svd_within_0_1_percent_of_eckart_young(kind):
  m, n, r = 512, 384, 16
  assert linalg.uses_randomized((m, n), r)
  w = _kernel(kind, m, n, seed=1)
  spec = jc.Spec([jc.Rule("w", [lowrank.svd(rank=r)])])
  approx = np.asarray(spec.apply(*spec.init({"w": jnp.asarray(w)}))["w"], np.float64)
  sv = np.linalg.svd(w.astype(np.float64), compute_uv=False)
  optimum = np.sqrt(np.sum(sv[r:] ** 2))
  assert np.linalg.norm(approx - w) <= 1.001 * optimum


def test_kernel_of_rank_below_the_sketch_is_still_exact():
  rng = np.random.default_rng(2)
  w = (rng.standard_normal((512, 5)) @ rng.standard_normal((5, 384))).astype(np.float32)
  spec = jc.Spec([jc.Rule("w", [lowrank.svd(rank=16)])])
  approx = np.asarray(spec.apply(*spec.init({"w": jnp.asarray(w)}))["w"])
  assert np.all(np.isfinite(approx))
  np.testing.assert_allclose(approx, w, atol=1e-3 * np.abs(w).max())


def test_method_choice_follows_the_shapes():
  assert not linalg.uses_randomized((24, 16), 2)  # small: the full SVD
  assert not linalg.uses_randomized((4096, 4096), 1024)  # large rank: the full SVD
  assert linalg.uses_randomized((2048, 2048), 64)


def _np_hooi(w, r_in, r_out, iters):
  """Tucker-2 over the last two axes by HOSVD then ``iters`` HOOI passes (numpy, float64)."""
  w = np.asarray(w, np.float64)

  def lead(a, r):
    return np.linalg.svd(a, full_matrices=False)[0][:, :r]

  def unfold(t, axis):
    return np.moveaxis(t, axis, 0).reshape(t.shape[axis], -1)

  u_in, u_out = lead(unfold(w, -2), r_in), lead(unfold(w, -1), r_out)
  for _ in range(iters):
    u_in = lead(unfold(np.einsum("...io,ob->...ib", w, u_out), -2), r_in)
    u_out = lead(unfold(np.einsum("...io,ia->...ao", w, u_in), -1), r_out)
  return np.einsum("...io,ia,ja,ob,pb->...jp", w, u_in, u_in, u_out, u_out)


def test_tucker2_hooi_matches_numpy_and_lowers_the_error():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((3, 3, 16, 24)).astype(np.float32)
  ranks = (4, 6)
  errors = {}
  for iters in (0, 5):
    spec = jc.Spec([jc.Rule("conv", [lowrank.tucker2(rank=ranks, refine_iters=iters)])])
    out = np.asarray(spec.apply(*spec.init({"conv": jnp.asarray(w)}))["conv"], np.float64)
    ref = _np_hooi(w, *ranks, iters)
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)
    errors[iters] = np.linalg.norm(out - w)
  assert errors[5] < errors[0] * 0.999


def test_refine_iters_is_checked_when_built():
  with pytest.raises(ValueError, match=r"Tucker2: refine_iters must be an integer in \[0, inf\], got -1"):
    lowrank.tucker2(rank=2, refine_iters=-1)


def test_pair_rank_for_svd_fails_when_built():
  with pytest.raises(TypeError, match=r"SVD: rank \(2, 3\) is a pair of ranks .* for Tucker2"):
    lowrank.svd(rank=(2, 3))
  with pytest.raises(TypeError, match=r"SVD: rank \(2, 3\) is a pair"):
    lowrank.svd(rank={"a": 4, "b": (2, 3)})


@pytest.mark.parametrize(
    "stage,shape",
    [(lowrank.svd(rank=2), (8, 6)), (lowrank.svd(energy=0.9), (8, 6)), (lowrank.tucker2(rank=2), (3, 3, 4, 5))],
)
def test_non_finite_kernel_names_the_leaf(stage, shape):
  w = np.ones(shape, np.float32)
  w.flat[3] = np.nan
  params = {"Conv_0": {"kernel": jnp.asarray(w)}}
  spec = jc.Spec([jc.Rule(r".*kernel", [stage])])
  with pytest.raises(ValueError, match=r"leaf 'Conv_0/kernel' holds NaN or inf values"):
    spec.init(params)


def test_non_finite_kernel_under_jit_names_the_leaf():
  w = np.ones((8, 6), np.float32)
  w[2, 2] = np.inf
  spec = jc.Spec([jc.Rule("w", [lowrank.svd(rank=2)])])
  with pytest.raises(Exception, match=r"SVD: leaf 'w' holds NaN or inf values"):
    jax.block_until_ready(jax.jit(spec.init)({"w": jnp.asarray(w)}))

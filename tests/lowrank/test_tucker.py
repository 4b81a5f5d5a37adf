"""Tucker-2 over the channel axes of conv kernels, against a numpy HOSVD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress import lowrank


def _numpy_tucker2(w, r_in, r_out):
  """Truncated HOSVD over the last two axes, reconstructed (numpy, float64)."""
  w = np.asarray(w, np.float64)
  c_in, c_out = w.shape[-2], w.shape[-1]
  a_in = np.moveaxis(w, -2, 0).reshape(c_in, -1)
  a_out = np.moveaxis(w, -1, 0).reshape(c_out, -1)
  u_in = np.linalg.svd(a_in, full_matrices=False)[0][:, :r_in]
  u_out = np.linalg.svd(a_out, full_matrices=False)[0][:, :r_out]
  p_in, p_out = u_in @ u_in.T, u_out @ u_out.T
  return np.einsum("...io,ij,ok->...jk", w, p_in, p_out)


@pytest.mark.parametrize("ranks", [(2, 3), (4, 8), (6, 5)])
def test_reconstruction_matches_numpy_hosvd(ranks):
  w = np.random.default_rng(sum(ranks)).standard_normal((3, 3, 6, 8)).astype(np.float32)
  spec = jc.Spec([jc.Rule("conv", [lowrank.tucker2(rank=ranks)])])
  t, s = spec.init({"conv": jnp.asarray(w)})
  f = t["conv"].params["lowrank"]
  assert f.core.shape == (3, 3) + ranks and f.u_in.shape == (6, ranks[0]) and f.u_out.shape == (ranks[1], 8)
  out = np.asarray(spec.apply(t, s)["conv"])
  np.testing.assert_allclose(out, _numpy_tucker2(w, *ranks), rtol=1e-4, atol=1e-4)


def test_full_ranks_reconstruct_the_kernel():
  w = np.random.default_rng(0).standard_normal((2, 2, 5, 4)).astype(np.float32)
  spec = jc.Spec([jc.Rule("conv", [lowrank.tucker2(fraction=1.0)])])
  np.testing.assert_allclose(np.asarray(spec.apply(*spec.init({"conv": jnp.asarray(w)}))["conv"]), w, atol=1e-4)


def test_energy_per_mode():
  rng = np.random.default_rng(1)
  # Input channels with decaying scale, output channels flat.
  w = (rng.standard_normal((3, 3, 8, 6)) * np.exp(-np.arange(8) / 1.5)[:, None]).astype(np.float32)
  threshold = 0.9
  expected = []
  for axis in (-2, -1):
    a = np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(w.shape[axis], -1)
    e = np.linalg.svd(a, compute_uv=False) ** 2
    expected.append(next(r for r in range(1, len(e) + 1) if e[:r].sum() / e.sum() >= threshold))
  assert lowrank.tucker2(energy=threshold).select_ranks([jnp.asarray(w)], ["conv"]) == [tuple(expected)]
  assert expected[0] < expected[1]


def test_errors():
  with pytest.raises(ValueError, match=r"Tucker2: leaf 'w' has shape \(4, 4\)"):
    jc.Spec([jc.Rule("w", [lowrank.tucker2(rank=2)])]).init({"w": jnp.ones((4, 4))})
  with pytest.raises(ValueError, match=r"leaf 'conv' of shape \(3, 3, 4, 8\) has input-channel rank 4.*5"):
    jc.Spec([jc.Rule("conv", [lowrank.tucker2(rank=(5, 2))])]).init({"conv": jnp.ones((3, 3, 4, 8))})
  with pytest.raises(TypeError, match="Budget is not supported"):
    lowrank.Tucker2(rank=lowrank.Budget(100))


def test_svd_of_the_reshaped_conv_kernel_and_eval_shape():
  params = {"conv": jnp.ones((3, 3, 4, 8))}
  spec = jc.Spec([jc.Rule("conv", [lowrank.svd(rank=2)])])
  t, _ = jax.eval_shape(spec.init, params)
  assert t["conv"].params["lowrank"].u.shape == (36, 2)
  spec = jc.Spec([jc.Rule("conv", [lowrank.tucker2(rank=2)])])
  t, _ = jax.eval_shape(spec.init, params)
  assert t["conv"].params["lowrank"].core.shape == (3, 3, 2, 2)

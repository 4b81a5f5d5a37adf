"""SparseGPT against the row-by-row float64 reference, and its defining property."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress import oneshot
from tests.oneshot import cases
from tests.oneshot import reference as ref

W = cases.kernel(64, 16)
X = cases.correlated(512, 64)

CASES = [
    (dict(sparsity=0.5), dict(sparsity=0.5)),
    (dict(n_m=(2, 4)), dict(n_m=(2, 4))),
    (dict(sparsity=0.5, bits=4), dict(sparsity=0.5, bits=4)),
    (dict(n_m=(2, 4), bits=4, granularity=jc.quant.PerGroup(size=16, axis=0), symmetric=False),
     dict(n_m=(2, 4), bits=4, group=16, symmetric=False)),
    (dict(sparsity=0.7, bits=3, granularity=jc.quant.PerTensor()), dict(sparsity=0.7, bits=3, per_tensor=True)),
    # block_size=4 is below the group: the blocks grow to 16 rows so that each group fits one.
    (dict(n_m=(1, 4), bits=3, granularity=jc.quant.PerGroup(size=16, axis=0), block_size=4),
     dict(n_m=(1, 4), bits=3, group=16)),
]
IDS = ["s50", "2:4", "s50_int4", "2:4_int4_group16_asym", "s70_int3_tensor", "1:4_int3_group16_block4"]


@pytest.mark.slow
@pytest.mark.parametrize("kw,ref_kw", CASES, ids=IDS)
def test_sparsegpt_matches_reference(kw, ref_kw):
  p = oneshot.sparsegpt(jnp.asarray(W), jnp.asarray(X), **{"block_size": 16, **kw})
  q_ref, m_ref = ref.sparsegpt(W, X, block=16, **ref_kw)
  e, e_ref = ref.out_err(X, W, p.kernel), ref.out_err(X, W, q_ref)
  assert abs(e / e_ref - 1) < 0.01, (e, e_ref)
  agree = np.mean(np.asarray(p.mask) == m_ref)
  # Pruning alone: the same mask (continuous data, no ties). Joint quantization: a rounding
  # decided differently in float32 may move a later choice.
  assert agree == 1.0 if "bits" not in kw else agree > 0.99, agree
  mask = np.asarray(p.mask)
  assert np.all(np.asarray(p.kernel)[~mask] == 0)
  if "n_m" in kw:
    n, m = kw["n_m"]
    np.testing.assert_array_equal(mask.reshape(-1, m, 16).sum(axis=1), n)
  else:  # each block of 16 rows keeps round((1 - s) * 16 * 16)
    np.testing.assert_array_equal(mask.reshape(4, -1).sum(axis=1), ref.keep_count(kw["sparsity"], 256))


def on_grid(kernel, mask, bits, group):
  """Each scale group's kept values are integers times one step, on the symmetric grid."""
  qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  k = np.asarray(kernel, np.float64)
  for g0 in range(0, k.shape[0], group):
    for c in range(k.shape[1]):
      v = k[g0 : g0 + group, c][np.asarray(mask)[g0 : g0 + group, c]]
      v = v[v != 0]
      if v.size == 0:
        continue
      fits = []
      for j in range(1, 2 ** (bits - 1) + 1):  # the smallest |value| is j steps
        codes = v / (np.abs(v).min() / j)
        fits.append(np.allclose(codes, np.round(codes), atol=1e-3)
                    and qmin <= np.round(codes).min() and np.round(codes).max() <= qmax)
      assert any(fits), (g0, c, v)


@pytest.mark.slow
def test_joint_quantization_keeps_zeros_and_grid():
  gran = jc.quant.PerGroup(size=16, axis=0)
  p = oneshot.sparsegpt(jnp.asarray(W), jnp.asarray(X), sparsity=0.5, bits=3, granularity=gran,
                        block_size=32)
  on_grid(p.kernel, p.mask, 3, 16)
  assert np.all(np.asarray(p.kernel)[~np.asarray(p.mask)] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(n_m=(2, 4))], ids=["s50", "2:4"])
def test_sparsegpt_beats_magnitude_and_wanda(kw):
  w, x = jnp.asarray(W), jnp.asarray(X)
  e = ref.out_err(X, W, oneshot.sparsegpt(w, x, **kw).kernel)
  e_mag = ref.out_err(X, W, oneshot.magnitude(w, **kw).kernel)
  e_wanda = ref.out_err(X, W, oneshot.wanda(w, x, **kw).kernel)
  assert e < 0.7 * e_mag and e < 0.7 * e_wanda, (e, e_mag, e_wanda)


@pytest.mark.slow
def test_no_sparsity_with_bits_is_gptq():
  gran = jc.quant.PerGroup(size=16, axis=0)
  p = oneshot.sparsegpt(jnp.asarray(W), jnp.asarray(X), sparsity=0.0, bits=4, granularity=gran)
  g = jc.quant.gptq(jnp.asarray(W), jnp.asarray(X), bits=4, granularity=gran)
  assert np.asarray(p.mask).all()
  np.testing.assert_allclose(np.asarray(p.kernel), np.asarray(jc.quant.dequantize(g)), atol=1e-4)


@pytest.mark.slow
def test_dead_inputs_bf16_and_jit():
  x = X.copy()
  x[:, 5] = 0.0  # an input that never fires
  w = jnp.asarray(W, jnp.bfloat16)
  p = oneshot.sparsegpt(w, jnp.asarray(x), sparsity=0.5, block_size=16)
  assert p.kernel.dtype == jnp.bfloat16 and p.kernel.shape == W.shape
  assert np.all(np.asarray(p.kernel, np.float32)[5] == 0) and not np.asarray(p.mask)[5].any()
  jitted = jax.jit(lambda w, x: oneshot.sparsegpt(w, x, sparsity=0.5, block_size=16))(w, jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(jitted.mask), np.asarray(p.mask))
  np.testing.assert_array_equal(np.asarray(jitted.kernel, np.float32), np.asarray(p.kernel, np.float32))


@pytest.mark.slow
def test_singular_hessian_without_damping_is_refused():
  x = X[:4]  # 4 samples for 64 inputs: H has rank 4
  with pytest.raises(ValueError, match=r"Dense_0/kernel: sparsegpt: the dampened Hessian .* not positive "
                                       r"definite in float32 \(damp=0.0\).*raise damp"):
    oneshot.sparsegpt(jnp.asarray(W), jnp.asarray(x), sparsity=0.5, damp=0.0, path="Dense_0/kernel")
  p = oneshot.sparsegpt(jnp.asarray(W), jnp.asarray(x), sparsity=0.5)  # the default damp copes
  assert np.isfinite(np.asarray(p.kernel)).all()

import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress.quant as jq
from jaxcompress.quant import ptq
from tests.quant import reference as ref

RNG = np.random.default_rng(4)
N_IN, N_OUT = 64, 16
W = RNG.normal(size=(N_IN, N_OUT)).astype(np.float32)
# Correlated calibration inputs: a low-rank mixture plus a little noise.
_MIX = RNG.normal(size=(8, N_IN)).astype(np.float32)
X = (RNG.normal(size=(512, 8)).astype(np.float32) @ _MIX + 0.1 * RNG.normal(size=(512, N_IN))).astype(
    np.float32
)


def out_err(q, x=X, w=W):
  deq = np.asarray(jq.dequantize(q), np.float64)
  return np.linalg.norm(x @ w.astype(np.float64) - x @ deq)


def test_quantize_params_rtn_matches_numpy_and_keeps_other_leaves():
  params = {
      "Dense_0": {"kernel": jnp.asarray(W), "bias": jnp.ones((N_OUT,))},
      "Dense_1": {"kernel": jnp.asarray(W[:16, :8], jnp.bfloat16), "bias": jnp.ones((8,))},
  }
  q = jq.quantize_params(params, bits=4, symmetric=False, granularity=jq.PerGroup(size=16))
  k0 = q["Dense_0"]["kernel"]
  assert isinstance(k0, jq.QArray) and k0.values.dtype == jnp.int4 and k0.scale.shape == (4, N_OUT)
  assert q["Dense_0"]["bias"] is params["Dense_0"]["bias"]
  deq = jq.dequantize_params(q)
  kw = dict(kind="group", axis=0, size=16)
  np.testing.assert_array_equal(np.asarray(deq["Dense_0"]["kernel"]), ref.fake_quant_int(W, 4, False, **kw))
  assert deq["Dense_1"]["kernel"].dtype == jnp.bfloat16
  w1 = np.asarray(params["Dense_1"]["kernel"], np.float32)
  np.testing.assert_array_equal(
      np.asarray(deq["Dense_1"]["kernel"]),
      ref.fake_quant_int(w1, 4, False, **kw).astype(jnp.bfloat16),
  )


def test_quantize_params_fp8_and_errors():
  q = jq.quantize_params({"a": {"kernel": jnp.asarray(W)}}, dtype="float8_e4m3fn")
  values, s = ref.quantize_fp8(W, "float8_e4m3fn")
  np.testing.assert_array_equal(np.asarray(q["a"]["kernel"].values).view(np.uint8), values.view(np.uint8))
  with pytest.raises(ValueError, match=r"pattern 'w.*' matches no leaf.*'a/kernel'"):
    jq.quantize_params({"a": {"kernel": jnp.asarray(W)}}, pattern="w.*")
  with pytest.raises(ValueError, match=r"a/kernel: PerGroup\(size=48\) does not divide axis -2 of size 64"):
    jq.quantize_params({"a": {"kernel": jnp.asarray(W)}}, granularity=jq.PerGroup(size=48))
  with pytest.raises(ValueError, match=r"quantize_params: bits=12 is not supported"):
    jq.quantize_params({"a": {"kernel": jnp.asarray(W)}}, bits=12)


@pytest.mark.parametrize(
    "kw",
    [dict(bits=3), dict(bits=4, granularity=jq.PerGroup(size=16)), dict(bits=3, act_order=True),
     dict(bits=4, symmetric=False, block_size=16)],
    ids=["int3_channel", "int4_group16", "int3_act_order", "int4_asym_blocks16"],
)
def test_gptq_output_error_below_rtn(kw):
  gran = kw.get("granularity")
  rtn = jq.quantize_params({"k": jnp.asarray(W)}, pattern="k", bits=kw["bits"],
                           symmetric=kw.get("symmetric", True), granularity=gran)["k"]
  q = jq.gptq(jnp.asarray(W), jnp.asarray(X), **kw)
  assert q.values.dtype == jnp.int4 and q.shape == W.shape
  e_gptq, e_rtn = out_err(q), out_err(rtn)
  assert e_gptq < 0.5 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("group", [None, 16], ids=["channel", "group16"])
def test_gptq_matches_unblocked_numpy_reference(group):
  gran = jq.PerGroup(size=group) if group else None
  q = jq.gptq(jnp.asarray(W), jnp.asarray(X), bits=4, granularity=gran, block_size=16)
  q_ref, s_ref = ref.gptq(W, X, 4, group=group)
  np.testing.assert_allclose(np.asarray(q.scale), s_ref, rtol=1e-4)
  agree = np.mean(np.asarray(q.values, np.float32) == q_ref)
  assert agree > 0.99, agree
  deq_ref = q_ref * np.repeat(s_ref, group or N_IN, axis=0)
  e_ref = np.linalg.norm(X @ W.astype(np.float64) - X @ deq_ref)
  assert out_err(q) == pytest.approx(e_ref, rel=0.05)


def test_gptq_equals_rtn_when_inputs_are_uncorrelated():
  # One-hot rows: H is exactly diagonal, so no error is fed forward.
  x = np.repeat(np.eye(N_IN, dtype=np.float32), 3, axis=0) * RNG.uniform(0.5, 2.0, size=(3 * N_IN, 1)).astype(np.float32)
  q = jq.gptq(jnp.asarray(W), jnp.asarray(x), bits=4)
  rtn = jq.quantize_params({"k": jnp.asarray(W)}, pattern="k", bits=4)["k"]
  np.testing.assert_array_equal(np.asarray(q.values), np.asarray(rtn.values))
  np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(rtn.scale))


def test_gptq_dead_inputs_and_bf16():
  x = X.copy()
  x[:, :5] = 0.0
  q = jq.gptq(jnp.asarray(W, jnp.bfloat16), jnp.asarray(x), bits=4)
  deq = jq.dequantize(q)
  assert deq.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(deq, np.float32)))
  np.testing.assert_array_equal(np.asarray(deq, np.float32)[:5], 0.0)


def test_gptq_params_over_a_tree():
  params = {"Dense_0": {"kernel": jnp.asarray(W), "bias": jnp.zeros((N_OUT,))},
            "Dense_1": {"kernel": jnp.asarray(W[:N_OUT, :4]), "bias": jnp.zeros((4,))}}
  h = X @ W
  q = jq.gptq_params(params, {"Dense_0": jnp.asarray(X), "Dense_1/kernel": jnp.asarray(h)}, bits=4)
  assert isinstance(q["Dense_0"]["kernel"], jq.QArray) and isinstance(q["Dense_1"]["kernel"], jq.QArray)
  assert not isinstance(q["Dense_0"]["bias"], jq.QArray)
  with pytest.raises(ValueError, match=r"inputs given for \['Dense_9'\]"):
    jq.gptq_params(params, {"Dense_9": jnp.asarray(X)})


def test_gptq_errors_name_path():
  with pytest.raises(ValueError, match=r"conv/kernel: GPTQ takes 2-D Dense kernels"):
    jq.gptq(jnp.ones((3, 3, 4, 8)), jnp.ones((4, 4)), path="conv/kernel")
  with pytest.raises(ValueError, match=r"kernel: calibration inputs of shape \(4, 5\)"):
    jq.gptq(jnp.asarray(W), jnp.ones((4, 5)))
  with pytest.raises(ValueError, match=r"act_order=True reorders input rows"):
    jq.gptq(jnp.asarray(W), jnp.asarray(X), granularity=jq.PerGroup(size=16), act_order=True)
  with pytest.raises(ValueError, match=r"scales must be shared along the input axis"):
    jq.gptq(jnp.asarray(W), jnp.asarray(X), granularity=jq.PerChannel(axis=0))
  with pytest.raises(ValueError, match=r"kernel: PerGroup\(size=7\) does not divide"):
    jq.gptq(jnp.asarray(W), jnp.asarray(X), granularity=jq.PerGroup(size=7))


def test_hessian_closed_form():
  np.testing.assert_allclose(np.asarray(ptq.hessian(jnp.asarray(X))), 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-4)

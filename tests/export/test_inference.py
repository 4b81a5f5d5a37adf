"""Compressed inference: Dense layers computed from the stored codes match the float model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.export.inference import int8_matmul, unpack4
from tests.benchmarks import load


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(32)(x))
    return nn.Dense(8)(h)


def setup(stages):
  model = MLP()
  x = jax.random.normal(jax.random.key(1), (3, 16))
  params = model.init(jax.random.key(0), x)["params"]
  spec = jc.Spec([jc.Rule(r".*kernel", stages)])
  t, s = spec.init(params)
  want = model.apply({"params": spec.apply(t, s)}, x)
  return model, x, jc.export.export(spec, t, s), want


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_weight_only_matches_the_decoded_model(bits):
  model, x, artifact, want = setup([jc.quant.FakeQuant(bits=bits)])
  served = jc.export.serving_params(artifact)
  key = "kernel_codes4" if bits <= 4 else "kernel_codes"
  assert set(served["Dense_0"]) == {key, "kernel_scale", "bias"}
  assert served["Dense_0"][key].dtype == jnp.int8
  with jc.export.compressed_dense():
    got = model.apply({"params": served}, x)
  # Two int8 limbs of the inputs: error below 2**-15 of each row's absmax.
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * float(jnp.abs(want).max()))


def test_w8a8_is_within_activation_quantization_error():
  model, x, artifact, want = setup([jc.quant.FakeQuant(bits=8)])
  with jc.export.compressed_dense(activations="int8"):
    got = model.apply({"params": jc.export.serving_params(artifact)}, x)
  assert float(jnp.abs(got - want).max()) < 0.05 * float(jnp.abs(want).max())


def test_pruned_and_per_group_kernels_are_served_as_codes_or_floats():
  # Pruned int8 codes are served as codes; per-group scales fall back to floats.
  model, x, artifact, want = setup([jc.prune.magnitude(sparsity=0.5), jc.quant.FakeQuant(bits=8)])
  with jc.export.compressed_dense():
    got = model.apply({"params": jc.export.serving_params(artifact)}, x)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * float(jnp.abs(want).max()))
  model, x, artifact, want = setup([jc.quant.FakeQuant(bits=4, granularity=jc.quant.PerGroup(size=8))])
  served = jc.export.serving_params(artifact)
  assert set(served["Dense_0"]) == {"kernel", "bias"}
  with jc.export.compressed_dense():
    np.testing.assert_array_equal(model.apply({"params": served}, x), want)


def test_int4_packing_round_trip():
  codes = jnp.asarray(np.random.default_rng(0).integers(-8, 8, (5, 12)), jnp.int8)
  from jaxcompress.export.inference import _pack4
  np.testing.assert_array_equal(unpack4(jnp.asarray(_pack4(np.asarray(codes)))), codes)


def test_matmul_checks_its_mode_and_shapes():
  with pytest.raises(ValueError, match="activations='fp8'; use 'float' or 'int8'"):
    int8_matmul(jnp.ones((1, 2)), jnp.ones((3, 2), jnp.int8), jnp.ones(3), activations="fp8")
  with pytest.raises(ValueError, match="activations='bf16'"):
    with jc.export.compressed_dense(activations="bf16"):
      pass
  model, x, artifact, _ = setup([jc.quant.FakeQuant(bits=8)])
  with pytest.raises(ValueError, match=r"Dense 'Dense_0': the stored kernel codes \(32, 16\) .* do not fit inputs with 4"):
    with jc.export.compressed_dense():
      model.apply({"params": jc.export.serving_params(artifact)}, jnp.ones((1, 4)))


@pytest.mark.slow
def test_serve_benchmark_quick_run():
  out = load("serve").run(quick=True)
  for key in ("b1_w8", "b1_w4", "b16_w8a8", "b16_w4", "layer_b1_w8", "layer_b16_w8a8"):
    assert out[key] > 0
  assert out["quick"] and "flags" in out and "cpu" in out

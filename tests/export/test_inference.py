"""Compressed inference: outputs from the stored codes against a float64 numpy model on the decoded params.

The references never call the product code: the decoded params (``decode``)
go through a numpy float64 forward, and w8a8 is the numpy formula
``round(x / s_x) @ codes * s_x * s_w`` on the codes the decoder reads.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcompress as jc
from jaxcompress.export import encodings as enc
from jaxcompress.export import inference as inf

D_IN, D_HID, D_OUT = 60, 40, 22  # odd sizes: blocks padded, int4 rows unpaired

ENCODINGS = {
    "w8": [jc.quant.FakeQuant(bits=8)],
    "w8_tensor": [jc.quant.FakeQuant(bits=8, granularity=jc.quant.PerTensor())],
    "w4": [jc.quant.FakeQuant(bits=4)],
    "w3_lsq": [jc.quant.LSQ(bits=3)],
    "w4_group": [jc.quant.FakeQuant(bits=4, granularity=jc.quant.PerGroup(size=20, axis=0))],
    "w8_group": [jc.quant.FakeQuant(bits=8, granularity=jc.quant.PerGroup(size=10))],
    "nm24_w8": [jc.prune.Prune(structure=jc.prune.NM(2, 4)), jc.quant.FakeQuant(bits=8)],
    "pruned_w4": [jc.prune.magnitude(sparsity=0.7), jc.quant.FakeQuant(bits=4)],
    "lowrank_w8": [jc.lowrank.svd(rank=8), jc.quant.FakeQuant(bits=8)],
    "lowrank_w4_group": [jc.lowrank.svd(rank=8), jc.quant.FakeQuant(bits=4, granularity=jc.quant.PerGroup(size=4))],
    "lowrank_float": [jc.lowrank.svd(rank=8)],
    "codebook": [jc.cluster.kmeans(bits=4)],
    "codebook_channel_pruned": [jc.prune.magnitude(sparsity=0.5), jc.cluster.kmeans(bits=3, channel_axis=-1)],
}
KINDS = {
    "w8": "IntKernel", "w8_tensor": "IntKernel", "w4": "IntKernel", "w3_lsq": "IntKernel",
    "w4_group": "IntKernel", "w8_group": "IntKernel", "nm24_w8": "IntKernel", "pruned_w4": "IntKernel",
    "lowrank_w8": "LowRankKernel", "lowrank_w4_group": "LowRankKernel", "lowrank_float": "LowRankKernel",
    "codebook": "CodebookKernel", "codebook_channel_pruned": "CodebookKernel",
}
# Weight-only int products split the inputs into two int8 limbs: an error below
# 2**-15 of each row's absmax per input, so below ~1e-4 of the output's scale.
INT_TOL, FLOAT_TOL = 2e-4, 1e-5


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(D_HID)(x))
    return nn.Dense(D_OUT)(h)


def np_forward(p: dict, x) -> np.ndarray:
  """The MLP in float64 numpy on ``{"Dense_i": {"kernel", "bias"}}`` params."""
  f = lambda a: np.asarray(a, np.float64)
  h = np.maximum(f(x) @ f(p["Dense_0"]["kernel"]) + f(p["Dense_0"]["bias"]), 0)
  return h @ f(p["Dense_1"]["kernel"]) + f(p["Dense_1"]["bias"])


def exported(params, stages):
  spec = jc.Spec([jc.Rule(r".*kernel", stages)])
  t, s = spec.init(params)
  t, s = spec.update(t, s, 0)
  return jc.export.export(spec, t, s)


def linen_setup(stages):
  model = MLP()
  x = jax.random.normal(jax.random.key(1), (5, D_IN))
  params = model.init(jax.random.key(0), x)["params"]
  return model, x, params, exported(params, stages)


def tolerance(name: str) -> float:
  return FLOAT_TOL if name in ("lowrank_float", "codebook", "codebook_channel_pruned") else INT_TOL


def assert_close(got, want, rel):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = np.abs(want).max()
  assert np.abs(got - want).max() <= rel * scale, (np.abs(got - want).max() / scale, rel)


def small_blocks(monkeypatch):
  """Blocks of 8 rows, so that every blocked product runs several blocks (and a padded one)."""
  monkeypatch.setattr(inf, "_MIN_ROWS", 8)
  monkeypatch.setattr(inf, "_BLOCK_BYTES", 1)


# --------------------------------------------------------------------------
# Fast checks: messages.
# --------------------------------------------------------------------------


def test_modes_and_kernels_are_checked():
  with pytest.raises(ValueError, match="activations='fp8'; use 'float' or 'int8'"):
    jc.export.int8_matmul(jnp.ones((1, 2)), jnp.ones((3, 2), jnp.int8), jnp.ones(3), activations="fp8")
  with pytest.raises(ValueError, match="compressed_dense: activations='bf16'"):
    with jc.export.compressed_dense(activations="bf16"):
      pass
  k = jc.export.IntKernel.from_codes(np.ones((4, 3)), np.ones((1, 3)), bits=8)
  with pytest.raises(ValueError, match=r"inputs of shape \(2, 5\) do not fit a \(4, 3\) kernel"):
    jc.export.compressed_matmul(np.ones((2, 5)), k)
  with pytest.raises(TypeError, match="kernel is a ndarray; pass a served kernel"):
    jc.export.compressed_matmul(np.ones((2, 4)), np.ones((4, 3)))
  with pytest.raises(ValueError, match=r"scales of shape \(2, 3\) with group=None do not fit \(4, 3\) codes"):
    jc.export.IntKernel.from_codes(np.ones((4, 3)), np.ones((2, 3)), bits=8)
  with pytest.raises(ValueError, match=r"codes in \[1, 9\] do not fit bits=4 \(\[-8, 7\]\)"):
    jc.export.IntKernel.from_codes(np.array([[1, 9]]), np.ones((1, 2)), bits=4)
  with pytest.raises(TypeError, match="CompressedLinear 'head': kernel is a ndarray"):
    jc.export.CompressedLinear(np.ones((4, 3)), name="head")


def test_codes_that_do_not_fit_the_inputs_name_the_layer():
  kernel = jc.export.IntKernel.from_codes(np.ones((4, 3)), np.ones((1, 3)), bits=4)
  with pytest.raises(ValueError, match=r"Dense 'layers_1': the stored kernel is \(4, 3\) \(in, out\) and does not fit inputs with 6 features"):
    with jc.export.compressed_dense():
      nn.Sequential([nn.Dense(6), nn.Dense(3)]).apply(
          {"params": {"layers_0": {"kernel": jnp.ones((2, 6)), "bias": jnp.zeros(6)},
                      "layers_1": {"kernel": kernel, "bias": jnp.zeros(3)}}}, jnp.ones((1, 2)))
  layer = jc.export.CompressedLinear(kernel, name="blocks/0")
  with pytest.raises(ValueError, match=r"CompressedLinear 'blocks/0': the stored kernel is \(4, 3\) .* inputs with 6 features"):
    layer(jnp.ones((1, 6)))
  with pytest.raises(TypeError, match="or use jc.export.serving_nnx for an NNX model"):
    jc.export.serving_params(jc.export.Artifact([{"kernel": jnp.ones(3)}]))


@pytest.mark.slow
def test_serving_nnx_names_the_layer_that_does_not_fit():
  art = exported({"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}, [jc.quant.FakeQuant(bits=8)])
  with pytest.raises(ValueError, match=r"Linear 'layers/0': the stored kernel is \(4, 3\) .* 8 features and 3 outputs"):
    jc.export.serving_nnx(nnx.Sequential(nnx.Linear(8, 3, rngs=nnx.Rngs(0))),
                          jc.export.Artifact({"layers": {0: art.tree}}))
  with pytest.raises(ValueError, match="serving_nnx: the model has no variable at 'bias'"):
    jc.export.serving_nnx(nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0))), art)


# --------------------------------------------------------------------------
# Numerics (slow: each encoding compiles its own products).
# --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ENCODINGS))
def test_linen_outputs_equal_the_decoded_float_model(name, monkeypatch):
  small_blocks(monkeypatch)
  model, x, params, art = linen_setup(ENCODINGS[name])
  before = [leaf.record for leaf in art.leaves]
  served = jc.export.serving_params(art)
  assert type(served["Dense_0"]["kernel"]).__name__ == KINDS[name]
  want = np_forward(jc.export.decode(art), x)

  @jax.jit
  def forward(p, x):
    with jc.export.compressed_dense():
      return model.apply({"params": p}, x)

  assert_close(forward(served, x), want, tolerance(name))
  assert_close(forward(served, x[:2]), want[:2], tolerance(name))
  assert [leaf.record for leaf in art.leaves] == before  # the artifact is read, not changed
  assert all(isinstance(leaf, jc.export.EncodedLeaf) for leaf in jax.tree.leaves(
      art.tree, is_leaf=lambda l: isinstance(l, jc.export.EncodedLeaf)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["w4", "w4_group", "nm24_w8", "lowrank_w8", "codebook_channel_pruned"])
def test_nnx_outputs_equal_the_decoded_float_model_and_the_model_is_untouched(name, monkeypatch):
  small_blocks(monkeypatch)
  model = nnx.Sequential(nnx.Linear(D_IN, D_HID, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(D_HID, D_OUT, rngs=nnx.Rngs(1)))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  original = jax.tree.map(np.array, nnx.state(model))
  art = exported(params, ENCODINGS[name])
  served = jc.export.serving_nnx(model, art)
  assert [type(served.layers[i]).__name__ for i in (0, 2)] == ["CompressedLinear"] * 2
  assert type(served.layers[0].kernel.get_value()).__name__ == KINDS[name]
  # The caller's model: same layers, same values.
  assert [type(model.layers[i]).__name__ for i in (0, 2)] == ["Linear"] * 2
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, nnx.state(model)), original)
  decoded = jc.export.decode(art)
  ref = {f"Dense_{j}": {k: decoded["layers"][i][k].get_value() for k in ("kernel", "bias")}
         for j, i in enumerate((0, 2))}
  x = jax.random.normal(jax.random.key(1), (5, D_IN))
  want = np_forward(ref, x)
  assert_close(served(x), want, tolerance(name))
  assert_close(nnx.jit(lambda m, x: m(x))(served, x), want, tolerance(name))


def np_w8a8(x, codes, scale, group):
  """``sum_g (round(x_g / s_x) @ codes_g) * s_g * s_x`` in float64 (``group=None``: one group)."""
  x = np.asarray(x, np.float64)
  sx = np.abs(x).max(axis=1, keepdims=True) / 127
  sx = np.where(sx > 0, sx, 1)
  q = np.round(x / sx)
  g = group or codes.shape[0]
  y = sum((q[:, i:i + g] @ codes[i:i + g]) * scale[i // g] for i in range(0, codes.shape[0], g))
  return y * sx


@pytest.mark.slow
@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (8, 10), (4, 20)])
def test_w8a8_is_the_int8_formula(bits, group, monkeypatch):
  small_blocks(monkeypatch)
  gran = jc.quant.PerChannel() if group is None else jc.quant.PerGroup(size=group)
  params = {"kernel": jax.random.normal(jax.random.key(0), (D_IN, D_OUT)), "bias": jnp.zeros(D_OUT)}
  art = exported(params, [jc.quant.FakeQuant(bits=bits, granularity=gran)])
  leaf = art.tree["kernel"]
  codes, scale, _, _ = enc.quantized_parts(leaf.record.encoding, list(leaf.buffers), leaf.record.shape)
  x = jax.random.normal(jax.random.key(1), (7, D_IN))
  got = jax.jit(lambda k, x: jc.export.compressed_matmul(x, k, activations="int8"))(jc.export.serving_kernel(leaf), x)
  assert_close(got, np_w8a8(x, codes.astype(np.float64), scale.astype(np.float64), group), 1e-5)
  # Through a model: within the activations' quantization error of the decoded model.
  model, x, _, art = linen_setup([jc.quant.FakeQuant(bits=bits, granularity=gran)])
  with jc.export.compressed_dense(activations="int8"):
    got = model.apply({"params": jc.export.serving_params(art)}, x)
  assert_close(got, np_forward(jc.export.decode(art), x), 0.05)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["w4_group", "w8_group", "w8", "w4", "codebook_channel_pruned", "lowrank_w8"])
def test_other_formulations_equal_the_decoded_model(name, monkeypatch):
  # Per-group weight-only from _FLOAT_ROWS rows on (float blocks), and the
  # dequantize-then-multiply products of other backends, run here on CPU.
  small_blocks(monkeypatch)
  monkeypatch.setattr(inf, "_FLOAT_ROWS", 3)
  model, x, _, art = linen_setup(ENCODINGS[name])
  want = np_forward(jc.export.decode(art), x)
  served = jc.export.serving_params(art)
  with jc.export.compressed_dense():
    got = model.apply({"params": served}, x)
  assert_close(got, want, FLOAT_TOL if "group" in name else tolerance(name))
  monkeypatch.setattr(inf, "_backend", lambda: "gpu")
  with jc.export.compressed_dense():
    got = model.apply({"params": served}, x)
  assert_close(got, want, FLOAT_TOL)


@pytest.mark.slow
def test_kernels_from_codes_match_numpy_for_every_layout(monkeypatch):
  small_blocks(monkeypatch)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 24)).astype(np.float32)
  for bits, group, n_out in [(8, None, 13), (4, None, 13), (4, None, 16), (8, 6, 9), (4, 8, 17), (4, 3, 10)]:
    lo, hi = (-8, 7) if bits == 4 else (-127, 127)
    codes = rng.integers(lo, hi + 1, (24, n_out))
    scale = rng.random((24 // (group or 24), n_out)).astype(np.float32)
    w = codes * np.repeat(scale, group or 24, axis=0)
    k = jc.export.IntKernel.from_codes(codes, scale, bits=bits, group=group)
    got = jc.export.compressed_matmul(x, k)
    assert_close(got, x.astype(np.float64) @ w, INT_TOL)
    assert k.bits == bits and k.group == group


@pytest.mark.slow
@pytest.mark.parametrize("stage", [jc.quant.FakeQuant(dtype="float8_e4m3fn"), jc.quant.FakeQuant(bits=8, symmetric=False)])
def test_unservable_leaves_are_decoded(stage):
  # float8 codes and zero points have no integer product here: float values.
  model, x, _, art = linen_setup([stage])
  served = jc.export.serving_params(art)
  assert isinstance(served["Dense_0"]["kernel"], jax.Array)
  with jc.export.compressed_dense():
    got = model.apply({"params": served}, x)
  assert_close(got, np_forward(jc.export.decode(art), x), FLOAT_TOL)

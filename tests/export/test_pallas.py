"""The Pallas weight-only kernel in Pallas's interpreter, against numpy float64 products.

The reference is ``x @ W`` in float64 with ``W[i, o] = codes[i, o] * scale[i // group, o]``
built from the integer codes and scales given to ``IntKernel.from_codes``.
Tolerances: float32 inputs, 1e-5 of the output's largest magnitude (float32
accumulation of exact products); bfloat16 inputs, the output's own rounding
(2**-8 of each value) plus the same 1e-5.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcompress as jc
from jaxcompress.export import inference

LAYOUTS = [(8, None), (8, 32), (4, None), (4, 32)]  # (bits, group): the four stored layouts


def random_kernel(rng, bits, group, n_in, n_out):
  """``(IntKernel, codes (in, out), scales (G, out))`` with random codes over the full range."""
  lo, hi = (-8, 7) if bits == 4 else (-128, 127)
  codes = rng.integers(lo, hi + 1, (n_in, n_out))
  scale = rng.uniform(0.01, 0.1, (1 if group is None else n_in // group, n_out)).astype(np.float32)
  return jc.export.IntKernel.from_codes(codes, scale, bits=bits, group=group), codes, scale


def reference(x, codes, scale):
  """``x @ W`` in float64, ``W`` dequantized from the codes and scales by repetition over each group."""
  group = codes.shape[0] // scale.shape[0]
  w = codes.astype(np.float64) * np.repeat(scale.astype(np.float64), group, axis=0)
  return np.asarray(np.asarray(x, np.float32), np.float64) @ w


def assert_close(got, want, dtype):
  got = np.asarray(np.asarray(got, np.float32), np.float64)
  rel = 2.0**-8 if dtype == jnp.bfloat16 else 0.0
  limit = rel * np.abs(want) + 1e-5 * np.abs(want).max()
  assert got.shape == want.shape
  assert np.all(np.abs(got - want) <= limit), np.abs(got - want).max() / np.abs(want).max()


def run(x, kernel, **blocks):
  return jax.jit(lambda x, k: jc.export.pallas_matmul(x, k, interpret=True, **blocks))(x, kernel)


@pytest.mark.parametrize("bits,group", LAYOUTS)
def test_four_layouts_match_float64(bits, group):
  # 3 rows (padded to 16) and 40 outputs: tiles of 16 overhang every layout's rows.
  rng = np.random.default_rng(bits + (group or 0))
  k, codes, scale = random_kernel(rng, bits, group, 64, 40)
  x = rng.normal(size=(3, 64)).astype(np.float32)
  y = run(x, k, block_n=16, block_k=32)
  assert y.dtype == jnp.float32
  assert_close(y, reference(x, codes, scale), jnp.float32)


def test_bfloat16_int4_per_group():
  rng = np.random.default_rng(7)
  k, codes, scale = random_kernel(rng, 4, 32, 64, 48)
  x = jnp.asarray(rng.normal(size=(2, 64)), jnp.bfloat16)
  y = run(x, k, block_n=16, block_k=32)
  assert y.dtype == jnp.bfloat16
  assert_close(y, reference(x, codes, scale), jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_to_triton(dtype, monkeypatch):
  # Lowered (not run) for an NVIDIA GPU from this CPU: the Pallas Triton lowering
  # accepts every layout, ragged tiles included (its loads and stores must be
  # powers of two; its ops must have Triton rules).
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  rng = np.random.default_rng(1)
  for bits, group in LAYOUTS:
    k = random_kernel(rng, bits, group, 64, 40)[0]
    fn = jax.jit(lambda x, k: jc.export.pallas_matmul(x, k, block_n=16, block_k=32))
    text = fn.trace(jnp.ones((3, 64), dtype), k).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1, (bits, group)


# ---------------------------------------------------------------------------
# Errors (no kernel runs).
# ---------------------------------------------------------------------------


def small_kernel(bits=8, group=None, n_in=32, n_out=16):
  return random_kernel(np.random.default_rng(0), bits, group, n_in, n_out)[0]


def test_needs_a_gpu_unless_interpreted(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  x = jnp.ones((1, 32))
  with pytest.raises(ValueError, match=r"needs a GPU \(jax.default_backend\(\) is 'cpu'\).*interpret=True"):
    jc.export.pallas_matmul(x, small_kernel())
  with pytest.raises(ValueError, match=r"compressed_matmul: impl='pallas' needs a GPU.*impl='xla'"):
    jc.export.compressed_matmul(x, small_kernel(), impl="pallas")
  with pytest.raises(ValueError, match=r"compressed_dense: impl='pallas' needs a GPU"):
    with jc.export.compressed_dense(impl="pallas"):
      pass


def test_impl_and_activations_are_checked():
  x = jnp.ones((1, 32))
  with pytest.raises(ValueError, match=r"compressed_matmul: impl='triton'; use 'xla' \(the default\) or 'pallas'"):
    jc.export.compressed_matmul(x, small_kernel(), impl="triton")
  with pytest.raises(ValueError, match=r"impl='pallas' with activations='int8'.*weight-only.*impl='xla' for w8a8"):
    jc.export.compressed_matmul(x, small_kernel(), activations="int8", impl="pallas", interpret=True)
  with pytest.raises(ValueError, match=r"CompressedLinear 'head': impl='pallas' with activations='int8'"):
    jc.export.CompressedLinear(small_kernel(), activations="int8", impl="pallas", interpret=True, name="head")


def test_bad_blocks_shapes_and_kernels():
  k = small_kernel()
  x = jnp.ones((1, 32))
  with pytest.raises(ValueError, match=r"block_n must be a power of two \(Triton block shapes\), got 24; use 16 or 32"):
    jc.export.pallas_matmul(x, k, interpret=True, block_n=24)
  with pytest.raises(ValueError, match=r"block_k must be an integer in \[16, 4096\], got 8"):
    jc.export.pallas_matmul(x, k, interpret=True, block_k=8)
  with pytest.raises(ValueError, match=r"inputs of shape \(1, 31\) do not fit a \(32, 16\) kernel"):
    jc.export.pallas_matmul(jnp.ones((1, 31)), k, interpret=True)
  with pytest.raises(TypeError, match=r"inputs of dtype int32; pass float32, bfloat16 or float16"):
    jc.export.pallas_matmul(jnp.ones((1, 32), jnp.int32), k, interpret=True)
  with pytest.raises(ValueError, match=r"\(32, 16\) kernel with group size 8: no power of two from 16 to "
                                       r"block_k=128 divides it.*impl='xla'"):
    jc.export.pallas_matmul(x, small_kernel(4, 8), interpret=True)
  with pytest.raises(ValueError, match=r"\(24, 16\) kernel with 24 input features: no power of two"):
    jc.export.pallas_matmul(jnp.ones((1, 24)), small_kernel(8, None, 24), interpret=True)
  lowrank = jc.export.LowRankKernel(np.ones((32, 2), np.float32), np.ones((2, 16), np.float32))
  with pytest.raises(TypeError, match=r"kernel is a LowRankKernel; pass an IntKernel"):
    jc.export.pallas_matmul(x, lowrank, interpret=True)


# ---------------------------------------------------------------------------
# Slow: more shapes, every layout in bfloat16, and the opt-in from the serving API.
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("bits,group", LAYOUTS)
def test_shapes_blocks_and_dtypes(bits, group, dtype, monkeypatch):
  # Blocks of 128 rows (several per kernel, the last one partly padding),
  # leading axes, several row tiles, and group sizes over several block_k steps.
  monkeypatch.setattr(inference, "_BLOCK_BYTES", 1)
  monkeypatch.setattr(inference, "_GROUP_BLOCK_BYTES", 1)
  rng = np.random.default_rng(bits)
  cases = [((2, 5), 128, 300, {"block_n": 32, "block_k": 32}),
           ((70,), 64, 24, {"block_m": 32, "block_n": 16, "block_k": 16}),
           ((1,), 256, 128, {})]
  for lead, n_in, n_out, blocks in cases:
    k, codes, scale = random_kernel(rng, bits, group, n_in, n_out)
    if k.blocked and n_out > 128:
      assert k.codes.shape[0] == 3  # three blocks of 128 rows
    x = jnp.asarray(rng.normal(size=lead + (n_in,)), dtype)
    y = run(x, k, **blocks)
    assert y.shape == lead + (n_out,) and y.dtype == dtype
    want = reference(np.asarray(x, np.float32).reshape(-1, n_in), codes, scale)
    assert_close(np.asarray(y, np.float32).reshape(-1, n_out), want, dtype)


def _dense_model_and_artifact(stages, n_in=64, n_out=48):
  model = nn.Sequential([nn.Dense(n_out), nn.relu, nn.Dense(16)])
  x = jax.random.normal(jax.random.key(1), (3, n_in))
  params = model.init(jax.random.key(0), x)["params"]
  spec = jc.Spec([jc.Rule(r".*kernel", stages)])
  t, s = spec.init(params)
  return model, x, jc.export.export(spec, t, s)


def _float64_mlp(params, x):
  """The two-layer MLP in float64 numpy from decoded params."""
  f = lambda a: np.asarray(a, np.float64)
  h = np.maximum(f(x) @ f(params["layers_0"]["kernel"]) + f(params["layers_0"]["bias"]), 0.0)
  return h @ f(params["layers_2"]["kernel"]) + f(params["layers_2"]["bias"])


@pytest.mark.slow
@pytest.mark.parametrize("stages", [
    [jc.quant.FakeQuant(bits=4, granularity=jc.quant.PerGroup(size=16, axis=0))],
    [jc.lowrank.svd(rank=16), jc.quant.FakeQuant(bits=8)],
], ids=["w4_group", "lowrank_w8"])
def test_compressed_dense_and_serving_nnx_opt_in(stages, monkeypatch):
  calls = []
  kernel_fn = jc.export.pallas.pallas_matmul

  def spy(x, kernel, **kwargs):
    calls.append(kernel.bits)
    return kernel_fn(x, kernel, **kwargs)

  monkeypatch.setattr(jc.export.pallas, "pallas_matmul", spy)
  model, x, artifact = _dense_model_and_artifact(stages)
  served = jc.export.serving_params(artifact)
  want = _float64_mlp(jc.export.decode(artifact), x)

  @jax.jit
  def apply(p, x):
    with jc.export.compressed_dense(impl="pallas", interpret=True):
      return model.apply({"params": p}, x)

  assert_close(apply(served, x), want, jnp.float32)
  assert len(calls) == (2 if len(stages) == 1 else 4)  # every integer product ran the Pallas kernel

  net = nnx.Sequential(nnx.Linear(64, 48, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(48, 16, rngs=nnx.Rngs(1)))
  _, params, _ = nnx.split(net, nnx.Param, ...)
  spec = jc.Spec([jc.Rule(r".*kernel", stages)])
  nart = jc.export.export(spec, *spec.init(params))
  fast = jc.export.serving_nnx(net, nart, impl="pallas", interpret=True)
  assert fast.layers[0].impl == "pallas"
  dec = jc.export.decode(nart)
  f = lambda a: np.asarray(a, np.float64)
  h = np.maximum(f(x) @ f(dec["layers"][0]["kernel"]) + f(dec["layers"][0]["bias"]), 0.0)
  want_nnx = h @ f(dec["layers"][2]["kernel"]) + f(dec["layers"][2]["bias"])
  assert_close(fast(x), want_nnx, jnp.float32)
  assert len(calls) == (4 if len(stages) == 1 else 8)

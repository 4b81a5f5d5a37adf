"""oneshot.sequential: block-by-block capture and compression, against float64 numpy.

The toy model has an ``embed`` (a Linear and tanh, outside the blocks) and two
residual MLP blocks ``x + fc2(relu(fc1(x)))``. ``compress`` rounds kernels to
a grid of 1/8 (so block outputs visibly change) and records what it was given.
The reference runs the same procedure in numpy: block 1's layers must see the
outputs of block 0 *with its rounded kernels*.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxcompress.oneshot.sequential import sequential

D_IN, D, H = 3, 8, 16
PATHS = ["blocks/0/fc1/kernel", "blocks/0/fc2/kernel", "blocks/1/fc1/kernel", "blocks/1/fc2/kernel"]


def batches(n=2, b=4, t=5, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(b, t, D_IN)).astype(np.float32) for _ in range(n)]


class ToyBlock(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(D, H, rngs=rngs)
    self.fc2 = nnx.Linear(H, D, rngs=rngs)

  def __call__(self, x):
    return x + self.fc2(jax.nn.relu(self.fc1(x)))


class _Toy(nnx.Module):
  def __init__(self):
    rngs = nnx.Rngs(0)
    self.inp = nnx.Linear(D_IN, D, rngs=rngs)
    self.blocks = nnx.List([ToyBlock(rngs) for _ in range(2)])

  def embed(self, x):
    return jnp.tanh(self.inp(x))


class _Empty(nnx.Module):
  pass


def Toy(seed=0):
  """The toy model with numpy-drawn parameters (nonzero biases, so that a dropped
  bias would show); built abstractly first, so no random kernels are compiled."""
  model = nnx.eval_shape(_Toy)
  rng = np.random.default_rng(seed)
  draw = lambda p, a: jnp.asarray(
      rng.normal(size=a.shape) * (0.3 if p[-2].key == "bias" else a.shape[0] ** -0.5), jnp.float32
  )
  nnx.update(model, jax.tree_util.tree_map_with_path(draw, nnx.state(model, nnx.Param)))
  return model


class LinenBlock(nn.Module):
  def setup(self):
    self.fc1 = nn.Dense(H)
    self.fc2 = nn.Dense(D)

  def __call__(self, x):
    return x + self.fc2(nn.relu(self.fc1(x)))


class LinenToy(nn.Module):
  def setup(self):
    self.inp = nn.Dense(D)
    self.blocks = [LinenBlock() for _ in range(2)]

  def embed(self, x):
    return jnp.tanh(self.inp(x))

  def __call__(self, x):
    x = self.embed(x)
    for b in self.blocks:
      x = b(x)
    return x


def rounding(record):
  def compress(path, kernel, x):
    record.append((path, np.asarray(kernel), x))
    return jnp.round(kernel * 8) / 8

  return compress


def np_params_nnx(model):
  f = lambda m: (np.asarray(m.kernel[...], np.float64), np.asarray(m.bias[...], np.float64))
  return f(model.inp), [(f(b.fc1), f(b.fc2)) for b in model.blocks]


def np_params_linen(params):
  f = lambda p: (np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64))
  return f(params["inp"]), [(f(params[f"blocks_{i}"]["fc1"]), f(params[f"blocks_{i}"]["fc2"])) for i in range(2)]


def reference(inp, blocks, data, compressed=(0, 1)):
  """Float64: the inputs each layer sees, and the kernels sequential should return."""
  (wi, bi) = inp
  h = np.concatenate([np.tanh(b.reshape(-1, D_IN).astype(np.float64) @ wi + bi) for b in data])
  seen, kernels = [], []
  for i, ((w1, b1), (w2, b2)) in enumerate(blocks):
    a = np.maximum(h @ w1 + b1, 0.0)
    seen += [h, a]
    if i in compressed:
      w1, w2 = np.round(w1 * 8) / 8, np.round(w2 * 8) / 8
    kernels += [w1, w2]
    h = h + np.maximum(h @ w1 + b1, 0.0) @ w2 + b2
  return seen, kernels


def check_against_reference(record, seen, kernels, new_kernels, paths=PATHS):
  assert [r[0] for r in record] == paths
  for (path, _, x), want in zip(record, seen):
    assert x.shape == want.shape, path
    np.testing.assert_allclose(np.asarray(x, np.float64), want, rtol=1e-5, atol=1e-5, err_msg=path)
  for path, got, want in zip(paths, new_kernels, kernels):
    np.testing.assert_array_equal(np.asarray(got, np.float64), want, err_msg=path)


def test_nnx_capture_and_propagation_match_numpy():
  model = Toy()
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  data = batches()
  record = []
  state = sequential(model, data, rounding(record))

  inp, blocks = np_params_nnx(model)
  seen, kernels = reference(inp, blocks, data)
  new = [state["blocks"][int(p.split("/")[1])][p.split("/")[2]]["kernel"][...] for p in PATHS]
  check_against_reference(record, seen, kernels, new)
  # The capture is exact: block 0's first layer sees the embedding, bit for bit.
  embedded = np.concatenate([np.asarray(model.embed(jnp.asarray(b))).reshape(-1, D) for b in data])
  np.testing.assert_array_equal(np.asarray(record[0][2]), embedded)
  # Block 1 saw the outputs of the *compressed* block 0, which differ from the float ones.
  float_seen, _ = reference(inp, blocks, data, compressed=())
  assert np.abs(float_seen[2] - seen[2]).max() > 1e-2
  # Everything else is the caller's, and the model is unchanged.
  assert state["inp"]["kernel"][...] is model.inp.kernel[...]
  assert state["blocks"][0]["fc1"]["bias"][...] is model.blocks[0].fc1.bias[...]
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(model, nnx.Param)))
  # The compressed state runs in a clone of the model.
  clone = nnx.clone(model)
  nnx.update(clone, state)
  assert clone.blocks[1].fc2.kernel[...] is state["blocks"][1]["fc2"]["kernel"][...]


@pytest.mark.slow
def test_linen_capture_and_propagation_match_numpy():
  model = LinenToy()
  params = model.init(jax.random.key(1), jnp.ones((1, D_IN)))["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.3 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
      if p[-1].key == "bias" else x,
      params,
  )
  data = batches(seed=1)
  record = []
  out = sequential(model, data, rounding(record), params=params)

  inp, blocks = np_params_linen(params)
  seen, kernels = reference(inp, blocks, data)
  paths = [f"blocks_{p.split('/')[1]}/{p.split('/')[2]}/kernel" for p in PATHS]
  new = [out[p.split("/")[0]][p.split("/")[1]]["kernel"] for p in paths]
  check_against_reference(record, seen, kernels, new, paths)
  assert out["inp"]["kernel"] is params["inp"]["kernel"]
  # The compressed params run in the unchanged linen model.
  y = model.apply({"params": out}, jnp.asarray(data[0]))
  assert y.shape == (4, 5, D)


@pytest.mark.slow
def test_pattern_selects_layers_and_later_blocks_see_float_outputs():
  model = Toy(seed=3)
  data = batches(n=1)
  record = []
  state = sequential(model, data, rounding(record), pattern=r"blocks/1/.*")
  inp, blocks = np_params_nnx(model)
  seen, kernels = reference(inp, blocks, data, compressed=(1,))
  check_against_reference(record, seen[2:], kernels[2:], [
      state["blocks"][1]["fc1"]["kernel"][...], state["blocks"][1]["fc2"]["kernel"][...]
  ], PATHS[2:])
  assert state["blocks"][0]["fc1"]["kernel"][...] is model.blocks[0].fc1.kernel[...]


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_sharded_batches_give_sharded_rows_and_the_unsharded_result(axis_type):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  model = Toy(seed=5)
  data = batches(n=2, b=8, t=3, seed=5)
  hessians = {}

  def gram(path, kernel, x):
    assert x.sharding.spec == PartitionSpec("data", None), (path, x.sharding)
    assert len(x.sharding.device_set) == 8
    # The statistic GPTQ and SparseGPT take, reduced across the 8 devices.
    hessians[path] = np.asarray(jax.jit(lambda x: x.T @ x)(x), np.float64)
    return jnp.round(kernel * 8) / 8

  sharded = sequential(model, data, gram, sharding=sharding)
  record = []
  plain = sequential(model, data, rounding(record))
  for (path, _, x) in record:
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(hessians[path], x64.T @ x64, rtol=1e-4, atol=1e-4, err_msg=path)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6),
      sharded, plain,
  )


def test_errors_name_the_problem_and_the_fix():
  model = Toy()
  data = batches(n=1, b=2, t=1)
  keep = lambda path, kernel, x: kernel
  with pytest.raises(TypeError, match="flax.nnx.Module or a flax.linen.Module"):
    sequential({"w": jnp.ones((2, 2))}, data, keep)
  with pytest.raises(TypeError, match="linen model needs its parameters"):
    sequential(LinenToy(), data, keep)
  with pytest.raises(TypeError, match="params= is for linen models"):
    sequential(model, data, keep, params={})
  with pytest.raises(ValueError, match="batches is empty"):
    sequential(model, [], keep)
  with pytest.raises(TypeError, match="NamedSharding of the batch axis"):
    sequential(model, data, keep, sharding="data")
  with pytest.raises(ValueError, match="no attribute 'blocks'"):
    sequential(_Empty(), data, keep)
  with pytest.raises(ValueError, match=r"blocks\(model\) is empty"):
    sequential(model, data, keep, blocks=lambda m: [])
  with pytest.raises(TypeError, match="block 0 is _Empty, not an nnx.Module of the model"):
    sequential(model, data, keep, blocks=lambda m: [_Empty()])
  with pytest.raises(ValueError, match=r"selects no Linear/Dense layer.*'blocks/0/fc1'"):
    sequential(model, data, keep, pattern="nothing")
  with pytest.raises(ValueError, match=r"blocks/0/fc1/kernel.*shape \(8, 16\)"):
    sequential(model, data, lambda path, kernel, x: kernel[:2])
  with pytest.raises(TypeError, match=r"returned a tuple.*take .kernel of a Pruned"):
    sequential(model, data, lambda path, kernel, x: (kernel, kernel))
  mesh = jax.make_mesh((8,), ("data",))
  with pytest.raises(ValueError, match="2 rows on its first axis.*multiple of 8"):
    sequential(model, data, keep, sharding=NamedSharding(mesh, PartitionSpec("data")))


@pytest.mark.slow
def test_a_selected_layer_the_block_never_calls_is_an_error():
  model = Toy()
  model.blocks[1].spare = nnx.Linear(D, D, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="blocks/1/spare/kernel is selected, but its block never called"):
    sequential(model, batches(n=1), lambda path, kernel, x: kernel)
  state = sequential(model, batches(n=1), lambda path, kernel, x: kernel, pattern=r".*/fc\d")
  assert state["blocks"][1]["spare"]["kernel"][...] is model.blocks[1].spare.kernel[...]

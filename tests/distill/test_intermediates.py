"""Selecting and pairing intermediate features from linen and NNX models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcompress import distill


class Block(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.width)(x)
    self.sow("intermediates", "feat", h)
    return nn.relu(h)


class Net(nn.Module):
  widths: tuple

  @nn.compact
  def __call__(self, x):
    for w in self.widths:
      x = Block(w)(x)
    return nn.Dense(3)(x)


def relu(x):
  return np.maximum(x, 0)


def test_linen_capture_and_sow_select_the_right_arrays():
  net = Net((4, 5, 6))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7)), jnp.float32)
  variables = net.init(jax.random.key(0), x)

  @jax.jit
  def run(v, x):
    return net.apply(v, x, capture_intermediates=True, mutable=["intermediates"])

  _, col = run(variables, x)
  paths = list(distill.feature_paths(col))
  assert "Block_1/feat" in paths and "Block_1" in paths and "Block_1/Dense_0" in paths and "" in paths
  feats = distill.select_features(col, r"Block_\d/feat")
  assert list(feats) == ["Block_0/feat", "Block_1/feat", "Block_2/feat"]
  # Independent forward pass in numpy.
  p = jax.tree_util.tree_map(np.asarray, variables["params"])
  h0 = np.asarray(x) @ p["Block_0"]["Dense_0"]["kernel"] + p["Block_0"]["Dense_0"]["bias"]
  h1 = relu(h0) @ p["Block_1"]["Dense_0"]["kernel"] + p["Block_1"]["Dense_0"]["bias"]
  np.testing.assert_allclose(feats["Block_0/feat"], h0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(feats["Block_1/feat"], h1, rtol=1e-5, atol=1e-6)
  outs = distill.select_features(col, r"Block_\d")  # module outputs from capture_intermediates
  np.testing.assert_allclose(outs["Block_1"], relu(h1), rtol=1e-5, atol=1e-6)


class Shared(nn.Module):
  @nn.compact
  def __call__(self, x):
    blk = Block(3)
    return blk(blk(x))  # one module called twice


def test_a_module_called_twice_gives_indexed_paths():
  m = Shared()
  x = jnp.ones((1, 3))
  _, col = m.apply(m.init(jax.random.key(0), x), x, mutable=["intermediates"])
  assert list(distill.select_features(col, r"Block_0/feat/\d")) == ["Block_0/feat/0", "Block_0/feat/1"]


class NBlock(nnx.Module):
  def __init__(self, din, dout, rngs):
    self.lin = nnx.Linear(din, dout, rngs=rngs)

  def __call__(self, x):
    h = self.lin(x)
    self.sow(nnx.Intermediate, "feat", h)
    return jax.nn.relu(h)


class NNet(nnx.Module):
  def __init__(self, widths, rngs):
    dims = (7,) + tuple(widths)
    self.layers = nnx.List([NBlock(a, b, rngs) for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def test_nnx_sow_under_jit_with_split_params():
  model = NNet((4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8), nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7)), jnp.float32)

  @jax.jit
  def features(params, x):
    m = nnx.merge(graphdef, params)
    _, col = nnx.capture(m, nnx.Intermediate)(x)
    return distill.select_features(col, r"layers/(1|10)/feat")

  feats = features(params, x)
  assert list(feats) == ["layers/1/feat", "layers/10/feat"]  # natural order, not 1, 10 as strings
  w0 = np.asarray(model.layers[0].lin.kernel[...])
  b0 = np.asarray(model.layers[0].lin.bias[...])
  w1 = np.asarray(model.layers[1].lin.kernel[...])
  b1 = np.asarray(model.layers[1].lin.bias[...])
  h1 = relu(np.asarray(x) @ w0 + b0) @ w1 + b1
  np.testing.assert_allclose(feats["layers/1/feat"], h1, rtol=1e-5, atol=1e-6)


def test_pairing_linen_student_with_nnx_teacher_and_errors():
  student = Net((4, 4))
  x = jnp.ones((2, 7))
  _, s_col = student.apply(student.init(jax.random.key(0), x), x, mutable=["intermediates"])
  teacher = NNet((8, 8, 8, 8), nnx.Rngs(1))
  _, t_col = nnx.capture(teacher, nnx.Intermediate)(x)

  pairs = distill.pair_features(
      s_col, t_col, student_pattern=r"Block_\d/feat", teacher_pattern=r"layers/(1|3)/feat", same_width=False
  )
  assert [(p.student_path, p.teacher_path) for p in pairs] == [
      ("Block_0/feat", "layers/1/feat"),
      ("Block_1/feat", "layers/3/feat"),
  ]
  assert pairs[0].student.shape == (2, 4) and pairs[0].teacher.shape == (2, 8)

  with pytest.raises(ValueError, match=r"student pattern .* matches 2 features but teacher pattern .* matches 4; they pair one to one"):
    distill.pair_features(s_col, t_col, student_pattern=r"Block_\d/feat", teacher_pattern=r"layers/.*/feat")
  with pytest.raises(ValueError, match=r"'Block_0/feat' \(2, 4\) does not pair with teacher feature 'layers/1/feat' \(2, 8\): need equal shapes\. Pass same_width=False"):
    distill.pair_features(s_col, t_col, student_pattern=r"Block_\d/feat", teacher_pattern=r"layers/(1|3)/feat")
  with pytest.raises(ValueError, match=r"pattern 'Block_9' matches no intermediate.*Block_0/feat \(2, 4\)"):
    distill.select_features(s_col, "Block_9")
  with pytest.raises(ValueError, match=r"The intermediates are: none"):
    distill.select_features({}, "x")

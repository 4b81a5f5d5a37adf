"""Quantized layer inputs: linen interception and NNX surgery."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcompress.quant.activations import (
    InputRange,
    InputRule,
    QuantizedInput,
    quantize_inputs,
    quantize_nnx_inputs,
)
from tests.quant.test_dot_general import np_int8_matmul, np_quantize


def np_fq_tokens(x, bits=8):
  q, s = np_quantize(x, (-1,), 2 ** (bits - 1) - 1)
  return q * s


def np_fq_static(x, absmax, bits=8):
  qmax = 2 ** (bits - 1) - 1
  s = absmax / qmax
  return np.clip(np.round(np.asarray(x, np.float64) / s), -qmax, qmax) * s


def rand(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(7)(x))
    return nn.Dense(5)(h)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = Block(name="block")(nn.Dense(6)(x))
    return nn.Dense(3)(h)


def np_net(p, x, quant_paths, fq, product=None):
  """Reference forward of Net.

  Fake-quantizes the inputs of ``quant_paths`` with ``fq(x, path)``; ``product``
  maps a path to ``f(x, kernel)`` replacing the float product of that layer.
  """
  product = product or {}

  def dense(path, x):
    layer = p
    for k in path.split("/"):
      layer = layer[k]
    kernel = np.asarray(layer["kernel"], np.float64)
    if path in quant_paths:
      x = fq(x, path)
    y = product[path](x, kernel) if path in product else x @ kernel
    return y + np.asarray(layer["bias"])

  h = dense("Dense_0", x)
  h = dense("block/Dense_1", np.maximum(dense("block/Dense_0", h), 0))
  return dense("Dense_1", h)


def np_int8_product(x, kernel):
  acc, sx, sw = np_int8_matmul(x, kernel)
  return acc * sx * sw


def run_linen(model, variables, x, rules, *, calibrate=False):
  """``model.apply`` under ``quantize_inputs``, jitted (calibration returns the stats too)."""

  def f(v, x):
    with quantize_inputs(rules, calibrate=calibrate):
      return model.apply(v, x, mutable=["quant_stats"] if calibrate else False)

  return jax.jit(f)(variables, x)


@pytest.fixture(scope="module")
def net():
  x = rand((4, 9), 0)
  return Net(), jax.jit(Net().init)(jax.random.key(0), x)["params"], x


def test_straight_through_input_gradients():
  # Dynamic ranges: identity; static ranges: zero outside [-range, range].
  x = rand((3, 10), 1)
  w = rand((10, 2), 2)
  model = nn.Dense(2, use_bias=False)
  variables = {"params": {"kernel": jnp.asarray(w)}, "quant_stats": {"input_absmax": jnp.float32(0.7)}}
  for ranges, want in (("dynamic", np.ones_like(x)), ("static", (np.abs(x) <= 0.7).astype(np.float32))):
    def f(v):
      with quantize_inputs([InputRule(pattern="", ranges=ranges)]):
        return model.apply(variables, v).sum()
    g = jax.jit(jax.grad(f))(jnp.asarray(x))
    np.testing.assert_allclose(g, want * w.sum(1), rtol=1e-6)


def test_linen_dynamic_selects_by_path(net):
  model, params, x = net
  rules = [InputRule(pattern=r"block/Dense_\d", bits=4)]

  @jax.jit
  def forward(p, v):
    with quantize_inputs(rules):
      return model.apply({"params": p}, v)

  want = np_net(params, x, {"block/Dense_0", "block/Dense_1"}, lambda v, _: np_fq_tokens(v, 4))
  np.testing.assert_allclose(forward(params, x), want, rtol=1e-5, atol=1e-5)
  # Outside the context the model is the float model.
  float_out = jax.jit(model.apply)({"params": params}, x)
  np.testing.assert_allclose(float_out, np_net(params, x, set(), None), rtol=1e-5, atol=1e-5)


def test_linen_first_matching_rule_wins(net):
  model, params, x = net
  rules = [InputRule(pattern="Dense_0", bits=3), InputRule(pattern=".*", bits=6)]
  out = run_linen(model, {"params": params}, x, rules)
  bits = {"Dense_0": 3, "Dense_1": 6, "block/Dense_0": 6, "block/Dense_1": 6}
  want = np_net(params, x, set(bits), lambda v, path: np_fq_tokens(v, bits[path]))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_linen_straight_through_gradient(net):
  model, params, x = net
  rules = [InputRule(pattern="Dense_1")]

  def loss(p):
    with quantize_inputs(rules):
      return jnp.sum(model.apply({"params": p}, x) ** 2)

  g = jax.jit(jax.grad(loss))(params)
  # d loss / d kernel of Dense_1 = (quantized input)^T @ (2 * output).
  h_in = {}
  np_net(params, x, {"Dense_1"}, lambda v, path: h_in.setdefault(path, np_fq_tokens(v)))
  out = np.asarray(run_linen(model, {"params": params}, x, rules), np.float64)
  np.testing.assert_allclose(g["Dense_1"]["kernel"], h_in["Dense_1"].T @ (2 * out), rtol=1e-4, atol=1e-5)


def test_linen_static_calibration_and_use(net):
  model, params, x = net
  x2 = 3.0 * rand((4, 9), 2)
  rules = [InputRule(pattern="Dense_0", ranges="static", decay=0.75)]
  stats = {}
  for batch in (x, x2):
    _, upd = run_linen(model, {"params": params, **stats}, batch, rules, calibrate=True)
    stats = dict(upd)
  want = 0.75 * np.abs(x).max() + 0.25 * np.abs(x2).max()
  np.testing.assert_allclose(stats["quant_stats"]["Dense_0"]["input_absmax"], want, rtol=1e-6)
  assert int(stats["quant_stats"]["Dense_0"]["count"]) == 2
  out = run_linen(model, {"params": params, **stats}, x2, rules)
  ref = np_net(params, x2, {"Dense_0"}, lambda v, _: np_fq_static(v, want))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_linen_static_errors(net):
  model, params, x = net
  rules = [InputRule(pattern="Dense_0", ranges="static")]
  with pytest.raises(ValueError, match="'Dense_0' has static input ranges .* no 'quant_stats'"):
    run_linen(model, {"params": params}, x, rules)
  with pytest.raises(ValueError, match="needs the 'quant_stats' collection to be mutable"):
    with quantize_inputs(rules, calibrate=True):
      jax.eval_shape(model.apply, {"params": params}, x)


def test_linen_predicate_and_tuple_patterns(net):
  # Patterns are those of jc.Rule: a predicate over (path, module), or a tuple
  # mixing regexes and predicates, selects modules as a regex would.
  model, params, x = net
  want = np_net(params, x, {"block/Dense_0", "block/Dense_1"}, lambda v, _: np_fq_tokens(v, 4))
  in_block = lambda path, module: isinstance(module, nn.Dense) and path.startswith("block/")
  five_wide = lambda path, module: module.features == 5  # block/Dense_1
  for pattern in (in_block, ("block/Dense_0", five_wide)):
    out = run_linen(model, {"params": params}, x, [InputRule(pattern=pattern, bits=4)])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"matches no .* \(or predicates over \(path, module\)\); the paths are: 'Dense_0'"):
    run_linen(model, {"params": params}, x, [InputRule(pattern=lambda path, module: False)])


def test_linen_pattern_matching_nothing(net):
  model, params, x = net
  with pytest.raises(ValueError, match=r"'Dense_9' matches no .* paths are: 'Dense_0', 'block/Dense_0'"):
    run_linen(model, {"params": params}, x, [InputRule(pattern="Dense_9")])
  # Nothing traced inside the context (e.g. a cached jitted call) is reported too.
  with pytest.raises(ValueError, match=r"matches no .* \(none\)"):
    with quantize_inputs([InputRule(pattern="Dense_0")]):
      pass


def test_linen_real_int8_route(net):
  model, params, x = net

  def forward(p, v, pattern):
    with quantize_inputs([InputRule(pattern=pattern, matmul="int8")]):
      return model.apply({"params": p}, v)

  out = jax.jit(forward, static_argnums=2)(params, x, "Dense_0")
  want = np_net(params, x, set(), None, product={"Dense_0": np_int8_product})
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # Backward in full precision: the last layer's kernel gradient is h^T @ dL/dy with
  # h its float input, as in the float model.
  g = jax.jit(jax.grad(lambda p: forward(p, x, "Dense_1").sum()))(params)
  g_float = jax.jit(jax.grad(lambda p: model.apply({"params": p}, x).sum()))(params)
  np.testing.assert_allclose(g["Dense_1"]["kernel"], g_float["Dense_1"]["kernel"], rtol=1e-6, atol=1e-6)


def test_linen_conv_and_einsum_inputs():
  class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = nn.Conv(4, (3, 3))(x)
      return nn.Einsum((4, 2), "bhwc,cd->bhwd")(y)

  x = rand((2, 5, 5, 3), 3)
  model = ConvNet()
  params = jax.jit(model.init)(jax.random.key(1), x)
  out = run_linen(model, params, x, [InputRule(pattern="Conv_0|Einsum_0", bits=3)])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  # 3x3 "SAME" convolution of the input quantized per pixel, then the einsum of its
  # output quantized per pixel.
  xq = np.pad(np_fq_tokens(x, 3), ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = sum(
      np.einsum("bhwc,co->bhwo", xq[:, i : i + 5, j : j + 5], p["Conv_0"]["kernel"][i, j])
      for i in range(3)
      for j in range(3)
  ) + p["Conv_0"]["bias"]
  want = np.einsum("bhwc,cd->bhwd", np_fq_tokens(conv, 3), p["Einsum_0"]["kernel"]) + p["Einsum_0"]["bias"]
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="'Conv_0' is a linen Conv, which takes no dot_general"):
    with quantize_inputs([InputRule(pattern="Conv_0", matmul="int8")]):
      jax.eval_shape(model.apply, params, x)


# --------------------------------------------------------------------------
# NNX.
# --------------------------------------------------------------------------


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(6, 6, rngs=rngs), nnx.Linear(6, 6, rngs=rngs)])


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.inp = nnx.Linear(9, 6, rngs=rngs)
    self.block = NnxBlock(rngs)
    self.head = nnx.Einsum("bi,io->bo", (6, 3), (3,), rngs=rngs)
    self.again = self.block.layers[1]  # the same layer held twice

  def __call__(self, x):
    x = self.inp(x)
    for layer in self.block.layers:
      x = nnx.relu(layer(x))
    return self.head(self.again(x))


def np_nnx_net(m, x, fq, product=None):
  """Reference forward of NnxNet (read from the float model).

  ``fq(x, name)`` is applied to each layer input; ``product`` maps a layer name
  to ``f(x, kernel)`` replacing its float product.
  """
  product = product or {}

  def layer(name, module, v):
    v = fq(v, name)
    kernel = np.asarray(module.kernel[...], np.float64)
    y = product[name](v, kernel) if name in product else v @ kernel
    return y + np.asarray(module.bias[...])

  h = layer("inp", m.inp, x)
  h = np.maximum(layer("block/layers/0", m.block.layers[0], h), 0)
  h = np.maximum(layer("block/layers/1", m.block.layers[1], h), 0)
  h = layer("block/layers/1", m.block.layers[1], h)
  return layer("head", m.head, h)


def test_nnx_surgery_on_a_clone():
  model = NnxNet(nnx.Rngs(0))
  x = rand((4, 9), 4)
  before = jax.tree.map(np.array, nnx.state(model))
  q = quantize_nnx_inputs(model, [InputRule(pattern="block/layers/1|head", bits=4)])
  # The original is unchanged; the clone holds wrappers (the shared layer at both places).
  assert isinstance(model.block.layers[1], nnx.Linear) and isinstance(model.head, nnx.Einsum)
  assert model.again is model.block.layers[1]
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
  assert isinstance(q.block.layers[1], QuantizedInput) and q.again is q.block.layers[1]
  assert isinstance(q.head, QuantizedInput) and isinstance(q.block.layers[0], nnx.Linear)
  out = nnx.jit(lambda m, v: m(v))(q, x)
  quant = {"block/layers/1", "head"}
  want = np_nnx_net(model, x, lambda v, name: np_fq_tokens(v, 4) if name in quant else v)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # Gradients reach the wrapped parameters.
  grads = nnx.jit(nnx.grad(lambda m: m(x).sum()))(q)
  assert np.abs(grads["again"]["inner"]["kernel"][...]).sum() > 0


def test_nnx_static_calibration_through_a_view():
  model = NnxNet(nnx.Rngs(1))
  x1, x2 = rand((4, 9), 5), 2.0 * rand((4, 9), 6)
  q = quantize_nnx_inputs(model, [InputRule(pattern="inp", ranges="static", decay=0.5)])
  step = nnx.jit(lambda m, v: m(v))
  # Not calibrated yet: the inputs pass through unquantized.
  np.testing.assert_allclose(step(q, x1), np_nnx_net(model, x1, lambda v, _: v), rtol=1e-5, atol=1e-5)
  cal = nnx.view(q, calibrate=True)
  step(cal, x1)
  step(cal, x2)
  want_range = 0.5 * np.abs(x1).max() + 0.5 * np.abs(x2).max()
  np.testing.assert_allclose(q.inp.absmax[...], want_range, rtol=1e-6)
  assert isinstance(q.inp.absmax, InputRange) and int(q.inp.count[...]) == 2
  out = jax.jit(lambda v: q(v))(x2)
  want = np_nnx_net(model, x2, lambda v, name: np_fq_static(v, want_range) if name == "inp" else v)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # Ranges are not Params: an optimizer over nnx.Param does not see them.
  assert "absmax" not in nnx.state(q, nnx.Param)["inp"]


def test_nnx_real_products():
  model = NnxNet(nnx.Rngs(2))
  x = rand((4, 9), 7)
  q = quantize_nnx_inputs(model, [InputRule(pattern="inp|head", matmul="int8")])
  out = nnx.jit(lambda m, v: m(v))(q, x)
  int8 = {"inp": np_int8_product, "head": np_int8_product}
  want = np_nnx_net(model, x, lambda v, _: v, product=int8)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


def test_nnx_predicate_and_tuple_patterns():
  model = NnxNet(nnx.Rngs(4))
  x = rand((4, 9), 9)
  is_einsum = lambda path, layer: isinstance(layer, nnx.Einsum)
  q = quantize_nnx_inputs(model, [InputRule(pattern=(r"inp", is_einsum), bits=4)])
  assert isinstance(q.inp, QuantizedInput) and isinstance(q.head, QuantizedInput)
  assert isinstance(q.block.layers[0], nnx.Linear) and isinstance(q.block.layers[1], nnx.Linear)
  out = nnx.jit(lambda m, v: m(v))(q, x)
  want = np_nnx_net(model, x, lambda v, name: np_fq_tokens(v, 4) if name in ("inp", "head") else v)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # The predicate sees every path a shared layer is held at (here 'again' and 'block/layers/1').
  seen = []
  quantize_nnx_inputs(model, [InputRule(pattern=lambda path, layer: seen.append(path) or path == "again")])
  assert seen == ["again", "block/layers/0", "block/layers/1", "head", "inp"]


def test_nnx_errors():
  model = NnxNet(nnx.Rngs(3))
  with pytest.raises(ValueError, match=r"'nope' matches no .* 'again', 'block/layers/0', 'block/layers/1', 'head', 'inp'"):
    quantize_nnx_inputs(model, [InputRule(pattern="nope")])
  conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"nnx.Conv, which has no dot_general"):
    quantize_nnx_inputs(conv, [InputRule(pattern="", matmul="fp8")])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pattern="a", bits=1), "bits must be an int from 2 to 8"),
        (dict(pattern="a", ranges="minmax"), "ranges must be one of"),
        (dict(pattern="a", matmul="int4"), "matmul must be one of"),
        (dict(pattern="a", decay=1.0), r"decay must be in \[0, 1\)"),
        (dict(pattern="a", matmul="int8", ranges="static"), "static ranges work with matmul='fake'"),
        (dict(pattern="("), "not a valid regular expression"),
    ],
)
def test_bad_rules(kwargs, match):
  with pytest.raises(ValueError, match=match):
    InputRule(**kwargs)


@pytest.mark.parametrize(
    "pattern, error, match",
    [
        (3, TypeError, r"a regular expression \(str\), a predicate `\(path, module\) -> bool`, or a tuple"),
        ((), ValueError, "empty tuple"),
        (("Dense_0", "("), ValueError, r"'\(' is not a valid regular expression"),
        (("Dense_0", None), TypeError, "got None"),
    ],
)
def test_bad_patterns(pattern, error, match):
  with pytest.raises(error, match=match):
    InputRule(pattern=pattern)


def test_dense_general_tokens_span_every_contracted_axis():
  x = rand((2, 3, 4), 8)
  layer = nn.DenseGeneral(5, axis=(-2, -1), use_bias=False)
  params = jax.jit(layer.init)(jax.random.key(2), x)
  out = run_linen(layer, params, x, [InputRule(pattern="", bits=4)])
  q, s = np_quantize(x, (1, 2), 7)  # one scale per example, over both contracted axes
  kernel = np.asarray(params["params"]["kernel"], np.float64)
  np.testing.assert_allclose(out, np.einsum("bij,ijf->bf", q * s, kernel), rtol=1e-5, atol=1e-5)
  nnx_layer = nnx.LinearGeneral((3, 4), 5, axis=(-2, -1), use_bias=False, rngs=nnx.Rngs(0))
  q_layer = quantize_nnx_inputs(nnx_layer, InputRule(pattern="", bits=4))
  kernel = np.asarray(nnx_layer.kernel[...], np.float64)
  np.testing.assert_allclose(nnx.jit(lambda m, v: m(v))(q_layer, x), np.einsum("bij,ijf->bf", q * s, kernel), rtol=1e-5, atol=1e-5)

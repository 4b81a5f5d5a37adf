import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxcompress as jc
from jaxcompress.prune.shrink import shrink_dense_chain

CHAIN = ["Dense_0", "Dense_1", "Dense_2"]

# (jax activation given to shrink, numpy activation of the reference forward)
ACTS = {
    "relu": (jax.nn.relu, lambda h: np.maximum(h, 0.0)),
    "tanh": (jnp.tanh, np.tanh),
    "sigmoid": (jax.nn.sigmoid, lambda h: 1.0 / (1.0 + np.exp(-h))),  # sigmoid(0) = 0.5
    "identity": (lambda h: h, lambda h: h),
}


def reference_forward(layers, act, x):
  """numpy float64 forward of a Dense chain given as [(kernel, bias or None), ...]."""
  h = np.asarray(x, np.float64)
  for i, (k, b) in enumerate(layers):
    h = h @ np.asarray(k, np.float64)
    if b is not None:
      h = h + np.asarray(b, np.float64)
    if i < len(layers) - 1:
      h = act(h)
  return h


def as_layers(params, chain=CHAIN):
  return [(params[n]["kernel"], params[n].get("bias")) for n in chain]


def pruned_params(seed=0, dtype=np.float32):
  """A 6-8-5-3 chain whose removable channels are known by construction.

  Dense_0: columns 1, 4, 6 zero (biases nonzero: constant channels, folded);
           channel 2 feeds an all-zero row of Dense_1 (contributes nothing).
  Dense_1: column 3 is nonzero only in row 4, a constant channel of Dense_0, so
           it becomes constant after the fold; channel 0 feeds a zero row of Dense_2.
  Removable: Dense_0 {1, 2, 4, 6}, Dense_1 {0, 3}.
  """
  rng = np.random.default_rng(seed)
  k0 = rng.normal(size=(6, 8))
  k1 = rng.normal(size=(8, 5))
  k2 = rng.normal(size=(5, 3))
  k0[:, [1, 4, 6]] = 0.0
  k1[2, :] = 0.0
  k1[:, 3] = 0.0
  k1[4, 3] = 1.7
  k2[0, :] = 0.0
  return {
      "Dense_0": {"kernel": k0.astype(dtype), "bias": rng.normal(size=8).astype(dtype)},
      "Dense_1": {"kernel": k1.astype(dtype), "bias": rng.normal(size=5).astype(dtype)},
      "Dense_2": {"kernel": k2.astype(dtype), "bias": rng.normal(size=3).astype(dtype)},
  }


@pytest.mark.parametrize("act", sorted(ACTS))
def test_outputs_identical_and_channels_removed(act):
  jax_act, np_act = ACTS[act]
  params = pruned_params()
  x = np.random.default_rng(1).normal(size=(16, 6))
  small = shrink_dense_chain(params, CHAIN, activation=jax_act)
  assert small.features == (4, 3, 3)
  assert small.kept["Dense_0"].tolist() == [0, 3, 5, 7]
  assert small.kept["Dense_1"].tolist() == [1, 2, 4]
  shapes = {n: tuple(small.params[n]["kernel"].shape) for n in CHAIN}
  assert shapes == {"Dense_0": (6, 4), "Dense_1": (4, 3), "Dense_2": (3, 3)}
  np.testing.assert_allclose(
      reference_forward(as_layers(small.params), np_act, x),
      reference_forward(as_layers(params), np_act, x),
      rtol=1e-5,
      atol=1e-5,
  )


def test_folded_constant_matches_closed_form():
  # Dense_0 channel 1 has a zero column and bias 2: relu(2) * row 1 joins Dense_1's bias.
  params = {
      "Dense_0": {"kernel": np.array([[1.0, 0.0]], np.float32), "bias": np.array([0.0, 2.0], np.float32)},
      "Dense_1": {"kernel": np.array([[1.0, 0.0], [3.0, -1.0]], np.float32), "bias": np.array([0.5, 0.25], np.float32)},
  }
  small = shrink_dense_chain(params, ["Dense_0", "Dense_1"], activation=jax.nn.relu)
  np.testing.assert_array_equal(np.asarray(small.params["Dense_1"]["bias"]), [0.5 + 6.0, 0.25 - 2.0])
  np.testing.assert_array_equal(np.asarray(small.params["Dense_1"]["kernel"]), [[1.0, 0.0]])


@pytest.mark.parametrize("act", ["relu", "sigmoid"])
def test_layer_without_bias(act):
  # No bias on Dense_0: a zero column outputs act(0) (0.5 for a sigmoid), folded into Dense_1.
  jax_act, np_act = ACTS[act]
  params = pruned_params()
  del params["Dense_0"]["bias"]
  small = shrink_dense_chain(params, CHAIN, activation=jax_act)
  assert "bias" not in small.params["Dense_0"]
  x = np.random.default_rng(2).normal(size=(8, 6))
  np.testing.assert_allclose(
      reference_forward(as_layers(small.params), np_act, x),
      reference_forward(as_layers(params), np_act, x),
      rtol=1e-5,
      atol=1e-5,
  )


def test_one_activation_per_pair():
  params = pruned_params()
  x = np.random.default_rng(3).normal(size=(8, 6))
  small = shrink_dense_chain(params, CHAIN, activation=[jax.nn.sigmoid, jax.nn.relu])

  def ref(layers):
    (k0, b0), (k1, b1), (k2, b2) = [(np.float64(k), np.float64(b)) for k, b in layers]
    h = ACTS["sigmoid"][1](x @ k0 + b0)
    h = np.maximum(h @ k1 + b1, 0.0)
    return h @ k2 + b2

  np.testing.assert_allclose(ref(as_layers(small.params)), ref(as_layers(params)), rtol=1e-5, atol=1e-5)


def test_explicit_keep_may_keep_removable_channels():
  params = pruned_params()
  keep0 = np.ones(8, bool)
  keep0[[1, 4]] = False  # drop two of the four removable channels only
  small = shrink_dense_chain(params, CHAIN, activation=jax.nn.relu, keep={"Dense_0": keep0})
  assert small.kept["Dense_0"].tolist() == [0, 2, 3, 5, 6, 7]
  x = np.random.default_rng(4).normal(size=(8, 6))
  np.testing.assert_allclose(
      reference_forward(as_layers(small.params), ACTS["relu"][1], x),
      reference_forward(as_layers(params), ACTS["relu"][1], x),
      rtol=1e-5,
      atol=1e-5,
  )


def test_dense_model_is_unchanged():
  rng = np.random.default_rng(5)
  params = {f"Dense_{i}": {"kernel": rng.normal(size=s).astype(np.float32), "bias": np.zeros(s[1], np.float32)}
            for i, s in enumerate([(4, 6), (6, 5), (5, 2)])}
  small = shrink_dense_chain(params, CHAIN, activation=jax.nn.relu)
  assert small.features == (6, 5, 2)
  for n in CHAIN:
    np.testing.assert_array_equal(np.asarray(small.params[n]["kernel"]), params[n]["kernel"])


def test_bfloat16_dtype_kept():
  params = jax.tree.map(jnp.asarray, pruned_params(dtype=jnp.bfloat16))
  small = shrink_dense_chain(params, CHAIN, activation=jax.nn.relu)
  for n in CHAIN:
    assert small.params[n]["kernel"].dtype == jnp.bfloat16
    assert small.params[n]["bias"].dtype == jnp.bfloat16
  x = np.random.default_rng(6).normal(size=(8, 6))
  np.testing.assert_allclose(
      reference_forward(as_layers(small.params), ACTS["relu"][1], x),
      reference_forward(as_layers(params), ACTS["relu"][1], x),
      rtol=2e-2,
      atol=5e-2,
  )


class MLP(nn.Module):
  features: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(self.features):
      x = nn.Dense(f)(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


@pytest.mark.slow
def test_flax_linen_model_channel_pruned_by_a_spec():
  """Channel-prune a linen MLP with jc.prune.Channel, shrink, rebuild the smaller model."""
  model = MLP((32, 16, 4))
  x = jax.random.normal(jax.random.key(0), (10, 12))
  params = model.init(jax.random.key(1), x)["params"]
  # Biases are left dense: pruned channels keep a nonzero constant output that must be folded.
  params = jax.tree.map(lambda p: p + 0.3 if p.ndim == 1 else p, params)
  stage = jc.prune.Prune(sparsity=0.75, structure=jc.prune.Channel())
  spec = jc.Spec([jc.Rule(r"Dense_[01]/kernel", [stage])])
  trainable, state = spec.init(params)
  pruned = spec.apply(trainable, state)
  pruned_np = jax.tree.map(np.asarray, pruned)
  live = [int(np.any(pruned_np[n]["kernel"] != 0, axis=0).sum()) for n in CHAIN[:2]]
  assert live == [8, 4]  # 25% of 32 and of 16 channels kept
  small = shrink_dense_chain(pruned, CHAIN, activation=jax.nn.relu)
  assert small.features == (8, 4, 4)
  out_small = MLP(small.features).apply({"params": small.params}, x)
  expected = reference_forward(as_layers(pruned_np), ACTS["relu"][1], x)
  np.testing.assert_allclose(np.asarray(out_small), expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(model.apply({"params": pruned}, x)), expected, rtol=1e-4, atol=1e-5)


def test_nnx_state():
  class Net(nnx.Module):
    def __init__(self, sizes, rngs):
      self.l1 = nnx.Linear(sizes[0], sizes[1], rngs=rngs)
      self.l2 = nnx.Linear(sizes[1], sizes[2], rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  net = Net((5, 7, 3), nnx.Rngs(0))
  k = np.asarray(net.l1.kernel[...]).copy()
  k[:, [0, 3, 5]] = 0.0
  net.l1.kernel[...] = jnp.asarray(k)
  _, st = nnx.split(net)
  small = shrink_dense_chain(st, ["l1", "l2"], activation=jax.nn.relu)
  assert small.features == (4, 3)
  smaller = Net((5, 4, 3), nnx.Rngs(1))
  nnx.update(smaller, small.params)
  x = jax.random.normal(jax.random.key(2), (6, 5))
  layers = [(k, np.asarray(net.l1.bias[...])), (np.asarray(net.l2.kernel[...]), np.asarray(net.l2.bias[...]))]
  np.testing.assert_allclose(np.asarray(smaller(x)), reference_forward(layers, ACTS["relu"][1], x), rtol=1e-4, atol=1e-5)


# --- errors -----------------------------------------------------------------


def test_missing_layer_is_named_with_existing_kernels():
  with pytest.raises(ValueError, match=r"no leaf 'Dense_9/kernel'.*'Dense_0/kernel', 'Dense_1/kernel'"):
    shrink_dense_chain(pruned_params(), ["Dense_0", "Dense_9"], activation=jax.nn.relu)


def test_prefixed_paths_are_listed():
  with pytest.raises(ValueError, match=r"'params/Dense_0/kernel'"):
    shrink_dense_chain({"params": pruned_params()}, CHAIN, activation=jax.nn.relu)


def test_shapes_must_chain():
  with pytest.raises(ValueError, match=r"'Dense_0/kernel' has 8 output channels but 'Dense_2/kernel' takes 5"):
    shrink_dense_chain(pruned_params(), ["Dense_0", "Dense_2"], activation=jax.nn.relu)


def test_kernel_must_be_at_least_2d():
  params = pruned_params()
  params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"][0]
  with pytest.raises(ValueError, match=r"'Dense_1/kernel' has shape \(5,\)"):
    shrink_dense_chain(params, CHAIN, activation=jax.nn.relu)


def test_keep_cannot_drop_live_channels():
  keep = np.ones(8, bool)
  keep[[0, 1]] = False  # channel 0 is live, channel 1 is removable
  with pytest.raises(ValueError, match=r"keep\['Dense_0'\] drops channels \[0\] whose slice of 'Dense_0/kernel'"):
    shrink_dense_chain(pruned_params(), CHAIN, activation=jax.nn.relu, keep={"Dense_0": keep})


def test_keep_shape_and_names_checked():
  with pytest.raises(ValueError, match=r"keep\['Dense_0'\] must be a bool array of shape \(8,\)"):
    shrink_dense_chain(pruned_params(), CHAIN, activation=jax.nn.relu, keep={"Dense_0": np.ones(7, bool)})
  with pytest.raises(ValueError, match=r"keep names \['Dense_2'\]"):
    shrink_dense_chain(pruned_params(), CHAIN, activation=jax.nn.relu, keep={"Dense_2": np.ones(3, bool)})


def test_fold_needs_a_bias():
  params = pruned_params()
  del params["Dense_1"]["bias"]
  with pytest.raises(ValueError, match=r"'Dense_1', which has no bias \('Dense_1/bias'\)"):
    shrink_dense_chain(params, CHAIN, activation=jax.nn.relu)


def test_chain_and_activation_arguments_checked():
  params = pruned_params()
  with pytest.raises(ValueError, match=r"fewer than two layers"):
    shrink_dense_chain(params, ["Dense_0"], activation=jax.nn.relu)
  with pytest.raises(TypeError, match=r"chain must be a list of layer paths, got 'Dense_0'"):
    shrink_dense_chain(params, "Dense_0", activation=jax.nn.relu)
  with pytest.raises(ValueError, match=r"names a layer more than once"):
    shrink_dense_chain(params, ["Dense_0", "Dense_0"], activation=jax.nn.relu)
  with pytest.raises(ValueError, match=r"got 3 activations for a chain of 3 layers"):
    shrink_dense_chain(params, CHAIN, activation=[jax.nn.relu] * 3)
  with pytest.raises(TypeError, match=r"activation must be the elementwise function"):
    shrink_dense_chain(params, CHAIN, activation="relu")


# --- the benchmark (quick mode) ---------------------------------------------


@pytest.mark.slow
def test_pruning_benchmark_quick_run():
  from tests.benchmarks import load

  bench = load("pruning")
  result = bench.main(quick=True)
  assert set(result) >= {"apply_ratio", "update_every_step_ratio", "shrink_speedup"}
  assert all(result[k] > 0 for k in ("apply_ratio", "update_every_step_ratio", "shrink_speedup"))
  assert result["shrink_features"] == [75, 25, 10]  # 784-300-100-10 with 75% of hidden channels cut
  assert result["shrink_max_abs_diff"] < 1e-4
  assert result["per_output_select_equal"] is True  # topk_rows and lax.top_k agree
  assert result["update_every_step_st_ratio"] > 0 and result["per_output_select_speedup"] > 0
  json.dumps(result)

"""The byte-level LM of examples/tiny_lm.py and the one-shot benchmark on it."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcompress as jc
from jaxcompress.core.paths import path_str
from tests import benchmarks

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import tiny_lm  # noqa: E402

QUICK = tiny_lm.CONFIGS["quick"]


def test_the_file_lists_are_fixed_sorted_disjoint_and_present():
  assert list(tiny_lm.TRAIN_MODULES) == sorted(set(tiny_lm.TRAIN_MODULES))
  assert list(tiny_lm.VALID_MODULES) == sorted(set(tiny_lm.VALID_MODULES))
  assert not set(tiny_lm.TRAIN_MODULES) & set(tiny_lm.VALID_MODULES)
  for name in tiny_lm.TRAIN_MODULES + tiny_lm.VALID_MODULES:
    assert tiny_lm.module_file(name).stat().st_size > 0
  with pytest.raises(FileNotFoundError, match="no module 'not_a_module'"):
    tiny_lm.module_file("not_a_module")


def test_every_kind_of_parameter_is_reachable_by_rule_patterns():
  model = nnx.eval_shape(lambda: tiny_lm.init_model(QUICK))
  paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]]
  rules = {
      r"blocks/\d+/attn/(q|k|v|o)/kernel": 4 * QUICK.n_layers,
      r"blocks/\d+/mlp/(up|down)/kernel": 2 * QUICK.n_layers,
      r"blocks/\d+/ln(1|2)/(scale|bias)": 4 * QUICK.n_layers,
      r"(tokens|positions)/embedding": 2,
      r"ln_f/scale|head/kernel": 2,
  }
  for pattern, count in rules.items():
    rule = jc.Rule(pattern, jc.prune.magnitude(sparsity=0.5))
    assert sum(rule.matches(p) for p in paths) == count, pattern


@pytest.mark.slow
def test_a_block_runs_in_linen_through_the_bridge_with_the_same_output():
  config = dataclasses.replace(QUICK, d_model=16, n_heads=2, d_ff=32)
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nnx.bridge.ToLinen(tiny_lm.Block, args=(config,), name="block")(x)

  variables = Stack().init(jax.random.key(1), x)
  y_linen = Stack().apply(variables, x)
  block = tiny_lm.Block(config, rngs=nnx.Rngs(7))
  params = nnx.state(block, nnx.Param)
  nnx.replace_by_pure_dict(params, variables["params"]["block"])
  nnx.update(block, params)
  np.testing.assert_allclose(np.asarray(y_linen), np.asarray(block(x)), rtol=1e-6, atol=1e-6)
  assert variables["params"]["block"]["attn"]["q"]["kernel"].shape == (16, 16)


@pytest.mark.slow
def test_training_is_deterministic_and_the_checkpoint_round_trips(tmp_path):
  config = dataclasses.replace(QUICK, steps=4, warmup=1, d_model=32, d_ff=64)
  train_data, valid_data = tiny_lm.load_corpus()
  a = tiny_lm.train(config, train_data)
  b = tiny_lm.train(config, train_data)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(a, nnx.Param), nnx.state(b, nnx.Param))
  init = nnx.state(tiny_lm.init_model(config), nnx.Param)
  assert not np.array_equal(init["head"]["kernel"][...], nnx.state(a, nnx.Param)["head"]["kernel"][...])

  tiny_lm.save(a, tmp_path / "ckpt")
  c = tiny_lm.restore(config, tmp_path / "ckpt")
  jax.tree.map(np.testing.assert_array_equal, nnx.state(a, nnx.Param), nnx.state(c, nnx.Param))
  windows = tiny_lm.valid_windows(valid_data, config.seq_len + 1, 8)
  ppl = tiny_lm.perplexity(c, windows)
  # Against an independent computation: exp of the mean cross entropy, in float64 numpy.
  logits = np.asarray(c(jnp.asarray(windows[:, :-1])), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1).mean()
  assert ppl == pytest.approx(math.exp(nll), rel=1e-5)
  # A second load_or_train finds the checkpoint and does not train.
  model, info = tiny_lm.load_or_train(config, tmp_path / "ckpt")
  assert info["trained"] is False


@pytest.mark.slow
def test_quick_benchmark_json_and_robust_orderings(tmp_path):
  bench = benchmarks.load("lm_oneshot")
  out = json.loads(json.dumps(bench.main(quick=True, ckpt=str(tmp_path / "quick"))))
  keys = {
      "float", "w4_rtn", "w4_gptq", "w4_awq", "w3_rtn", "w3_gptq", "w3_awq", "w4_mxfp4", "w4_nvfp4",
      "w8a8_naive", "w8a8_smoothquant", "s50_magnitude", "s50_wanda", "s50_sparsegpt",
      "nm24_magnitude", "nm24_wanda", "nm24_sparsegpt", "lowrank50", "lowrank50_kd",
      "w4_mxfp4_gptq", "w4_nvfp4_gptq", "w3_gptq_lora", "nm24_sparsegpt_lora",
  }
  assert set(out["ppl"]) == keys and set(out["seconds"]) == keys
  assert set(out["targets"]) == {
      "w4_gptq_le_half_rtn", "w3_gptq_le_half_rtn", "s50_sparsegpt_le_half_magnitude",
      "s50_wanda_le_half_magnitude", "nm24_sparsegpt_le_half_magnitude",
      "nm24_wanda_le_half_magnitude", "kd_recovers_half_lowrank",
      "w3_gptq_lora_recovers", "nm24_sparsegpt_lora_recovers",
  }
  assert all(isinstance(v, bool) for v in out["targets"].values())
  ppl = out["ppl"]
  assert all(1.0 < v < 256.0 for v in ppl.values()), ppl
  assert out["checkpoint"]["trained"] is True
  # Orderings that hold at this size by a wide margin.
  up = lambda k: ppl[k] - ppl["float"]
  assert up("w3_gptq") < up("w3_rtn")
  assert up("s50_sparsegpt") < up("s50_magnitude")
  assert up("nm24_sparsegpt") < 0.5 * up("nm24_magnitude")
  assert 0 < up("lowrank50_kd") < 0.5 * up("lowrank50")
  assert abs(up("w8a8_naive")) < 0.02 * ppl["float"]
  assert up("nm24_sparsegpt_lora") < up("nm24_sparsegpt")


@pytest.mark.slow
def test_sequential_gptq_on_the_lm_sharded_over_8_devices_matches_one_device():
  from jax.sharding import NamedSharding, PartitionSpec

  from jaxcompress.oneshot.sequential import sequential

  config = dataclasses.replace(QUICK, d_model=32, d_ff=64, seq_len=16)
  model = tiny_lm.init_model(config)
  train_data, _ = tiny_lm.load_corpus()
  tokens = tiny_lm.random_windows(train_data, 16, config.seq_len, np.random.default_rng(0))
  batches = [jnp.asarray(tokens[:8]), jnp.asarray(tokens[8:])]
  group = jc.quant.PerGroup(size=16, axis=0)
  paths = []

  def gptq(path, kernel, x):
    paths.append(path)
    return jc.quant.dequantize(jc.quant.gptq(kernel, x, bits=3, granularity=group, path=path))

  plain = sequential(model, batches, gptq)
  mesh = jax.make_mesh((8,), ("data",))
  sharded = sequential(model, batches, gptq, sharding=NamedSharding(mesh, PartitionSpec("data")))
  names = ["attn/k", "attn/o", "attn/q", "attn/v", "mlp/down", "mlp/up"]
  assert paths[: len(paths) // 2] == [f"blocks/{i}/{n}/kernel" for i in range(config.n_layers) for n in names]
  # The Hessians are summed in another order across devices, which may flip the
  # rounding of a weight at a tie (and GPTQ then updates the rest of its column):
  # nearly every weight must agree.
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded)):
    agree = np.isclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert agree.mean() > 0.98, agree.mean()
  # Every block kernel is on the 3-bit grid of its group: at most 8 levels per group and column.
  k = np.asarray(plain["blocks"][1]["mlp"]["down"]["kernel"][...])
  assert max(len(np.unique(k[:16, j])) for j in range(k.shape[1])) <= 8

"""Int4 weights, int8 activations on the scikit-learn digits: PTQ against QAT.

A 64-128-64-10 ReLU MLP is trained in float. Then two ways to get int4 kernels
(symmetric; one scale per output channel, or one per tensor) with int8 layer
inputs (one scale per example, computed on the fly):

- PTQ: round-to-nearest int4 kernels of the trained float model
  (``jc.quant.quantize_params``) and int8 inputs (``jc.quant.quantize_inputs``),
  no training;
- QAT: the float model fine-tuned with the same quantization in the forward pass
  (``jc.quant.FakeQuant(bits=4)`` on the kernels through a ``jc.Spec``, int8
  inputs through ``quantize_inputs``), straight-through gradients; its kernels
  are then exported with the same round-to-nearest as PTQ (the result equals
  the int4 kernels the QAT forward pass used, up to float rounding).

Prints the data split and the test accuracy of the float, PTQ and QAT models,
per-channel and per-tensor, for three seeds (model init and batch order), and
the means.

Run: ``python examples/qat_digits.py`` (needs scikit-learn; about a minute on CPU).
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxcompress as jc
from jaxcompress import quant

SPLIT_SEED = 0
SEEDS = (0, 1, 2)
BATCH = 128
FLOAT_STEPS = 1500
QAT_STEPS = 1000
WEIGHT_BITS = 4
INPUT_BITS = 8
GRANULARITIES = {"per-channel": quant.PerChannel(), "per-tensor": quant.PerTensor()}


class MLP(nn.Module):
  features: tuple[int, ...] = (128, 64, 10)

  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(self.features):
      x = nn.Dense(f)(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


MODEL = MLP()
INPUTS = [quant.InputRule(pattern=r"Dense_\d+", bits=INPUT_BITS)]


def load_data():
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  return train_test_split(x, y, test_size=0.25, random_state=SPLIT_SEED, stratify=y)


def logits(params, x, quantized_inputs: bool):
  if not quantized_inputs:
    return MODEL.apply({"params": params}, x)
  with quant.quantize_inputs(INPUTS):
    return MODEL.apply({"params": params}, x)


def make_loss(quantized_inputs: bool):
  def loss_fn(params, batch):
    x, y = batch
    out = logits(params, x, quantized_inputs)
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

  return loss_fn


@jax.jit
def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(logits(params, x, False), -1) == y)


@jax.jit
def quantized_accuracy(params, x, y):
  return jnp.mean(jnp.argmax(logits(params, x, True), -1) == y)


def train(spec, params, loss_fn, x, y, steps, lr, seed):
  optimizer = optax.adam(lr)
  ts = jc.init_train_state(spec, optimizer, params)  # params stay valid: the state owns copies
  step = jc.make_train_step(loss_fn, spec, optimizer)
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(x), BATCH)
    ts, _ = step(ts, (x[idx], y[idx]))
  return ts


def run(seed, x_train, x_test, y_train, y_test) -> dict:
  params = MODEL.init(jax.random.key(seed), x_train[:1])["params"]

  # Float model.
  plain = jc.Spec([])
  ts = train(plain, params, make_loss(False), x_train, y_train, FLOAT_STEPS, 1e-3, seed)
  float_params = plain.apply(ts.trainable, ts.spec_state)
  out = {"float": float(accuracy(float_params, x_test, y_test))}

  for name, granularity in GRANULARITIES.items():

    def int4_kernels(p):
      q = quant.quantize_params(p, pattern=r".*kernel", bits=WEIGHT_BITS, granularity=granularity)
      return quant.dequantize_params(q)

    # PTQ: round-to-nearest int4 kernels of the float model, int8 inputs.
    out[f"ptq {name}"] = float(quantized_accuracy(int4_kernels(float_params), x_test, y_test))

    # QAT: fine-tune the float model with int4 fake-quantized kernels and int8 inputs,
    # then export its kernels with the same round-to-nearest as PTQ.
    spec = jc.Spec([jc.Rule(r".*kernel", [quant.FakeQuant(bits=WEIGHT_BITS, granularity=granularity)])])
    ts = train(spec, float_params, make_loss(True), x_train, y_train, QAT_STEPS, 1e-4, seed + 100)
    exported = int4_kernels(ts.trainable)
    seen = spec.apply(ts.trainable, ts.spec_state)  # what the QAT forward pass used
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(seen)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # equal up to float rounding
    out[f"qat {name}"] = float(quantized_accuracy(exported, x_test, y_test))
    # What it buys: the exported model with int4 kernels (packed two per byte).
    artifact = jc.export.export(spec, ts.trainable, ts.spec_state)
    out[f"stored bytes {name}"] = artifact.nbytes
    out["float32 bytes"] = artifact.float_nbytes
  return out


def main() -> dict:
  x_train, x_test, y_train, y_test = load_data()
  print(
      f"digits: {len(x_train)} train / {len(x_test)} test images, stratified split, "
      f"train_test_split(test_size=0.25, random_state={SPLIT_SEED})"
  )
  print(
      f"MLP 64-128-64-10; int{WEIGHT_BITS} kernels (symmetric, round to nearest), int{INPUT_BITS} "
      f"layer inputs (one scale per example); float: {FLOAT_STEPS} Adam steps, QAT: "
      f"{QAT_STEPS} fine-tuning steps from the float model"
  )
  results = []
  for seed in SEEDS:
    r = run(seed, x_train, x_test, y_train, y_test)
    results.append(r)
    print(f"seed {seed}: test accuracy " + "  ".join(f"{k} {v:.4f}" for k, v in r.items()))
  mean = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
  print(f"mean over {len(SEEDS)} seeds: " + "  ".join(
      f"{k} {v:.4f}" for k, v in mean.items() if "bytes" not in k))
  for name in GRANULARITIES:
    b = mean[f"stored bytes {name}"]
    print(f"int{WEIGHT_BITS} {name}: {mean['float32 bytes']:.0f} bytes float32 -> {b:.0f} bytes stored "
          f"({mean['float32 bytes'] / b:.1f}x smaller)")
  return mean


if __name__ == "__main__":
  print(json.dumps(main()))

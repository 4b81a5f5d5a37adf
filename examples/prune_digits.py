"""Gradual magnitude pruning of an MLP on the scikit-learn digits data, to 90% sparsity.

A 64-300-100-10 MLP (LeNet-300-100 on 8x8 digits) is trained dense, then its
kernels are pruned gradually with the cubic schedule of Zhu and Gupta (2017)
from 0% to 90% sparsity while training goes on, then fine-tuned with the masks
fixed. The train step keeps the pruned weights and their Adam moments at
exactly zero. Prints the data split, test accuracy before and after pruning,
the sparsity of every layer, the exported model's size table, and one JSON
line last with these figures.

Run: ``python examples/prune_digits.py`` (needs scikit-learn).
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

SEED = 0
BATCH = 128
DENSE_STEPS = 1500  # train dense first
PRUNE_END = 4500  # sparsity reaches its target here ...
TOTAL_STEPS = 6000  # ... then fine-tune with the masks fixed
TARGET_SPARSITY = 0.9
UPDATE_EVERY = 50  # recompute the masks every this many steps while pruning


class MLP(nn.Module):
  features: tuple[int, ...] = (300, 100, 10)

  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(self.features):
      x = nn.Dense(f)(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


def load_data():
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  return train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)


def main() -> dict:
  x_train, x_test, y_train, y_test = load_data()
  print(
      f"digits: {len(x_train)} train / {len(x_test)} test images, stratified split, "
      f"train_test_split(test_size=0.25, random_state={SEED})"
  )
  model = MLP()
  params = model.init(jax.random.key(SEED), x_train[:1])["params"]

  sparsity = jc.schedules.polynomial(
      0.0, TARGET_SPARSITY, begin_step=DENSE_STEPS, end_step=PRUNE_END, power=3.0
  )
  prune = jc.prune.magnitude(
      sparsity=sparsity, begin_step=DENSE_STEPS, end_step=PRUNE_END + 1, update_every=UPDATE_EVERY
  )
  spec = jc.Spec([jc.Rule(r".*kernel", [prune])])
  print(spec.describe(params))

  def loss_fn(p, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  optimizer = optax.adam(1e-3)  # the step keeps pruned weights and moments at 0
  ts = jc.init_train_state(spec, optimizer, params)
  step = jc.make_train_step(loss_fn, spec, optimizer)

  @jax.jit
  def accuracy(trainable, spec_state, x, y):
    logits = model.apply({"params": spec.apply(trainable, spec_state)}, x)
    return jnp.mean(jnp.argmax(logits, -1) == y)

  rng = np.random.default_rng(SEED)
  order = np.empty(0, np.int64)
  results = {}
  for i in range(TOTAL_STEPS):
    if i == DENSE_STEPS:
      results["dense_accuracy"] = float(accuracy(ts.trainable, ts.spec_state, x_test, y_test))
      print(f"step {i:5d}  test accuracy before pruning: {results['dense_accuracy']:.4f}")
    if order.size < BATCH:
      order = np.concatenate([order, rng.permutation(len(x_train))])
    idx, order = order[:BATCH], order[BATCH:]
    ts, metrics = step(ts, (x_train[idx], y_train[idx]))
    if (i + 1) % 1000 == 0:
      print(f"step {i + 1:5d}  loss {float(metrics['loss']):.4f}  target sparsity {float(sparsity(i)):.3f}")

  results["pruned_accuracy"] = float(accuracy(ts.trainable, ts.spec_state, x_test, y_test))
  print(f"test accuracy after pruning to {TARGET_SPARSITY:.0%}: {results['pruned_accuracy']:.4f}")

  pruned = spec.apply(ts.trainable, ts.spec_state)
  total = zeros = 0
  print("layer            shape        sparsity")
  for path, w in jax.tree_util.tree_flatten_with_path(pruned)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if name.endswith("kernel"):
      z = int(jnp.sum(w == 0))
      total, zeros = total + w.size, zeros + z
      print(f"{name:16s} {str(tuple(w.shape)):12s} {z / w.size:.4f}")
  results["kernel_sparsity"] = zeros / total
  print(f"all kernels                   {results['kernel_sparsity']:.4f}")

  # What pruning bought: the exported model stores only the kept weights and
  # their positions (a bit mask or relative indices, whichever is smaller).
  artifact = jc.export.export(spec, ts.trainable, ts.spec_state)
  print(artifact)
  results["float32_bytes"] = artifact.float_nbytes
  results["stored_bytes"] = artifact.nbytes
  results["size_ratio"] = round(artifact.float_nbytes / artifact.nbytes, 2)
  print(f"{artifact.float_nbytes} bytes float32 -> {artifact.nbytes} bytes stored: "
        f"{results['size_ratio']:.1f}x smaller (unstructured sparsity makes it smaller, "
        "not faster, on CPU)")
  return results


if __name__ == "__main__":
  print(json.dumps(main()))

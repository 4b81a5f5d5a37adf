"""Deep Compression of a digits classifier: prune, cluster, fine-tune, Huffman-code.

Han et al. (2016) store LeNet-300-100 40x smaller with no loss of accuracy by
pruning it, sharing its weights through k-means, fine-tuning the shared values
and entropy-coding what is left. The same pipeline with jaxcompress, on
scikit-learn's 8x8 digits and an MLP 64-300-100-10:

1. train the dense MLP;
2. one spec does the rest in one training loop: the kernels are pruned by
   magnitude on a cubic schedule, fine-tuned, then clustered into 32 shared
   values each (zeros stay zero); the biases into 16; the shared values
   (centroids) then train, each with the summed gradient of its weights;
3. ``jc.cluster.compressed_size`` says what the result costs to store.

Run: ``python examples/deep_compression_digits.py`` (about a minute on a CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxcompress as jc
import jaxcompress.cluster  # noqa: F401

PRUNE_STEPS, FINETUNE_STEPS, CENTROID_STEPS = 1500, 1000, 800


def mlp(params, x):
  for i in range(3):
    x = x @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
    x = jax.nn.relu(x) if i < 2 else x
  return x


def loss_fn(params, batch):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()


def accuracy(params, x, y):
  return float(jnp.mean(jnp.argmax(mlp(params, x), -1) == y))


def fit(spec, optimizer, params, data, steps, rng):
  x, y = data
  ts = jc.init_train_state(spec, optimizer, params)
  step = jc.make_train_step(loss_fn, spec, optimizer)
  for _ in range(steps):
    idx = rng.choice(len(x), 64, replace=False)
    ts, _ = step(ts, (jnp.asarray(x[idx]), jnp.asarray(y[idx])))
  return spec.apply(ts.trainable, ts.spec_state)


def main():
  digits = load_digits()
  x_train, x_test, y_train, y_test = train_test_split(
      (digits.data / 16).astype(np.float32), digits.target.astype(np.int32),
      test_size=0.25, random_state=0, stratify=digits.target,
  )
  rng = np.random.default_rng(0)
  keys = jax.random.split(jax.random.key(0), 3)
  sizes = (64, 300, 100, 10)
  params = {
      f"Dense_{i}": {
          "kernel": jax.random.normal(keys[i], (m, n)) * np.sqrt(2 / m),
          "bias": jnp.zeros(n),
      }
      for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:]))
  }

  # 1. The dense baseline (a spec with no rules changes nothing).
  dense = fit(jc.Spec([]), optax.adam(1e-3), params, (x_train, y_train), 1500, rng)
  print(f"dense test accuracy: {accuracy(dense, x_test, y_test):.4f}")

  # 2. Prune -> fine-tune -> cluster -> fine-tune the centroids.
  cluster_at = PRUNE_STEPS + FINETUNE_STEPS

  def prune(sparsity):
    schedule = jc.schedules.polynomial(0.0, sparsity, end_step=PRUNE_STEPS)
    return jc.prune.magnitude(sparsity=schedule, end_step=PRUNE_STEPS + 1)  # then frozen

  spec = jc.Spec([
      jc.Rule("Dense_0/kernel", [prune(0.90), jc.cluster.kmeans(bits=5, begin_step=cluster_at)]),
      jc.Rule("Dense_1/kernel", [prune(0.97), jc.cluster.kmeans(bits=5, begin_step=cluster_at)]),
      jc.Rule("Dense_2/kernel", [prune(0.85), jc.cluster.kmeans(bits=5, begin_step=cluster_at)]),
      jc.Rule(r".*/bias", [jc.cluster.kmeans(bits=4, begin_step=cluster_at)]),
  ])
  print(spec.describe(dense))
  lr = optax.piecewise_constant_schedule(1e-3, {cluster_at: 0.3})
  optimizer = jc.masked_optimizer(optax.adam(lr))  # pruned weights and moments stay 0
  steps = PRUNE_STEPS + FINETUNE_STEPS + CENTROID_STEPS
  compressed = fit(spec, optimizer, dense, (x_train, y_train), steps, rng)
  print(f"compressed test accuracy: {accuracy(compressed, x_test, y_test):.4f}")
  w = np.asarray(compressed["Dense_1"]["kernel"])
  print(f"Dense_1/kernel: {np.mean(w == 0):.1%} zeros, {np.unique(w[w != 0]).size} distinct nonzero values")

  # 3. What it costs to store: Huffman-coded indices and relative positions.
  report = jc.cluster.compressed_size(compressed, index_bits=5)
  print(report)
  print(f"{report.dense_bytes} bytes dense float32 -> {report.compressed_bytes} bytes: "
        f"{report.ratio:.1f}x smaller")


if __name__ == "__main__":
  main()

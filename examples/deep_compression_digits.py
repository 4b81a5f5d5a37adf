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
3. ``jc.export`` writes it as one safetensors file (Huffman-coded indices,
   relative positions of the kept weights), which loads back bit for bit.

Prints the accuracies and the size table, then one JSON line with the figures.

Run: ``python examples/deep_compression_digits.py`` (a few minutes on a CPU;
needs scikit-learn and safetensors: ``pip install -e ".[examples]"``).
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxcompress as jc

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
  return ts


def main() -> dict:
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
  dense = fit(jc.Spec([]), optax.adam(1e-3), params, (x_train, y_train), 1500, rng).trainable
  dense_acc = accuracy(dense, x_test, y_test)
  print(f"dense test accuracy: {dense_acc:.4f}")

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
  optimizer = optax.adam(lr)  # the step keeps pruned weights and their moments at 0
  steps = PRUNE_STEPS + FINETUNE_STEPS + CENTROID_STEPS
  ts = fit(spec, optimizer, dense, (x_train, y_train), steps, rng)
  compressed = spec.apply(ts.trainable, ts.spec_state)
  compressed_acc = accuracy(compressed, x_test, y_test)
  print(f"compressed test accuracy: {compressed_acc:.4f}")
  w = np.asarray(compressed["Dense_1"]["kernel"])
  print(f"Dense_1/kernel: {np.mean(w == 0):.1%} zeros, {np.unique(w[w != 0]).size} distinct nonzero values")

  # 3. The real file: export, save, load back and check it is the same model.
  artifact = jc.export.export(spec, ts.trainable, ts.spec_state, huffman=True)
  print(artifact)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "digits.safetensors")
    saved = jc.export.save(artifact, path)
    loaded = jc.export.decode(jc.export.load(path, like=dense))
  same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(compressed)))
  float_bytes = artifact.float_nbytes
  print(f"{float_bytes} bytes float32 -> {saved.nbytes} bytes on disk (manifest included): "
        f"{float_bytes / saved.nbytes:.1f}x smaller; loads back bit for bit: {same}")
  return {
      "example": "deep_compression_digits",
      "dense_accuracy": round(dense_acc, 4),
      "compressed_accuracy": round(compressed_acc, 4),
      "float32_bytes": float_bytes,
      "file_bytes": saved.nbytes,
      "size_ratio": round(float_bytes / saved.nbytes, 2),
      "loads_bit_exact": same,
  }


if __name__ == "__main__":
  print(json.dumps(main()))

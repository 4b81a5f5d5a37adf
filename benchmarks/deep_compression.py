"""Deep Compression on the digits data: prune, cluster, fine-tune, entropy-code.

An MLP 64-300-100-10 is trained on scikit-learn's digits (1797 real 8x8
handwritten digits), then compressed in one spec, in one training loop:

1. gradual magnitude pruning of the kernels (Zhu and Gupta's cubic schedule,
   per-layer final sparsities), with ``jc.masked_optimizer`` keeping pruned
   weights and their Adam moments at zero; the masks freeze at the end;
2. fine-tuning of the pruned network;
3. k-means weight sharing of every kernel and bias (the nonzero kernel
   weights only; linear centroid init), then fine-tuning of the centroids;
4. the stored size from ``jc.cluster.compressed_size``: Huffman-coded cluster
   indices, Huffman-coded relative indices with fillers, codebooks, tables;
5. the real file: ``jc.export`` (Huffman-coded) written as one safetensors
   file, against the float32 safetensors file of the same params.

Figures: ``ratio`` = dense float32 bytes of all params (kernels and biases)
over the stored bytes; ``disk_ratio`` = the float32 safetensors file's size
over the compressed file's size (headers and manifest included; target >= 40);
``accuracy_drop_pt`` = dense test accuracy minus compressed test accuracy, in
percentage points. Target: ratio >= 40 at a drop
<= 0.5 pt (Deep Compression: LeNet-300-100 on MNIST 40x, error 1.64% ->
1.58%). The split (stratified, ``random_state`` below) and the seeds are
printed in the JSON.

Run: ``python benchmarks/deep_compression.py`` (``--quick`` for a smoke run).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxcompress as jc
from _common import cross_entropy as loss_fn
from _common import cpu_info, init_mlp, mlp
import jaxcompress.cluster  # noqa: F401

SIZES = (64, 300, 100, 10)
SPLIT_SEED = 0
TEST_FRACTION = 0.25
BATCH = 64

# Final sparsity and codebook bits per layer (bits of the biases' codebooks too).
SPARSITY = {"Dense_0": 0.90, "Dense_1": 0.97, "Dense_2": 0.85}
KERNEL_BITS = 5
BIAS_BITS = 4
INDEX_BITS = 5  # relative index bits for sparse storage (Deep Compression: 5 for Dense)

# Steps of each phase.
FULL = {"dense": 1500, "prune": 1500, "pruned": 1000, "centroids": 800}
QUICK = {"dense": 150, "prune": 100, "pruned": 50, "centroids": 50}


def load_data():
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  return train_test_split(
      x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
  )


@jax.jit
def accuracy(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(mlp(params, x), -1) == y)


def batches(x: np.ndarray, y: np.ndarray, steps: int, rng: np.random.Generator):
  """``steps`` minibatches, reshuffled every epoch."""
  done = 0
  while done < steps:
    order = rng.permutation(len(x))
    for i in range(0, len(x) - BATCH + 1, BATCH):
      if done == steps:
        return
      idx = order[i : i + BATCH]
      yield jnp.asarray(x[idx]), jnp.asarray(y[idx])
      done += 1


def compression_spec(steps: dict) -> jc.Spec:
  """Prune (cubic ramp, then frozen masks) -> cluster at ``prune + pruned`` steps."""
  ramp_end = steps["prune"]
  cluster_at = steps["prune"] + steps["pruned"]
  rules = []
  for layer, sparsity in SPARSITY.items():
    prune = jc.prune.magnitude(
        sparsity=jc.schedules.polynomial(0.0, sparsity, begin_step=0, end_step=ramp_end),
        end_step=ramp_end + 1,
    )
    rules.append(
        jc.Rule(f"{layer}/kernel", [prune, jc.cluster.kmeans(bits=KERNEL_BITS, begin_step=cluster_at)])
    )
  rules.append(jc.Rule(r".*/bias", [jc.cluster.kmeans(bits=BIAS_BITS, begin_step=cluster_at)]))
  return jc.Spec(rules)


def train(loss, spec, opt, params, x, y, steps, rng):
  ts = jc.init_train_state(spec, opt, params)
  step = jc.make_train_step(loss, spec, opt)
  for batch in batches(x, y, steps, rng):
    ts, _ = step(ts, batch)
  return ts


def disk_sizes(spec: jc.Spec, trainable, state) -> dict:
  """Bytes of the model written to disk: compressed (``jc.export``, Huffman-coded,
  one safetensors file, manifest included) and as a float32 safetensors file."""
  from safetensors.numpy import save_file

  artifact = jc.export.export(spec, trainable, state, huffman=True)
  model = jc.export.decode(artifact)  # equal bit for bit to spec.apply (export checks it)
  with tempfile.TemporaryDirectory() as d:
    saved = jc.export.save(artifact, os.path.join(d, "model.safetensors"))
    dense = {
        jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v, np.float32)
        for p, v in jax.tree_util.tree_flatten_with_path(model)[0]
    }
    save_file(dense, os.path.join(d, "float32.safetensors"))
    float_bytes = os.path.getsize(os.path.join(d, "float32.safetensors"))
  return {"file_bytes": saved.nbytes, "file_overhead_bytes": saved.overhead,
          "float_file_bytes": float_bytes}


def run(quick: bool = False, seed: int = 0) -> dict:
  """The whole pipeline; ``seed`` sets the init and batch-order seeds (not the split)."""
  t0 = time.perf_counter()
  steps = QUICK if quick else FULL
  x_train, x_test, y_train, y_test = load_data()
  rng = np.random.default_rng(seed)
  params = init_mlp(jax.random.key(seed), SIZES, gain=2.0)

  # Dense baseline (an empty spec: every leaf passes through).
  dense_spec = jc.Spec([])
  ts = train(loss_fn, dense_spec, optax.adam(1e-3), params, x_train, y_train, steps["dense"], rng)
  dense = dense_spec.apply(ts.trainable, ts.spec_state)
  dense_acc = float(accuracy(dense, x_test, y_test))

  # Prune -> fine-tune -> cluster -> fine-tune centroids, one spec, one loop.
  spec = compression_spec(steps)
  total = steps["prune"] + steps["pruned"] + steps["centroids"]
  lr = optax.piecewise_constant_schedule(
      1e-3, {steps["prune"] + steps["pruned"]: 0.3}
  )
  opt = jc.masked_optimizer(optax.adam(lr))
  ts = train(loss_fn, spec, opt, dense, x_train, y_train, total, rng)
  model = spec.apply(ts.trainable, ts.spec_state)
  acc = float(accuracy(model, x_test, y_test))

  report = jc.cluster.compressed_size(model, index_bits=INDEX_BITS)
  disk = disk_sizes(spec, ts.trainable, ts.spec_state)
  kernels = [l for l in report.leaves if l.path.endswith("kernel")]
  weights = sum(l.size for l in kernels)
  result = {
      "ratio": round(report.ratio, 2),
      "disk_ratio": round(disk["float_file_bytes"] / disk["file_bytes"], 2),
      **disk,
      "accuracy_drop_pt": round(100 * (dense_acc - acc), 2),
      "dense_accuracy": round(dense_acc, 4),
      "compressed_accuracy": round(acc, 4),
      "dense_bytes": report.dense_bytes,
      "compressed_bytes": report.compressed_bytes,
      "kernel_sparsity": round(1 - sum(l.nonzeros for l in kernels) / weights, 4),
      "layer_sparsity": SPARSITY,
      "kernel_bits": KERNEL_BITS,
      "bias_bits": BIAS_BITS,
      "index_bits": INDEX_BITS,
      "split": {
          "data": "sklearn.datasets.load_digits",
          "train": len(x_train),
          "test": len(x_test),
          "stratified": True,
          "random_state": SPLIT_SEED,
      },
      "seeds": {"init": seed, "batches": seed},
      "steps": steps,
      "target_met": bool(report.ratio >= 40 and 100 * (dense_acc - acc) <= 0.5),
      "quick": quick,
      "seconds": round(time.perf_counter() - t0, 1),
  }
  return {"table": report.table(), **result}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a few steps per phase (smoke run)")
  parser.add_argument("--seed", type=int, default=0, help="init and batch-order seed")
  args = parser.parse_args()
  result = run(quick=args.quick, seed=args.seed)
  print(result.pop("table"))
  print(json.dumps({**result, **cpu_info()}))


if __name__ == "__main__":
  main()

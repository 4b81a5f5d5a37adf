"""Low-rank Dense: x (256, 4096) @ W (4096, 4096) against x @ U @ V at rank 1024, CPU.

W has a decaying spectrum, ``s_i = 1 / (i + 1)``, built as ``Q1 diag(s) Q2^T``
from random orthogonal ``Q1``, ``Q2`` (signed, permuted Hadamard matrices), so the optimal (Eckart-Young) error of
rank ``r`` is known in closed form: ``sqrt(sum_{i >= r} s_i**2 / sum_i s_i**2)``.
``jc.lowrank.svd(rank=1024)`` factorizes it through ``spec.init``, and the same
``flax.linen.Dense`` runs once on the dense kernel and once as ``x @ U @ V``
inside ``jc.lowrank.factorized_dense()`` (two matmuls, W never formed).

Figures (measured side by side in one process, jitted, calls interleaved,
medians after warm-up):

- ``speedup``: median dense time over median factorized time. Target >= 1.8x
  (the FLOP ratio is ``in * out / (r * (in + out)) = 2``).
- ``rel_error``: ``||x U V - x W||_F / ||x W||_F``.
- ``weight_rel_error``: ``||U V - W||_F / ||W||_F``, and ``optimal_rel_error``,
  the Eckart-Young optimum from the known spectrum; ``error_over_optimal`` is
  their ratio (1 means optimal).
- ``dense_ms``, ``factorized_ms``: the medians (CPU, for orientation).

Run: ``python benchmarks/lowrank.py`` (``--quick``: 512-wide, rank 128, a smoke
run). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxcompress as jc
from jaxcompress import lowrank
from _common import cpu_info, interleaved


def _random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
  """A random (n, n) orthogonal matrix, n a power of two: a signed, permuted Hadamard.

  Cheap to build (no QR of an n x n matrix), and exactly orthogonal.
  """
  if n & (n - 1):
    raise ValueError(f"n must be a power of two, got {n}.")
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  signs = rng.choice(np.array([-1.0, 1.0], np.float32), size=n)
  return h[rng.permutation(n)] * signs / np.float32(np.sqrt(n))


def decaying_kernel(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """An (n, n) float32 kernel with singular values 1 / (i + 1), and those values."""
  rng = np.random.default_rng(seed)
  q1, q2 = _random_orthogonal(n, rng), _random_orthogonal(n, rng)
  s = 1.0 / np.arange(1, n + 1, dtype=np.float64)
  w = (q1 * s.astype(np.float32)) @ q2.T
  return w.astype(np.float32), s


def main(quick: bool = False) -> dict:
  n, rank, batch = (512, 128, 64) if quick else (4096, 1024, 256)
  steps, warmup = (5, 2) if quick else (30, 5)
  w_np, s = decaying_kernel(n)
  x = jax.random.normal(jax.random.key(0), (batch, n), jnp.float32)

  model = nn.Dense(n, use_bias=False)
  params = {"kernel": jnp.asarray(w_np)}
  spec = jc.Spec([jc.Rule("kernel", [lowrank.svd(rank=rank)])])
  trainable, state = spec.init(params)
  fparams = lowrank.factorized_params(spec, trainable, state)

  dense_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))

  def factorized(p, x):
    with lowrank.factorized_dense():
      return model.apply({"params": p}, x)

  factorized_fn = jax.jit(factorized)

  y_dense = np.asarray(dense_fn(params, x), np.float64)
  y_fact = np.asarray(factorized_fn(fparams, x), np.float64)
  rel_error = float(np.linalg.norm(y_fact - y_dense) / np.linalg.norm(y_dense))
  w_r = np.asarray(spec.apply(trainable, state)["kernel"], np.float64)
  weight_rel_error = float(np.linalg.norm(w_r - w_np) / np.linalg.norm(w_np.astype(np.float64)))
  optimal = float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2)))

  medians = interleaved(
      {
          "dense": lambda: dense_fn(params, x).block_until_ready(),
          "factorized": lambda: factorized_fn(fparams, x).block_until_ready(),
      },
      steps=steps,
      warmup=warmup,
  )
  return {
      "shape": [batch, n, n],
      "rank": rank,
      "dense_ms": round(medians["dense"] * 1e3, 3),
      "factorized_ms": round(medians["factorized"] * 1e3, 3),
      "speedup": round(medians["dense"] / medians["factorized"], 3),
      "rel_error": round(rel_error, 6),
      "weight_rel_error": round(weight_rel_error, 6),
      "optimal_rel_error": round(optimal, 6),
      "error_over_optimal": round(weight_rel_error / optimal, 5),
      "steps": steps,
      "backend": jax.default_backend(),
  }


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a small, fast smoke run")
  args = parser.parse_args()
  print(json.dumps({**main(quick=args.quick), **cpu_info()}))

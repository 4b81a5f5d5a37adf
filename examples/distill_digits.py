"""Knowledge distillation on scikit-learn's digits: a narrow student learns from a wide teacher.

A wide teacher MLP (64-512-512-10, trained with dropout) is distilled into a
narrow student (64-64-10, 8x narrower, one hidden layer). The same student is
trained twice from the same initialization, on the same mini-batches, for the
same number of steps: once from the labels alone (cross entropy) and once with
``distillation_loss`` (Hinton et al., 2015: weight 0.95 on the soft targets at
temperature 8, 0.05 on the labels), inside ``make_distill_step``, which runs
the frozen teacher and the student in one jitted step.

Data: the 1797 8x8 digits of ``sklearn.datasets.load_digits``, pixels scaled to
[0, 1], split by a permutation drawn with ``numpy.random.default_rng(0)``: its
first 500 indices train, the other 1297 test. Hinton et al. report, on MNIST,
146 test errors for a student trained on labels and 74 with soft targets.

Run: ``python examples/distill_digits.py`` (about a minute or two on a laptop
CPU). It prints a table of test accuracies per seed and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import jaxcompress as jc
from jaxcompress import distill

TRAIN_SIZE = 500
SPLIT_SEED = 0
TEACHER = (64, 512, 512, 10)
STUDENT = (64, 64, 10)
BATCH = 64
TEACHER_STEPS, TEACHER_LR, DROPOUT = 1500, 1e-3, 0.5
STUDENT_STEPS, STUDENT_LR = 3000, 3e-3
TEMPERATURE, ALPHA = 8.0, 0.95


def load_split():
  x, y = load_digits(return_X_y=True)
  x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
  perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
  train, test = perm[:TRAIN_SIZE], perm[TRAIN_SIZE:]
  return (x[train], y[train]), (x[test], y[test])


def init_mlp(key: jax.Array, sizes) -> dict:
  keys = jax.random.split(key, len(sizes) - 1)
  return {
      f"Dense_{i}": {
          "kernel": jax.random.normal(k, (a, b), jnp.float32) * np.sqrt(2.0 / a),
          "bias": jnp.zeros((b,), jnp.float32),
      }
      for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
  }


def mlp(params: dict, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
  n = len(params)
  for i in range(n):
    x = x @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
    if i < n - 1:
      x = jax.nn.relu(x)
      if dropout_key is not None:
        dropout_key, sub = jax.random.split(dropout_key)
        keep = jax.random.bernoulli(sub, 1.0 - DROPOUT, x.shape)
        x = jnp.where(keep, x / (1.0 - DROPOUT), 0.0)
  return x


def batches(seed: int, n: int, steps: int) -> list[np.ndarray]:
  """Mini-batch indices: reshuffled every epoch, a fixed sequence per seed."""
  rng = np.random.default_rng(seed)
  out: list[np.ndarray] = []
  while len(out) < steps:
    perm = rng.permutation(n)
    out += [perm[i : i + BATCH] for i in range(0, n - BATCH + 1, BATCH)]
  return out[:steps]


def accuracy(params: dict, x: np.ndarray, y: np.ndarray) -> float:
  return float(np.mean(np.asarray(jnp.argmax(mlp(params, jnp.asarray(x)), -1)) == y))


def train_teacher(seed: int, train) -> dict:
  x, y = train
  spec, opt = jc.Spec([]), optax.adam(TEACHER_LR)

  def loss(p, batch):
    xb, yb, key = batch
    return optax.softmax_cross_entropy_with_integer_labels(mlp(p, xb, key), yb).mean()

  key_init, key_noise = jax.random.split(jax.random.key(1000 + seed))
  ts = jc.init_train_state(spec, opt, init_mlp(key_init, TEACHER))
  step = jc.make_train_step(loss, spec, opt)
  for i, idx in enumerate(batches(2000 + seed, len(x), TEACHER_STEPS)):
    ts, _ = step(ts, (x[idx], y[idx], jax.random.fold_in(key_noise, i)))
  return ts.trainable


def train_students(seed: int, train, teacher: dict) -> tuple[dict, dict]:
  """The same student from labels alone and with distillation: same init, batches, steps."""
  x, y = train
  spec, opt = jc.Spec([]), optax.adam(STUDENT_LR)

  def labels_loss(p, batch):
    xb, yb = batch
    return optax.softmax_cross_entropy_with_integer_labels(mlp(p, xb), yb).mean()

  def kd_loss(p, batch, teacher_logits, step):
    xb, yb = batch
    return distill.distillation_loss(
        mlp(p, xb), teacher_logits, yb, alpha=ALPHA, temperature=TEMPERATURE
    ).mean()

  init = init_mlp(jax.random.key(3000 + seed), STUDENT)
  labels_state = jc.init_train_state(spec, opt, jax.tree_util.tree_map(jnp.copy, init))
  kd_state = jc.init_train_state(spec, opt, jax.tree_util.tree_map(jnp.copy, init))
  labels_step = jc.make_train_step(labels_loss, spec, opt)
  kd_step = distill.make_distill_step(kd_loss, lambda p, batch: mlp(p, batch[0]), spec, opt)
  for idx in batches(4000 + seed, len(x), STUDENT_STEPS):
    batch = (x[idx], y[idx])
    labels_state, _ = labels_step(labels_state, batch)
    kd_state, _ = kd_step(kd_state, teacher, batch)
  return labels_state.trainable, kd_state.trainable


def forward_ms(params: dict, x: np.ndarray, repeats: int = 50) -> float:
  """Median time of one jitted forward pass over ``x``, in milliseconds."""
  f = jax.jit(mlp)
  f(params, x).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(params, x).block_until_ready()
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def nbytes(params: dict) -> int:
  return sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(params))


def main(seeds=(0, 1, 2)) -> dict:
  train, test = load_split()
  print(
      f"digits: {len(train[0])} train / {len(test[0])} test, split = permutation of "
      f"numpy.random.default_rng({SPLIT_SEED}), first {TRAIN_SIZE} train"
  )
  print(
      f"teacher {'-'.join(map(str, TEACHER))} (dropout {DROPOUT}, {TEACHER_STEPS} steps), student "
      f"{'-'.join(map(str, STUDENT))} ({STUDENT_STEPS} steps, batch {BATCH}, Adam {STUDENT_LR}), "
      f"distillation T={TEMPERATURE}, alpha={ALPHA}"
  )
  rows = []
  t0 = time.perf_counter()
  header = f"{'seed':>4}  {'teacher':>14}  {'student labels':>15}  {'student KD':>15}"
  print(header)
  n_test = len(test[0])
  for seed in seeds:
    teacher = train_teacher(seed, train)
    labels, kd = train_students(seed, train, teacher)
    accs = [accuracy(p, *test) for p in (teacher, labels, kd)]
    rows.append(accs)
    cells = [f"{a:.4f} ({round((1 - a) * n_test):>3} err)" for a in accs]
    print(f"{seed:>4}  {cells[0]:>14}  {cells[1]:>15}  {cells[2]:>15}", flush=True)
  teacher_acc, labels_acc, kd_acc = (list(c) for c in zip(*rows))
  wins = all(k > l for k, l in zip(kd_acc, labels_acc))
  print(
      f"mean   {np.mean(teacher_acc):.4f}          {np.mean(labels_acc):.4f}           "
      f"{np.mean(kd_acc):.4f}"
  )
  print(f"distilled student beats the labels-only student on every seed: {wins} "
        f"({time.perf_counter() - t0:.0f} s)")
  # What the smaller model buys: bytes and forward time over the test set,
  # timed side by side (medians), same batch.
  teacher_ms, student_ms = forward_ms(teacher, test[0]), forward_ms(kd, test[0])
  print(f"teacher {nbytes(teacher)} B, student {nbytes(kd)} B ({nbytes(teacher) / nbytes(kd):.1f}x "
        f"smaller); forward over the test set {teacher_ms:.3f} ms vs {student_ms:.3f} ms "
        f"({teacher_ms / student_ms:.1f}x faster)")
  return {
      "example": "distill_digits",
      "split": {"train": len(train[0]), "test": n_test, "seed": SPLIT_SEED},
      "teacher": list(TEACHER),
      "student": list(STUDENT),
      "temperature": TEMPERATURE,
      "alpha": ALPHA,
      "steps": STUDENT_STEPS,
      "seeds": list(seeds),
      "teacher_acc": [round(a, 4) for a in teacher_acc],
      "labels_acc": [round(a, 4) for a in labels_acc],
      "kd_acc": [round(a, 4) for a in kd_acc],
      "kd_wins_every_seed": wins,
      "teacher_bytes": nbytes(teacher),
      "student_bytes": nbytes(kd),
      "size_ratio": round(nbytes(teacher) / nbytes(kd), 2),
      "forward_speedup": round(teacher_ms / student_ms, 2),
  }


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  args = parser.parse_args()
  print(json.dumps(main(tuple(args.seeds))))

"""Distil the byte-level LM into a smaller one from cached teacher top-k logits.

The teacher is ``tiny_lm``'s model (trained and saved with Orbax by
``examples/tiny_lm.py``; trained here when its checkpoint is absent). Its top-k
next-byte logits over a fixed set of training windows are written once to disk
(``jc.distill.write_topk_cache``: values, indices and the full logsumexp, so
the student also learns the teacher's mass outside the k bytes). A student with
half the width and depth then trains for the same number of steps on the same
windows, in the same order, twice per seed:

- ``labels``: next-byte cross entropy only;
- ``kd``: ``(1 - alpha) * cross entropy + alpha * topk_distillation_loss``
  from the cache (``jc.distill``), at the cache's temperature.

The script prints one JSON line last: the validation perplexity of the teacher
and of each student run, their means, and ``kd_better_every_seed``.

Run: ``python examples/lm_distill.py`` (``--quick``: the tiny configuration,
fewer steps; used by the tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_lm  # noqa: E402

import jaxcompress as jc  # noqa: E402

SETTINGS = {
    # teacher config, student config, cached windows, student steps, seeds, k
    "full": dict(teacher="small", student=tiny_lm.LMConfig(d_model=64, n_layers=2, n_heads=2, d_ff=256,
                                                           steps=400, batch=32, lr=3e-3),
                 windows=4096, k=32, temperature=1.0, alpha=0.5, seeds=(0, 1, 2)),
    "quick": dict(teacher="quick", student=tiny_lm.LMConfig(d_model=32, n_layers=1, n_heads=2, d_ff=128,
                                                            seq_len=64, steps=150, batch=16, lr=3e-3),
                  windows=256, k=32, temperature=1.0, alpha=0.5, seeds=(0, 1, 2)),
}


def cache_teacher(teacher: tiny_lm.TinyLM, windows: np.ndarray, directory: str, *, k: int,
                  temperature: float) -> jc.distill.TopKCache:
  """The teacher's top-k logits at every position of ``windows[:, :-1]``, on disk."""
  graphdef, state = nnx.split(teacher)

  @jax.jit
  def logits(x):
    return nnx.merge(graphdef, state)(x)

  return jc.distill.write_topk_cache(directory, logits, windows[:, :-1], k=k,
                                     temperature=temperature, batch_size=64)


def train_student(config: tiny_lm.LMConfig, windows: np.ndarray, cache, *, alpha: float,
                  temperature: float, distil: bool) -> tiny_lm.TinyLM:
  """``config.steps`` steps on ``windows`` (batches drawn by ``config.seed``), with or without KD."""
  model = tiny_lm.init_model(config)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = tiny_lm.optimizer(config)
  opt_state = tx.init(params)

  def loss_fn(params, x, values, indices, lse):
    logits = nnx.merge(graphdef, params, rest)(x[:, :-1])
    ce = tiny_lm.next_byte_nll(logits, x).mean()
    if not distil:
      return ce
    kd = jc.distill.topk_distillation_loss(logits, values, indices, lse, temperature=temperature)
    return (1.0 - alpha) * ce + alpha * kd.mean()

  @jax.jit
  def step(params, opt_state, x, values, indices, lse):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, values, indices, lse)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(config.seed)
  for _ in range(config.steps):
    ids = np.sort(rng.choice(len(windows), config.batch, replace=False))
    params, opt_state, _ = step(params, opt_state, jnp.asarray(windows[ids]),
                                jnp.asarray(cache.values[ids]), jnp.asarray(cache.indices[ids]),
                                jnp.asarray(cache.logsumexp[ids]))
  return nnx.merge(graphdef, params, rest)


def run(quick: bool = False, ckpt: str | None = None) -> dict:
  s = SETTINGS["quick" if quick else "full"]
  teacher_config = tiny_lm.CONFIGS[s["teacher"]]
  student_base: tiny_lm.LMConfig = s["student"]
  student_base = dataclasses.replace(student_base, seq_len=teacher_config.seq_len)
  t0 = time.perf_counter()
  teacher, info = tiny_lm.load_or_train(teacher_config, ckpt)
  train_data, valid_data = tiny_lm.load_corpus()
  valid = tiny_lm.valid_windows(valid_data, teacher_config.seq_len + 1,
                                count=64 if quick else tiny_lm.VALID_WINDOWS)
  windows = tiny_lm.random_windows(train_data, s["windows"], teacher_config.seq_len + 1,
                                   np.random.default_rng(1234))
  out = {"teacher_ppl": round(tiny_lm.perplexity(teacher, valid), 4),
         "teacher_params": int(sum(x.size for x in jax.tree.leaves(nnx.state(teacher, nnx.Param))))}
  with tempfile.TemporaryDirectory() as d:
    t1 = time.perf_counter()
    cache = cache_teacher(teacher, windows, d, k=s["k"], temperature=s["temperature"])
    cache_seconds = time.perf_counter() - t1
    ppl = {"labels": [], "kd": []}
    for seed in s["seeds"]:
      config = dataclasses.replace(student_base, seed=seed)
      for mode in ("labels", "kd"):
        student = train_student(config, windows, cache, alpha=s["alpha"],
                                temperature=s["temperature"], distil=mode == "kd")
        ppl[mode].append(round(tiny_lm.perplexity(student, valid), 4))
    cache_bytes = sum(os.path.getsize(p) for p in pathlib.Path(d).iterdir())
  out.update({
      "student_params": int(sum(x.size for x in jax.tree.leaves(nnx.state(student, nnx.Param)))),
      "student_steps": student_base.steps,
      "ppl_labels": ppl["labels"],
      "ppl_kd": ppl["kd"],
      "mean_ppl_labels": round(float(np.mean(ppl["labels"])), 4),
      "mean_ppl_kd": round(float(np.mean(ppl["kd"])), 4),
      "kd_better_every_seed": all(k < l for k, l in zip(ppl["kd"], ppl["labels"])),
      "k": s["k"], "temperature": s["temperature"], "alpha": s["alpha"],
      "cache_bytes": int(cache_bytes), "cache_seconds": round(cache_seconds, 1),
      "teacher_trained_here": info["trained"],
      "seconds": round(time.perf_counter() - t0, 1),
      "backend": jax.default_backend(),
  })
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny teacher and student, few steps")
  parser.add_argument("--ckpt", default=None, help="the teacher's checkpoint folder")
  args = parser.parse_args()
  result = run(args.quick, args.ckpt)
  print(f"teacher ppl {result['teacher_ppl']}; student ppl, labels only {result['ppl_labels']}, "
        f"distilled {result['ppl_kd']}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()

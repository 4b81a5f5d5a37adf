"""Helpers shared by the benchmarks: a plain-JAX MLP and side-by-side timing.

The benchmarks import this module by name (``python benchmarks/NAME.py`` puts
this folder on ``sys.path``; the tests that run them do the same).
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def init_mlp(
    key: jax.Array, sizes: Sequence[int], *, gain: float = 1.0, bias_std: float = 0.0
) -> dict:
  """``{"Dense_i": {"kernel", "bias"}}`` for a ReLU MLP of layer ``sizes``.

  Kernels are normal with variance ``gain / fan_in`` (1: LeCun, 2: He); biases
  are zero, or normal with ``bias_std`` (small nonzero biases, as after
  training).
  """
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    kernel = jax.random.normal(sub, (fan_in, fan_out), jnp.float32) * np.sqrt(gain / fan_in)
    bias = jnp.zeros((fan_out,), jnp.float32)
    if bias_std:
      key, sub = jax.random.split(key)
      bias = bias_std * jax.random.normal(sub, (fan_out,), jnp.float32)
    params[f"Dense_{i}"] = {"kernel": kernel, "bias": bias}
  return params


def mlp(params: dict, x: jax.Array) -> jax.Array:
  """The ReLU MLP of ``init_mlp`` params (no activation after the last layer)."""
  n = len(params)
  for i in range(n):
    x = x @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def cross_entropy(params: dict, batch) -> jax.Array:
  """Mean softmax cross-entropy of the MLP on ``(x, integer labels)``."""
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()


def interleaved(runners: dict[str, Callable[[], Any]], steps: int, warmup: int) -> dict[str, float]:
  """Median seconds per call of each runner.

  Calls are interleaved round-robin, the order rotated every round so that no
  runner always runs right after the same other one.
  """
  for _ in range(warmup):
    for run in runners.values():
      run()
  names = list(runners)
  times: dict[str, list[float]] = {name: [] for name in names}
  for i in range(steps):
    for name in names[i % len(names) :] + names[: i % len(names)]:
      t0 = time.perf_counter()
      runners[name]()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def paired_times(
    runners: dict[str, Callable[[], Any]], rounds: int, block: int, warmup: int
) -> dict[str, list[float]]:
  """Mean seconds per call of each runner, one figure per round.

  Each round runs every runner in a shuffled order: one untimed call (so that
  a runner does not pay for the caches the previous one left), then ``block``
  timed calls, as in a training loop. Figures of one round were measured
  moments apart, so ratios within a round are fair even on a busy machine.
  """
  for _ in range(warmup):
    for run in runners.values():
      run()
  rng = random.Random(0)
  names = list(runners)
  per_call: dict[str, list[float]] = {name: [] for name in names}
  for _ in range(rounds):
    rng.shuffle(names)
    for name in names:
      runners[name]()
      t0 = time.perf_counter()
      for _ in range(block):
        runners[name]()
      per_call[name].append((time.perf_counter() - t0) / block)
  return per_call


def paired_ratios(
    runners: dict[str, Callable[[], Any]], baseline: str, rounds: int, block: int, warmup: int
) -> dict[str, float]:
  """Median over rounds of (runner time / baseline time) within the round (``paired_times``).

  The median over rounds drops the rounds another process disturbed.
  """
  per_call = paired_times(runners, rounds, block, warmup)
  base = per_call[baseline]
  return {
      name: statistics.median(t / b for t, b in zip(ts, base))
      for name, ts in per_call.items()
      if name != baseline
  }


def cpu_info() -> dict:
  """The CPU model and its int8-relevant instruction sets, from /proc/cpuinfo:
  int8 figures mean little without them (AVX2 only, AVX-512 VNNI, AMX)."""
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return {"cpu": "unknown", "flags": []}
  lines = text.splitlines()
  model = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), "unknown")
  flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
  wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "amx_tile")
  return {"cpu": model, "flags": [f for f in flags if f in wanted]}

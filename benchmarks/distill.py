"""Overhead of the distillation step over its parts, measured side by side.

``step_ratio`` = time of one jitted distillation step (frozen teacher forward,
student forward and backward, Adam update) over the sum of the times of its
parts run as separate jitted calls: the teacher forward alone plus the
student's ordinary train step (hard labels, same optimizer). Target <= 1.1.

Models: a wide teacher MLP 784-1024-1024-10 and a student 784-128-10, batch
256, float32, Adam; the loss is ``distillation_loss`` (alpha 0.5, T = 4).
``step_ratio_int8_teacher`` is the same with the teacher's kernels
fake-quantized to int8 inside the step (``teacher_spec``), over the same parts
with the quantized teacher forward.

Run: ``python benchmarks/distill.py`` (``--quick`` for a smoke run). The last
line printed is one JSON object. Each round runs the three parts in a shuffled
order, a block of calls each (``_common.paired_times``); the ratio is the
median over rounds. Absolute times are printed only on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcompress as jc
from jaxcompress import distill
from _common import cross_entropy as hard_loss
from _common import cpu_info, init_mlp, mlp, paired_times

BATCH = 256
TEACHER = (784, 1024, 1024, 10)
STUDENT = (784, 128, 10)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8Weights(jc.Stage):
  """Per-channel symmetric int8 fake quantization of a kernel."""

  name: ClassVar[str] = "int8"

  def apply(self, value, params, state):
    scale = jnp.max(jnp.abs(value), axis=0, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return (jnp.round(value / scale) * scale).astype(value.dtype)


def teacher_fn(params: dict, batch) -> jax.Array:
  return mlp(params, batch[0])


def kd_loss(params: dict, batch, teacher_logits, step) -> jax.Array:
  x, y = batch
  return distill.distillation_loss(mlp(params, x), teacher_logits, y, alpha=0.5, temperature=4.0).mean()


def measure(rounds: int, block: int, warmup: int, *, int8_teacher: bool, sizes=(TEACHER, STUDENT), batch=BATCH) -> dict:
  t_sizes, s_sizes = sizes
  rng = np.random.default_rng(0)
  data = (
      jnp.asarray(rng.normal(size=(batch, t_sizes[0])), jnp.float32),
      jnp.asarray(rng.integers(0, t_sizes[-1], size=batch), jnp.int32),
  )
  teacher_params = init_mlp(jax.random.key(1), t_sizes)
  teacher_spec = jc.Spec([jc.Rule(r".*kernel", [Int8Weights()])]) if int8_teacher else None
  teacher = jax.jit(teacher_spec.init)(teacher_params) if int8_teacher else teacher_params

  spec, opt = jc.Spec([]), optax.adam(1e-3)
  student_params = init_mlp(jax.random.key(2), s_sizes)
  fresh = lambda: jc.init_train_state(spec, opt, jax.tree_util.tree_map(jnp.copy, student_params))
  plain_step = jc.make_train_step(hard_loss, spec, opt)
  kd_step = distill.make_distill_step(kd_loss, teacher_fn, spec, opt, teacher_spec=teacher_spec)
  if int8_teacher:
    forward = jax.jit(lambda t, b: teacher_fn(teacher_spec.apply(*t), b))
  else:
    forward = jax.jit(teacher_fn)

  state = {"plain": fresh(), "kd": fresh()}

  def run_forward():
    forward(teacher, data).block_until_ready()

  def run_plain():
    state["plain"], m = plain_step(state["plain"], data)
    m["loss"].block_until_ready()

  def run_kd():
    state["kd"], m = kd_step(state["kd"], teacher, data)
    m["loss"].block_until_ready()

  t = paired_times({"forward": run_forward, "plain": run_plain, "kd": run_kd}, rounds, block, warmup)
  ratio = statistics.median(k / (f + p) for k, f, p in zip(t["kd"], t["forward"], t["plain"]))
  return {"ratio": ratio, "times": {name: statistics.median(v) for name, v in t.items()}}


def main(quick: bool = False) -> dict:
  rounds, block, warmup = (4, 2, 1) if quick else (40, 5, 5)
  sizes = ((784, 128, 128, 10), (784, 32, 10)) if quick else (TEACHER, STUDENT)
  plain = measure(rounds, block, warmup, int8_teacher=False, sizes=sizes)
  int8 = measure(rounds, block, warmup, int8_teacher=True, sizes=sizes)
  device = jax.devices()[0]
  result = {
      "benchmark": "distill",
      "step_ratio": round(plain["ratio"], 4),
      "step_ratio_int8_teacher": round(int8["ratio"], 4),
      "target": 1.1,
      "teacher": list(sizes[0]),
      "student": list(sizes[1]),
      "batch": BATCH,
      "steps_measured": rounds * block,
      "device": device.device_kind if device.platform == "gpu" else device.platform,
      "quick": quick,
  }
  if device.platform == "gpu":
    result["times_us"] = {k: round(v * 1e6, 1) for k, v in plain["times"].items()}
  return result


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small models, few steps (smoke run)")
  args = parser.parse_args()
  res = main(quick=args.quick)
  print(f"step time / (teacher forward + student step): {res['step_ratio']:.3f} "
        f"(int8 teacher: {res['step_ratio_int8_teacher']:.3f}; target <= {res['target']})")
  print(json.dumps({**res, **cpu_info()}))

"""Serving a compressed model on CPU: Dense layers on stored int8/int4 codes vs float32.

A 4096x4096 Dense layer and a 4096 -> 16384 -> 4096 MLP block (Flax linen,
ReLU) are quantized per output channel (``FakeQuant``, int8 or int4), exported
(``jc.export``), and run from the artifact with ``jc.export.compressed_dense``
(``serving_params``: the codes, never float weights), side by side in one
process with the float32 model (medians over rounds of paired timings,
``_common.paired_times``). Keys: ``b{B}_{mode}`` for the MLP block,
``layer_b{B}_{mode}`` for the layer; each figure is float32 time / compressed
time. Modes: ``w8`` and ``w4`` (weight-only: float activations, split into two
int8 limbs), ``w8a8`` (activations quantized per row to int8, int32
accumulation). The CPU model and its int8 features come from /proc/cpuinfo.

Targets: b1_w8 >= 1.0, b1_w4 >= 1.0, b16_w8a8 >= 2.0, b256_w8a8 >= 1.0, b16_w4 >= 1.5.

Run: ``python benchmarks/serve.py`` (``--quick``: 256-wide, two rounds). The
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxcompress as jc
from _common import cpu_info, paired_times

FULL = {"d": 4096, "ffn": 16384, "batches": (1, 4, 16, 256), "rounds": 20, "warmup": 2}
QUICK = {"d": 256, "ffn": 1024, "batches": (1, 16), "rounds": 2, "warmup": 1}
MODES = {"w8": (8, "float"), "w4": (4, "float"), "w8a8": (8, "int8")}
TARGETS = {"b1_w8": 1.0, "b1_w4": 1.0, "b16_w8a8": 2.0, "b256_w8a8": 1.0, "b16_w4": 1.5}


class Layer(nn.Module):
  d: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.d)(x)


class Block(nn.Module):
  d: int
  ffn: int

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(self.ffn)(x))
    return nn.Dense(self.d)(h)


def served(model, params, bits: int) -> dict:
  """Export ``params`` with every kernel fake-quantized to ``bits``; the serving params."""
  spec = jc.Spec([jc.Rule(r".*kernel", [jc.quant.FakeQuant(bits=bits)])])
  t, s = spec.init(params)
  return jc.export.serving_params(jc.export.export(spec, t, s))


def speedups(model, params, batches, rounds, warmup, prefix="") -> dict:
  float_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
  fns = {}
  for mode, (bits, activations) in MODES.items():
    sp = served(model, params, bits)

    def run(sp, x, activations=activations):
      with jc.export.compressed_dense(activations=activations):
        return model.apply({"params": sp}, x)

    fns[mode] = (jax.jit(run), sp)  # the codes are arguments, as the float params are
  out = {}
  for b in batches:
    x = jax.random.normal(jax.random.key(b), (b, params["Dense_0"]["kernel"].shape[0]))
    runners = {"float": lambda x=x: float_fn(params, x).block_until_ready()}
    for mode, (fn, sp) in fns.items():
      runners[mode] = lambda fn=fn, sp=sp, x=x: fn(sp, x).block_until_ready()
    per = paired_times(runners, rounds=rounds, block=1, warmup=warmup)
    for mode in fns:
      out[f"{prefix}b{b}_{mode}"] = round(
          statistics.median(f / t for f, t in zip(per["float"], per[mode])), 2
      )
  return out


def run(quick: bool = False) -> dict:
  t0 = time.perf_counter()
  cfg = QUICK if quick else FULL
  d, ffn = cfg["d"], cfg["ffn"]
  result = {}
  layer = Layer(d)
  lp = layer.init(jax.random.key(0), jnp.ones((1, d)))["params"]
  result.update(speedups(layer, lp, cfg["batches"], cfg["rounds"], cfg["warmup"], prefix="layer_"))
  del lp
  block = Block(d, ffn)
  bp = block.init(jax.random.key(1), jnp.ones((1, d)))["params"]
  result.update(speedups(block, bp, cfg["batches"], cfg["rounds"], cfg["warmup"]))
  met = {k: result[k] >= v for k, v in TARGETS.items() if k in result}
  return {
      **result,
      "targets_met": met,
      **cpu_info(),
      "d": d,
      "ffn": ffn,
      "rounds": cfg["rounds"],
      "quick": quick,
      "seconds": round(time.perf_counter() - t0, 1),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="256-wide, two rounds (smoke run)")
  args = parser.parse_args()
  print(json.dumps(run(quick=args.quick)))


if __name__ == "__main__":
  main()

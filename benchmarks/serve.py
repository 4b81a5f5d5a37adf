"""Serving a compressed model from its artifact: Dense layers on the stored codes vs float.

A 4096x4096 Dense layer and a 4096 -> 16384 -> 4096 MLP block (Flax linen,
ReLU) are compressed six ways, exported (``jc.export``), and run from the
artifact with ``jc.export.compressed_dense`` (``serving_params``: codes,
factors and codebooks, never float weights), side by side in one process with
the float model (medians over rounds of paired timings,
``_common.paired_times``). Modes:

- ``w8``: int8 per output channel, weight-only (float activations, split into
  two int8 limbs);
- ``w4``: int4 with one scale per group of 128 inputs, weight-only;
- ``w4_channel``: int4 per output channel, weight-only (no target; the int4
  unpacking without the per-group sums);
- ``w8a8``: int8 per channel, activations quantized per row to int8, int32
  accumulation;
- ``nm24_w8``: 2:4 pruning then int8 (the kept codes are scattered back into
  dense int8 codes on load: no sparse matmul unit on CPU);
- ``lowrank_w8``: rank-1024 SVD factors, each int8 (two int8 products).

Keys (MLP block; the layer's carry a ``layer_`` prefix): ``b{B}_{mode}`` is
float time / compressed time at batch ``B``; ``{mode}_bytes`` the kernels'
stored bytes (``float_bytes`` the float kernels'); ``{mode}_err`` the largest
output error against the float model on ``decode``'s params, over all
batches, relative to that output's largest magnitude. ``targets`` holds each
target, ``targets_met`` whether it is met, ``load`` the 1-minute load average
before and after (the timings are only as good as the machine was quiet).

Targets (CPU, float32): b1_w8 >= 1.0, b1_w4 >= 1.0, b16_w8a8 >= 2.0,
b256_w8a8 >= 1.0, b16_w4 >= 1.5. ``--gpu``: the same in bfloat16 on the
default accelerator, targets b1_w8 >= 1.8 and b1_w4 >= 3.0 over bfloat16
(``--gpu --quick`` runs small on whatever backend there is, as a smoke check).

``--gpu --pallas`` also times the Pallas kernel (``impl="pallas"``,
``jc.export.pallas_matmul``) on the ``w8``, ``w4`` and ``w4_channel``
artifacts beside the XLA path: ``pallas_b{B}_{mode}`` is bfloat16 float time /
Pallas time, ``pallas_{mode}_err`` its error as above (the layer's keys carry
the ``layer_`` prefix). On CPU (``--gpu --quick --pallas``) the kernel runs in
Pallas's interpreter: a smoke check of the keys, its times mean nothing.

Run: ``python benchmarks/serve.py`` (``--quick``: 256-wide, two rounds). The
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxcompress as jc
from _common import cpu_info, paired_times

FULL = {"d": 4096, "ffn": 16384, "rank": 1024, "group": 128, "batches": (1, 4, 16, 256), "rounds": 20,
        "warmup": 2}
QUICK = {"d": 256, "ffn": 1024, "rank": 64, "group": 32, "batches": (1, 16), "rounds": 2, "warmup": 1}
TARGETS = {"b1_w8": 1.0, "b1_w4": 1.0, "b16_w8a8": 2.0, "b256_w8a8": 1.0, "b16_w4": 1.5}
GPU_TARGETS = {"b1_w8": 1.8, "b1_w4": 3.0}
PALLAS_MODES = ("w8", "w4", "w4_channel")


def modes(cfg: dict) -> dict:
  """``{mode: (stages, activations)}``."""
  q8 = lambda: jc.quant.FakeQuant(bits=8)
  return {
      "w8": ([q8()], "float"),
      "w4": ([jc.quant.FakeQuant(bits=4, granularity=jc.quant.PerGroup(size=cfg["group"], axis=0))], "float"),
      "w4_channel": ([jc.quant.FakeQuant(bits=4)], "float"),
      "w8a8": ([q8()], "int8"),
      "nm24_w8": ([jc.prune.Prune(structure=jc.prune.NM(2, 4)), q8()], "float"),
      "lowrank_w8": ([jc.lowrank.svd(rank=cfg["rank"]), q8()], "float"),
  }


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


def exported(params, stages) -> jc.export.Artifact:
  """``params`` with every kernel compressed by ``stages``, exported."""
  spec = jc.Spec([jc.Rule(r".*kernel", stages)])
  t, s = spec.init(params)
  t, s = spec.update(t, s, 0)
  return jc.export.export(spec, t, s)


def kernel_bytes(artifact: jc.export.Artifact) -> int:
  return sum(r.nbytes for r in artifact.records if r.path.endswith("kernel"))


def measure(model, params, cfg: dict, dtype, prefix: str = "", pallas: bool = False) -> dict:
  """Speed-ups, bytes and errors of every mode for one model (and of the Pallas kernel, with ``pallas``)."""
  float_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
  d = params["Dense_0"]["kernel"].shape[0]
  xs = {b: jax.random.normal(jax.random.key(b), (b, d), jnp.float32).astype(dtype) for b in cfg["batches"]}
  out = {f"{prefix}float_bytes": sum(int(l["kernel"].nbytes) for l in params.values())}
  fns = {}
  artifacts = {}
  for mode, (stages, activations) in modes(cfg).items():
    names = tuple(repr(s) for s in stages)
    if names not in artifacts:  # w8 and w8a8 serve the same artifact
      artifacts = {names: exported(params, stages)}
    artifact = artifacts[names]
    served = jc.export.serving_params(artifact)

    def run(sp, x, activations=activations):
      with jc.export.compressed_dense(activations=activations):
        return model.apply({"params": sp}, x)

    fn = jax.jit(run)  # the codes are arguments, as the float params are
    timed = {mode: fn}
    if pallas and mode in PALLAS_MODES:
      interpret = jax.default_backend() == "cpu"  # --quick smoke run: Pallas's interpreter

      def run_pallas(sp, x):
        with jc.export.compressed_dense(impl="pallas", interpret=interpret):
          return model.apply({"params": sp}, x)

      timed[f"pallas_{mode}"] = jax.jit(run_pallas)
    decoded = jc.export.decode(artifact)
    errs = dict.fromkeys(timed, 0.0)
    for x in xs.values():
      want = np.asarray(float_fn(decoded, x), np.float64)
      for name, f in timed.items():
        got = np.asarray(f(served, x), np.float64)
        errs[name] = max(errs[name], float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)))
    del decoded
    out[f"{prefix}{mode}_bytes"] = kernel_bytes(artifact)
    for name, f in timed.items():
      out[f"{prefix}{name}_err"] = float(f"{errs[name]:.3g}")
      fns[name] = (f, served)
  for b, x in xs.items():
    runners = {"float": lambda x=x: float_fn(params, x).block_until_ready()}
    for mode, (fn, sp) in fns.items():
      runners[mode] = lambda fn=fn, sp=sp, x=x: fn(sp, x).block_until_ready()
    per = paired_times(runners, rounds=cfg["rounds"], block=1, warmup=cfg["warmup"])
    for mode in fns:
      key = f"pallas_b{b}_{mode[len('pallas_'):]}" if mode.startswith("pallas_") else f"b{b}_{mode}"
      out[f"{prefix}{key}"] = round(statistics.median(f / t for f, t in zip(per["float"], per[mode])), 2)
  return out


def run(quick: bool = False, gpu: bool = False, pallas: bool = False) -> dict:
  t0 = time.perf_counter()
  load0 = os.getloadavg()[0]
  cfg = QUICK if quick else FULL
  dtype = jnp.bfloat16 if gpu else jnp.float32
  d, ffn = cfg["d"], cfg["ffn"]
  result = {}
  cast = lambda p: jax.tree.map(lambda a: a.astype(dtype), p)
  layer = Layer(d)
  lp = cast(layer.init(jax.random.key(0), jnp.ones((1, d)))["params"])
  result.update(measure(layer, lp, cfg, dtype, prefix="layer_", pallas=pallas))
  del lp
  block = Block(d, ffn)
  bp = cast(block.init(jax.random.key(1), jnp.ones((1, d)))["params"])
  result.update(measure(block, bp, cfg, dtype, pallas=pallas))
  targets = GPU_TARGETS if gpu else TARGETS
  return {
      **result,
      "targets": targets,
      "targets_met": {k: result[k] >= v for k, v in targets.items() if k in result},
      "backend": jax.default_backend(),
      "dtype": jnp.dtype(dtype).name,
      **cpu_info(),
      "load": [round(load0, 1), round(os.getloadavg()[0], 1)],
      "d": d,
      "ffn": ffn,
      "rank": cfg["rank"],
      "group": cfg["group"],
      "rounds": cfg["rounds"],
      "quick": quick,
      **({"pallas": True} if pallas else {}),
      "seconds": round(time.perf_counter() - t0, 1),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="256-wide, two rounds (smoke run)")
  parser.add_argument("--gpu", action="store_true",
                      help="bfloat16 on the default accelerator (with --quick: any backend)")
  parser.add_argument("--pallas", action="store_true",
                      help="with --gpu: also time the Pallas kernel (interpreted on CPU, with --quick)")
  args = parser.parse_args()
  if args.pallas and not args.gpu:
    parser.error("--pallas times the Pallas GPU kernel in bfloat16: add --gpu (and --quick on CPU).")
  if args.gpu and not args.quick and jax.default_backend() == "cpu":
    parser.error("--gpu needs an accelerator (jax.default_backend() is 'cpu'); add --quick for a smoke run.")
  print(json.dumps(run(quick=args.quick, gpu=args.gpu, pallas=args.pallas)))


if __name__ == "__main__":
  main()

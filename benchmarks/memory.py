"""Peak per-device memory of compression on a kernel sharded 8 ways, from XLA's buffer assignment.

A ``4096 x 16384`` float32 kernel (256 MiB) is sharded over its output axis on
an 8-device mesh (``PartitionSpec(None, "model")``, Auto axes; 8 CPU devices
through ``XLA_FLAGS``): 32 MiB per device, the unit of every figure. For each
technique (magnitude pruning at 90%, int8 ``FakeQuant``, SVD low-rank at rank
512, 4-bit k-means clustering, QLoRA: an int4 ``FakeQuant`` base with rank-16
``LoRA`` adapters trained by ``jc.lowrank.adapters_only(adam)``) three
programs are compiled, never run:

- ``init``: ``jax.jit(spec.init, out_shardings=spec.shardings(...))``;
- ``step``: ``jc.make_train_step`` with Adam (QLoRA: Adam on the adapters) and the derived state shardings
  (state donated), loss ``mean((x @ W) ** 2)`` on a replicated batch of 16;
- ``update``: ``spec.update`` at a step that recomputes the masks (trainable
  and state donated, the gradient an argument), as inside the step.

Each figure is ``peak / params``, where ``peak = arguments + outputs - aliased
+ temporaries`` of the compiled per-device program
(``jitted.lower(...).compile().memory_analysis()``): every buffer XLA assigns
on one device, inputs (params, state, optimizer moments, batch, gradient) and
outputs included, donated outputs counted once. It is an upper bound on what
is live at once (temporaries of different phases may share space, which XLA's
figure already accounts for), and it excludes the runtime's own overhead.
``params`` is the kernel's own per-device bytes. The ``temp`` figures are the
temporaries alone, over the same unit.

``init_over_params``, ``step_over_params`` and ``update_over_params`` are the
worst case over the techniques; ``gathers`` lists the programs whose
temporaries reach the kernel's full (unsharded) size, i.e. that hold a
replicated dense copy somewhere. The same programs are measured on an
Explicit mesh (``explicit``) and with the kernel split over its input axis
instead (``row_sharded``, ``PartitionSpec("model", None)``, Auto axes).

Run: ``python benchmarks/memory.py`` (``--quick``: a 512 x 2048 kernel). The
last line printed is one JSON object.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import jaxcompress as jc  # noqa: E402
from _common import cpu_info  # noqa: E402

DEVICES = 8
BATCH = 16


def techniques(quick: bool) -> dict[str, jc.Stage]:
  return {
      "magnitude_prune": jc.prune.magnitude(sparsity=0.9),
      "int8_fake_quant": jc.quant.FakeQuant(bits=8),
      "svd_lowrank": jc.lowrank.svd(rank=64 if quick else 512),
      "kmeans_cluster": jc.cluster.kmeans(bits=4),
      "qlora": jc.Chain([jc.quant.FakeQuant(bits=4), jc.lowrank.LoRA(rank=16)]),
  }


def optimizer(name: str) -> optax.GradientTransformation:
  """Adam; for QLoRA, Adam on the adapters alone (no moments of the frozen base)."""
  return jc.lowrank.adapters_only(optax.adam(1e-3)) if name == "qlora" else optax.adam(1e-3)


def _loss(p, x):
  return jnp.mean((x @ p["kernel"]) ** 2)


def peak_bytes(compiled) -> tuple[int, int]:
  """``(peak, temporaries)`` in bytes of one device's compiled program."""
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return peak, m.temp_size_in_bytes


def measure(
    stage: jc.Stage, mesh, shape: tuple[int, int], opt: optax.GradientTransformation, spec_p: P = P(None, "model")
) -> dict[str, tuple[int, int]]:
  """Per-device bytes (peak and temporaries) of init, step and update for one stage.

  Every abstract input carries its sharding (on an Explicit mesh it is part
  of the type that the program is traced with).
  """
  spec = jc.Spec([jc.Rule("kernel", [stage])])
  p_sh = {"kernel": NamedSharding(mesh, spec_p)}
  params = {"kernel": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=p_sh["kernel"])}
  t_sh, s_sh = spec.shardings(params, p_sh)
  ts_sh = jc.train_state_shardings(spec, opt, params, p_sh)
  replicated = NamedSharding(mesh, P())

  def sharded(tree, shardings):
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )

  out = {}
  init = jax.jit(spec.init, in_shardings=(p_sh,), out_shardings=(t_sh, s_sh))
  out["init"] = peak_bytes(init.lower(params).compile())

  ts_abs = sharded(jax.eval_shape(lambda p: jc.init_train_state(spec, opt, p), params), ts_sh)
  x = jax.ShapeDtypeStruct((BATCH, shape[0]), jnp.float32, sharding=replicated)
  step = jc.make_train_step(_loss, spec, opt, state_shardings=ts_sh, batch_sharding=replicated)
  out["step"] = peak_bytes(step.lower(ts_abs, x).compile())

  def update(trainable, state, grads):
    return spec.update(trainable, state, jnp.int32(1), grads=grads)

  update_jit = jax.jit(
      update, in_shardings=(t_sh, s_sh, p_sh), out_shardings=(t_sh, s_sh), donate_argnums=(0, 1)
  )
  out["update"] = peak_bytes(update_jit.lower(ts_abs.trainable, ts_abs.spec_state, params).compile())
  return out


def _figures(stage_figures: dict, params_bytes: int) -> dict:
  row = {}
  for program, (peak, temp) in stage_figures.items():
    row[program] = round(peak / params_bytes, 3)
    row[f"{program}_temp"] = round(temp / params_bytes, 3)
  return row


def main(quick: bool = False) -> dict:
  shape = (512, 2048) if quick else (4096, 16384)
  if jax.device_count() < DEVICES:
    raise RuntimeError(
        f"benchmarks/memory.py needs {DEVICES} devices, found {jax.device_count()}: run it as a "
        "script (it sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts)."
    )
  params_bytes = shape[0] * shape[1] * 4 // DEVICES
  full_bytes = params_bytes * DEVICES
  out: dict = {}
  gathers = []
  t0 = time.perf_counter()
  layouts = (
      (AxisType.Auto, "per_technique", P(None, "model")),
      (AxisType.Explicit, "explicit", P(None, "model")),
      (AxisType.Auto, "row_sharded", P("model", None)),
  )
  for axis_type, key, spec_p in layouts:
    mesh = jax.make_mesh((DEVICES,), ("model",), axis_types=(axis_type,), devices=jax.devices()[:DEVICES])
    out[key] = {}
    with jax.set_mesh(mesh):
      for name, stage in techniques(quick).items():
        figures = measure(stage, mesh, shape, optimizer(name), spec_p)
        out[key][name] = _figures(figures, params_bytes)
        prefix = "" if key == "per_technique" else f"{key}."
        gathers += [f"{prefix}{name}.{p}" for p, (_, temp) in figures.items() if temp >= full_bytes]
  worst = {
      f"{program}_over_params": max(row[program] for row in out["per_technique"].values())
      for program in ("init", "step", "update")
  }
  return {
      "kernel": list(shape),
      "devices": DEVICES,
      "sharding": "P(None, 'model')",
      "params_bytes_per_device": params_bytes,
      **worst,
      **out,
      "gathers": gathers,
      "compile_s": round(time.perf_counter() - t0, 1),
      "backend": jax.default_backend(),
  }


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a 512 x 2048 kernel, for the test")
  args = parser.parse_args()
  print(json.dumps({**main(quick=args.quick), **cpu_info()}))

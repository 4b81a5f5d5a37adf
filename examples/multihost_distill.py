"""Distillation across processes: an FSDP teacher, a pruned int8 student, checkpoints, resume.

One command starts N local processes that form one JAX program through
``jax.distributed`` (CPU collectives through gloo), as N hosts would:

    python examples/multihost_distill.py --processes 2

(``--devices-per-process 4`` by default: 2 x 4 = 8 CPU devices.) The script
starts copies of itself with ``--process-id``; each copy:

1. joins the others (``jax.distributed.initialize``) and builds the global mesh
   ``(processes, devices-per-process)`` with axes ("data", "model") of type
   Auto, so the model code needs no sharding annotations;
2. loads scikit-learn's digits and feeds, for every global batch, only the rows
   its own devices hold (``jax.make_array_from_process_local_data``);
3. trains a wide teacher (64-512-512-10) with its kernels sharded over every
   device (FSDP) and the batch over "data";
4. distills it into a narrow student (64-64-10), data parallel, pruned
   gradually to 80% sparsity with int8 fake quantization, in
   ``jc.distill.make_distill_step`` (teacher FSDP, student replicated);
5. saves the student's whole train state halfway (``jc.checkpoint.save``,
   asynchronously: training goes on while it is written), and at the end
   restores it and runs the second half again: the resumed run ends bit for
   bit where the uninterrupted one did.

Process 0 prints one JSON line: test accuracies, the student's sparsity, and
whether the resumed run matched. Run with ``--processes 1`` for one process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

TEACHER, STUDENT = (64, 512, 512, 10), (64, 64, 10)
TRAIN_SIZE, BATCH = 1200, 64
TEACHER_STEPS, STUDENT_STEPS = 300, 400
TEMPERATURE, ALPHA, SPARSITY = 4.0, 0.9, 0.8


# ----------------------------------------------------------------------------
# The launcher: N copies of this script, one per process.
# ----------------------------------------------------------------------------


def launch(processes: int, devices: int, timeout: float) -> int:
  with socket.socket() as s:  # a free port for the coordinator
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = tempfile.mkdtemp(prefix="multihost_distill_")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  procs = [
      subprocess.Popen(
          [sys.executable, __file__, f"--process-id={i}", f"--processes={processes}",
           f"--port={port}", f"--workdir={workdir}"],
          env=env,
          stdout=None if i == 0 else subprocess.DEVNULL,  # process 0 reports
      )
      for i in range(processes)
  ]
  deadline = time.monotonic() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
    except subprocess.TimeoutExpired:
      codes.append(None)
  for p in procs:
    if p.poll() is None:
      p.kill()
  if any(c != 0 for c in codes):
    print(f"processes exited with {codes}", file=sys.stderr)
    return 1
  return 0


# ----------------------------------------------------------------------------
# One process.
# ----------------------------------------------------------------------------


def worker(process_id: int, processes: int, port: int, workdir: str) -> None:
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}", num_processes=processes, process_id=process_id
  )
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from sklearn.datasets import load_digits

  import jaxcompress as jc

  t0 = time.perf_counter()
  # Auto axes: the model code below has no sharding annotations (see docs/scaling.md).
  mesh = jax.make_mesh(
      (processes, jax.local_device_count()), ("data", "model"), axis_types=(AxisType.Auto,) * 2
  )
  all_devices = ("data", "model")
  batch_sh = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  # -- data: every process knows the split, but reads only its own rows --------
  x, y = load_digits(return_X_y=True)
  x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(x))
  train, test = perm[:TRAIN_SIZE], perm[TRAIN_SIZE:]

  def my_rows(n: int) -> slice:
    """The rows of a global batch of n that this process's devices hold."""
    index = batch_sh.addressable_devices_indices_map((n,)).values()
    return slice(min(i[0].indices(n)[0] for i in index), max(i[0].indices(n)[1] for i in index))

  def global_batch(ids: np.ndarray):
    local = ids[my_rows(len(ids))]  # a real pipeline would load only these examples
    return tuple(
        jax.make_array_from_process_local_data(batch_sh, a[local], (len(ids),) + a.shape[1:])
        for a in (x, y)
    )

  def batch_ids(seed: int, steps: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)  # the same sequence on every process
    return [np.sort(rng.choice(train, BATCH, replace=False)) for _ in range(steps)]

  def init_mlp(seed: int, sizes) -> dict:
    rng = np.random.default_rng(seed)
    return {
        f"Dense_{i}": {"kernel": (rng.normal(size=(a, b)) * np.sqrt(2.0 / a)).astype(np.float32),
                       "bias": np.zeros(b, np.float32)}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
    }

  def mlp(p, xb):
    n = len(p)
    for i in range(n):
      xb = xb @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
      xb = jax.nn.relu(xb) if i < n - 1 else xb
    return xb

  # -- the teacher: kernels split over every device (FSDP) ----------------------
  teacher0 = init_mlp(1, TEACHER)
  teacher_sh = jax.tree_util.tree_map(
      lambda a: NamedSharding(mesh, P(all_devices, None) if a.ndim == 2 else P()), teacher0
  )
  t_spec, t_opt = jc.Spec([]), optax.adam(1e-3)
  t_state_sh = jc.train_state_shardings(t_spec, t_opt, teacher0, teacher_sh)

  def ce_loss(p, batch):
    return optax.softmax_cross_entropy_with_integer_labels(mlp(p, batch[0]), batch[1]).mean()

  t_step = jc.make_train_step(ce_loss, t_spec, t_opt, state_shardings=t_state_sh, batch_sharding=batch_sh)
  ts = jax.jit(lambda p: jc.init_train_state(t_spec, t_opt, p), out_shardings=t_state_sh)(teacher0)
  for ids in batch_ids(1, TEACHER_STEPS):
    ts, _ = t_step(ts, global_batch(ids))
    # Wait for each step: on CPU, collectives of many queued steps across
    # processes (gloo) can hang (seen after ~450 queued steps, 4 devices each).
    jax.block_until_ready(ts)
  teacher = ts.trainable

  # -- the student: data parallel, pruned and int8, distilled -------------------
  spec = jc.Spec([
      jc.Rule(r"Dense_\d/kernel", [
          jc.prune.magnitude(sparsity=jc.schedules.polynomial(0.0, SPARSITY, begin_step=0,
                                                              end_step=STUDENT_STEPS // 2)),
          jc.quant.FakeQuant(bits=8),
      ])
  ])
  opt = optax.adam(3e-3)
  student0 = init_mlp(2, STUDENT)
  state_sh = jc.train_state_shardings(
      spec, opt, student0, jax.tree_util.tree_map(lambda _: replicated, student0)
  )

  def kd_loss(p, batch, teacher_logits, step):
    del step
    return jc.distill.distillation_loss(
        mlp(p, batch[0]), teacher_logits, batch[1], alpha=ALPHA, temperature=TEMPERATURE
    ).mean()

  step = jc.distill.make_distill_step(
      kd_loss, lambda tp, batch: mlp(tp, batch[0]), spec, opt,
      state_shardings=state_sh, teacher_shardings=teacher_sh, batch_sharding=batch_sh,
  )
  state = jax.jit(lambda p: jc.init_train_state(spec, opt, p), out_shardings=state_sh)(student0)
  schedule = batch_ids(2, STUDENT_STEPS)
  half = STUDENT_STEPS // 2
  ckpt = os.path.join(workdir, f"student_step_{half}")
  for i, ids in enumerate(schedule):
    if i == half:  # every process calls save; each writes its own shards
      pending = jc.checkpoint.save(ckpt, state, wait=False)
    state, _ = step(state, teacher, global_batch(ids))
    jax.block_until_ready(state)
  pending.wait()

  # -- resume from the checkpoint: the same end state, bit for bit --------------
  target = jax.eval_shape(lambda: jc.init_train_state(spec, opt, student0))
  resumed = jc.checkpoint.restore(ckpt, target, shardings=state_sh)
  for ids in schedule[half:]:
    resumed, _ = step(resumed, teacher, global_batch(ids))
    jax.block_until_ready(resumed)
  same = all(
      bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(resumed))
  )

  # -- report -------------------------------------------------------------------
  def accuracy(p) -> float:
    p = jax.device_put(p, replicated)  # small enough to hold whole on every device
    logits = jax.jit(mlp)(p, jax.device_put(x[test], replicated))
    return float(jnp.mean(jnp.argmax(logits, -1) == jax.device_put(y[test], replicated)))

  student = spec.apply(state.trainable, state.spec_state)
  kernels = [student[f"Dense_{i}"]["kernel"] for i in range(len(STUDENT) - 1)]
  result = {
      "processes": jax.process_count(),
      "devices": jax.device_count(),
      "mesh": dict(mesh.shape),
      "teacher_accuracy": round(accuracy(teacher), 4),
      "student_accuracy": round(accuracy(student), 4),
      "student_sparsity": round(float(sum(jnp.sum(k == 0) for k in kernels) / sum(k.size for k in kernels)), 4),
      "resumed_bit_identical": same,
      "seconds": round(time.perf_counter() - t0, 1),
  }
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
  jax.distributed.shutdown()
  if not same:
    sys.exit("the resumed run differs from the uninterrupted one")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=2, help="local processes to start")
  parser.add_argument("--devices-per-process", type=int, default=4, help="CPU devices of each")
  parser.add_argument("--timeout", type=float, default=900, help="seconds before the processes are stopped")
  parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.process_id is None:
    sys.exit(launch(args.processes, args.devices_per_process, args.timeout))
  worker(args.process_id, args.processes, args.port, args.workdir)


if __name__ == "__main__":
  main()

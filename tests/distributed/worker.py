"""One process of the multi-process tests: ``python -m tests.distributed.worker``.

Started by the tests (``tests/distributed/launch.py``) as one of ``--processes``
processes on localhost, each with 4 CPU devices (``XLA_FLAGS``, set by the
launcher before JAX starts). It joins the others through
``jax.distributed.initialize`` (CPU collectives through gloo), runs the
scenarios of ``tests/distributed/scenarios.py`` on the global mesh, and writes
their results to ``<out>/process_<id>.npz``.
"""

from __future__ import annotations

import argparse


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--processes", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--workdir", required=True, help="shared by the processes: checkpoints, caches")
  parser.add_argument("--out", required=True)
  parser.add_argument("--scenarios", default="", help="comma-separated; all by default")
  args = parser.parse_args()

  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{args.port}",
      num_processes=args.processes,
      process_id=args.process_id,
  )
  import numpy as np

  from tests.distributed import scenarios

  assert jax.process_count() == args.processes and jax.device_count() == 4 * args.processes
  mesh = scenarios.make_mesh()
  names = [s for s in args.scenarios.split(",") if s] or None
  results = scenarios.run_all(mesh, args.workdir, names)
  results["devices"] = np.array([[d.process_index for d in row] for row in mesh.devices])
  np.savez(f"{args.out}/process_{args.process_id}.npz", **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()

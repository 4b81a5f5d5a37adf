"""Runs ``tests/distributed/worker.py`` as N local processes and collects their results."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).parents[2]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker_env(devices: int) -> dict:
  """This environment, with ``devices`` CPU devices per process instead of the test's 8."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  return env


def run_workers(workdir: pathlib.Path, *, processes: int = 2, scenarios: str = "", timeout: float = 900) -> list[dict]:
  """Starts the processes, waits for all of them (killing all on a failure or the
  timeout), and returns each one's results as ``{name: array}``."""
  out = workdir / "results"
  out.mkdir(parents=True, exist_ok=True)
  port = free_port()
  procs, logs = [], []
  for i in range(processes):
    log = open(workdir / f"process_{i}.log", "w+")
    cmd = [sys.executable, "-m", "tests.distributed.worker", f"--process-id={i}", f"--processes={processes}",
           f"--port={port}", f"--workdir={workdir}", f"--out={out}", f"--scenarios={scenarios}"]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=worker_env(4), stdout=log, stderr=subprocess.STDOUT))
    logs.append(log)
  try:
    for p in procs:
      p.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
  if failed:
    tails = []
    for i, log in enumerate(logs):
      log.seek(0)
      tails.append(f"--- process {i} (exit {procs[i].returncode}) ---\n{log.read()[-4000:]}")
    raise RuntimeError(f"worker processes failed or timed out: {failed}\n" + "\n".join(tails))
  for log in logs:
    log.close()
  return [dict(np.load(out / f"process_{i}.npz")) for i in range(processes)]

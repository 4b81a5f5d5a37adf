"""Importing jaxcompress must not start a JAX backend (multi-process scripts
import it before ``jax.distributed.initialize``)."""

import os
import socket
import subprocess
import sys
import textwrap


def test_import_starts_no_backend_and_distributed_initialize_works():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = textwrap.dedent(f"""
      import jaxcompress
      import jax
      jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=1, process_id=0)
      assert jax.process_count() == 1
      jax.distributed.shutdown()
      print("ok")
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("ok")

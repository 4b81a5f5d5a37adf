import os

# Every test sees 8 CPU devices; this must happen before jax is imported. The
# tests' arrays are tiny, so compiling dominates their time: LLVM's
# optimization passes are turned off for them (about a fifth less suite time;
# numerics are XLA's either way). Benchmarks run without this conftest.
flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in flags:
  flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402,F401

"""benchmarks/lowrank.py runs in quick mode and reaches the Eckart-Young optimum."""

import numpy as np

from tests.benchmarks import load


def test_quick_run_reports_optimal_error():
  bench = load("lowrank")
  w, s = bench.decaying_kernel(64, seed=1)
  np.testing.assert_allclose(np.linalg.svd(w.astype(np.float64), compute_uv=False), s, rtol=1e-4, atol=1e-6)
  out = bench.main(quick=True)
  assert {"speedup", "rel_error", "dense_ms", "factorized_ms"} <= set(out)
  s = 1.0 / np.arange(1, 513)
  np.testing.assert_allclose(out["optimal_rel_error"], np.sqrt(np.sum(s[128:] ** 2) / np.sum(s**2)), rtol=1e-4)
  assert abs(out["error_over_optimal"] - 1.0) < 1e-3
  assert out["speedup"] > 0 and 0 < out["rel_error"] < 0.1

"""benchmarks/deep_compression.py runs in quick mode and counts its sizes consistently."""

import pytest

from tests.benchmarks import load


@pytest.mark.slow
def test_quick_run_reports_a_consistent_size_and_sparsity():
  out = load("deep_compression").run(quick=True, seed=0)
  assert out["split"] == {
      "data": "sklearn.datasets.load_digits", "train": 1347, "test": 450, "stratified": True,
      "random_state": 0,
  }
  # 64-300-100-10 in float32: (64*300 + 300 + 300*100 + 100 + 100*10 + 10) * 4 bytes.
  assert out["dense_bytes"] == 4 * (64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10)
  assert out["ratio"] == round(out["dense_bytes"] / out["compressed_bytes"], 2)
  assert out["layer_sparsity"] == {"Dense_0": 0.9, "Dense_1": 0.97, "Dense_2": 0.85}
  assert out["ratio"] > 30  # 5-bit indices and codes: far below 32 bits per kept weight
  assert 0.5 < out["compressed_accuracy"] <= 1.0

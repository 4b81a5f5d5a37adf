"""benchmarks/distill.py runs in quick mode and reports its ratios."""

import math

import pytest

from tests.benchmarks import load


@pytest.mark.slow
def test_quick_run_reports_step_ratios():
  out = load("distill").main(quick=True)
  assert out["benchmark"] == "distill" and out["quick"] is True
  for key in ("step_ratio", "step_ratio_int8_teacher"):
    assert math.isfinite(out[key]) and 0.2 < out[key] < 5.0, out

"""benchmarks/distill.py runs in quick mode and reports its ratios."""

import importlib.util
import math
import pathlib
import sys


def _load():
  path = pathlib.Path(__file__).parents[2] / "benchmarks" / "distill.py"
  spec = importlib.util.spec_from_file_location("distill_benchmark", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclass looks the module up while being built
  spec.loader.exec_module(module)
  return module


def test_quick_run_reports_step_ratios():
  out = _load().main(quick=True)
  assert out["benchmark"] == "distill" and out["quick"] is True
  for key in ("step_ratio", "step_ratio_int8_teacher"):
    assert math.isfinite(out[key]) and 0.2 < out[key] < 5.0, out

"""examples/multihost_distill.py runs as two processes from one command."""

import json
import pathlib
import subprocess
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).parents[2] / "examples" / "multihost_distill.py"


@pytest.mark.slow
def test_two_processes_distill_checkpoint_and_resume_bit_for_bit():
  out = subprocess.run(
      [sys.executable, str(EXAMPLE), "--processes=2", "--devices-per-process=4", "--timeout=600"],
      capture_output=True, text=True, timeout=900,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["processes"] == 2 and result["devices"] == 8
  assert result["mesh"] == {"data": 2, "model": 4}
  assert result["resumed_bit_identical"] is True
  assert result["student_sparsity"] == 0.8
  assert result["teacher_accuracy"] > 0.95 and result["student_accuracy"] > 0.85

"""The LM distillation example: a student distilled from cached teacher top-k logits."""

import importlib
import sys
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


@pytest.mark.slow
def test_distilled_student_beats_labels_only_at_equal_steps(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the teacher is trained afresh
  monkeypatch.syspath_prepend(str(EXAMPLES))
  lm_distill = importlib.import_module("lm_distill")
  out = lm_distill.run(quick=True)
  assert out["teacher_trained_here"]
  assert len(out["ppl_labels"]) == len(out["ppl_kd"]) == 3
  assert out["student_params"] < out["teacher_params"] / 2
  # The teacher is better than either student; distillation beats labels on average.
  assert out["teacher_ppl"] < min(out["ppl_kd"] + out["ppl_labels"])
  assert out["mean_ppl_kd"] < out["mean_ppl_labels"], out
  sys.modules.pop("lm_distill", None)

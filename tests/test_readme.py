"""README's quickstart runs as written."""

import pathlib
import re


def test_quickstart_runs(capsys):
  text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  quickstart = blocks[-1]
  exec(compile(quickstart, "README.md", "exec"), {})
  out = capsys.readouterr().out
  line = next(x for x in out.splitlines() if x.startswith("{'Dense_0'"))
  sparsities = eval(line)
  assert all(abs(s - 0.9) < 0.01 for s in sparsities.values())
  assert "total" in out  # the exported artifact's size table

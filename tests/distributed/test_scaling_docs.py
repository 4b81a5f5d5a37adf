"""The ``python`` blocks of docs/scaling.md run as written, in order, in one namespace.

(Its ``py`` blocks need several processes; ``examples/multihost_distill.py``
runs them, tested in ``test_example.py``.)
"""

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).parents[2] / "docs" / "scaling.md"


@pytest.mark.slow
def test_scaling_guide_runs():
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
  assert len(blocks) >= 5
  namespace: dict = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f"docs/scaling.md (python block {i})", "exec"), namespace)
  assert namespace["restored"].trainable["Dense_0"]["kernel"].sharding.mesh.shape == {"data": 4, "model": 2}

"""Loads a benchmark script (``benchmarks/NAME.py``) as a module, for the tests that run it."""

import importlib.util
import pathlib
import sys
from types import ModuleType

_DIR = pathlib.Path(__file__).parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
  """``benchmarks/<name>.py`` as a module; its folder goes on ``sys.path`` for ``_common``."""
  if str(_DIR) not in sys.path:
    sys.path.insert(0, str(_DIR))
  spec = importlib.util.spec_from_file_location(f"{name}_benchmark", _DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses (flax modules) look their module up
  spec.loader.exec_module(module)
  return module

"""Stage registry for the shared invariant suite (tests/test_invariants.py).

Each technique owns one module here with a ``CASES`` list; a new stage joins the
suite by one line in its technique's list.
"""

import dataclasses
from typing import Any, Callable

import jaxcompress as jc


@dataclasses.dataclass(frozen=True)
class Case:
  """One stage (or stage chain) checked by the invariant suite.

  Attributes:
    name: test id.
    stages: builds the stage list of the rule; the rule selects every kernel.
    needs_grads: pass gradients to spec.update.
    needs_key: pass a PRNG key to init and update.
    pattern: the rule's pattern over the standard params
      (``Dense_0/kernel`` (16, 32), ``Dense_1/kernel`` (32, 8), biases).
    stats: builds the stats passed to update, by leaf path (e.g. activation norms).
    trains: the trainable leaves that must get a non-zero gradient (a rule
      pattern over their paths, as ``jaxcompress.testing``'s ``where=``);
      ``None``: every one.
  """

  name: str
  stages: Callable[[], list[jc.Stage]]
  needs_grads: bool = False
  needs_key: bool = False
  pattern: Any = r".*kernel"
  stats: Callable[[], dict] | None = None
  trains: Any = None

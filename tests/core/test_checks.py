"""Integer settings are checked by one helper: numpy integers are ints, bools are not."""

import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.cluster.entropy import relative_index
from jaxcompress.core.checks import is_int, is_number


def test_is_int_and_is_number():
  assert is_int(3) and is_int(np.int64(3)) and is_int(np.uint8(3))
  assert not is_int(True) and not is_int(np.bool_(True)) and not is_int(3.0)
  assert is_number(np.float32(0.5)) and is_number(2) and not is_number(True)


@pytest.mark.parametrize(
    "build",
    [
        lambda v: jc.prune.RigL(sparsity=0.5, end_step=100, update_every=v),
        lambda v: jc.prune.Block((v, 2)),
        lambda v: jc.lowrank.Budget(v),
        lambda v: relative_index(np.array([1, 0, 1], bool), v),
        lambda v: jc.quant.InputRule(pattern="Dense_0", bits=v),
    ],
)
def test_numpy_integer_settings_are_accepted_and_bools_refused(build):
  build(np.int64(2))  # e.g. a value read from a numpy config array
  with pytest.raises((TypeError, ValueError)):
    build(True)

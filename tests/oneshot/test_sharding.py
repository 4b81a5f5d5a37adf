"""Sharded calibration inputs give the unsharded results; the functions under jax.jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxcompress as jc
from jaxcompress import oneshot
from tests.oneshot import cases

W = cases.kernel(64, 16)
X = cases.correlated(512, 64)


def sharded_x():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.device_put(jnp.asarray(X), NamedSharding(mesh, P("data", None)))


RUNS = {
    "wanda": lambda x: oneshot.wanda(jnp.asarray(W), x, sparsity=0.5),
    "sparsegpt": lambda x: oneshot.sparsegpt(jnp.asarray(W), x, n_m=(2, 4), bits=4, block_size=16),
    "awq": lambda x: oneshot.awq(jnp.asarray(W), x, bits=4, group_size=16, grid=5),
    "smoothquant": lambda x: oneshot.smoothquant(jnp.asarray(W), x),
    "w8a8_matmul": lambda x: oneshot.w8a8_matmul(x, jnp.asarray(W)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_sharded_inputs_give_the_same_result(name):
  xs = sharded_x()
  assert len(xs.sharding.device_set) == 8
  plain, sharded = RUNS[name](jnp.asarray(X)), RUNS[name](xs)
  leaves = jax.tree_util.tree_leaves(plain)
  for a, b in zip(leaves, jax.tree_util.tree_leaves(sharded)):
    if a.dtype == jnp.bool_:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-4, atol=1e-4)
  if name == "awq":
    assert isinstance(sharded.quantized, jc.quant.QArray)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_under_jit_gives_the_same_result(name):
  eager, jitted = RUNS[name](jnp.asarray(X)), jax.jit(RUNS[name])(jnp.asarray(X))
  for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_nan_calibration_input_under_jit_is_refused_at_run_time():
  x = jnp.asarray(X).at[7, 3].set(jnp.nan)
  with pytest.raises(Exception, match=r"blocks_1/kernel: non-finite calibration inputs would make the wanda "
                                      r"statistics non-finite"):
    jax.block_until_ready(jax.jit(lambda x: oneshot.wanda(jnp.asarray(W), x, sparsity=0.5,
                                                          path="blocks_1/kernel"))(x))

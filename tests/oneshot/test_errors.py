"""Every one-shot function refuses bad input before any work, naming the leaf path (fast)."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress import oneshot

W = jnp.ones((16, 4))
X = jnp.ones((8, 16))
P = "blocks_0/mlp/kernel"


def raises(exc, pattern, fn, *args, **kwargs):
  with pytest.raises(exc, match=pattern):
    fn(*args, path=P, **kwargs)


LAYER_FNS = [
    (oneshot.wanda, dict(sparsity=0.5)),
    (oneshot.sparsegpt, dict(sparsity=0.5)),
    (oneshot.awq, dict(group_size=8)),
    (oneshot.smoothquant, dict()),
]


@pytest.mark.parametrize("fn,kw", LAYER_FNS, ids=[f.__name__ for f, _ in LAYER_FNS])
def test_layer_inputs_are_checked(fn, kw):
  name = fn.__name__
  raises(ValueError, rf"{P}: {name} takes 2-D Dense kernels \(in, out\), got shape \(16,\)", fn, W[:, 0], X, **kw)
  raises(ValueError, rf"{P}: {name}: calibration inputs of shape \(8, 12\) do not fit the kernel \(16, 4\); "
         r"their last axis must be the kernel's input size 16", fn, W, X[:, :12], **kw)
  raises(ValueError, rf"{P}: {name}: calibration inputs of shape \(0, 16\) hold no sample", fn, W, X[:0], **kw)
  raises(TypeError, rf"{P}: {name}: the kernel has dtype int32", fn, W.astype(jnp.int32), X, **kw)
  raises(TypeError, rf"{P}: {name}: calibration inputs have dtype int32", fn, W, X.astype(jnp.int32), **kw)
  raises(ValueError, rf"{P}: 1 non-finite weight\(s\) \(first nan at index \(2, 1\)\) cannot be handled by {name}",
         fn, W.at[2, 1].set(jnp.nan), X, **kw)
  raises(ValueError, rf"{P}: 1 non-finite calibration input\(s\) \(first inf at index \(3, 0\)\)",
         fn, W, X.at[3, 0].set(jnp.inf), **kw)


@pytest.mark.parametrize("fn", [oneshot.magnitude, oneshot.wanda, oneshot.sparsegpt],
                         ids=lambda f: f.__name__)
def test_sparsity_patterns_are_checked(fn):
  args = (W,) if fn is oneshot.magnitude else (W, X)
  name = fn.__name__
  raises(ValueError, rf"{P}: {name}: give exactly one of sparsity= and n_m=, got sparsity=None and n_m=None",
         fn, *args)
  raises(ValueError, r"give exactly one of sparsity= and n_m=, got sparsity=0.5 and n_m=\(2, 4\)",
         fn, *args, sparsity=0.5, n_m=(2, 4))
  raises(ValueError, re.escape(f"{P}: {name}: sparsity must be a number in [0, 1), got 1.0."),
         fn, *args, sparsity=1.0)
  raises(ValueError, re.escape("sparsity must be a number in [0, 1), got -0.1."), fn, *args, sparsity=-0.1)
  raises(TypeError, r"sparsity must be a real number in \[0, 1\), got '0.5'", fn, *args, sparsity="0.5")
  raises(ValueError, re.escape(f"{P}: {name}: n of n_m must be an integer in [1, 4], got 5."),
         fn, *args, n_m=(5, 4))
  raises(ValueError, re.escape("n of n_m must be an integer in [1, 4], got 0."), fn, *args, n_m=(0, 4))
  raises(ValueError, re.escape(f"{P}: {name}: n_m=(2, 3) needs m to divide the kernel's input size 16"),
         fn, *args, n_m=(2, 3))
  raises(TypeError, r"n_m must be a pair \(n, m\) of ints", fn, *args, n_m=4)


def test_sparsegpt_settings_are_checked():
  raises(ValueError, rf"{P}: sparsegpt: bits=1 is not supported", oneshot.sparsegpt, W, X, sparsity=0.5, bits=1)
  raises(TypeError, rf"{P}: sparsegpt: bits must be an integer", oneshot.sparsegpt, W, X, sparsity=0.5, bits=4.0)
  raises(ValueError, r"granularity=PerTensor\(\) is given without bits=", oneshot.sparsegpt, W, X,
         sparsity=0.5, granularity=jc.quant.PerTensor())
  raises(ValueError, rf"{P}: PerGroup\(size=3\) does not divide axis 0 of size 16", oneshot.sparsegpt, W, X,
         sparsity=0.5, bits=4, granularity=jc.quant.PerGroup(size=3, axis=0))
  raises(ValueError, r"scales must be shared along the input axis; got granularity=PerChannel\(axis=0\)",
         oneshot.sparsegpt, W, X, sparsity=0.5, bits=4, granularity=jc.quant.PerChannel(axis=0))
  raises(ValueError, re.escape(f"{P}: sparsegpt: damp must be a number in [0, inf), got -0.01."),
         oneshot.sparsegpt, W, X, sparsity=0.5, damp=-0.01)
  raises(ValueError, re.escape("block_size must be an integer in [1, inf], got 0."), oneshot.sparsegpt, W, X,
         sparsity=0.5, block_size=0)


def test_awq_and_smoothquant_settings_are_checked():
  raises(ValueError, rf"{P}: awq: bits=9 is not supported", oneshot.awq, W, X, bits=9, group_size=8)
  raises(ValueError, rf"{P}: PerGroup\(size=128\) does not divide axis 0 of size 16 .*e\.g\. one of \[2, 4, 8, 16\]",
         oneshot.awq, W, X)
  raises(ValueError, re.escape(f"{P}: awq: grid must be an integer in [1, inf], got 0."), oneshot.awq, W, X,
         group_size=8, grid=0)
  raises(TypeError, rf"{P}: awq: clip must be True or False, got 1", oneshot.awq, W, X, group_size=8, clip=1)
  raises(ValueError, re.escape(f"{P}: smoothquant: alpha must be a number in [0, 1], got 1.5."),
         oneshot.smoothquant, W, X, alpha=1.5)
  raises(ValueError, rf"{P}: w8a8_matmul: inputs of shape \(8, 12\) do not fit the kernel \(16, 4\)",
         oneshot.w8a8_matmul, X[:, :12], W)
  raises(ValueError, rf"{P}: w8a8_matmul: input_scale of shape \(4,\) must be \(16,\)",
         oneshot.w8a8_matmul, X, W, input_scale=jnp.ones(4))


def test_magnitude_kernel_checks_and_result_type():
  raises(ValueError, rf"{P}: magnitude takes 2-D Dense kernels", oneshot.magnitude, jnp.ones((2, 2, 2)),
         sparsity=0.5)
  raises(TypeError, rf"{P}: magnitude: the kernel must be an array \(in, out\), got list", oneshot.magnitude,
         [[1.0]], sparsity=0.5)
  assert oneshot.Pruned._fields == ("kernel", "mask")
  assert oneshot.AWQResult._fields == ("kernel", "input_scale", "quantized")
  assert oneshot.Smoothed._fields == ("kernel", "input_scale")
  assert sorted(oneshot.__all__) == sorted(
      ["AWQResult", "Pruned", "Smoothed", "awq", "magnitude", "sequential", "smoothquant", "sparsegpt",
       "w8a8_matmul", "wanda"]
  )
  np.testing.assert_array_equal(W, np.ones((16, 4)))  # nothing was changed in place

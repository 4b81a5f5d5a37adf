"""Compressed inference for Flax NNX: ``nnx.Linear`` layers swapped on a copy of the model.

``serving_nnx(model, artifact)`` clones the model and, for each ``nnx.Linear``
whose kernel ``serving_kernel`` serves (integer codes per channel, tensor or
group, pruned codes, quantized or float low-rank factors, codebooks), puts a
``CompressedLinear`` in its place that computes ``compressed_matmul`` from the
served kernel; every other param of the copy takes its decoded value. The
model passed in is not changed, and the model code runs unchanged on the copy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress.core.modules import get_child, key_of, set_child
from jaxcompress.export import artifact as _art
from jaxcompress.export import inference as _inf


class CompressedKernel(nnx.Variable):
  """The served kernel of a ``CompressedLinear`` (stored codes, not trained)."""


class CompressedLinear(nnx.Module):
  """An NNX linear layer ``y = compressed_matmul(x, kernel) + bias`` from a served kernel.

  Args:
    kernel: an ``IntKernel``, ``LowRankKernel`` or ``CodebookKernel``.
    bias: ``(out,)`` or ``None``.
    activations: ``"float"`` (weight-only) or ``"int8"`` (w8a8).
    impl: ``"xla"`` (the default) or ``"pallas"`` (integer codes multiplied by
      a Pallas GPU kernel; see ``compressed_matmul``).
    interpret: with ``impl="pallas"``, run the kernel in Pallas's interpreter.
    dtype: the output dtype (``None``: the inputs' dtype promoted with float32).
    name: the layer's path, for error messages.

  Example:
    >>> import numpy as np, jax.numpy as jnp, jaxcompress as jc
    >>> k = jc.export.IntKernel.from_codes(np.ones((4, 2)), np.full((1, 2), 0.5), bits=8)
    >>> jc.export.CompressedLinear(k, jnp.zeros(2))(jnp.ones((1, 4))).tolist()
    [[2.0, 2.0]]
  """

  def __init__(
      self,
      kernel: _inf.ServedKernel,
      bias: jax.Array | None = None,
      *,
      activations: str = "float",
      impl: str = "xla",
      interpret: bool = False,
      dtype: Any = None,
      name: str = "CompressedLinear",
  ):
    if not _inf.is_served_kernel(kernel):
      raise TypeError(
          f"CompressedLinear {name!r}: kernel is a {type(kernel).__name__}; pass a served kernel "
          "(jc.export.serving_kernel of a stored leaf)."
      )
    _inf.check_activations(f"CompressedLinear {name!r}", activations)
    _inf.check_impl(f"CompressedLinear {name!r}", impl, activations, interpret)
    self.in_features, self.out_features = (int(d) for d in kernel.shape)
    if bias is not None and tuple(bias.shape) != (self.out_features,):
      raise ValueError(
          f"CompressedLinear {name!r}: bias of shape {tuple(bias.shape)} does not fit a kernel with "
          f"{self.out_features} outputs."
      )
    self.kernel = CompressedKernel(kernel)
    self.bias = nnx.Param(bias) if bias is not None else nnx.data(None)
    self.activations = activations
    self.impl = impl
    self.interpret = interpret
    self.dtype = dtype
    self.name = name

  @classmethod
  def from_linear(cls, linear: nnx.Linear, kernel: _inf.ServedKernel, *, activations: str = "float",
                  impl: str = "xla", interpret: bool = False, name: str = "CompressedLinear") -> "CompressedLinear":
    """A ``CompressedLinear`` with ``linear``'s bias and dtype.

    Args:
      linear: the ``nnx.Linear`` it replaces.
      kernel: the served kernel of its kernel.
      activations: ``"float"`` or ``"int8"``.
      impl: ``"xla"`` or ``"pallas"``.
      interpret: with ``impl="pallas"``, run the kernel in Pallas's interpreter.
      name: the layer's path, for error messages.

    Returns:
      The new layer.
    """
    _inf.check_fits(kernel, linear.in_features, linear.out_features, f"Linear {name!r}")
    bias = linear.bias[...] if linear.bias is not None else None
    return cls(kernel, bias, activations=activations, impl=impl, interpret=interpret, dtype=linear.dtype,
               name=name)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """``compressed_matmul(inputs, kernel) + bias`` over the last axis."""
    kernel = self.kernel.get_value()
    if inputs.shape[-1] != self.in_features:
      raise ValueError(
          f"CompressedLinear {self.name!r}: the stored kernel is ({self.in_features}, {self.out_features}) "
          f"(in, out) and does not fit inputs with {inputs.shape[-1]} features."
      )
    y = _inf.compressed_matmul(inputs, kernel, activations=self.activations, impl=self.impl,
                               interpret=self.interpret)
    dtype = self.dtype or jnp.result_type(inputs.dtype, jnp.float32)
    y = y.astype(dtype)
    if self.bias is not None:
      y = y + jnp.reshape(self.bias[...], (1,) * (y.ndim - 1) + (-1,)).astype(dtype)
    return y


def serving_nnx(model: nnx.Module, artifact: _art.Artifact, *, activations: str = "float", impl: str = "xla",
                interpret: bool = False) -> nnx.Module:
  """A copy of an NNX model whose ``nnx.Linear`` layers compute from the artifact's codes.

  Each ``nnx.Linear`` whose kernel ``serving_kernel`` serves becomes a
  ``CompressedLinear`` (its bias and dtype kept); every other param of the
  copy takes its decoded value. The model passed in is not changed.

  Args:
    model: the NNX model the artifact was exported from (the spec was
      initialised on ``nnx.split(model, nnx.Param, ...)`` params).
    artifact: from ``export`` or ``load(path, like=params)``.
    activations: ``"float"`` (weight-only) or ``"int8"`` (w8a8).
    impl: ``"xla"`` (the default) or ``"pallas"`` (integer codes multiplied by
      a Pallas GPU kernel; see ``compressed_matmul``).
    interpret: with ``impl="pallas"``, run the kernel in Pallas's interpreter.

  Returns:
    The new model.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(16, 8, rngs=nnx.Rngs(0)))
    >>> _, params, _ = nnx.split(model, nnx.Param, ...)
    >>> spec = jc.Spec([jc.Rule(r".*kernel", [jc.quant.FakeQuant(bits=4)])])
    >>> served = jc.export.serving_nnx(model, jc.export.export(spec, *spec.init(params)))
    >>> type(served.layers[0]).__name__, served(jnp.ones((2, 16))).shape
    ('CompressedLinear', (2, 8))
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"serving_nnx: model must be an nnx.Module, got {type(model).__name__}.")
  if not isinstance(artifact, _art.Artifact):
    raise TypeError(f"serving_nnx: expected a jc.export.Artifact, got {type(artifact).__name__}.")
  _inf.check_activations("serving_nnx", activations)
  _inf.check_impl("serving_nnx", impl, activations, interpret)
  new = nnx.clone(model)
  flat = jax.tree_util.tree_flatten_with_path(
      artifact.tree, is_leaf=lambda x: isinstance(x, _art.EncodedLeaf)
  )[0]
  swaps = []
  for kp, leaf in flat:
    if not isinstance(leaf, _art.EncodedLeaf):
      raise TypeError(f"serving_nnx: the artifact's tree holds a {type(leaf).__name__}, not stored leaves.")
    keys = [key_of(e) for e in kp]
    if keys and keys[-1] == "value":
      keys = keys[:-1]
    where = "/".join(map(str, keys))
    try:
      parent = new
      for k in keys[:-1]:
        parent = get_child(parent, k)
      var = get_child(parent, keys[-1])
    except (AttributeError, KeyError, IndexError, TypeError):
      var = None
    if not isinstance(var, nnx.Variable):
      raise ValueError(
          f"serving_nnx: the model has no variable at {where!r}; pass the model whose nnx.split "
          "params the artifact was exported from."
      )
    kernel = None
    if keys[-1] == "kernel" and isinstance(parent, nnx.Linear):
      kernel = _inf.serving_kernel(leaf)
    if kernel is not None:
      swaps.append((keys[:-1], parent, kernel))
      continue
    value = leaf.decode()
    if tuple(value.shape) != tuple(var.get_value().shape):
      raise ValueError(
          f"serving_nnx: leaf {where!r} is {tuple(value.shape)} in the artifact and "
          f"{tuple(var.get_value().shape)} in the model; pass the model the artifact was exported from."
      )
    var.set_value(value)
  for keys, linear, kernel in swaps:  # after the biases took their decoded values
    layer = CompressedLinear.from_linear(linear, kernel, activations=activations, impl=impl, interpret=interpret,
                                         name="/".join(map(str, keys)) or "<model>")
    if not keys:
      return layer  # the model is the Linear itself
    grand = new
    for k in keys[:-1]:
      grand = get_child(grand, k)
    set_child(grand, keys[-1], layer, "/".join(map(str, keys)))
  return new

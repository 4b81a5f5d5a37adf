"""Factorized inference: run Dense layers as ``x @ U @ V``, never forming ``W``.

``spec.apply`` multiplies the factors out, so that training runs the unchanged
model. For inference the two thin matmuls are cheaper: ``r * (in + out)``
multiply-adds per row instead of ``in * out``.

- Flax linen: ``factorized_params`` turns ``(trainable, state)`` into model
  params where each factorized Dense kernel is stored as ``kernel_u`` and
  ``kernel_v``; inside ``with factorized_dense():`` every ``nn.Dense`` that holds
  them computes ``(x @ kernel_u) @ kernel_v + bias`` (by
  ``flax.linen.intercept_methods``; the model code is unchanged).
- Flax NNX: ``factorize_nnx`` returns a copy of the model with each factorized
  ``nnx.Linear`` replaced by a ``LowRankLinear``.

Later stages of the rule (``quantize``) are applied to each factor first, so the
factors used are the ones ``spec.apply`` would have multiplied. Leaves that are
not 2-D SVD factors (Tucker-2 or conv kernels, other techniques) are
materialized as ``spec.apply`` gives them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from jax import lax

from jaxcompress.core.modules import get_child, key_of, set_child
from jaxcompress.core.spec import Compressed, LeafState, Spec
from jaxcompress.core.stage import materialize
from jaxcompress.lowrank.factors import Factors
from jaxcompress.lowrank.stage import SVD

PyTree = Any


def _leaf_values(spec: Spec, trainable: PyTree, state: PyTree):
  """``(key path, value, is_dense_factors)`` per leaf, and the tree's structure."""
  is_node = lambda x: isinstance(x, (Compressed, LeafState))
  flat, treedef = jax.tree_util.tree_flatten_with_path(trainable, is_leaf=is_node)
  states = treedef.flatten_up_to(state)
  values = treedef.flatten_up_to(spec.apply(trainable, state, materialize=False))
  out = []
  for (kp, _), s, v in zip(flat, states, values):
    is_dense = (
        bool(s.stages)
        and isinstance(spec.rules[s.rule].stages[0], SVD)
        and isinstance(v, Factors)
        and len(v.shape) == 2
    )
    out.append((kp, v if is_dense else materialize(v), is_dense))
  return out, treedef


def factorized_params(spec: Spec, trainable: PyTree, state: PyTree) -> dict:
  """Linen model params with each SVD-factorized Dense kernel kept as two factors.

  Where the spec factorizes a 2-D leaf named ``kernel`` with ``SVD``, the leaf is
  replaced by its siblings ``kernel_u (in, r)`` and ``kernel_v (r, out)`` (the
  factors after the rule's later stages). Every other leaf is what
  ``spec.apply`` gives. Run the model inside ``with factorized_dense():``.

  Args:
    spec: the spec.
    trainable, state: from ``spec.init`` or ``spec.update``; the params must be
      nested mappings (Flax linen params).

  Returns:
    A nested ``dict`` of params.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxcompress as jc
    >>> model = nn.Dense(8)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 16)))["params"]
    >>> spec = jc.Spec([jc.Rule("kernel", [jc.lowrank.svd(rank=4)])])
    >>> fparams = jc.lowrank.factorized_params(spec, *spec.init(params))
    >>> sorted(fparams), fparams["kernel_u"].shape
    (['bias', 'kernel_u', 'kernel_v'], (16, 4))
  """
  values, treedef = _leaf_values(spec, trainable, state)
  leaves = [v for _, v, _ in values]
  tree = treedef.unflatten(leaves)

  def expand(node: Any) -> Any:
    if isinstance(node, Mapping):
      out = {}
      for k, v in node.items():
        if isinstance(v, Factors) and k == "kernel":
          out["kernel_u"], out["kernel_v"] = v.u, v.v
        else:
          out[k] = expand(v)
      return out
    if isinstance(node, Factors):
      return node.materialize()
    if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
      return type(node)(expand(v) for v in node)
    return node

  return expand(tree)


def _factorized_dense_call(module: nn.Dense, inputs: jax.Array) -> jax.Array:
  u = module.get_variable("params", "kernel_u")
  v = module.get_variable("params", "kernel_v")
  bias = module.get_variable("params", "bias") if module.use_bias else None
  if u.shape[0] != inputs.shape[-1] or v.shape[1] != module.features:
    raise ValueError(
        f"Dense {module.path}: kernel_u {u.shape} and kernel_v {v.shape} do not fit inputs "
        f"with {inputs.shape[-1]} features and features={module.features}."
    )
  if module.dot_general_cls is not None:
    raise TypeError(
        f"Dense {module.path} has dot_general_cls={module.dot_general_cls!r}; factorized "
        "compute supports Dense with dot_general (or the default) only."
    )
  inputs, u, v, bias = module.promote_dtype(inputs, u, v, bias, dtype=module.dtype)
  dot_general = module.dot_general if module.dot_general is not None else lax.dot_general
  dims = (((inputs.ndim - 1,), (0,)), ((), ()))
  h = dot_general(inputs, u, dims, precision=module.precision)
  y = dot_general(h, v, (((h.ndim - 1,), (0,)), ((), ())), precision=module.precision)
  if bias is not None:
    y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return y


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  if (
      context.method_name == "__call__"
      and isinstance(module, nn.Dense)
      and module.scope is not None
      and module.has_variable("params", "kernel_u")
  ):
    return _factorized_dense_call(module, *args, **kwargs)
  return next_fun(*args, **kwargs)


@contextlib.contextmanager
def factorized_dense() -> Iterator[None]:
  """Within this context, ``nn.Dense`` layers holding ``kernel_u``/``kernel_v`` run as ``x @ U @ V``.

  A Dense whose params hold ``kernel_u (in, r)`` and ``kernel_v (r, out)`` (as
  ``factorized_params`` writes them) computes ``(x @ kernel_u) @ kernel_v +
  bias`` with its own dtype, precision and ``dot_general``; every other module
  runs as usual. Uses ``flax.linen.intercept_methods``; nothing global is patched.

  Returns:
    A context manager.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxcompress as jc
    >>> model = nn.Dense(8)
    >>> x = jnp.ones((2, 16))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> spec = jc.Spec([jc.Rule("kernel", [jc.lowrank.svd(rank=8)])])  # full rank
    >>> fparams = jc.lowrank.factorized_params(spec, *spec.init(params))
    >>> with jc.lowrank.factorized_dense():
    ...   y = model.apply({"params": fparams}, x)
    >>> bool(jnp.allclose(y, model.apply({"params": params}, x), atol=1e-4))
    True
  """
  with nn.intercept_methods(_interceptor):
    yield


class LowRankLinear(nnx.Module):
  """An NNX linear layer ``y = (x @ kernel_u) @ kernel_v + bias``.

  Args:
    kernel_u: ``(in, r)``.
    kernel_v: ``(r, out)``.
    bias: ``(out,)`` or ``None``.
    dtype: the computation dtype (``None``: inferred, as ``nnx.Linear``).
    precision: passed to ``dot_general``.
    dot_general: the matmul, ``jax.lax.dot_general`` by default.
    promote_dtype: the dtype promotion function, as ``nnx.Linear``'s.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> layer = jc.lowrank.LowRankLinear(jnp.ones((4, 1)), jnp.ones((1, 2)), jnp.zeros(2))
    >>> layer(jnp.ones((3, 4))).tolist()
    [[4.0, 4.0], [4.0, 4.0], [4.0, 4.0]]
  """

  def __init__(
      self,
      kernel_u: jax.Array,
      kernel_v: jax.Array,
      bias: jax.Array | None = None,
      *,
      dtype: Any = None,
      precision: Any = None,
      dot_general: Any = lax.dot_general,
      promote_dtype: Any = nnx_dtypes.promote_dtype,
  ):
    if kernel_u.ndim != 2 or kernel_v.ndim != 2 or kernel_u.shape[1] != kernel_v.shape[0]:
      raise ValueError(
          f"LowRankLinear: kernel_u {kernel_u.shape} and kernel_v {kernel_v.shape} must be "
          "(in, r) and (r, out)."
      )
    self.kernel_u = nnx.Param(kernel_u)
    self.kernel_v = nnx.Param(kernel_v)
    self.bias = nnx.Param(bias) if bias is not None else nnx.data(None)
    self.dtype = dtype
    self.precision = precision
    self.dot_general = dot_general
    self.promote_dtype = promote_dtype

  @classmethod
  def from_linear(cls, linear: nnx.Linear, kernel_u: jax.Array, kernel_v: jax.Array) -> "LowRankLinear":
    """A ``LowRankLinear`` with ``linear``'s bias, dtype and matmul settings.

    Args:
      linear: the ``nnx.Linear`` it replaces.
      kernel_u, kernel_v: the factors of its kernel.

    Returns:
      The new layer.

    Example:
      >>> import jax.numpy as jnp, jaxcompress as jc
      >>> from flax import nnx
      >>> lin = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
      >>> jc.lowrank.LowRankLinear.from_linear(lin, jnp.ones((4, 1)), jnp.ones((1, 2))).kernel_u.shape
      (4, 1)
    """
    if linear.preferred_element_type is not None:
      raise TypeError(
          "LowRankLinear: preferred_element_type on the nnx.Linear is not supported; "
          "set dtype instead."
      )
    bias = linear.bias[...] if linear.bias is not None else None
    return cls(
        kernel_u,
        kernel_v,
        bias,
        dtype=linear.dtype,
        precision=linear.precision,
        dot_general=linear.dot_general,
        promote_dtype=linear.promote_dtype,
    )

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """``(inputs @ kernel_u) @ kernel_v + bias`` over the last axis."""
    u, v = self.kernel_u[...], self.kernel_v[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, u, v, bias = self.promote_dtype((inputs, u, v, bias), dtype=self.dtype)
    h = self.dot_general(inputs, u, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    y = self.dot_general(h, v, (((h.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def factorize_nnx(model: nnx.Module, spec: Spec, trainable: PyTree, state: PyTree) -> nnx.Module:
  """A copy of an NNX model with the spec applied and factorized ``Linear`` layers swapped.

  Each ``nnx.Linear`` whose kernel the spec factorizes with ``SVD`` becomes a
  ``LowRankLinear`` holding the factors (after the rule's later stages); every
  other param takes the value ``spec.apply`` gives. The model passed in is not
  changed.

  Args:
    model: the NNX model whose ``nnx.split(model, nnx.Param, ...)`` params the
      spec was initialised on.
    spec: the spec.
    trainable, state: from ``spec.init`` or ``spec.update``.

  Returns:
    The new model.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(16, 8, rngs=nnx.Rngs(0)))
    >>> _, params, _ = nnx.split(model, nnx.Param, ...)
    >>> spec = jc.Spec([jc.Rule(r".*kernel", [jc.lowrank.svd(rank=4)])])
    >>> fast = jc.lowrank.factorize_nnx(model, spec, *spec.init(params))
    >>> type(fast.layers[0]).__name__, fast(jnp.ones((2, 16))).shape
    ('LowRankLinear', (2, 8))
  """
  values, _ = _leaf_values(spec, trainable, state)
  new = nnx.clone(model)
  for kp, value, is_dense in values:
    keys = [key_of(e) for e in kp]
    if keys and keys[-1] == "value":
      keys = keys[:-1]
    parent = new
    for k in keys[:-1]:
      parent = get_child(parent, k)
    if is_dense and keys[-1] == "kernel" and isinstance(parent, nnx.Linear):
      layer = LowRankLinear.from_linear(parent, value.u, value.v)
      if len(keys) == 1:
        new = layer  # the model is the Linear itself
        continue
      grand = new
      for k in keys[:-2]:
        grand = get_child(grand, k)
      set_child(grand, keys[-2], layer, "/".join(map(str, keys)))
      continue
    var = get_child(parent, keys[-1])
    if isinstance(value, Factors):
      value = value.materialize()
    if isinstance(var, nnx.Variable):
      var.set_value(value)
    else:
      raise TypeError(
          f"factorize_nnx: the model has no variable at {'/'.join(map(str, keys))}; pass the "
          "model whose nnx.split params the spec was initialised on."
      )
  return new

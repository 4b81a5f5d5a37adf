"""Factorized weights: pytrees of factors that multiply out to a kernel.

``Factors`` (``U @ V``, from an SVD) and ``Tucker2Factors`` (a core between two
channel factors) are the trainable params of the low-rank stages and the value
they hand to the next stage of a rule: a following ``quantize`` stage is applied
to each factor. ``materialize()`` gives the dense kernel in the factors' dtype.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxcompress.core import sharding as _sharding

Array = jax.Array


def _acc_dtype(dtype) -> jnp.dtype:
  """f32 accumulation for low-precision factors, the dtype itself otherwise."""
  return jnp.promote_types(dtype, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Factors:
  """A kernel ``W`` of shape ``shape`` stored as ``U (m, r) @ V (r, n)``.

  ``m = prod(shape[:-1])`` and ``n = shape[-1]``: a Dense kernel ``(in, out)``
  is the matrix itself; a conv kernel ``(h, w, in, out)`` is reshaped to
  ``(h * w * in, out)``.

  Attributes:
    u: the left factor ``(m, r)``.
    v: the right factor ``(r, n)``.
    shape: the kernel's shape (static).

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> f = jc.lowrank.Factors(jnp.ones((4, 1)), jnp.full((1, 3), 2.0), (4, 3))
    >>> f.materialize().tolist()[0]
    [2.0, 2.0, 2.0]
    >>> f.rank, f.num_params
    (1, 7)
  """

  u: Array
  v: Array
  shape: tuple[int, ...]

  @property
  def rank(self) -> int:
    """The inner dimension ``r``."""
    return self.u.shape[-1]

  @property
  def dtype(self):
    """The dtype of the kernel these factors stand for (that of ``u``)."""
    return self.u.dtype

  @property
  def num_params(self) -> int:
    """Entries stored: ``r * (m + n)``."""
    return math.prod(self.u.shape) + math.prod(self.v.shape)

  def materialize(self) -> Array:
    """The dense kernel ``(U @ V).reshape(shape)``, in ``u``'s dtype."""
    u = _sharding.unshard_axes(self.u, (1,))  # the rank axis
    v = _sharding.unshard_axes(self.v, (0,))
    w = jnp.matmul(u, v, preferred_element_type=_acc_dtype(self.u.dtype))
    return w.astype(self.u.dtype).reshape(self.shape)

  def dot(self, x: Array) -> Array:
    """``x @ W`` over ``x``'s last axis, computed as ``(x @ U) @ V`` without forming W.

    Only for 2-D kernels (``shape == (in, out)``).

    Args:
      x: an array whose last axis has size ``in``.

    Returns:
      ``x @ W``, of shape ``x.shape[:-1] + (out,)``.

    Example:
      >>> import jax.numpy as jnp, jaxcompress as jc
      >>> f = jc.lowrank.Factors(jnp.ones((4, 1)), jnp.full((1, 3), 2.0), (4, 3))
      >>> f.dot(jnp.ones((2, 4))).tolist()
      [[8.0, 8.0, 8.0], [8.0, 8.0, 8.0]]
    """
    if len(self.shape) != 2:
      raise ValueError(
          f"Factors.dot multiplies by a 2-D kernel, but these factors stand for a kernel "
          f"of shape {self.shape}; use materialize() for it."
      )
    u = _sharding.unshard_axes(self.u, (1,))
    v = _sharding.unshard_axes(self.v, (0,))
    return (x @ u) @ v


@dataclasses.dataclass(frozen=True)
class Tucker2Factors:
  """A kernel ``(*spatial, in, out)`` as a Tucker-2 product over its channel axes.

  ``W[..., i, o] = sum_ab u_in[i, a] * core[..., a, b] * u_out[b, o]``: a
  ``1x1`` conv into ``r_in`` channels, the ``(*spatial, r_in, r_out)`` core conv,
  and a ``1x1`` conv out to ``out`` channels.

  Attributes:
    core: ``(*spatial, r_in, r_out)``.
    u_in: ``(in, r_in)``.
    u_out: ``(r_out, out)``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> t = jc.lowrank.Tucker2Factors(jnp.ones((3, 3, 1, 1)), jnp.ones((2, 1)), jnp.ones((1, 4)))
    >>> t.materialize().shape
    (3, 3, 2, 4)
  """

  core: Array
  u_in: Array
  u_out: Array

  @property
  def shape(self) -> tuple[int, ...]:
    """The kernel's shape ``(*spatial, in, out)``."""
    return tuple(self.core.shape[:-2]) + (self.u_in.shape[0], self.u_out.shape[1])

  @property
  def dtype(self):
    """The dtype of the kernel these factors stand for (that of ``core``)."""
    return self.core.dtype

  @property
  def rank(self) -> tuple[int, int]:
    """``(r_in, r_out)``."""
    return self.core.shape[-2], self.core.shape[-1]

  @property
  def num_params(self) -> int:
    """Entries stored in the core and both channel factors."""
    return sum(math.prod(a.shape) for a in (self.core, self.u_in, self.u_out))

  def materialize(self) -> Array:
    """The dense kernel, in ``core``'s dtype."""
    w = jnp.einsum(
        "...ab,ia,bo->...io",
        _sharding.unshard_axes(self.core, (self.core.ndim - 2, self.core.ndim - 1)),
        _sharding.unshard_axes(self.u_in, (1,)),
        _sharding.unshard_axes(self.u_out, (0,)),
        preferred_element_type=_acc_dtype(self.core.dtype),
    )
    return w.astype(self.core.dtype)


jax.tree_util.register_dataclass(Factors, data_fields=["u", "v"], meta_fields=["shape"])
jax.tree_util.register_dataclass(
    Tucker2Factors, data_fields=["core", "u_in", "u_out"], meta_fields=[]
)

"""What the one-shot layer algorithms share: the result type, input checks, N:M masks.

Every one-shot function takes one Dense kernel ``w`` of shape ``(in, out)`` and
the layer's calibration inputs ``x`` of shape ``(..., in)`` (every leading axis
is a sample: batch, sequence), as ``jc.quant.gptq`` does. Before any work they
check, naming the leaf ``path`` in the message:

- ``w`` is 2-D and ``x``'s last axis is ``in``; both have real floating-point
  dtypes; ``x`` holds at least one sample;
- neither holds NaN or +-inf (at once for concrete arrays, at run time under
  ``jit``, see ``jaxcompress.core.checks.error_if``);
- the sparsity pattern: exactly one of ``sparsity`` (a fraction in ``[0, 1)``)
  and ``n_m=(n, m)`` (``0 < n <= m``, ``m`` dividing ``in``).

An N:M pattern keeps ``n`` of every ``m`` consecutive inputs of each output:
in the ``(in, out)`` kernel, each column is cut into runs of ``m`` rows, and
each run keeps its ``n`` highest scores (ties to the lower input index).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcompress.core.checks import check_int, check_number
from jaxcompress.core.select import topk_rows
from jaxcompress.quant import numerics

Array = jax.Array


class Pruned(NamedTuple):
  """A pruned kernel and its mask.

  Attributes:
    kernel: the kernel, with the shape and dtype of the input kernel; pruned
      entries are exactly 0.
    mask: bool, same shape; True where a weight is kept.
  """

  kernel: Array
  mask: Array


def check_layer(where: str, w: Any, x: Any, path: str) -> None:
  """Checks a kernel ``(in, out)`` and its calibration inputs ``(..., in)``.

  Args:
    where: the algorithm, for the message (``"sparsegpt"``).
    w: the kernel.
    x: the calibration inputs.
    path: the leaf path, named in the message.

  Returns:
    None; raises ``TypeError`` for non-float dtypes and ``ValueError`` for
    shapes that do not fit or non-finite values.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.oneshot.common import check_layer
    >>> check_layer("wanda", jnp.ones((4, 2)), jnp.ones((8, 3)), "Dense_0/kernel")
    Traceback (most recent call last):
    ...
    ValueError: Dense_0/kernel: wanda: calibration inputs of shape (8, 3) do not fit the kernel (4, 2); ...
  """
  check_kernel(where, w, path)
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{path}: {where}: calibration inputs must be an array (..., in), got {type(x).__name__}.")
  if x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(
        f"{path}: {where}: calibration inputs of shape {tuple(x.shape)} do not fit the kernel "
        f"{tuple(w.shape)}; their last axis must be the kernel's input size {w.shape[0]} "
        "(x is what the layer multiplies: (..., in))."
    )
  if x.size == 0:
    raise ValueError(
        f"{path}: {where}: calibration inputs of shape {tuple(x.shape)} hold no sample; pass "
        "at least one batch of the layer's inputs."
    )
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{path}: {where}: calibration inputs have dtype {x.dtype}; only real floating-point "
        "inputs are accepted. Cast them to a float dtype."
    )
  numerics.check_finite(
      x, None, path, what="calibration input", why=f"would make the {where} statistics non-finite",
      fix="drop or clean the calibration batches that hold them.",
  )


def check_kernel(where: str, w: Any, path: str) -> None:
  """Checks a 2-D float kernel ``(in, out)`` with finite values.

  Args:
    where: the algorithm, for the message.
    w: the kernel.
    path: the leaf path, named in the message.

  Returns:
    None; raises ``TypeError``/``ValueError``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.oneshot.common import check_kernel
    >>> check_kernel("magnitude", jnp.ones((4,)), "Dense_0/bias")
    Traceback (most recent call last):
    ...
    ValueError: Dense_0/bias: magnitude takes 2-D Dense kernels (in, out), got shape (4,); ...
  """
  if not hasattr(w, "shape") or not hasattr(w, "dtype"):
    raise TypeError(f"{path}: {where}: the kernel must be an array (in, out), got {type(w).__name__}.")
  if w.ndim != 2:
    raise ValueError(
        f"{path}: {where} takes 2-D Dense kernels (in, out), got shape {tuple(w.shape)}; reshape "
        "the kernel to (in, out) first (a conv kernel (h, w, in, out) to (h * w * in, out))."
    )
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(
        f"{path}: {where}: the kernel has dtype {w.dtype}; only real floating-point kernels "
        "are accepted. Cast it to a float dtype, or leave this leaf alone."
    )
  numerics.check_finite(
      w, None, path, what="weight", why=f"cannot be handled by {where}",
      fix="replace or mask them first (e.g. jnp.nan_to_num), or leave this kernel alone.",
  )


def check_pattern(
    where: str, sparsity: Any, n_m: Any, n_in: int, path: str
) -> tuple[float | None, tuple[int, int] | None]:
  """Checks a sparsity pattern: exactly one of ``sparsity`` and ``n_m``.

  Args:
    where: the algorithm, for the message.
    sparsity: ``None`` or the fraction of weights removed, in ``[0, 1)``.
    n_m: ``None`` or ``(n, m)``: ``n`` kept of every ``m`` consecutive inputs.
    n_in: the kernel's input size (``m`` must divide it).
    path: the leaf path, named in the message.

  Returns:
    ``(sparsity, n_m)`` with one of them ``None``, as a float and a tuple of ints.

  Example:
    >>> from jaxcompress.oneshot.common import check_pattern
    >>> check_pattern("wanda", None, (2, 4), 16, "kernel")
    (None, (2, 4))
    >>> check_pattern("wanda", 0.5, (2, 4), 16, "kernel")
    Traceback (most recent call last):
    ...
    ValueError: kernel: wanda: give exactly one of sparsity= and n_m=, got sparsity=0.5 and n_m=(2, 4); ...
  """
  if (sparsity is None) == (n_m is None):
    raise ValueError(
        f"{path}: {where}: give exactly one of sparsity= and n_m=, got sparsity={sparsity!r} and "
        f"n_m={n_m!r}; e.g. sparsity=0.5 (half of the weights, unstructured) or n_m=(2, 4) "
        "(2 of every 4 consecutive inputs)."
    )
  if sparsity is not None:
    return check_number(f"{path}: {where}", "sparsity", sparsity, low=0, high=1, high_open=True), None
  if not isinstance(n_m, (tuple, list)) or len(n_m) != 2:
    raise TypeError(
        f"{path}: {where}: n_m must be a pair (n, m) of ints, n of every m consecutive inputs "
        f"kept, e.g. (2, 4); got {n_m!r}."
    )
  m = check_int(f"{path}: {where}", "m of n_m", n_m[1], low=1)
  n = check_int(f"{path}: {where}", "n of n_m", n_m[0], low=1, high=m)
  if n_in % m:
    raise ValueError(
        f"{path}: {where}: n_m={(n, m)} needs m to divide the kernel's input size {n_in}; "
        f"pick an m that divides {n_in}, or use sparsity= for this kernel."
    )
  return None, (n, m)


def keep_count(sparsity: float, size: int) -> int:
  """How many of ``size`` weights a ``sparsity`` keeps: ``round((1 - sparsity) * size)``.

  Rounded half to even, as ``jnp.round`` and the pruning stages do.

  Example:
    >>> from jaxcompress.oneshot.common import keep_count
    >>> keep_count(0.5, 10), keep_count(0.25, 10)
    (5, 8)
  """
  return int(round((1.0 - sparsity) * size))


@functools.partial(jax.jit, static_argnums=(1,))
def topk_mask(scores: Array, k: int) -> Array:
  """Keeps the ``k`` largest entries along the last axis (ties to the lower index).

  The library's sort-free exact select (``jaxcompress.core.select.topk_rows``;
  ties to the lower index, NaN ranked lowest); scores are ranked as float32.

  Args:
    scores: float scores of any rank (the last axis is ranked).
    k: entries kept in each row of the last axis (a Python int; clipped to
      ``[0, n]``).

  Returns:
    A bool mask like ``scores``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.oneshot.common import topk_mask
    >>> topk_mask(jnp.array([[1.0, 3.0, 3.0], [0.0, 2.0, 1.0]]), 2).tolist()
    [[False, True, True], [False, True, True]]
  """
  n = scores.shape[-1]
  if k <= 0 or k >= n:
    return jnp.full(scores.shape, k > 0, jnp.bool_)
  return topk_rows(scores.reshape(-1, n), k).reshape(scores.shape)


@functools.partial(jax.jit, static_argnums=(1, 2))
def nm_mask(scores: Array, n: int, m: int) -> Array:
  """Keeps the ``n`` highest of every ``m`` consecutive rows, in each column.

  Ties go to the lower row; ``m`` must divide the rows.

  Args:
    scores: ``(in, out)`` float scores, no NaN.
    n: entries kept per run.
    m: the run length along axis 0.

  Returns:
    A bool mask like ``scores``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.oneshot.common import nm_mask
    >>> nm_mask(jnp.array([[1.0], [4.0], [3.0], [3.0]]), 2, 4).ravel().tolist()
    [False, True, True, False]
  """
  n_in, n_out = scores.shape
  runs = scores.reshape(n_in // m, m, n_out).transpose(0, 2, 1)  # (runs, out, m)
  return topk_mask(runs, n).transpose(0, 2, 1).reshape(n_in, n_out)


__all__ = ["Pruned", "check_kernel", "check_layer", "check_pattern", "keep_count", "nm_mask", "topk_mask"]

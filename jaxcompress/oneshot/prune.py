"""One-shot pruning of a layer by a score: magnitude, and Wanda.

- ``magnitude``: the baseline. The score of a weight is ``|W_ij|``. Unstructured,
  the layer keeps its ``round((1 - sparsity) * in * out)`` largest weights
  (one threshold for the whole kernel); with ``n_m=(n, m)``, each output keeps
  the ``n`` largest of every ``m`` consecutive inputs.
- ``wanda``: Wanda (Sun et al., 2024, "A Simple and Effective Pruning Approach
  for Large Language Models"). The score of a weight is its magnitude times
  the L2 norm of its input feature over the calibration tokens,

      S_ij = |W_ij| * ||X_i||_2       (kernel W of shape (in, out), X (tokens, in)),

  and weights are compared within each output (a column of the kernel): each
  output keeps its ``round((1 - sparsity) * in)`` highest scores, or, with
  ``n_m``, the ``n`` highest of every ``m`` consecutive inputs. A few input
  features of a language model carry activations far larger than the rest;
  the norm keeps the small weights that multiply them, which magnitude would
  prune. No weight is updated: the kept weights keep their values.

Ties at the threshold go to the lower flat index (magnitude) or the lower
input index (Wanda, N:M), so exactly the stated number of weights is kept.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcompress.oneshot.common import (
    Pruned,
    check_kernel,
    check_layer,
    check_pattern,
    keep_count,
    nm_mask,
    topk_mask,
)

Array = jax.Array


def _select(scores: Array, keep: int | None, n_m: tuple[int, int] | None, per_output: bool) -> Array:
  if n_m is not None:
    return nm_mask(scores, *n_m)
  if per_output:
    return topk_mask(scores.T, keep).T
  return topk_mask(scores.reshape(-1), keep).reshape(scores.shape)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _magnitude(w, keep, n_m):
  mask = _select(jnp.abs(w.astype(jnp.float32)), keep, n_m, per_output=False)
  return Pruned(jnp.where(mask, w, jnp.zeros_like(w)), mask)


def magnitude(
    w: Array,
    *,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    path: str = "kernel",
) -> Pruned:
  """Magnitude pruning of one kernel ``(in, out)``: keeps the largest ``|W_ij|``.

  Args:
    w: the kernel ``(in, out)``, any float dtype.
    sparsity: the fraction of weights removed, in ``[0, 1)``; the kernel keeps
      its ``round((1 - sparsity) * in * out)`` largest weights (one threshold
      for the whole layer).
    n_m: ``(n, m)`` instead of ``sparsity``: each output keeps the ``n``
      largest of every ``m`` consecutive inputs (``m`` divides ``in``).
    path: the leaf path, named in error messages.

  Returns:
    ``Pruned(kernel, mask)``: the kernel (shape and dtype of ``w``) with pruned
    weights exactly 0, and the bool mask of kept weights.

  Raises:
    TypeError: ``w`` is not a float array.
    ValueError: ``w`` is not 2-D or holds NaN/inf; the pattern is invalid.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> w = jnp.array([[1.0, -4.0], [3.0, 0.5], [-2.0, 6.0], [0.1, 0.2]])
    >>> jc.oneshot.magnitude(w, sparsity=0.5).kernel.tolist()
    [[0.0, -4.0], [3.0, 0.0], [-2.0, 6.0], [0.0, 0.0]]
    >>> jc.oneshot.magnitude(w, n_m=(1, 2)).mask.tolist()
    [[False, True], [True, False], [True, True], [False, False]]
  """
  check_kernel("magnitude", w, path)
  sparsity, n_m = check_pattern("magnitude", sparsity, n_m, w.shape[0], path)
  keep = None if sparsity is None else keep_count(sparsity, w.size)
  return _magnitude(w, keep, n_m)


@jax.jit
def input_norms(x: Array) -> Array:
  """The L2 norm of each input feature over all samples: ``||X_i||_2``, float32.

  Args:
    x: inputs ``(..., in)``; all leading axes are samples.

  Returns:
    ``(in,)`` float32.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.oneshot.prune import input_norms
    >>> input_norms(jnp.array([[3.0, 0.0], [4.0, 1.0]])).tolist()
    [5.0, 1.0]
  """
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return jnp.sqrt(jnp.sum(x2 * x2, axis=0))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _wanda(w, x, keep, n_m):
  scores = jnp.abs(w.astype(jnp.float32)) * input_norms(x)[:, None]
  mask = _select(scores, keep, n_m, per_output=True)
  return Pruned(jnp.where(mask, w, jnp.zeros_like(w)), mask)


def wanda(
    w: Array,
    x: Array,
    *,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    path: str = "kernel",
) -> Pruned:
  """Wanda pruning of one kernel ``(in, out)`` from its calibration inputs.

  Scores ``|W_ij| * ||X_i||_2`` are compared within each output (a column of
  the kernel); see the module docstring.

  Args:
    w: the kernel ``(in, out)``, any float dtype.
    x: the layer's calibration inputs ``(..., in)`` (may be sharded over the
      samples; the norms are reduced under ``jit``).
    sparsity: the fraction of weights removed, in ``[0, 1)``: each output
      keeps its ``round((1 - sparsity) * in)`` highest scores.
    n_m: ``(n, m)`` instead of ``sparsity``: each output keeps the ``n``
      highest of every ``m`` consecutive inputs.
    path: the leaf path, named in error messages.

  Returns:
    ``Pruned(kernel, mask)`` as for ``magnitude``.

  Raises:
    TypeError: ``w`` or ``x`` is not a float array.
    ValueError: shapes do not fit, NaN/inf in ``w`` or ``x``, or an invalid
      pattern.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> w = jnp.array([[1.0, 2.0], [3.0, 1.0]])
    >>> x = jnp.array([[10.0, 1.0]])  # input 0 is large: its small weights stay
    >>> jc.oneshot.wanda(w, x, sparsity=0.5).mask.tolist()
    [[True, True], [False, False]]
  """
  check_layer("wanda", w, x, path)
  sparsity, n_m = check_pattern("wanda", sparsity, n_m, w.shape[0], path)
  keep = None if sparsity is None else keep_count(sparsity, w.shape[0])
  return _wanda(w, x, keep, n_m)


__all__ = ["input_norms", "magnitude", "wanda"]

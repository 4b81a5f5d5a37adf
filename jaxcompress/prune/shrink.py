"""Structured shrink: physically remove pruned channels from a chain of Dense layers.

After whole output channels of consecutive Dense layers are pruned (the columns
of a Flax ``(in, out)`` kernel set to zero), the model still computes with the
full shapes. ``shrink_dense_chain`` deletes those channels, giving a smaller
dense params tree whose model computes the same outputs:

    layer i:    columns ``j`` removed from ``kernel`` (in, out) and from ``bias``
    layer i+1:  rows ``j`` removed from its ``kernel``

A pruned channel is not necessarily silent: its pre-activation is its bias
``b[j]``, a constant, so it feeds ``act(b[j]) * next_kernel[j, :]`` into the
next layer on every input (and ``act(0)`` may be nonzero, e.g. for a sigmoid).
That constant is folded into the next layer's bias, which is exact for any
elementwise activation. The activation between the layers is therefore a
required argument; pass the identity for linear chains.

Shrinking is a host-side, one-off rewrite (output shapes depend on the values),
called outside ``jax.jit``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.paths import path_str

PyTree = Any
Activation = Callable[[jax.Array], jax.Array]


class Shrunk(NamedTuple):
  """The result of ``shrink_dense_chain``.

  Attributes:
    params: the params tree with the chain's kernels and biases made smaller;
      every other leaf is unchanged.
    features: the output width of each layer of the chain after shrinking, in
      chain order (the last layer keeps its width): build the smaller model
      with these.
    kept: ``{layer: int indices of the output channels kept}`` for every layer
      but the last, indices into the original channels.
  """

  params: PyTree
  features: tuple[int, ...]
  kept: dict[str, np.ndarray]


def _leaf_map(params: PyTree) -> dict[str, Any]:
  return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _lookup(leaves: dict[str, Any], name: str) -> tuple[np.ndarray, np.ndarray | None, Any]:
  kpath = f"{name}/kernel"
  if kpath not in leaves:
    kernels = [p for p in leaves if p.endswith("/kernel") or p == "kernel"]
    shown = ", ".join(repr(p) for p in kernels[:20]) + (" ..." if len(kernels) > 20 else "")
    raise ValueError(
        f"shrink_dense_chain: no leaf {kpath!r} in params for chain layer {name!r}. A chain "
        "entry is the module path of a Dense layer, whose kernel is '<layer>/kernel'; the "
        f"kernels in params are: {shown or '(none)'}."
    )
  kernel = leaves[kpath]
  if getattr(kernel, "ndim", None) != 2:
    raise ValueError(
        f"shrink_dense_chain: {kpath!r} has shape {tuple(getattr(kernel, 'shape', ()))}; a "
        "Dense kernel is 2-D (in_features, out_features). Put only Dense layers in the chain."
    )
  bias = leaves.get(f"{name}/bias")
  if bias is not None and tuple(bias.shape) != (kernel.shape[1],):
    raise ValueError(
        f"shrink_dense_chain: '{name}/bias' has shape {tuple(bias.shape)}, but {kpath!r} has "
        f"{kernel.shape[1]} output features; expected a bias of shape ({kernel.shape[1]},)."
    )
  return np.asarray(kernel), None if bias is None else np.asarray(bias), kernel.dtype


def _activations(activation: Activation | Sequence[Activation], n: int) -> list[Activation]:
  if callable(activation):
    return [activation] * n
  if isinstance(activation, (list, tuple)) and all(callable(a) for a in activation):
    if len(activation) != n:
      raise ValueError(
          f"shrink_dense_chain: got {len(activation)} activations for a chain of {n + 1} "
          f"layers; give one activation (used between every pair) or {n}, one between each "
          "pair of consecutive layers."
      )
    return list(activation)
  raise TypeError(
      "shrink_dense_chain: activation must be the elementwise function applied between "
      f"consecutive layers (e.g. jax.nn.relu, or lambda x: x), or a sequence of them; got "
      f"{activation!r}."
  )


def shrink_dense_chain(
    params: PyTree,
    chain: Sequence[str],
    *,
    activation: Activation | Sequence[Activation],
    keep: Mapping[str, Any] | None = None,
) -> Shrunk:
  """Removes pruned output channels from consecutive Dense layers.

  The chain must be a plain feed-forward sequence: layer ``i+1`` consumes
  exactly ``activation(layer_i(x))``, with no normalization, residual or other
  consumer of layer ``i``'s outputs. For every layer but the last, output
  channel ``j`` is removed when it cannot vary with the input or reach the
  output:

  - its kernel column is all zero: its output is the constant
    ``activation(bias[j])`` (``activation(0)`` without a bias), and
    ``activation(bias[j]) * next_kernel[j, :]`` is added to the next layer's
    bias, so the outputs stay the same for any elementwise activation;
  - or the next kernel's row ``j`` is all zero: it contributes nothing.

  "Zero" means exactly 0.0 (NaN and inf are nonzero). The last layer's outputs
  are the chain's outputs and are kept.

  Args:
    params: the pruned model params (``spec.apply(trainable, state)``): a Flax
      linen params dict, an NNX ``State``, or any pytree whose leaves are named
      ``<layer>/kernel`` (``(in, out)``) and optionally ``<layer>/bias``.
    chain: module paths of at least two consecutive Dense layers, in order
      (``["Dense_0", "Dense_1", "Dense_2"]``).
    activation: the elementwise function applied between consecutive layers
      (``jax.nn.relu``; ``lambda x: x`` when there is none), or a sequence of
      ``len(chain) - 1`` of them, one after each layer but the last.
    keep: optional ``{layer: bool array (out_features,)}`` choosing the channels
      to keep (True = keep) for some layers but the last; by default every
      channel that can be removed is. A channel it drops must be removable as
      above, else the outputs would change and a ``ValueError`` says which.

  Returns:
    A ``Shrunk``: the smaller params, the new output width of each chain
    layer, and the kept channel indices. New leaves are jax arrays of the
    original dtypes (on the default device); other leaves are unchanged.

  Raises:
    ValueError: a chain layer is missing from ``params`` (the message lists the
      kernels that exist), shapes do not chain, ``keep`` drops a live channel,
      or a constant must be folded into a layer without a bias.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"Dense_0": {"kernel": jnp.array([[1., 0., 2.]]), "bias": jnp.array([0., 1., 0.])},
    ...           "Dense_1": {"kernel": jnp.array([[1.], [5.], [3.]]), "bias": jnp.array([0.5])}}
    >>> small = jc.prune.shrink_dense_chain(params, ["Dense_0", "Dense_1"], activation=jax.nn.relu)
    >>> small.features
    (2, 1)
    >>> small.params["Dense_0"]["kernel"].tolist(), small.params["Dense_1"]["bias"].tolist()
    ([[1.0, 2.0]], [5.5])
  """
  if isinstance(chain, str) or not isinstance(chain, Sequence):
    raise TypeError(
        f"shrink_dense_chain: chain must be a list of layer paths, got {chain!r}; e.g. "
        '["Dense_0", "Dense_1"].'
    )
  chain = list(chain)
  if len(chain) < 2:
    raise ValueError(
        f"shrink_dense_chain: chain {chain!r} has fewer than two layers; removing a layer's "
        "output channels needs the layer that consumes them, so give at least two."
    )
  if len(set(chain)) != len(chain):
    raise ValueError(f"shrink_dense_chain: chain {chain!r} names a layer more than once.")
  acts = _activations(activation, len(chain) - 1)
  leaves = _leaf_map(params)
  layers = [_lookup(leaves, name) for name in chain]
  for i in range(len(chain) - 1):
    ka, kb = layers[i][0], layers[i + 1][0]
    if ka.shape[1] != kb.shape[0]:
      raise ValueError(
          f"shrink_dense_chain: '{chain[i]}/kernel' has {ka.shape[1]} output features but "
          f"'{chain[i + 1]}/kernel' takes {kb.shape[0]} inputs ({ka.shape} then {kb.shape}); "
          "the chain must list Dense layers that feed each other, in order."
      )
  keep = dict(keep or {})
  unknown = sorted(set(keep) - set(chain[:-1]))
  if unknown:
    raise ValueError(
        f"shrink_dense_chain: keep names {unknown}, which are not layers of the chain before "
        f"the last ({chain[:-1]}); the last layer's outputs are always kept."
    )

  kernels = [k for k, _, _ in layers]
  biases = [b for _, b, _ in layers]
  dtypes = [d for _, _, d in layers]
  new: dict[str, Any] = {}
  kept: dict[str, np.ndarray] = {}
  in_rows: np.ndarray | None = None  # rows of the current kernel kept (previous layer's channels)
  for i, name in enumerate(chain):
    kernel = kernels[i] if in_rows is None else kernels[i][in_rows]
    bias = biases[i]
    if i == len(chain) - 1:
      # The last layer keeps its outputs; its bias may hold folded constants.
      new[f"{name}/kernel"] = kernel
      if bias is not None:
        new[f"{name}/bias"] = bias
      break
    nxt = chain[i + 1]
    col_zero = ~np.any(kernel != 0, axis=0)
    row_zero = ~np.any(kernels[i + 1] != 0, axis=1)
    removable = col_zero | row_zero
    if name in keep:
      mask = np.asarray(keep[name])
      if mask.dtype != np.bool_ or mask.shape != col_zero.shape:
        raise ValueError(
            f"shrink_dense_chain: keep[{name!r}] must be a bool array of shape "
            f"{col_zero.shape} (one entry per output channel of '{name}/kernel'), got "
            f"dtype {mask.dtype} and shape {mask.shape}."
        )
      live = np.flatnonzero(~mask & ~removable)
      if live.size:
        raise ValueError(
            f"shrink_dense_chain: keep[{name!r}] drops channels {live[:10].tolist()}"
            f"{' ...' if live.size > 10 else ''} whose column in '{name}/kernel' is not all "
            f"zero and whose row in '{nxt}/kernel' is not all zero; removing them would change "
            "the outputs. Prune those channels first, or keep them."
        )
      keep_mask = mask
    else:
      keep_mask = ~removable
    idx = np.flatnonzero(keep_mask)
    kept[name] = idx

    # Constant outputs of dropped zero-column channels fold into the next bias.
    folded = np.flatnonzero(~keep_mask & col_zero & ~row_zero)
    if folded.size:
      pre = bias[folded] if bias is not None else np.zeros(folded.size, kernel.dtype)
      const = np.asarray(acts[i](jnp.asarray(pre, dtypes[i])), np.float64)
      if const.shape != pre.shape:
        raise ValueError(
            f"shrink_dense_chain: the activation after {name!r} changed the shape "
            f"{pre.shape} to {const.shape}; it must be elementwise."
        )
      contrib = const @ kernels[i + 1][folded].astype(np.float64)
      nbias = biases[i + 1]
      if nbias is None:
        if np.any(contrib != 0):
          raise ValueError(
              f"shrink_dense_chain: removing channels {folded[:10].tolist()} of {name!r} leaves "
              f"a constant input activation(bias) != 0 for '{nxt}', which has no bias "
              f"('{nxt}/bias') to fold it into. Keep those channels (keep=...), or give "
              f"'{nxt}' a bias."
          )
      else:
        biases[i + 1] = (nbias.astype(np.float64) + contrib).astype(nbias.dtype)

    new[f"{name}/kernel"] = kernel[:, idx]
    if bias is not None:
      new[f"{name}/bias"] = bias[idx]
    in_rows = idx

  def replace(path, leaf):
    p = path_str(path)
    return jnp.asarray(new[p], leaf.dtype) if p in new else leaf

  features = tuple(int(new[f"{n}/kernel"].shape[1]) for n in chain)
  return Shrunk(jax.tree_util.tree_map_with_path(replace, params), features, kept)

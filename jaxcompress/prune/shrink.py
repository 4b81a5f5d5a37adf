"""Structured shrink: physically remove pruned channels and attention heads.

After whole output channels of consecutive layers are pruned (the output
columns of a Flax ``(..., in, out)`` kernel set to zero), the model still
computes with the full shapes. ``shrink_chain`` deletes those channels from a
chain of Dense and convolution layers, giving a smaller params tree whose model
computes the same outputs:

    layer i:    output channel ``j`` removed from ``kernel[..., j]`` and ``bias[j]``
    layer i+1:  input channel ``j`` removed from its ``kernel[..., j, :]`` (for a
                Dense layer after a flattened ``(..., H, W, C)`` map: every row
                ``p * C + j``)

A pruned channel is not necessarily silent: its pre-activation is its bias
``b[j]`` at every position, so after the activation it is the constant map
``c = act(b[j])`` (``act(0)`` may be nonzero, e.g. for a sigmoid). Its
contribution to the next layer is folded into the next layer's bias:

- next Dense layer (or a Dense after flattening): ``c * sum of the rows of j``:
  exact for any elementwise activation;
- next convolution with ``VALID`` padding, or a 1x1 window: ``c * sum over the
  window``: exact, since every window lies inside the map;
- next convolution with ``SAME`` (zero) padding and a larger window: windows at
  the borders overlap the zero padding and see less of the constant, so the
  fold is exact in the interior only. ``shrink_chain`` refuses this unless
  ``allow_border_error=True``, and ``Shrunk.inexact`` lists those channels.
  A channel whose constant is 0 (``relu`` of a bias <= 0) is always exact.

``shrink_heads`` removes attention heads: head ``h`` is removable when its value
projection's columns are zero (the head then outputs its value bias whatever
the attention weights, since they sum to 1: folded into the output bias,
exactly) or its output projection's rows are zero. Zero query/key weights do
not make a head removable (its attention becomes uniform, not silent).

Shrinking is a host-side, one-off rewrite (output shapes depend on the values),
called outside ``jax.jit``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.checks import check_int
from jaxcompress.core.paths import path_str

PyTree = Any
Activation = Callable[[jax.Array], jax.Array]
_PADDINGS = ("SAME", "VALID")


class Shrunk(NamedTuple):
  """The result of ``shrink_chain`` and ``shrink_heads``.

  Attributes:
    params: the params tree with the chain's kernels and biases made smaller;
      every other leaf is unchanged.
    features: the output width of each layer of the chain after shrinking, in
      chain order (the last layer keeps its width): build the smaller model
      with these. For ``shrink_heads``: ``(heads kept,)``.
    kept: ``{layer: int indices of the output channels kept}`` for every layer
      but the last, indices into the original channels (for ``shrink_heads``:
      ``{"heads": kept head indices}``).
    inexact: ``{layer: channel indices}`` whose constant output was folded into
      a ``SAME``-padded convolution's bias, exact in the interior of the map
      only (empty unless ``allow_border_error=True``).
  """

  params: PyTree
  features: tuple[int, ...]
  kept: dict[str, np.ndarray]
  inexact: dict[str, np.ndarray] = {}


def _leaf_map(params: PyTree) -> dict[str, Any]:
  return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _lookup(
    leaves: dict[str, Any], name: str, where: str, heads: bool = False
) -> tuple[np.ndarray, np.ndarray | None, Any]:
  kpath = f"{name}/kernel"
  if kpath not in leaves:
    kernels = [p for p in leaves if p.endswith("/kernel") or p == "kernel"]
    shown = ", ".join(repr(p) for p in kernels[:20]) + (" ..." if len(kernels) > 20 else "")
    raise ValueError(
        f"{where}: no leaf {kpath!r} in params for layer {name!r}. A layer is named by its "
        "module path, whose kernel is '<layer>/kernel'; the kernels in params are: "
        f"{shown or '(none)'}."
    )
  kernel = leaves[kpath]
  if getattr(kernel, "ndim", 0) < 2:
    raise ValueError(
        f"{where}: {kpath!r} has shape {tuple(getattr(kernel, 'shape', ()))}; a Dense kernel "
        "is (in_features, out_features) and a convolution kernel (*window, in, out)."
    )
  bias = leaves.get(f"{name}/bias")
  # A DenseGeneral q/k/v projection (d, heads, head_dim) has a (heads, head_dim) bias.
  shapes = [(kernel.shape[-1],)] + ([tuple(kernel.shape[1:])] if heads and kernel.ndim == 3 else [])
  if bias is not None and tuple(bias.shape) not in shapes:
    raise ValueError(
        f"{where}: '{name}/bias' has shape {tuple(bias.shape)}, but {kpath!r} has shape "
        f"{tuple(kernel.shape)}; expected a bias of shape {' or '.join(map(str, shapes))}."
    )
  return np.asarray(kernel), None if bias is None else np.asarray(bias), kernel.dtype


def _per_gap(value: Any, n: int, what: str, check: Callable[[Any], bool], example: str) -> list:
  """One setting per gap between consecutive layers: a single value, or a sequence of ``n``."""
  if check(value):
    return [value] * n
  if isinstance(value, (list, tuple)) and all(check(v) for v in value):
    if len(value) != n:
      raise ValueError(
          f"shrink_chain: got {len(value)} {what}s for a chain of {n + 1} layers; give one "
          f"(used between every pair) or {n}, one between each pair of consecutive layers."
      )
    return list(value)
  raise TypeError(f"shrink_chain: {what} must be {example}, or a sequence of them; got {value!r}.")


def _as_rows(kernel: np.ndarray, channels: int) -> np.ndarray:
  """The next kernel as ``(positions, channels, out)``."""
  if kernel.ndim > 2:  # convolution: (*window, in, out)
    return kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1])
  return kernel.reshape(kernel.shape[0] // channels, channels, kernel.shape[1])


def shrink_chain(
    params: PyTree,
    chain: Sequence[str],
    *,
    activation: Activation | Sequence[Activation],
    keep: Mapping[str, Any] | None = None,
    padding: str | Sequence[str] | None = None,
    allow_border_error: bool = False,
) -> Shrunk:
  """Removes pruned output channels from consecutive Dense and convolution layers.

  The chain must be a plain feed-forward sequence: layer ``i+1`` consumes
  exactly ``activation(layer_i(x))`` (flattened, channels last, when a Dense
  layer follows a convolution; max or average pooling in between keeps a
  constant map constant and is allowed), with no normalization, residual or
  other consumer of layer ``i``'s outputs. For every layer but the last, output
  channel ``j`` is removed when it cannot vary with the input or reach the
  output:

  - its kernel slice ``kernel[..., j]`` is all zero: its output is the constant
    ``activation(bias[j])`` (``activation(0)`` without a bias), folded into the
    next layer's bias (see the module docstring for when that is exact);
  - or the next kernel's slice for input channel ``j`` is all zero: it
    contributes nothing.

  "Zero" means exactly 0.0 (NaN and inf are nonzero). The last layer's outputs
  are the chain's outputs and are kept.

  Args:
    params: the pruned model params (``spec.apply(trainable, state)``): a Flax
      linen params dict, an NNX ``State``, or any pytree whose leaves are named
      ``<layer>/kernel`` (Dense ``(in, out)``, convolution ``(*window, in, out)``)
      and optionally ``<layer>/bias``.
    chain: module paths of at least two consecutive layers, in order
      (``["Conv_0", "Conv_1", "Dense_0"]``).
    activation: the elementwise function applied between consecutive layers
      (``jax.nn.relu``; ``lambda x: x`` when there is none), or a sequence of
      ``len(chain) - 1`` of them, one after each layer but the last.
    keep: optional ``{layer: bool array (out_features,)}`` choosing the channels
      to keep (True = keep) for some layers but the last; by default every
      channel that can be removed is. A channel it drops must be removable as
      above, else the outputs would change and a ``ValueError`` says which.
    padding: the padding of each convolution that follows a layer of the
      chain, ``"SAME"`` or ``"VALID"`` (one for all, or one per gap; Dense
      gaps ignore it). Needed only to fold a nonzero constant into a
      convolution with a window larger than 1x1.
    allow_border_error: fold constants into ``SAME``-padded convolutions
      although the result is exact in the interior only (listed in
      ``Shrunk.inexact``); by default that raises.

  Returns:
    A ``Shrunk``: the smaller params, the new output width of each chain
    layer, the kept channel indices, and the inexact folds. New leaves are jax
    arrays of the original dtypes (on the default device); other leaves are
    unchanged.

  Raises:
    ValueError: a chain layer is missing from ``params`` (the message lists the
      kernels that exist), shapes do not chain, ``keep`` drops a live channel,
      a constant must be folded into a layer without a bias, or into a
      convolution whose padding is unknown or ``SAME`` (without
      ``allow_border_error``).

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"Dense_0": {"kernel": jnp.array([[1., 0., 2.]]), "bias": jnp.array([0., 1., 0.])},
    ...           "Dense_1": {"kernel": jnp.array([[1.], [5.], [3.]]), "bias": jnp.array([0.5])}}
    >>> small = jc.prune.shrink_chain(params, ["Dense_0", "Dense_1"], activation=jax.nn.relu)
    >>> small.features
    (2, 1)
    >>> small.params["Dense_0"]["kernel"].tolist(), small.params["Dense_1"]["bias"].tolist()
    ([[1.0, 2.0]], [5.5])
  """
  where = "shrink_chain"
  if isinstance(chain, str) or not isinstance(chain, Sequence):
    raise TypeError(
        f"{where}: chain must be a list of layer paths, got {chain!r}; e.g. "
        '["Conv_0", "Conv_1", "Dense_0"].'
    )
  chain = list(chain)
  if len(chain) < 2:
    raise ValueError(
        f"{where}: chain {chain!r} has fewer than two layers; removing a layer's output "
        "channels needs the layer that consumes them, so give at least two."
    )
  if len(set(chain)) != len(chain):
    raise ValueError(f"{where}: chain {chain!r} names a layer more than once.")
  gaps = len(chain) - 1
  acts = _per_gap(activation, gaps, "activation", callable,
                  "the elementwise function applied between consecutive layers (e.g. "
                  "jax.nn.relu, or lambda x: x)")
  pads = _per_gap(padding, gaps, "padding", lambda v: v is None or v in _PADDINGS,
                  "'SAME' or 'VALID' (the padding of the convolution after the gap)")
  leaves = _leaf_map(params)
  layers = [_lookup(leaves, name, where) for name in chain]
  for i in range(gaps):
    ka, kb = layers[i][0], layers[i + 1][0]
    c = ka.shape[-1]
    fits = kb.shape[-2] == c if kb.ndim > 2 else kb.shape[0] % c == 0 and (
        ka.ndim > 2 or kb.shape[0] == c)
    if not fits:
      raise ValueError(
          f"{where}: '{chain[i]}/kernel' has {c} output channels but "
          f"'{chain[i + 1]}/kernel' takes {kb.shape[-2]} inputs ({ka.shape} then {kb.shape}); "
          "the chain must list layers that feed each other, in order (a Dense layer after a "
          "convolution takes the flattened map: a multiple of its channels)."
      )
  keep = dict(keep or {})
  unknown = sorted(set(keep) - set(chain[:-1]))
  if unknown:
    raise ValueError(
        f"{where}: keep names {unknown}, which are not layers of the chain before the last "
        f"({chain[:-1]}); the last layer's outputs are always kept."
    )

  kernels = [k for k, _, _ in layers]
  biases = [b for _, b, _ in layers]
  dtypes = [d for _, _, d in layers]
  new: dict[str, Any] = {}
  kept: dict[str, np.ndarray] = {}
  inexact: dict[str, np.ndarray] = {}
  for i, name in enumerate(chain):
    kernel, bias = kernels[i], biases[i]
    if i == len(chain) - 1:
      # The last layer keeps its outputs; its bias may hold folded constants.
      new[f"{name}/kernel"] = kernel
      if bias is not None:
        new[f"{name}/bias"] = bias
      break
    nxt = chain[i + 1]
    channels = kernel.shape[-1]
    rows = _as_rows(kernels[i + 1], channels)  # (positions, channels, out)
    col_zero = ~np.any(kernel.reshape(-1, channels) != 0, axis=0)
    row_zero = ~np.any(rows != 0, axis=(0, 2))
    removable = col_zero | row_zero
    if name in keep:
      mask = np.asarray(keep[name])
      if mask.dtype != np.bool_ or mask.shape != col_zero.shape:
        raise ValueError(
            f"{where}: keep[{name!r}] must be a bool array of shape {col_zero.shape} (one "
            f"entry per output channel of '{name}/kernel'), got dtype {mask.dtype} and shape "
            f"{mask.shape}."
        )
      live = np.flatnonzero(~mask & ~removable)
      if live.size:
        raise ValueError(
            f"{where}: keep[{name!r}] drops channels {live[:10].tolist()}"
            f"{' ...' if live.size > 10 else ''} whose slice of '{name}/kernel' is not all "
            f"zero and whose slice of '{nxt}/kernel' is not all zero; removing them would "
            "change the outputs. Prune those channels first, or keep them."
        )
      keep_mask = mask
    else:
      keep_mask = ~removable
    idx = np.flatnonzero(keep_mask)
    kept[name] = idx

    # Constant outputs of dropped zero-slice channels fold into the next bias.
    folded = np.flatnonzero(~keep_mask & col_zero & ~row_zero)
    if folded.size:
      pre = bias[folded] if bias is not None else np.zeros(folded.size, kernel.dtype)
      const = np.asarray(acts[i](jnp.asarray(pre, dtypes[i])), np.float64)
      if const.shape != pre.shape:
        raise ValueError(
            f"{where}: the activation after {name!r} changed the shape {pre.shape} to "
            f"{const.shape}; it must be elementwise."
        )
      live_const = const != 0
      if kernels[i + 1].ndim > 2 and rows.shape[0] > 1 and np.any(live_const):
        if pads[i] is None:
          raise ValueError(
              f"{where}: channels {folded[live_const][:10].tolist()} of {name!r} output the "
              f"nonzero constant activation(bias), which folds into the bias of the "
              f"convolution {nxt!r} exactly only with VALID padding; pass padding='VALID' or "
              "'SAME' (the padding that convolution uses)."
          )
        if pads[i] == "SAME":
          if not allow_border_error:
            raise ValueError(
                f"{where}: channels {folded[live_const][:10].tolist()} of {name!r} output "
                f"the nonzero constant activation(bias); folded into the bias of the "
                f"SAME-padded convolution {nxt!r} it is exact in the interior but not at the "
                "borders, where windows overlap the zero padding. Pass "
                "allow_border_error=True to accept that (Shrunk.inexact lists them), or keep "
                f"those channels (keep={{{name!r}: ...}})."
            )
          inexact[name] = folded[live_const]
      contrib = const @ rows[:, folded, :].astype(np.float64).sum(axis=0)
      nbias = biases[i + 1]
      if nbias is None:
        if np.any(contrib != 0):
          raise ValueError(
              f"{where}: removing channels {folded[:10].tolist()} of {name!r} leaves a "
              f"constant input activation(bias) != 0 for '{nxt}', which has no bias "
              f"('{nxt}/bias') to fold it into. Keep those channels (keep=...), or give "
              f"'{nxt}' a bias."
          )
      else:
        biases[i + 1] = (nbias.astype(np.float64) + contrib).astype(nbias.dtype)

    new[f"{name}/kernel"] = kernel[..., idx]
    if bias is not None:
      new[f"{name}/bias"] = bias[idx]
    nk = kernels[i + 1]
    if nk.ndim > 2:
      kernels[i + 1] = np.take(nk, idx, axis=-2)
    else:  # rows p * channels + j of a Dense kernel (1 position unless flattened)
      kernels[i + 1] = rows[:, idx, :].reshape(-1, nk.shape[1])

  def replace(path, leaf):
    p = path_str(path)
    return jnp.asarray(new[p], leaf.dtype) if p in new else leaf

  features = tuple(int(new[f"{n}/kernel"].shape[-1]) for n in chain)
  return Shrunk(jax.tree_util.tree_map_with_path(replace, params), features, kept, inexact)


def shrink_dense_chain(
    params: PyTree,
    chain: Sequence[str],
    *,
    activation: Activation | Sequence[Activation],
    keep: Mapping[str, Any] | None = None,
) -> Shrunk:
  """``shrink_chain`` for a chain of Dense layers (its earlier name; same results).

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"a": {"kernel": jnp.array([[1., 0.]])}, "b": {"kernel": jnp.array([[2.], [3.]])}}
    >>> jc.prune.shrink_dense_chain(params, ["a", "b"], activation=jax.nn.relu).features
    (1, 1)
  """
  return shrink_chain(params, chain, activation=activation, keep=keep)


def shrink_heads(
    params: PyTree,
    *,
    q: str,
    k: str,
    v: str,
    o: str,
    num_heads: int,
    keep: Any = None,
) -> Shrunk:
  """Removes pruned heads from one attention layer's q, k, v and output projections.

  Head ``h`` is removed when its value projection's kernel columns are all
  zero (its output is then its value bias at every query, since attention
  weights sum to 1; ``value_bias[h] @ o_kernel[h]`` is folded into the output
  bias, exactly) or its output projection's rows are all zero (it contributes
  nothing). Zero query or key weights do not make a head removable. Each query
  must attend to at least one key (a fully masked row has no weights summing
  to 1).

  Two layouts are read: ``DenseGeneral``-style kernels (q/k/v ``(d, heads,
  head_dim)``, biases ``(heads, head_dim)``, output ``(heads, head_dim, d)``, as
  ``flax.linen.MultiHeadDotProductAttention`` and ``flax.nnx.MultiHeadAttention``
  store them) and ``Dense``-style ones (q/k/v ``(d, heads * head_dim)``, output
  ``(heads * head_dim, d)``, heads contiguous).

  Args:
    params: the pruned params (any pytree with ``<layer>/kernel`` and
      optionally ``<layer>/bias`` leaves).
    q, k, v, o: the module paths of the query, key, value and output
      projections (``"attn/query"``, ...).
    num_heads: the number of heads.
    keep: optional bool array ``(num_heads,)`` of the heads to keep; a head it
      drops must be removable as above.

  Returns:
    A ``Shrunk`` with ``features == (heads kept,)`` and ``kept["heads"]``: build
    the smaller layer with that many heads.

  Raises:
    ValueError: a projection is missing or its shape does not split into
      ``num_heads`` heads, ``keep`` drops a live head, or a value bias must be
      folded into an output projection without a bias.

  Example:
    >>> import jax.numpy as jnp, numpy as np, jaxcompress as jc
    >>> w = np.ones((4, 2, 2), np.float32); vw = w.copy(); vw[:, 1] = 0.0  # head 1 silent
    >>> params = {"q": {"kernel": w}, "k": {"kernel": w}, "v": {"kernel": vw},
    ...           "o": {"kernel": np.ones((2, 2, 4), np.float32), "bias": np.zeros(4, np.float32)}}
    >>> small = jc.prune.shrink_heads(params, q="q", k="k", v="v", o="o", num_heads=2)
    >>> small.features, small.params["v"]["kernel"].shape, small.params["o"]["kernel"].shape
    ((1,), (4, 1, 2), (1, 2, 4))
  """
  where = "shrink_heads"
  heads = check_int(where, "num_heads", num_heads, low=1)
  leaves = _leaf_map(params)
  proj = {name: _lookup(leaves, path, where, heads=name != "o")
          for name, path in (("q", q), ("k", k), ("v", v), ("o", o))}

  def split_in(name: str, kernel: np.ndarray, bias: np.ndarray | None):
    """(d, H, dh) kernel and (H, dh) bias of a q/k/v projection."""
    path = {"q": q, "k": k, "v": v}[name]
    if kernel.ndim == 3 and kernel.shape[1] == heads:
      return kernel, bias
    if kernel.ndim == 2 and kernel.shape[1] % heads == 0:
      dh = kernel.shape[1] // heads
      return kernel.reshape(kernel.shape[0], heads, dh), None if bias is None else bias.reshape(heads, dh)
    raise ValueError(
        f"{where}: '{path}/kernel' has shape {kernel.shape}, which does not split into "
        f"num_heads={heads} heads: expected (d, {heads}, head_dim) or (d, {heads} * head_dim)."
    )

  split = {name: split_in(name, *proj[name][:2]) for name in ("q", "k", "v")}
  ok, ob, _ = proj["o"]
  if ok.ndim == 3 and ok.shape[0] == heads:
    o3 = ok
  elif ok.ndim == 2 and ok.shape[0] % heads == 0:
    o3 = ok.reshape(heads, ok.shape[0] // heads, ok.shape[1])
  else:
    raise ValueError(
        f"{where}: '{o}/kernel' has shape {ok.shape}, which does not split into "
        f"num_heads={heads} heads: expected ({heads}, head_dim, d) or ({heads} * head_dim, d)."
    )
  vk, vb = split["v"]
  if o3.shape[1] != vk.shape[2]:
    raise ValueError(
        f"{where}: '{v}/kernel' gives heads of {vk.shape[2]} values but '{o}/kernel' takes "
        f"{o3.shape[1]} per head ({vk.shape} then {ok.shape})."
    )

  v_zero = ~np.any(vk != 0, axis=(0, 2))
  o_zero = ~np.any(o3 != 0, axis=(1, 2))
  removable = v_zero | o_zero
  if keep is None:
    keep_mask = ~removable
  else:
    keep_mask = np.asarray(keep)
    if keep_mask.dtype != np.bool_ or keep_mask.shape != (heads,):
      raise ValueError(
          f"{where}: keep must be a bool array of shape ({heads},), one entry per head; got "
          f"dtype {keep_mask.dtype} and shape {keep_mask.shape}."
      )
    live = np.flatnonzero(~keep_mask & ~removable)
    if live.size:
      raise ValueError(
          f"{where}: keep drops heads {live.tolist()}, whose value columns in '{v}/kernel' and "
          f"output rows in '{o}/kernel' are not all zero; removing them would change the "
          "outputs. Prune those heads first, or keep them."
      )
  idx = np.flatnonzero(keep_mask)
  folded = np.flatnonzero(~keep_mask & v_zero & ~o_zero)
  if folded.size and vb is not None:
    contrib = np.einsum("hd,hdo->o", vb[folded].astype(np.float64), o3[folded].astype(np.float64))
    if ob is None:
      if np.any(contrib != 0):
        raise ValueError(
            f"{where}: heads {folded.tolist()} output their value bias ('{v}/bias'), which "
            f"must be folded into '{o}/bias', but '{o}' has no bias. Keep those heads "
            "(keep=...), or give the output projection a bias."
        )
    else:
      ob = (ob.astype(np.float64) + contrib).astype(ob.dtype)

  new: dict[str, Any] = {}
  for name, path in (("q", q), ("k", k), ("v", v)):
    kernel, _, _ = proj[name]
    k3, b2 = split[name]
    k3 = k3[:, idx]
    new[f"{path}/kernel"] = k3 if kernel.ndim == 3 else k3.reshape(k3.shape[0], -1)
    if b2 is not None:
      b2 = b2[idx]
      new[f"{path}/bias"] = b2 if kernel.ndim == 3 else b2.reshape(-1)
  o3 = o3[idx]
  new[f"{o}/kernel"] = o3 if ok.ndim == 3 else o3.reshape(-1, o3.shape[-1])
  if ob is not None:
    new[f"{o}/bias"] = ob

  def replace(path, leaf):
    p = path_str(path)
    return jnp.asarray(new[p], leaf.dtype) if p in new else leaf

  return Shrunk(jax.tree_util.tree_map_with_path(replace, params), (int(idx.size),), {"heads": idx}, {})

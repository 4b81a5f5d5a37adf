"""The clustering stage: k-means weight sharing with trainable centroids.

Deep Compression (Han et al. 2016) prunes, then clusters the surviving weights
of a layer into ``2^b`` shared values, fine-tunes the shared values and
Huffman-codes the result. In a spec that is one rule::

    jc.Rule(r".*kernel", [jc.prune.magnitude(sparsity=0.9), jc.cluster.kmeans(bits=5)])

``Cluster`` does not replace the weight: it reads the value the stages before
it left (the pruned weight), so that zeros are known when it clusters. Its
``apply`` maps every nonzero entry of that value to its centroid and keeps
zeros at exactly zero. The centroids are the stage's trainable params; the
assignments are state. Because ``apply`` is a gather ``centroids[assignments]``,
the gradient of a centroid is the sum of the gradients of the weights assigned
to it, as in the paper; the dense weight gets a zero gradient once clustered
(it only tells which entries are zero).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxcompress.cluster import kmeans1d as _km
from jaxcompress.core import sharding as _sharding
from jaxcompress.core.checks import check_int, error_if, is_int
from jaxcompress.core.stage import Stage, UpdateContext

Array = jax.Array

MAX_BITS = 8

#: One codebook per layer is clustered from the leaf's sorted columns
#: (``kmeans1d.sort_columns``) when the leaf has at least this many entries: a
#: sharded leaf is then never gathered (sorting it whole does gather it). Below,
#: the whole leaf is sorted, which gathers at most 4 MiB of float32. Both take
#: about the same time on XLA:CPU (4096x4096, ``"optimal"`` init: 7.6 s by
#: columns, 7.4 s whole; 784x300: 0.21 s and 0.20 s).
COLUMNS_MIN_SIZE = 2**20


class ClusterState(NamedTuple):
  """State of one clustered leaf.

  Attributes:
    assignments: uint8, the weight's shape: the index of each entry's centroid
      (0 for zero entries, which map to zero, not to a centroid).
    clustered: bool scalar; False before ``begin_step``, while the stage passes
      the weight through unchanged.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.cluster.kmeans(bits=1)])])
    >>> t, s = spec.init({"w": jnp.array([0.9, 1.1, 0.0, -2.0])})
    >>> st = s["w"].stages["cluster"]
    >>> st.assignments.tolist(), bool(st.clustered)
    ([1, 1, 0, 0], True)
  """

  assignments: Array
  clustered: Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cluster(Stage):
  """k-means weight sharing: ``apply`` gives ``where(w != 0, centroids[assignments], 0)``.

  Args:
    bits: ``2^bits`` centroids per layer (or per channel); 1 to 8, since the
      assignments are stored as uint8.
    centroid_init: ``"optimal"`` (the default: the k-means optimum of the
      nonzero weights, by dynamic programming over their sorted values; exact
      for groups of up to 512 values, near-optimal beyond and polished by
      Lloyd), or a Lloyd starting point from Deep Compression: ``"linear"``
      (evenly spaced over ``[min, max]`` of the nonzero weights), ``"density"``
      (evenly spaced levels of their CDF) or ``"kmeans++"`` (needs a PRNG key:
      pass ``key=`` to ``spec.init``, or to ``spec.update`` when
      ``begin_step > 0``).
    channel_axis: ``None`` for one codebook per layer, or the axis of the
      output channels (``-1`` for a Flax ``Dense`` or ``Conv`` kernel) for one
      codebook per channel.
    iters: the most Lloyd iterations. Lloyd stops earlier, at its fixed point,
      once the partition no longer changes (each iteration costs O(k log n)
      on the sorted weights, so the cap is rarely reached); ``0`` keeps the
      initial centroids.
    begin_step: ``0`` clusters at ``spec.init``; a positive step clusters in
      the ``spec.update`` of that step, from the value the stages before left
      then (the weight after pruning and training). Before it, the stage
      passes the value through and the dense weight trains as usual.

  Zero entries of the value (pruned weights) take no part in k-means and stay
  exactly zero. The centroids train (their gradient is the sum of the
  gradients of their weights); after clustering the dense weight receives zero
  gradient.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.cluster.Cluster(bits=1)])])
    >>> t, s = spec.init({"w": jnp.array([0.9, 1.1, 0.0, -2.1, -1.9])})
    >>> [round(v, 4) for v in spec.apply(t, s)["w"].tolist()]
    [1.0, 1.0, 0.0, -2.0, -2.0]
  """

  name: ClassVar[str] = "cluster"

  bits: int
  centroid_init: str = "optimal"
  channel_axis: int | None = None
  iters: int = 300
  begin_step: int = 0

  def __post_init__(self):
    try:
      check_int("Cluster", "bits", self.bits, low=1, high=MAX_BITS)
    except ValueError as e:
      raise ValueError(
          f"{e} bits={self.bits} would give {2**self.bits} centroids, but cluster indices "
          f"are stored as uint8. Use bits in 1..{MAX_BITS} (Deep Compression uses 5 for "
          "Dense and 8 for Conv layers)."
      ) from None
    if self.centroid_init not in _km.INITS:
      raise ValueError(
          f"Cluster: centroid_init must be one of {_km.INITS}, got {self.centroid_init!r}. "
          "Use 'optimal' (the default) unless you reproduce a paper's initialisation."
      )
    if self.channel_axis is not None and (
        not is_int(self.channel_axis)
    ):
      raise TypeError(
          f"Cluster: channel_axis must be None (one codebook per layer) or an int axis, "
          f"got {self.channel_axis!r}."
      )
    check_int("Cluster", "iters", self.iters, low=0)
    check_int("Cluster", "begin_step", self.begin_step, low=0)

  @property
  def num_centroids(self) -> int:
    """``2^bits``."""
    return 2**self.bits

  # -- checks that need the leaf ---------------------------------------------
  def _check_leaf(self, value, path: str) -> None:
    if self.channel_axis is not None and not -value.ndim <= self.channel_axis < value.ndim:
      raise ValueError(
          f"Cluster on leaf {path!r}: channel_axis={self.channel_axis} is out of range for "
          f"a weight of shape {tuple(value.shape)}. Use an axis in "
          f"[{-value.ndim}, {value.ndim}) or None for one codebook per layer."
      )

  def _check_finite(self, value, path: str) -> None:
    error_if(
        ~jnp.all(jnp.isfinite(value)),
        f"Cluster on leaf {path!r}: the weight holds NaN or inf values, and k-means would "
        "turn every centroid they reach into NaN. Find where they come from (a diverged "
        "training step, a corrupt checkpoint) and cluster finite weights.",
    )

  def _key_needed(self, key, path: str, where: str) -> None:
    if self.centroid_init == "kmeans++" and key is None:
      raise ValueError(
          f"Cluster on leaf {path!r}: centroid_init='kmeans++' draws random centroids and "
          f"needs a PRNG key, but {where} got key=None. Pass key=jax.random.key(0) there, "
          "or use centroid_init='linear'."
      )

  # -- layout ------------------------------------------------------------------
  def _axis(self, ndim: int) -> int | None:
    return None if self.channel_axis is None else self.channel_axis % ndim

  def _grouped(self, x: Array) -> Array:
    """``(groups, n)``: one row per codebook."""
    ax = self._axis(x.ndim)
    if ax is None:
      return x.reshape(1, -1)
    return jnp.moveaxis(x, ax, 0).reshape(x.shape[ax], -1)

  def _ungrouped(self, a: Array, shape: tuple[int, ...]) -> Array:
    ax = self._axis(len(shape))
    if ax is None:
      return a.reshape(shape)
    moved = (shape[ax],) + tuple(s for i, s in enumerate(shape) if i != ax)
    return jnp.moveaxis(a.reshape(moved), 0, ax)

  # -- stage protocol ----------------------------------------------------------
  def init(self, value, *, path, key):
    self._check_leaf(value, path)
    k = self.num_centroids
    if self.begin_step > 0:
      shape = (k,) if self.channel_axis is None else (value.shape[self._axis(value.ndim)], k)
      centroids = jnp.zeros(shape, value.dtype)
      return centroids, ClusterState(
          jnp.zeros(value.shape, jnp.uint8), jnp.zeros((), jnp.bool_)
      )
    self._key_needed(key, path, "spec.init")
    self._check_finite(value, path)
    centroids, assignments = _cluster(self, value, key)
    return centroids, ClusterState(assignments, jnp.ones((), jnp.bool_))

  def apply(self, value, params, state):
    return _shared(params, state.assignments, value, state.clustered, self._axis(value.ndim))

  def update(self, value, params, state, ctx: UpdateContext):
    if self.begin_step == 0:
      return value, params, state
    self._key_needed(ctx.key, ctx.path, "spec.update")
    return value, *_cluster_at_step(self, value, params, state, ctx.step, ctx.key, ctx.path)


def _gather(table: Array, assignments: Array, axis: int | None) -> Array:
  a = assignments.astype(jnp.int32)
  if axis is not None:
    a = jax.lax.broadcasted_iota(jnp.int32, a.shape, axis) * table.shape[-1] + a
  # The gather takes the assignments' sharding (stated for Explicit meshes).
  return table.reshape(-1).at[a].get(out_sharding=_sharding.explicit_sharding(a))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _shared(table: Array, assignments: Array, value: Array, active: Array, axis: int | None) -> Array:
  """``Cluster.apply``: each nonzero entry's centroid once ``active``, else ``value``.

  ``table`` is ``(k,)``, or ``(channels, k)`` with the channels along
  ``axis``. A centroid's gradient is the sum of the gradients of the entries
  assigned to it. Autodiff of the gather and the selects makes that a
  scatter-add fed with a masked copy of the gradient, int32 indices and a
  flattened copy (three weights' worth of temporaries); here the gradient
  goes in as it is, with uint8 indices (uint16 for 256 centroids) that send
  zero entries out of bounds, where the scatter drops them. Sums are float32.
  """
  clustered = jnp.where(value != 0, _gather(table, assignments, axis), jnp.zeros_like(value))
  return jnp.where(active, clustered, value)


def _shared_fwd(table, assignments, value, active, axis):
  return _shared(table, assignments, value, active, axis), (table, assignments, value, active)


def _shared_bwd(axis, res, g):
  table, a, value, active = res
  k = table.shape[-1]
  index = jnp.where(active & (value != 0), a.astype(jnp.int32), k).astype(jnp.uint8 if k < 256 else jnp.uint16)
  dims = jax.lax.ScatterDimensionNumbers(
      update_window_dims=(),
      inserted_window_dims=(table.ndim - 1,),
      scatter_dims_to_operand_dims=(table.ndim - 1,),
      operand_batching_dims=() if axis is None else (0,),
      scatter_indices_batching_dims=() if axis is None else (axis,),
  )
  scatter = lambda ig: jax.lax.scatter_add(
      jnp.zeros(table.shape, jnp.float32), ig[0][..., None], ig[1].astype(jnp.float32), dims,
      mode=jax.lax.GatherScatterMode.FILL_OR_DROP,
  )
  # Partitioned by XLA on Explicit meshes too (per-shard sums, then one all-reduce).
  d_table, _ = _sharding.call_partitioned(scatter, (index, g), lambda out, sharding_of: sharding_of(table))
  return d_table.astype(table.dtype), None, jnp.where(active, jnp.zeros_like(g), g), None


_shared.defvjp(_shared_fwd, _shared_bwd)


# Jitted with the stage static: inlined under an outer jit, and compiled once
# (not op by op, nor once per call for the lax.cond) when called eagerly.
@functools.partial(jax.jit, static_argnums=0)
def _cluster(stage: Cluster, value: Array, key: Array | None) -> tuple[Array, Array]:
  """Centroids (``(k,)`` or ``(channels, k)``, value dtype) and uint8 assignments."""
  k = stage.num_centroids
  if stage.channel_axis is None and stage.centroid_init != "kmeans++" and value.size >= COLUMNS_MIN_SIZE:
    # One codebook: the leaf as a matrix, sorted by columns (kmeans1d.sort_columns),
    # so that a sharded leaf is neither flattened nor sorted whole (both gather it).
    # kmeans++ draws from the flattened leaf and takes the path below.
    x = value.astype(jnp.float32).reshape(-1, value.shape[-1] if value.ndim > 1 else 1)
    valid = x != 0
    centroids, assignments = _km.kmeans(
        x, valid, k, init=stage.centroid_init, iters=stage.iters, key=None,
        cuts=_km.num_cuts(x.size, k, 1),
    )
    assignments = jnp.where(valid, assignments, 0).astype(jnp.uint8)
    return centroids.astype(value.dtype), assignments.reshape(value.shape)
  x = stage._grouped(value.astype(jnp.float32))
  valid = x != 0
  keys = None if key is None else jax.random.split(key, x.shape[0])
  cuts = _km.num_cuts(x.shape[1], k, x.shape[0])

  def one(xg, vg, kg):
    return _km.kmeans(xg, vg, k, init=stage.centroid_init, iters=stage.iters, key=kg, cuts=cuts)

  centroids, assignments = jax.vmap(one)(x, valid, keys)
  assignments = jnp.where(valid, assignments, 0).astype(jnp.uint8)
  if stage.channel_axis is None:
    centroids = centroids[0]
  return centroids.astype(value.dtype), stage._ungrouped(assignments, value.shape)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _cluster_at_step(stage: Cluster, value, params, state, step, key, path):
  """Clusters ``value`` when ``step == stage.begin_step``; else keeps params and state."""

  def run(_):
    stage._check_finite(value, path)
    centroids, assignments = _cluster(stage, value, key)
    return centroids, ClusterState(assignments, jnp.ones((), jnp.bool_))

  def keep(_):
    return params, state

  return jax.lax.cond(step == stage.begin_step, run, keep, None)


def kmeans(bits: int, **kwargs: Any) -> Cluster:
  """k-means weight sharing with ``2^bits`` trainable centroids.

  Args:
    bits: centroids per codebook are ``2^bits`` (1 to 8).
    **kwargs: any other ``Cluster`` argument (centroid_init, channel_axis,
      iters, begin_step).

  Returns:
    ``Cluster(bits=bits, **kwargs)``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5), jc.cluster.kmeans(bits=1)])])
    >>> t, s = spec.init({"w": jnp.array([0.1, 3.0, -0.2, 5.0, 0.3, -4.0])})
    >>> spec.apply(t, s)["w"].tolist()
    [0.0, 4.0, 0.0, 4.0, 0.0, -4.0]
  """
  return Cluster(bits=bits, **kwargs)

"""Compression-aware training steps: what a user would write by hand, once.

    ts   = jc.init_train_state(spec, optimizer, params)
    step = jc.make_train_step(loss_fn, spec, optimizer)
    ts, metrics = step(ts, batch)

``loss_fn(model_params, batch)`` is the user's loss over ordinary model params.
The step runs ``spec.apply`` inside the differentiated function, updates the
trainable tree with the optimizer, then calls ``spec.update`` with the gradient
with respect to the model params (what saliency, movement and RigL read).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxcompress.core import sharding as _sharding
from jaxcompress.core.checks import key_data
from jaxcompress.core.spec import Spec

PyTree = Any


class MaskedOptimizer(optax.GradientTransformationExtraArgs):
  """The optax transformation ``jc.masked_optimizer`` returns (its own type, so
  the step builders can tell that an optimizer already takes ``masks=``)."""

  __slots__ = ()


class TrainState(NamedTuple):
  """Everything a compression-aware step carries.

  Attributes:
    step: int32 step counter.
    trainable: what the optimizer updates (``spec.init``'s first output).
    spec_state: the compression state (masks, ranges, assignments).
    opt_state: the optimizer state.
    key: the raw data (uint32) of the PRNG key for random stages, or ``None``.
      Raw data, not a typed key, so that the whole state checkpoints with
      Orbax; ``compression_update`` wraps it back into a key.
  """

  step: jax.Array
  trainable: PyTree
  spec_state: PyTree
  opt_state: PyTree
  key: jax.Array | None


def masked_optimizer(inner: optax.GradientTransformation) -> MaskedOptimizer:
  """Wraps an optimizer so that pruned weights and their moments stay exactly zero.

  The step builders (``jc.make_train_step``, ``jc.compression_update``,
  ``jc.distill.make_distill_step``) wrap the optimizer they are given
  themselves, so a plain optax optimizer is safe there; call this when you
  write your own step. Its state is ``inner``'s state, so a ``TrainState``
  built with either one works with both. Wrapping twice is the same as once.

  Its ``update`` takes ``masks=spec.update_masks(trainable, spec_state)`` (the
  train step passes it): the gradients and every optimizer-state leaf that
  mirrors a masked param (Adam's moments, momentum, ...) are zeroed where the
  mask is False before ``inner`` runs, and the updates are masked after. The
  state ``inner`` returns is then zero there for every optimizer whose
  per-weight state stays zero given a zero state and a zero gradient (SGD with
  momentum, Adam, AdamW, RMSProp, Adagrad, Lion, Yogi).
  Without ``masks`` it behaves exactly like ``inner``.

  Args:
    inner: any optax optimizer.

  Returns:
    A ``MaskedOptimizer`` (an optax ``GradientTransformationExtraArgs``);
    chain it like any other.

  Example:
    >>> import jax.numpy as jnp, optax, jaxcompress as jc
    >>> tx = jc.masked_optimizer(optax.adam(0.1))
    >>> w = {"w": jnp.ones(3)}
    >>> st = tx.init(w)
    >>> u, st = tx.update({"w": jnp.ones(3)}, st, w, masks={"w": jnp.array([True, False, True])})
    >>> [round(x, 4) for x in u["w"].tolist()]
    [-0.1, 0.0, -0.1]
  """
  if isinstance(inner, MaskedOptimizer):
    return inner
  inner = optax.with_extra_args_support(inner)

  def keep(x, m):
    # A mask made without the weight (LoRA's all-False one) is replicated;
    # on an Explicit mesh it is laid out as the weight first (a local slice).
    return jnp.where(_sharding.reshard_as(m, x), x, jnp.zeros_like(x))

  def mask_tree(tree, masks):
    return jax.tree_util.tree_map(lambda x, m: x if m is None else keep(x, m), tree, masks)

  def init(params):
    return inner.init(params)

  def update(updates, state, params=None, *, masks=None, **extra):
    if masks is None:
      return inner.update(updates, state, params, **extra)
    # The state is masked on the way in, not on the way out: XLA fuses the
    # select into the optimizer's own elementwise pass (masking its outputs
    # costs a separate pass per moment, ~10% of a small MLP's step on CPU).
    # With masked gradients, the moments it returns are then exactly zero too.
    state = optax.tree_utils.tree_map_params(
        inner,
        lambda x, m: x if m is None or getattr(x, "shape", None) != m.shape else keep(x, m),
        state,
        masks,
        transform_non_params=lambda x: x,
        # optax.partition/multi_transform hold MaskedNode() where a group has no params.
        is_leaf=lambda x: x is None or isinstance(x, optax.MaskedNode),
    )
    updates, state = inner.update(mask_tree(updates, masks), state, params, **extra)
    return mask_tree(updates, masks), state

  return MaskedOptimizer(init, update)


def _as_key(data: jax.Array | None) -> jax.Array | None:
  if data is None or jax.dtypes.issubdtype(data.dtype, jax.dtypes.prng_key):
    return data
  return jax.random.wrap_key_data(data)


def _unaliased(tree: PyTree, held: set[int]) -> PyTree:
  """Copies every array of ``tree`` the caller holds (``id`` in ``held``) or that
  appears twice, so that donating ``tree`` never deletes a caller's array."""
  seen: set[int] = set()

  def fresh(x):
    if isinstance(x, jax.Array) and (id(x) in held or id(x) in seen):
      x = jnp.copy(x)
    seen.add(id(x))
    return x

  return jax.tree_util.tree_map(fresh, tree)


def init_train_state(
    spec: Spec,
    optimizer: optax.GradientTransformation,
    params: PyTree,
    *,
    key: jax.Array | None = None,
) -> TrainState:
  """Builds the ``TrainState`` for ``make_train_step``.

  The state owns its arrays: where ``spec.init`` hands back the caller's own
  arrays (a leaf that a stage only masks or fake-quantizes) they are copied,
  so a step that donates the state never deletes ``params`` or ``key``.

  Args:
    spec: the compression spec.
    optimizer: any optax optimizer (the step builders wrap it in
      ``jc.masked_optimizer``; the optimizer state is the same either way).
    params: the model params. Never modified or donated.
    key: PRNG key for stages that draw random numbers (kept as raw key data).

  Returns:
    A ``TrainState`` at step 0.

  Example:
    >>> import jax.numpy as jnp, optax, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5)])])
    >>> ts = jc.init_train_state(spec, optax.sgd(0.1), {"w": jnp.arange(4.0)})
    >>> int(ts.step)
    0
  """
  held = {id(x) for x in jax.tree_util.tree_leaves((params, key))}
  trainable, spec_state = spec.init(params, key=key)
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      trainable=trainable,
      spec_state=spec_state,
      opt_state=optimizer.init(trainable),
      key=None if key is None else key_data(key, "init_train_state: key"),
  )
  return _unaliased(state, held)


def train_state_shardings(
    spec: Spec,
    optimizer: optax.GradientTransformation,
    params: PyTree,
    param_shardings: PyTree,
    *,
    key: jax.Array | None = None,
) -> TrainState:
  """The sharding of every ``TrainState`` leaf, derived from the params' shardings.

  Optimizer-state leaves that mirror a trainable leaf take its sharding; the
  rest (counters) are replicated.

  Args:
    spec, optimizer, key: as for ``init_train_state``.
    params: the params or their abstract shapes.
    param_shardings: a ``NamedSharding`` per param leaf.

  Returns:
    A ``TrainState`` of shardings, for ``jax.jit(..., out_shardings=...)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxcompress as jc
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5)])])
    >>> sh = jc.train_state_shardings(spec, optax.adam(1e-3), {"w": jnp.ones((4, 4))},
    ...                            {"w": NamedSharding(mesh, P(None, "model"))})
    >>> tuple(sh.spec_state["w"].stages["prune"].mask.spec)
    (None, 'model')
  """
  t_sh, s_sh = spec.shardings(params, param_shardings, key=key)
  mesh = jax.tree_util.tree_leaves(param_shardings)[0].mesh
  replicated = NamedSharding(mesh, PartitionSpec())
  t_abs, _ = jax.eval_shape(spec.init, params, key=key)
  o_abs = jax.eval_shape(optimizer.init, t_abs)
  o_sh = optax.tree_utils.tree_map_params(
      optimizer,
      lambda x, sh: x if isinstance(x, optax.MaskedNode) else sh,
      o_abs,
      t_sh,
      transform_non_params=lambda _: replicated,
      # optax.masked holds MaskedNode() where it keeps no state (jc.lowrank.adapters_only).
      is_leaf=lambda x: isinstance(x, optax.MaskedNode),
  )
  return TrainState(
      step=replicated,
      trainable=t_sh,
      spec_state=s_sh,
      opt_state=o_sh,
      key=None if key is None else replicated,
  )


def compression_update(
    ts: TrainState,
    loss_of_params: Callable[[PyTree], Any],
    spec: Spec,
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    stats_fn: Callable[[Any], dict] | None = None,
) -> tuple[TrainState, dict]:
  """One compression-aware update, the body of every step builder (not jitted).

  ``spec.apply`` runs inside the differentiated function; the optimizer,
  wrapped in ``jc.masked_optimizer``, updates the trainables so that pruned
  weights and their moments stay exactly zero; then
  ``spec.update`` gets the gradient with respect to the model params. Use it to
  write a custom step: ``jax.jit(lambda ts, b: compression_update(ts, ...))``.

  Args:
    ts: the current ``TrainState``.
    loss_of_params: ``loss_of_params(model_params) -> loss`` (or ``(loss, aux)``).
    spec, optimizer: the ones ``ts`` was built with.
    has_aux: whether ``loss_of_params`` returns ``(loss, aux)``.
    stats_fn: maps ``aux`` to ``spec.update``'s ``stats``.

  Returns:
    ``(new_state, {"loss": ..., "aux": ...})``.

  Example:
    >>> import jax.numpy as jnp, optax, jaxcompress as jc
    >>> spec, opt = jc.Spec([]), optax.sgd(0.5)
    >>> ts = jc.init_train_state(spec, opt, {"w": jnp.ones(2)})
    >>> ts, m = jc.compression_update(ts, lambda p: jnp.sum(p["w"] ** 2), spec, opt)
    >>> ts.trainable["w"].tolist(), float(m["loss"])
    ([0.0, 0.0], 2.0)
  """
  opt = masked_optimizer(optimizer)
  model_params, pullback = jax.vjp(lambda t: spec.apply(t, ts.spec_state), ts.trainable)
  out, g_model = jax.value_and_grad(loss_of_params, has_aux=has_aux)(model_params)
  loss, aux = out if has_aux else (out, None)
  (g_trainable,) = pullback(g_model)
  masks = spec.update_masks(ts.trainable, ts.spec_state)
  updates, opt_state = opt.update(g_trainable, ts.opt_state, ts.trainable, masks=masks)
  trainable = optax.apply_updates(ts.trainable, updates)
  stats = stats_fn(aux) if stats_fn is not None else None
  trainable, spec_state = spec.update(
      trainable, ts.spec_state, ts.step, grads=g_model, stats=stats, key=_as_key(ts.key)
  )
  new = TrainState(optax.safe_increment(ts.step), trainable, spec_state, opt_state, ts.key)
  return new, {"loss": loss, "aux": aux}


def make_train_step(
    loss_fn: Callable[..., Any],
    spec: Spec,
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    state_shardings: TrainState | None = None,
    batch_sharding: Any = None,
    donate: bool = True,
    stats_fn: Callable[[Any], dict] | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """Builds one jitted, compression-aware training step.

  Args:
    loss_fn: ``loss_fn(model_params, batch) -> loss`` (or ``(loss, aux)`` with
      ``has_aux=True``) over ordinary model params.
    spec: the compression spec.
    optimizer: the optax optimizer used in ``init_train_state``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    state_shardings: from ``train_state_shardings``, to pin the state's layout.
    batch_sharding: sharding of the batch (e.g. the data axis of a mesh).
    donate: donate the input state's buffers (the default): the state passed
      in is deleted by the step; use the state it returns. A state from
      ``init_train_state`` owns its arrays, so the caller's params and key are
      never donated. Pass ``donate=False`` to keep the old state alive.
    stats_fn: maps ``aux`` to ``spec.update``'s ``stats`` (e.g. activation norms).

  Returns:
    ``step(state, batch) -> (state, {"loss": ..., "aux": ...})``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.prune.magnitude(sparsity=0.5)])])
    >>> opt = jc.masked_optimizer(optax.sgd(0.1))
    >>> loss = lambda p, b: jnp.sum((b @ p["w"]) ** 2)
    >>> ts = jc.init_train_state(spec, opt, {"w": jnp.arange(1.0, 5.0)})
    >>> step = jc.make_train_step(loss, spec, opt)
    >>> ts, m = step(ts, jnp.ones((2, 4)))
    >>> (spec.apply(ts.trainable, ts.spec_state)["w"] == 0).sum().item()
    2
  """

  def step_fn(ts: TrainState, batch):
    return compression_update(
        ts, lambda p: loss_fn(p, batch), spec, optimizer, has_aux=has_aux, stats_fn=stats_fn
    )

  jit_kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
  if state_shardings is not None:
    jit_kwargs["in_shardings"] = (state_shardings, batch_sharding)
    jit_kwargs["out_shardings"] = (state_shardings, None)
  return jax.jit(step_fn, **jit_kwargs)

"""The distillation step: a frozen teacher and a student trained in one jitted step.

    ts   = jc.init_train_state(spec, optimizer, student_params)
    step = make_distill_step(loss_fn, teacher_fn, spec, optimizer)
    ts, metrics = step(ts, teacher_params, batch)

Inside the step: the teacher's output ``teacher_fn(teacher_params, batch)``
(gradients stopped); the student's model params ``spec.apply(trainable,
state)``; the loss ``loss_fn(student_params, batch, teacher_out, step)`` and
its gradient; the optimizer update of the trainable tree; ``spec.update``.
The state is the ``jc.TrainState`` of ``jaxcompress.train``, so everything a
compression spec does in ordinary training (masked optimizer moments,
schedules, saliency from gradients) works on the student unchanged. Use
``jc.Spec([])`` for an uncompressed student.

The teacher may be compressed too (an int8 teacher): with ``teacher_spec``, the
step takes ``teacher = (trainable, state)`` from ``teacher_spec.init`` and runs
``teacher_spec.apply`` inside the step. The teacher is an argument, not part of
the state: it is never donated or updated.

Offline distillation (teacher outputs cached on disk, see
``jaxcompress.distill.cache``) is the same step with a ``teacher_fn`` that
reads the batch: ``lambda _, batch: batch["teacher"]`` and ``teacher=None``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from jaxcompress.core.spec import Spec
from jaxcompress.train import TrainState, compression_update

PyTree = Any


def make_distill_step(
    loss_fn: Callable[..., Any],
    teacher_fn: Callable[[PyTree, Any], Any],
    spec: Spec,
    optimizer: optax.GradientTransformation,
    *,
    teacher_spec: Spec | None = None,
    has_aux: bool = False,
    state_shardings: TrainState | None = None,
    teacher_shardings: Any = None,
    batch_sharding: Any = None,
    donate: bool = True,
    stats_fn: Callable[[Any], dict] | None = None,
) -> Callable[[TrainState, PyTree, Any], tuple[TrainState, dict]]:
  """Builds one jitted distillation step.

  Args:
    loss_fn: ``loss_fn(student_params, batch, teacher_out, step) -> loss`` (or
      ``(loss, aux)`` with ``has_aux=True``), a scalar. ``student_params`` are
      the student's model params (after ``spec.apply``); ``step`` is the int32
      step, to evaluate schedules (``temperature=schedule(step)``).
    teacher_fn: ``teacher_fn(teacher_params, batch) -> teacher_out``, any
      pytree (logits, features, ``TopKLogits``). Its gradient is stopped.
    spec: the student's compression spec (``jc.Spec([])`` for none), the one
      the state was built with (``jc.init_train_state``).
    optimizer: any optax optimizer, the one the state was built with (wrap it
      in ``jc.masked_optimizer`` when the spec prunes).
    teacher_spec: a compression spec for the teacher; the step then takes
      ``teacher = (trainable, state)`` from ``teacher_spec.init``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    state_shardings: ``jc.train_state_shardings(...)`` of the student's state.
    teacher_shardings: the teacher's shardings (for a compressed teacher, the
      pair ``teacher_spec.shardings(params, param_shardings)``).
    batch_sharding: sharding of the batch (its data axis).
    donate: donate the input state's buffers.
    stats_fn: maps ``aux`` to ``spec.update``'s ``stats`` (e.g. the student's
      activation norms for Wanda), as in ``jc.make_train_step``.

  Returns:
    ``step(state, teacher, batch) -> (state, {"loss": ..., "aux": ...})``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxcompress as jc
    >>> x = jax.random.normal(jax.random.key(0), (8, 4))
    >>> teacher = {"w": jax.random.normal(jax.random.key(1), (4, 3))}
    >>> teacher_fn = lambda p, batch: batch @ p["w"]
    >>> def loss_fn(p, batch, teacher_logits, step):
    ...   return jc.distill.soft_target_loss(batch @ p["w"], teacher_logits, temperature=2.0).mean()
    >>> spec, opt = jc.Spec([]), optax.sgd(0.5)
    >>> ts = jc.init_train_state(spec, opt, {"w": jnp.zeros((4, 3))})
    >>> step = jc.distill.make_distill_step(loss_fn, teacher_fn, spec, opt)
    >>> losses = []
    >>> for _ in range(20):
    ...   ts, m = step(ts, teacher, x)
    ...   losses.append(float(m["loss"]))
    >>> losses[-1] < 0.1 * losses[0]
    True
  """
  if not isinstance(spec, Spec):
    raise TypeError(
        f"make_distill_step: spec must be a jc.Spec (jc.Spec([]) for an uncompressed student), "
        f"got {spec!r}."
    )
  if teacher_spec is not None and not isinstance(teacher_spec, Spec):
    raise TypeError(f"make_distill_step: teacher_spec must be a jc.Spec or None, got {teacher_spec!r}.")

  def teacher_params_of(teacher):
    if teacher_spec is None:
      return teacher
    if not (isinstance(teacher, (tuple, list)) and len(teacher) == 2):
      raise TypeError(
          "make_distill_step: with teacher_spec the step takes teacher=(trainable, state), the "
          f"pair teacher_spec.init(params) returns; got a {type(teacher).__name__}."
      )
    return teacher_spec.apply(*teacher)

  def step_fn(ts: TrainState, teacher, batch):
    teacher_out = jax.lax.stop_gradient(teacher_fn(teacher_params_of(teacher), batch))
    return compression_update(
        ts,
        lambda p: loss_fn(p, batch, teacher_out, ts.step),
        spec,
        optimizer,
        has_aux=has_aux,
        stats_fn=stats_fn,
    )

  jit_kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
  if state_shardings is not None or teacher_shardings is not None or batch_sharding is not None:
    jit_kwargs["in_shardings"] = (state_shardings, teacher_shardings, batch_sharding)
    jit_kwargs["out_shardings"] = (state_shardings, None)
  return jax.jit(step_fn, **jit_kwargs)

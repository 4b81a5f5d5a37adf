"""Schedules: pure functions of an integer step giving a scalar.

Usable for any scalar a stage or loss takes: sparsity, bits, temperature, loss
weights. Built with validated hyperparameters; no Python branching on the step,
so they trace once under ``jax.jit``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "Schedule",
    "ScalarOrSchedule",
    "as_schedule",
    "constant",
    "cosine",
    "linear",
    "piecewise",
    "polynomial",
]

Schedule = Callable[[jax.Array | int], jax.Array]
ScalarOrSchedule = float | Schedule


def _check_steps(name: str, **steps: int) -> None:
  for k, v in steps.items():
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ValueError(f"{name}: {k} must be a non-negative int, got {v!r}.")


def _progress(step, begin: int, end: int) -> jax.Array:
  step = jnp.asarray(step, jnp.float32)
  return jnp.clip((step - begin) / max(end - begin, 1), 0.0, 1.0)


def constant(value: float) -> Schedule:
  """A schedule that is ``value`` at every step.

  Example:
    >>> float(constant(0.5)(100))
    0.5
  """
  value = float(value)
  return lambda step: jnp.full((), value, jnp.float32)


def linear(init_value: float, end_value: float, *, begin_step: int = 0, end_step: int) -> Schedule:
  """Linear from ``init_value`` at ``begin_step`` to ``end_value`` at ``end_step``.

  Constant before and after.

  Example:
    >>> float(linear(0.0, 1.0, begin_step=0, end_step=10)(5))
    0.5
  """
  return polynomial(init_value, end_value, begin_step=begin_step, end_step=end_step, power=1.0)


def polynomial(
    init_value: float, end_value: float, *, begin_step: int = 0, end_step: int, power: float = 3.0
) -> Schedule:
  """``end + (init - end) * (1 - t)^power``, t the progress from begin to end.

  With ``power=3`` this is the gradual pruning schedule of Zhu and Gupta (2017):
  ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``.

  Example:
    >>> round(float(polynomial(0.0, 0.9, begin_step=0, end_step=100)(50)), 6)
    0.7875
  """
  _check_steps("polynomial", begin_step=begin_step, end_step=end_step)
  if end_step <= begin_step:
    raise ValueError(
        f"polynomial: end_step ({end_step}) must be greater than begin_step ({begin_step})."
    )
  if power <= 0:
    raise ValueError(f"polynomial: power must be positive, got {power}.")
  init_value, end_value, power = float(init_value), float(end_value), float(power)

  def schedule(step):
    t = _progress(step, begin_step, end_step)
    return end_value + (init_value - end_value) * (1.0 - t) ** power

  return schedule


def cosine(init_value: float, end_value: float, *, begin_step: int = 0, end_step: int) -> Schedule:
  """Half-cosine from ``init_value`` to ``end_value`` between the two steps.

  Example:
    >>> round(float(cosine(1.0, 0.0, end_step=100)(50)), 6)
    0.5
  """
  _check_steps("cosine", begin_step=begin_step, end_step=end_step)
  if end_step <= begin_step:
    raise ValueError(f"cosine: end_step ({end_step}) must be greater than begin_step ({begin_step}).")
  init_value, end_value = float(init_value), float(end_value)

  def schedule(step):
    t = _progress(step, begin_step, end_step)
    return end_value + (init_value - end_value) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))

  return schedule


def piecewise(boundaries: Sequence[int], values: Sequence[float]) -> Schedule:
  """``values[i]`` for steps in ``[boundaries[i-1], boundaries[i])``.

  ``values`` has one more entry than ``boundaries``, which must increase.

  Example:
    >>> s = piecewise([10, 20], [0.0, 0.5, 0.9])
    >>> [round(float(s(i)), 6) for i in (0, 10, 25)]
    [0.0, 0.5, 0.9]
  """
  boundaries = list(boundaries)
  if len(values) != len(boundaries) + 1:
    raise ValueError(
        f"piecewise: values needs len(boundaries) + 1 = {len(boundaries) + 1} entries, got {len(values)}."
    )
  _check_steps("piecewise", **{f"boundaries[{i}]": b for i, b in enumerate(boundaries)})
  if any(b2 <= b1 for b1, b2 in zip(boundaries, boundaries[1:])):
    raise ValueError(f"piecewise: boundaries must strictly increase, got {boundaries}.")
  b = jnp.asarray(boundaries, jnp.int32)
  v = jnp.asarray(values, jnp.float32)

  def schedule(step):
    return v[jnp.sum(jnp.asarray(step, jnp.int32) >= b)]

  return schedule


def as_schedule(value: ScalarOrSchedule, *, name: str = "value") -> Schedule:
  """A schedule from a number (constant) or a schedule (returned as is)."""
  if callable(value):
    return value
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return constant(value)
  raise TypeError(f"{name} must be a number or a schedule (a function of the step), got {value!r}.")

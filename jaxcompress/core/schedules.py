"""Schedules: pure functions of an integer step giving a scalar.

Usable for any scalar a stage or loss takes: sparsity, bits, temperature, loss
weights. Built with validated hyperparameters; no Python branching on the step,
so they trace once under ``jax.jit``.

A stage checks a schedule's values when it is built (``check_schedule``): the
schedules made here carry ``value_range``, the least and greatest value they
take at any step, so they are checked exactly; any other function of the step
is evaluated on the host at the steps the stage will use (its first and last
step and points between) and checked there.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.checks import check_int, check_number, is_number

__all__ = [
    "Schedule",
    "ScalarOrSchedule",
    "as_schedule",
    "check_schedule",
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
    check_int(name, k, v, low=0)


def _with_range(schedule: Schedule, *values: float) -> Schedule:
  """Records on ``schedule`` the least and greatest values it takes."""
  schedule.value_range = (min(values), max(values))
  return schedule


def _progress(step, begin: int, end: int) -> jax.Array:
  step = jnp.asarray(step, jnp.float32)
  return jnp.clip((step - begin) / max(end - begin, 1), 0.0, 1.0)


def constant(value: float) -> Schedule:
  """A schedule that is ``value`` at every step.

  Example:
    >>> import jaxcompress as jc
    >>> float(jc.schedules.constant(0.5)(100))
    0.5
  """
  value = check_number("constant", "value", value)

  def schedule(step):
    del step
    return jnp.full((), value, jnp.float32)

  return _with_range(schedule, value)


def linear(init_value: float, end_value: float, *, begin_step: int = 0, end_step: int) -> Schedule:
  """Linear from ``init_value`` at ``begin_step`` to ``end_value`` at ``end_step``.

  Constant before and after.

  Example:
    >>> import jaxcompress as jc
    >>> float(jc.schedules.linear(0.0, 1.0, begin_step=0, end_step=10)(5))
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
    >>> import jaxcompress as jc
    >>> round(float(jc.schedules.polynomial(0.0, 0.9, begin_step=0, end_step=100)(50)), 6)
    0.7875
  """
  _check_steps("polynomial", begin_step=begin_step, end_step=end_step)
  if end_step <= begin_step:
    raise ValueError(
        f"polynomial: end_step ({end_step}) must be greater than begin_step ({begin_step})."
    )
  power = check_number("polynomial", "power", power, low=0, low_open=True)
  init_value = check_number("polynomial", "init_value", init_value)
  end_value = check_number("polynomial", "end_value", end_value)

  def schedule(step):
    t = _progress(step, begin_step, end_step)
    return end_value + (init_value - end_value) * (1.0 - t) ** power

  return _with_range(schedule, init_value, end_value)


def cosine(init_value: float, end_value: float, *, begin_step: int = 0, end_step: int) -> Schedule:
  """Half-cosine from ``init_value`` to ``end_value`` between the two steps.

  Example:
    >>> import jaxcompress as jc
    >>> round(float(jc.schedules.cosine(1.0, 0.0, end_step=100)(50)), 6)
    0.5
  """
  _check_steps("cosine", begin_step=begin_step, end_step=end_step)
  if end_step <= begin_step:
    raise ValueError(f"cosine: end_step ({end_step}) must be greater than begin_step ({begin_step}).")
  init_value = check_number("cosine", "init_value", init_value)
  end_value = check_number("cosine", "end_value", end_value)

  def schedule(step):
    t = _progress(step, begin_step, end_step)
    return end_value + (init_value - end_value) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))

  return _with_range(schedule, init_value, end_value)


def piecewise(boundaries: Sequence[int], values: Sequence[float]) -> Schedule:
  """``values[i]`` for steps in ``[boundaries[i-1], boundaries[i])``.

  ``values`` has one more entry than ``boundaries``, which must increase.

  Example:
    >>> import jaxcompress as jc
    >>> s = jc.schedules.piecewise([10, 20], [0.0, 0.5, 0.9])
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
  values = [check_number("piecewise", f"values[{i}]", x) for i, x in enumerate(values)]
  b = jnp.asarray(boundaries, jnp.int32)
  v = jnp.asarray(values, jnp.float32)

  def schedule(step):
    return v[jnp.sum(jnp.asarray(step, jnp.int32) >= b)]

  return _with_range(schedule, *values)


def as_schedule(value: ScalarOrSchedule, *, name: str = "value") -> Schedule:
  """A schedule from a number (constant) or a schedule (returned as is)."""
  if callable(value):
    return value
  if is_number(value):
    return constant(value)
  raise TypeError(f"{name} must be a number or a schedule (a function of the step), got {value!r}.")


def _sample_steps(begin_step: int, end_step: int | None, samples: int) -> np.ndarray:
  """``begin_step``, ``end_step`` and points between; with no end, geometric steps to ``2**24``."""
  if end_step is None:
    offsets = [0] + [2**i for i in range(25)]
    return np.asarray([begin_step + o for o in offsets], np.int64)
  end_step = max(end_step, begin_step)
  return np.unique(np.linspace(begin_step, end_step, samples).round().astype(np.int64))


def check_schedule(
    where: str,
    name: str,
    schedule: Schedule,
    *,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
    begin_step: int = 0,
    end_step: int | None = None,
    samples: int = 33,
) -> None:
  """Raises ``ValueError`` if ``schedule`` takes a value outside ``[low, high]`` (or NaN).

  A schedule made by this module is checked by its ``value_range``, which
  holds at every step. Any other function of the step is evaluated on the
  host (once, under ``jax.vmap``) at ``begin_step``, ``end_step`` and
  ``samples`` evenly spaced steps between (with ``end_step=None``: at
  ``begin_step + 2**i`` up to ``2**24`` steps later); values between these
  steps are not seen.

  Args:
    where: what is being built, for the message (``"Prune"``).
    name: the setting, for the message (``"sparsity"``).
    schedule: a function of the integer step giving a scalar.
    low, high: the allowed range; ``low_open``/``high_open`` exclude the ends.
    begin_step, end_step: the steps at which the stage evaluates it.
    samples: how many steps between the ends a user function is evaluated at.

  Example:
    >>> import jaxcompress as jc
    >>> jc.schedules.check_schedule("Prune", "sparsity", jc.schedules.linear(0.0, 0.9, end_step=10),
    ...                             low=0, high=1, high_open=True)
    >>> jc.schedules.check_schedule("Prune", "sparsity", lambda step: step / 10,
    ...                             low=0, high=1, high_open=True, end_step=20)
    Traceback (most recent call last):
    ...
    ValueError: Prune: sparsity must stay in [0, 1), but the schedule gives 1.0 at step 10. ...
  """
  rng = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

  def bad(v: np.ndarray) -> np.ndarray:
    out = np.isnan(v) | (v < low) | (v > high)
    if low_open:
      out |= v == low
    if high_open:
      out |= v == high
    return out

  value_range = getattr(schedule, "value_range", None)
  if value_range is not None:
    values = np.asarray(value_range, np.float64)
    if bad(values).any():
      raise ValueError(
          f"{where}: {name} must stay in {rng}, but its schedule ranges over "
          f"[{values[0]:g}, {values[1]:g}]. Give a schedule whose values stay in {rng}, e.g. "
          f"one that ends below {high:g}."
      )
    return
  steps = _sample_steps(begin_step, end_step, samples)
  try:
    values = jax.vmap(lambda t: jnp.asarray(schedule(t), jnp.float32))(jnp.asarray(steps, jnp.int32))
  except Exception as e:  # noqa: BLE001 -- re-raised with the setting named
    raise TypeError(
        f"{where}: {name} is a callable that could not be evaluated as a schedule (a jax "
        f"function of an int32 step giving a scalar): {type(e).__name__}: {e}"
    ) from e
  if values.shape != steps.shape:
    raise TypeError(
        f"{where}: {name} must be a schedule giving a scalar for each step, got values of "
        f"shape {values.shape[1:]} from {schedule!r}."
    )
  values = np.asarray(values, np.float64)
  hit = np.flatnonzero(bad(values))
  if hit.size:
    i = hit[0]
    raise ValueError(
        f"{where}: {name} must stay in {rng}, but the schedule gives {float(values[i])!r} at step "
        f"{int(steps[i])}. Make the schedule stay in {rng} at every step, e.g. end it below "
        f"{high:g}."
    )

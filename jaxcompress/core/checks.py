"""Checks of user input, shared by every technique: one helper for one check.

Settings that do not depend on a leaf are checked when a stage is built
(``check_int``, ``check_number``); checks on array values are made on concrete
values at once and, when the values are traced, at run time (``error_if``):
never skipped in silence.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import numpy as np


def is_concrete(x: Any) -> bool:
  """True when ``x`` holds values now (not a tracer inside ``jit``/``grad``)."""
  return not isinstance(x, jax.core.Tracer)


def is_number(x: Any) -> bool:
  """True for Python and numpy real scalars (``0.5``, ``np.float32(0.5)``, ``3``), not bool."""
  if isinstance(x, (bool, np.bool_)):
    return False
  if isinstance(x, numbers.Real):
    return True
  return isinstance(x, (np.ndarray, jax.Array)) and x.ndim == 0 and is_concrete(x) and (
      np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
  )


def is_int(x: Any) -> bool:
  """True for Python and numpy integers (``3``, ``np.int64(3)``), not bool."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_int(where: str, name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
  """Returns ``value`` as an int, or raises naming ``where``, the value and the range.

  Example:
    >>> from jaxcompress.core.checks import check_int
    >>> check_int("FakeQuant", "bits", 8, low=2, high=8)
    8
    >>> check_int("FakeQuant", "bits", 9, low=2, high=8)
    Traceback (most recent call last):
    ...
    ValueError: FakeQuant: bits must be an integer in [2, 8], got 9.
  """
  rng = f" in [{'-inf' if low is None else low}, {'inf' if high is None else high}]"
  if not is_int(value):
    raise TypeError(f"{where}: {name} must be an integer{rng}, got {value!r} of type {type(value).__name__}.")
  v = int(value)
  if (low is not None and v < low) or (high is not None and v > high):
    raise ValueError(f"{where}: {name} must be an integer{rng}, got {v}.")
  return v


def check_number(
    where: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
  """Returns ``value`` as a float, or raises naming ``where``, the value and the range.

  NaN and values outside ``[low, high]`` (open ends where asked) are refused.

  Example:
    >>> from jaxcompress.core.checks import check_number
    >>> check_number("soft_target_loss", "temperature", 2, low=0, low_open=True)
    2.0
    >>> check_number("soft_target_loss", "temperature", 0.0, low=0, low_open=True)
    Traceback (most recent call last):
    ...
    ValueError: soft_target_loss: temperature must be a number in (0, inf), got 0.0.
  """
  lo = "-inf" if low is None else f"{low:g}"
  hi = "inf" if high is None else f"{high:g}"
  rng = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
  if not is_number(value):
    raise TypeError(f"{where}: {name} must be a real number in {rng}, got {value!r} of type {type(value).__name__}.")
  v = float(value)
  bad = math.isnan(v)
  if low is not None:
    bad |= v < low or (low_open and v == low)
  if high is not None:
    bad |= v > high or (high_open and v == high)
  if bad:
    raise ValueError(f"{where}: {name} must be a number in {rng}, got {v!r}.")
  return v


def _raise_if(pred: Any, *, message: str) -> None:
  if bool(np.asarray(pred)):
    raise ValueError(message)


def error_if(pred: Any, message: str) -> None:
  """Raises ``ValueError(message)`` where ``pred`` holds, also under ``jit``.

  On concrete values it raises at once. On traced values it inserts a host
  callback that raises when the computation runs (the error then reaches the
  caller wrapped in a ``JaxRuntimeError`` whose text contains ``message``).
  Use it off the hot path (init, calibration, export), not in a train step.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.core.checks import error_if
    >>> error_if(jnp.isnan(jnp.float32(1.0)), "w is NaN")
    >>> error_if(jnp.isnan(jnp.float32("nan")), "w is NaN")
    Traceback (most recent call last):
    ...
    ValueError: w is NaN
  """
  if is_concrete(pred):
    _raise_if(pred, message=message)
  else:
    jax.debug.callback(_raise_if, pred, message=message)


def key_data(key: Any, where: str) -> jax.Array:
  """A fresh copy of the raw uint32 data of a PRNG key, for state that must
  checkpoint (a typed key does not), or raises naming ``where`` and the fix.

  Typed keys must use JAX's default implementation, in which the data is
  wrapped back (``jax.random.wrap_key_data``); raw keys must be uint32.

  Example:
    >>> import jax
    >>> from jaxcompress.core.checks import key_data
    >>> key_data(jax.random.key(0), "init_train_state: key").dtype
    dtype('uint32')
    >>> key_data(jax.random.key(0, impl="rbg"), "init_train_state: key")
    Traceback (most recent call last):
    ...
    ValueError: init_train_state: key: the key's PRNG implementation rbg is not JAX's default threefry2x32, in which the state stores it; pass a key made by jax.random.key(seed).
  """
  key = jax.numpy.asarray(key)
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    impl, default = str(jax.random.key_impl(key)), jax.config.jax_default_prng_impl
    if impl != default:
      raise ValueError(
          f"{where}: the key's PRNG implementation {impl} is not JAX's default {default}, in "
          "which the state stores it; pass a key made by jax.random.key(seed)."
      )
    key = jax.random.key_data(key)
  elif key.dtype != np.uint32:
    raise TypeError(
        f"{where}: expected a PRNG key (jax.random.key(seed)), got an array of dtype "
        f"{key.dtype} and shape {key.shape}."
    )
  return jax.numpy.copy(key)  # key_data shares the key's buffer

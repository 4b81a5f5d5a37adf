"""Weight quantization stages for ``jc.Spec``: fake quantization and LSQ.

- ``FakeQuant``: the weight is quantized and dequantized in the forward pass;
  the backward pass is a straight-through estimator. The scale is either
  *dynamic* (computed from the current weight on every ``apply``) or *static*
  (calibrated once, at ``init``, and kept in the state; re-calibrated by
  ``spec.update`` with an exponential moving average only when asked, with
  ``update_every``: a calibration such as ``MSE()`` costs about a second per
  step on a 4096 x 4096 kernel).
- ``LSQ``: learned step size quantization; the steps are trainable leaves of
  the spec's ``trainable`` tree (``Compressed.params["step_size"]``), updated by the
  optimizer like any weight.

A quantization state remembers, as static (non-traced) metadata, the format,
granularity, ranges and rounding it was made for (``QuantState.meta``); a
stage refuses a state made for another setting when it traces ``apply`` or
``update`` (no run-time cost), instead of quantizing with a scale of the wrong
grid.

Non-finite weights (NaN, +-inf) follow the rule of ``numerics``: they pass
through unchanged, stay visible, and take no part in the scales, ranges or
steps of their neighbours. ``apply`` makes no check (it is the training hot
path).

Both keep the weight's dtype and compose after pruning: a pruned zero stays an
exact zero, since zero is on every grid (symmetric grids map 0 to 0; asymmetric
ones use an integer zero point). Mixed precision is one rule per precision::

    spec = jc.Spec([
        jc.Rule(r"Dense_0/kernel", [jc.quant.FakeQuant(bits=8)]),
        jc.Rule(r".*kernel", [jc.prune.magnitude(sparsity=0.5),
                              jc.quant.FakeQuant(bits=4, granularity=jc.quant.PerGroup(size=32))]),
    ])
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.checks import check_int, check_number, key_data
from jaxcompress.core.stage import Stage, UpdateContext
from jaxcompress.quant import calibration as _cal
from jaxcompress.quant import numerics, ste
from jaxcompress.quant.numerics import Format, Granularity, PerChannel

Array = jax.Array
_RANGES = ("dynamic", "static")


@dataclasses.dataclass(frozen=True)
class QuantMeta:
  """What a ``QuantState`` was made for: static metadata, not traced.

  A registered pytree node without children, so it rides along ``jit``,
  ``tree_map`` and checkpoints at no cost, and a stage compares it with its
  own settings when it traces.

  Attributes:
    fmt: the ``Format``.
    granularity: the granularity.
    ranges: ``"dynamic"`` or ``"static"``.
    rounding: ``"nearest"`` or ``"stochastic"``.
    path: the leaf path the state was made for (named in messages only).
  """

  fmt: Format
  granularity: Granularity
  ranges: str
  rounding: str
  path: str = dataclasses.field(default="", compare=False)

  def describe(self) -> str:
    """The settings as a short string, for messages."""
    return (f"{self.fmt!r}, {self.granularity!r}, ranges={self.ranges!r}, "
            f"rounding={self.rounding!r}")


jax.tree_util.register_dataclass(
    QuantMeta, data_fields=[], meta_fields=["fmt", "granularity", "ranges", "rounding", "path"]
)


class QuantState(NamedTuple):
  """State of a leaf with static scales or stochastic rounding.

  Attributes:
    scale: float32, shape ``granularity.scale_shape(weight.shape)``; ``None``
      with dynamic ranges.
    zero_point: the integer zero point (asymmetric formats) or ``None``.
    ranges: the moving average of the calibrated ranges (``None`` with
      dynamic ranges).
    key: with ``rounding="stochastic"``, the raw data (uint32) of the PRNG key
      the next ``apply`` draws its rounding noise from; ``spec.update``
      replaces it on every step. ``None`` otherwise.
    meta: the ``QuantMeta`` (static) of the stage that made this state.
  """

  scale: Array | None
  zero_point: Array | None
  ranges: _cal.RangeEMA | None
  key: Array | None = None
  meta: QuantMeta | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Quantizer(Stage):
  """Fields shared by the quantization stages."""

  bits: int = 8
  dtype: str = "int"
  symmetric: bool = True
  narrow_range: bool = False
  granularity: Granularity | None = None

  def __post_init__(self):
    where = type(self).__name__
    numerics.check_format_fields(where, dtype=self.dtype, bits=self.bits, symmetric=self.symmetric,
                                 narrow_range=self.narrow_range)
    if self.granularity is None:  # the format's default: frozen, so set once here
      object.__setattr__(self, "granularity", numerics.default_granularity(self.fmt))
    if not isinstance(self.granularity, Granularity) or type(self.granularity) is Granularity:
      raise ValueError(
          f"{where}: unknown granularity {self.granularity!r}; use jc.quant.PerTensor(), "
          "PerChannel(axis=...) or PerGroup(size=..., axis=...)."
      )
    numerics.check_block_granularity(self.fmt, self.granularity, where)

  def describe(self) -> str:
    """One line for ``spec.describe``; the granularity only when it is not the format's default."""
    if self.granularity != numerics.default_granularity(self.fmt):
      return super().describe()
    shown = copy.copy(self)
    object.__setattr__(shown, "granularity", None)  # shown as the field's default
    return Stage.describe(shown)

  @property
  def keeps_sharding(self) -> bool:  # type: ignore[override]
    """Per-tensor and per-channel ranges reduce the shards where they lie; groups, block
    scales and percentiles reshape or sort the leaf, so they take it whole."""
    calibrators = (None, _cal.AbsMax, _cal.MinMax, _cal.MSE)
    return (
        isinstance(self.granularity, (numerics.PerTensor, numerics.PerChannel))
        and not self.fmt.is_block_scaled
        and all(c is None or type(c) in calibrators for c in self._calibrators())
    )

  def _calibrators(self) -> tuple:
    return tuple(getattr(self, f, None) for f in ("calibration", "init_calibration"))

  @property
  def fmt(self) -> Format:
    """The ``numerics.Format`` of this stage."""
    return Format(dtype=self.dtype, bits=self.bits, symmetric=self.symmetric,
                  narrow_range=self.narrow_range)

  def _check(self, value: Any, path: str) -> None:
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise TypeError(
          f"{path}: {type(self).__name__} quantizes real floating-point weights, got dtype "
          f"{value.dtype}; narrow the rule's pattern so that it does not select this leaf."
      )
    numerics.check(self.fmt, self.granularity, tuple(value.shape), path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FakeQuant(_Quantizer):
  """Fake-quantizes a weight: ``apply`` gives ``dequantize(quantize(w))``.

  Args:
    bits: integer width, 2 to 8 (ignored for the float formats).
    dtype: ``"int"``, ``"float8_e4m3fn"``, ``"float8_e5m2"``, or a block-scaled
      format: ``"mxfp8_e4m3"``, ``"mxfp8_e5m2"``, ``"mxfp4"`` (OCP MX, 32-element
      blocks with power-of-two scales) or ``"nvfp4"`` (16-element blocks,
      float8 scales and a float32 tensor scale); see
      ``jaxcompress.quant.blockscaled``.
    symmetric: no zero point (the float formats are always symmetric).
    narrow_range: drop the most negative integer.
    granularity: ``PerTensor()``, ``PerChannel(axis=-1)`` (default) or
      ``PerGroup(size=..., axis=-2)``; block-scaled formats take
      ``PerGroup(size=block_size, axis=...)`` only (default: axis ``-2``, the
      input axis of a ``(in, out)`` kernel).
    calibration: how ranges are chosen: ``AbsMax()``, ``MinMax()``,
      ``Percentile(q)``, ``MSE()``; default ``AbsMax()`` for symmetric formats,
      ``MinMax()`` for asymmetric ones. Block-scaled formats take none: the
      format's rule sets each block's scale from the block's largest magnitude.
    ranges: ``"dynamic"``: calibrate the current weight on every ``apply``
      (no state); ``"static"``: calibrate at ``init`` and keep the scale in the
      state. Block-scaled formats are dynamic only.
    update_every: static ranges only; 0 (the default): calibrate once, at
      ``init``, and keep that scale; ``n > 0``: re-calibrate on every ``n``-th
      ``spec.update`` step (a calibration per re-calibration: ``MSE()`` on a
      4096 x 4096 kernel takes about 1 s).
    decay: static ranges with ``update_every > 0``; moving-average decay of
      re-calibrated ranges (0: take the latest).
    estimator: ``"identity"`` or ``"clipped"`` straight-through gradient.
    rounding: ``"nearest"`` (half to even) or ``"stochastic"``: unbiased
      random rounding (up with probability equal to the fractional part),
      with fresh noise on every step. Stochastic rounding keeps a PRNG key in
      the state: ``spec.init`` needs ``key=``, and ``spec.update`` replaces it
      on every step with its own ``key`` folded with the step, or without one
      with the old key folded with the step. Within a step the noise is fixed,
      so ``apply`` stays a pure function of ``(trainable, state)``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=4, granularity=jc.quant.PerTensor())])])
    >>> t, s = spec.init({"w": jnp.array([0.0, 0.3, -1.0, 3.5])})
    >>> spec.apply(t, s)["w"].tolist()
    [0.0, 0.5, -1.0, 3.5]

    Stochastic rounding, unbiased on average over steps:

    >>> import jax
    >>> sr = jc.quant.FakeQuant(bits=4, granularity=jc.quant.PerTensor(), rounding="stochastic")
    >>> spec = jc.Spec([jc.Rule("w", [sr])])
    >>> w = {"w": jnp.array([0.3, 3.5])}  # scale 0.5: 0.3 lies 60% of the way from 0 to 0.5
    >>> t, s = spec.init(w, key=jax.random.key(0))
    >>> draws = []
    >>> for step in range(400):
    ...   draws.append(spec.apply(t, s)["w"][0])
    ...   t, s = spec.update(t, s, step)
    >>> round(float(jnp.mean(jnp.stack(draws))), 1)
    0.3

    MXFP4: blocks of 32 input rows share a power-of-two scale (here 2**-1, for a
    block maximum of 3.0: floor(log2(3)) - 2); elements are e2m1 values:

    >>> spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(dtype="mxfp4")])])
    >>> t, s = spec.init({"w": jnp.array([[0.7], [-3.0]] * 16)})
    >>> spec.apply(t, s)["w"][:2, 0].tolist()
    [0.75, -3.0]
  """

  name: ClassVar[str] = "quant"

  calibration: _cal.Calibrator | None = None
  ranges: Literal["dynamic", "static"] = "dynamic"
  update_every: int = 0
  decay: float = 0.0
  estimator: ste.Estimator = "identity"
  rounding: numerics.Rounding = "nearest"

  def __post_init__(self):
    super().__post_init__()
    if self.rounding not in ("nearest", "stochastic"):
      raise ValueError(
          f"FakeQuant: rounding={self.rounding!r}; use 'nearest' or 'stochastic'."
      )
    if self.calibration is not None and not isinstance(self.calibration, _cal.Calibrator):
      raise TypeError(
          f"FakeQuant: calibration must be a Calibrator such as jc.quant.AbsMax() or "
          f"jc.quant.MSE(), got {self.calibration!r}."
      )
    if self.ranges not in _RANGES:
      raise ValueError(f"FakeQuant: ranges={self.ranges!r}; use 'dynamic' or 'static'.")
    if self.fmt.is_block_scaled and (self.calibration is not None or self.ranges != "dynamic"):
      raise ValueError(
          f"FakeQuant: dtype={self.dtype!r} takes each block's scale from the block's largest "
          f"magnitude (the format's rule), got calibration={self.calibration!r}, "
          f"ranges={self.ranges!r}; drop calibration= and use ranges='dynamic'."
      )
    if self.estimator not in ste._ESTIMATORS:
      raise ValueError(f"FakeQuant: estimator={self.estimator!r}; use 'identity' or 'clipped'.")
    check_int("FakeQuant", "update_every", self.update_every, low=0)
    check_number("FakeQuant", "decay", self.decay, low=0.0, high=1.0, high_open=True)

  def _meta(self, path: str = "") -> QuantMeta:
    return QuantMeta(self.fmt, self.granularity, self.ranges, self.rounding, path)

  def _check_state(self, value: Any, state: Any) -> None:
    """Refuses, when tracing, a state made for other settings (static info only)."""
    want = self._meta()
    if state is None and self.ranges == "dynamic" and self.rounding == "nearest":
      return
    got = state.meta if isinstance(state, QuantState) else None
    if got != want:
      made = (f"{got.describe()} (at {got.path!r})" if isinstance(got, QuantMeta) else
              "no quantization state" if state is None else f"a {type(state).__name__}")
      raise ValueError(
          f"{self.describe()}: got a state made for {made}, not for this stage "
          f"({want.describe()}); re-run spec.init with this spec to make its state."
      )
    if state.scale is not None:
      shape = self.granularity.scale_shape(tuple(value.shape))
      if tuple(state.scale.shape) != shape:
        raise ValueError(
            f"{self.describe()} at {got.path!r}: the state's scale has shape "
            f"{tuple(state.scale.shape)}, a weight of shape {tuple(value.shape)} needs {shape}; "
            "re-run spec.init with this spec on these params to make its state."
        )

  def _calibrate(self, value: Array) -> tuple[Array, Array]:
    cal = _cal.default_calibrator(self.fmt) if self.calibration is None else self.calibration
    return cal(jax.lax.stop_gradient(value), self.fmt, self.granularity)

  def init(self, value, *, path, key):
    self._check(value, path)
    noise = None
    if self.rounding == "stochastic":
      if key is None:
        raise ValueError(
            f"FakeQuant(rounding='stochastic') at {path!r} draws rounding noise: pass "
            "key=jax.random.key(...) to spec.init (jc.init_train_state(..., key=...))."
        )
      noise = key_data(key, f"FakeQuant(rounding='stochastic') at {path!r}")
    meta = self._meta(path)
    if self.ranges == "dynamic":
      return None, (None if noise is None else QuantState(None, None, None, noise, meta))
    lo, hi = self._calibrate(value)
    scale, zp = numerics.scale_from_range(lo, hi, self.fmt)
    ema = _cal.ema_update(_cal.ema_init(lo.shape), lo, hi, self.decay)
    return None, QuantState(scale, zp, ema, noise, meta)

  def _grid(self, value: Array, state: QuantState | None) -> tuple[Array | None, Array | None, Array | None]:
    """The scale, zero point and rounding key that ``apply`` and ``quantize`` share.

    Block-scaled formats: no scale (``numerics`` takes it from the blocks).
    """
    if self.fmt.is_block_scaled:
      scale, zp = None, None
    elif state is None or state.scale is None:
      scale, zp = numerics.scale_from_range(*self._calibrate(value), self.fmt)
    else:
      scale, zp = state.scale, state.zero_point
    key = None if state is None or state.key is None else jax.random.wrap_key_data(state.key)
    return scale, zp, key

  def apply(self, value, params, state):
    del params
    self._check_state(value, state)
    scale, zp, key = self._grid(value, state)
    return ste.fake_quant_ste(
        value, self.fmt, self.granularity, scale=scale, zero_point=zp, estimator=self.estimator,
        rounding=self.rounding, key=key,
    )

  def quantize(self, value: Array, state: QuantState | None, *, path: str = "<array>") -> numerics.QArray:
    """The codes, scales and zero points that ``apply``'s output stands for.

    What ``jc.export`` stores: dequantizing them gives ``apply``'s value.
    Non-finite weights that the format cannot hold raise naming ``path``.

    Args:
      value: the weight this stage sees.
      state: its state (from ``spec.init``/``spec.update``).
      path: the leaf path, for errors.

    Returns:
      A ``jc.quant.QArray``.

    Example:
      >>> import jax.numpy as jnp, jaxcompress as jc
      >>> stage = jc.quant.FakeQuant(bits=4, granularity=jc.quant.PerTensor())
      >>> stage.quantize(jnp.array([0.7, -0.35, 0.1]), None).values.tolist()
      [7, -4, 1]
    """
    self._check_state(value, state)
    scale, zp, key = self._grid(value, state)
    return numerics.quantize(
        value, self.fmt, self.granularity, scale=None if scale is None else jnp.asarray(scale, jnp.float32),
        zero_point=zp, rounding=self.rounding, key=key, path=path,
    )

  def update(self, value, params, state, ctx: UpdateContext):
    self._check_state(value, state)
    if state is not None and state.key is not None:  # fresh rounding noise every step
      fresh = ctx.key if ctx.key is not None else jax.random.wrap_key_data(state.key)
      state = state._replace(key=key_data(jax.random.fold_in(fresh, ctx.step), ctx.path))
    if state is None or state.scale is None or self.update_every == 0:
      return value, params, state
    return value, params, _recalibrate_if_due(self, value, state, ctx.step)


@functools.partial(jax.jit, static_argnums=0)
def _recalibrate_if_due(stage: FakeQuant, value: Array, state: QuantState, step: Array) -> QuantState:
  """Re-calibrates a static range on every ``stage.update_every``-th step.

  Jitted on its own (the stage is static), so that an eager ``spec.update``
  reuses one compiled ``cond`` instead of compiling the closures of a fresh
  one on every step.
  """

  def recalibrate(_):
    lo, hi = stage._calibrate(value)
    ema = _cal.ema_update(state.ranges, lo, hi, stage.decay)
    scale, zp = numerics.scale_from_range(ema.lo, ema.hi, stage.fmt)
    return state._replace(scale=scale, zero_point=zp, ranges=ema)

  due = step % stage.update_every == 0
  return jax.lax.cond(due, recalibrate, lambda _: state, None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LSQ(_Quantizer):
  """Learned step size quantization (Esser et al., 2020) of a weight.

  The steps (one per block of the granularity) are trainable: the leaf's
  trainable becomes ``Compressed(weight, {"step_size": steps})``. ``apply`` gives
  ``clip(round(w / s), qmin, qmax) * s``; the step gradient is scaled by
  ``grad_scale`` (default ``1 / sqrt(N * qmax)``, ``N`` elements per step).
  Steps start at ``2 * mean(|w|) / sqrt(qmax)`` (the paper's choice) or from a
  calibrator. Symmetric integer formats only. Steps below ``min_step`` are
  clamped in ``apply``.

  Args:
    bits: 2 to 8.
    narrow_range: drop the most negative integer.
    granularity: ``PerTensor()``, ``PerChannel()`` (default) or ``PerGroup(...)``.
    init_calibration: ``None`` for the paper's initial step, or a calibrator
      whose scale is the initial step (e.g. ``MSE()``).
    grad_scale: the step-gradient factor; ``None`` for LSQ's ``1/sqrt(N*qmax)``.
    min_step: the smallest step ``apply`` uses.

  Example:
    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> spec = jc.Spec([jc.Rule("w", [jc.quant.LSQ(bits=4)])])
    >>> t, s = spec.init({"w": jnp.ones((8, 2))})
    >>> t["w"].params["step_size"].shape
    (1, 2)
    >>> g = jax.grad(lambda t: spec.apply(t, s)["w"].sum())(t)
    >>> g["w"].params["step_size"].shape
    (1, 2)
  """

  name: ClassVar[str] = "step_size"

  init_calibration: _cal.Calibrator | None = None
  grad_scale: float | None = None
  min_step: float = 1e-8

  def __post_init__(self):
    super().__post_init__()
    if self.init_calibration is not None and not isinstance(self.init_calibration, _cal.Calibrator):
      raise TypeError(
          f"LSQ: init_calibration must be None or a Calibrator such as jc.quant.MSE(), "
          f"got {self.init_calibration!r}."
      )
    if self.dtype != "int" or not self.symmetric:
      raise ValueError(
          f"LSQ: dtype={self.dtype!r}, symmetric={self.symmetric!r}; LSQ learns the step of a "
          "symmetric integer grid: use dtype='int', symmetric=True (or FakeQuant for others)."
      )
    check_number("LSQ", "min_step", self.min_step, low=0.0, low_open=True)
    if self.grad_scale is not None:
      check_number("LSQ", "grad_scale", self.grad_scale, low=0.0, low_open=True)

  def init(self, value, *, path, key):
    del key
    self._check(value, path)
    v = jax.lax.stop_gradient(value)
    if self.init_calibration is None:
      step = ste.lsq_init_step(v, self.fmt, self.granularity)
    else:
      step, _ = self.init_calibration.scale(v, self.fmt, self.granularity)
    return step, None

  def apply(self, value, params, state):
    del state
    shape = self.granularity.scale_shape(tuple(value.shape))
    if tuple(params.shape) != shape:
      raise ValueError(
          f"{self.describe()}: the trainable steps have shape {tuple(params.shape)}, a weight of "
          f"shape {tuple(value.shape)} needs {shape}; re-run spec.init with this spec to make them."
      )
    step = jnp.maximum(params, jnp.float32(self.min_step))
    return ste.lsq_fake_quant(value, step, self.fmt, self.granularity, grad_scale=self.grad_scale)

  def quantize(self, value: Array, params: Array, *, path: str = "<array>") -> numerics.QArray:
    """The codes and learned step sizes that ``apply``'s output stands for (what
    ``jc.export`` stores); non-finite weights raise naming ``path``.

    Args:
      value: the weight this stage sees.
      params: the trainable step sizes.
      path: the leaf path, for errors.

    Returns:
      A ``jc.quant.QArray`` with the step sizes as scales.

    Example:
      >>> import jax.numpy as jnp, jaxcompress as jc
      >>> stage = jc.quant.LSQ(bits=4, granularity=jc.quant.PerTensor())
      >>> stage.quantize(jnp.array([0.7, -0.35, 0.1]), jnp.float32(0.1)).values.tolist()
      [7, -4, 1]
    """
    numerics.check_finite(value, self.fmt, path)  # integer codes hold no NaN or inf
    step = jnp.maximum(params, jnp.float32(self.min_step)).astype(jnp.float32)
    s = numerics.expand_scale(step, value.shape, self.granularity)
    codes = jnp.round(jnp.clip(value.astype(jnp.float32) / s, self.fmt.qmin, self.fmt.qmax))
    return numerics.QArray(codes.astype(jnp.int8), step, None, self.fmt, self.granularity, np.dtype(value.dtype))


__all__ = ["FakeQuant", "LSQ", "QuantMeta", "QuantState"]

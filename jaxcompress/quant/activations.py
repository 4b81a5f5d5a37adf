"""Quantized inputs for the Dense, Conv and Einsum layers of Flax models.

Activations are not parameters, so the params-tree spec cannot reach them. They
are quantized where the model computes:

- linen: ``quantize_inputs(rules)`` is a context manager that installs a
  ``flax.linen.intercept_methods`` interceptor: every selected module's
  ``__call__`` sees its input fake-quantized (or runs its product through a
  low-precision ``dot_general``);
- NNX: ``quantize_nnx_inputs(model, rules)`` returns a clone of the model in
  which each selected ``Linear``/``LinearGeneral``/``Conv``/``Einsum`` is wrapped
  by a ``QuantizedInput`` module; the original model is unchanged.

Modules are selected by ``InputRule.pattern`` as weight rules select leaves
(``jaxcompress.core.spec.matches``): a regular expression fully matched against
the module path (``Dense_0``, ``block/Dense_1``, ``layers/0``: the path of the
module's params without the param name), a predicate ``(path, module) ->
bool``, or a tuple of them. Nothing global in jax or flax is patched.

Ranges are either *dynamic* (the absolute maximum of each token, computed on
the fly) or *static* (one absolute maximum per tensor, an exponential moving
average collected in calibration passes: the ``"quant_stats"`` collection for
linen, ``InputRange`` variables for NNX).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Hashable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress.core.checks import is_int
from jaxcompress.core.modules import children, set_child
from jaxcompress.core.paths import path_str
from jaxcompress.core.spec import check_pattern, matches
from jaxcompress.quant import calibration, numerics
from jaxcompress.quant.dot_general import QuantizedDotGeneral, fp8_dot_general, int8_dot_general
from jaxcompress.quant.ste import fake_quant_ste

Array = jax.Array

#: Linen collection holding static input ranges.
STATS_COLLECTION = "quant_stats"

_RANGES = ("dynamic", "static")
_MATMULS = ("fake", "int8", "fp8")
_LINEN_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)
_NNX_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InputRule:
  """How the inputs of the modules selected by ``pattern`` are quantized.

  Args:
    pattern: which modules, as ``jc.Rule`` selects leaves: a regular expression
      fully matched (``re.fullmatch``) against the module path, its names
      joined by ``/`` (``Dense_0``, ``block/Dense_1``), a predicate
      ``(path, module) -> bool`` (the linen or NNX module), or a tuple of them
      (a module matching any one is selected).
    bits: integer width of the inputs, 2 to 8 (symmetric, round to nearest).
    ranges: ``"dynamic"``: one scale per token (the absolute maximum over the
      features the layer contracts), computed on every call; ``"static"``: one
      scale per tensor from a calibrated moving average of the absolute maximum.
    decay: moving-average decay of static ranges (``r <- decay * r + (1 -
      decay) * max|x|``; the first calibration batch sets ``r``).
    matmul: ``"fake"`` quantizes the input and runs the layer as usual (weights
      stay as the layer has them: fake-quantize those with a ``jc.Spec``);
      ``"int8"``/``"fp8"`` run the layer's product through ``int8_dot_general``
      / ``fp8_dot_general`` (input per token, weight per output channel, real
      low-precision forward, straight-through backward). Real products need
      dynamic ranges and a layer with a ``dot_general`` (linen ``Dense``,
      ``DenseGeneral``; NNX ``Linear``, ``LinearGeneral``, ``Einsum``).

  Example:
    >>> import jaxcompress as jc
    >>> rule = jc.quant.InputRule(pattern=r"Dense_\\d+", ranges="static")
    >>> rule.bits
    8
    >>> wide = jc.quant.InputRule(
    ...     pattern=("head", lambda path, module: getattr(module, "features", 0) >= 1024))
    >>> wide.matches("block/Dense_0", None), wide.matches("head")
    (False, True)
  """

  pattern: Any
  bits: int = 8
  ranges: str = "dynamic"
  decay: float = 0.9
  matmul: str = "fake"

  def __post_init__(self):
    check_pattern(self.pattern, what="InputRule", arg="module")
    if not is_int(self.bits) or not 2 <= self.bits <= 8:
      raise ValueError(f"InputRule {self.pattern!r}: bits must be an int from 2 to 8, got {self.bits!r}.")
    if self.ranges not in _RANGES:
      raise ValueError(f"InputRule {self.pattern!r}: ranges must be one of {_RANGES}, got {self.ranges!r}.")
    if not 0.0 <= self.decay < 1.0:
      raise ValueError(f"InputRule {self.pattern!r}: decay must be in [0, 1), got {self.decay!r}.")
    if self.matmul not in _MATMULS:
      raise ValueError(f"InputRule {self.pattern!r}: matmul must be one of {_MATMULS}, got {self.matmul!r}.")
    if self.matmul != "fake" and self.ranges != "dynamic":
      raise ValueError(
          f"InputRule {self.pattern!r}: matmul={self.matmul!r} computes per-token scales on the "
          "fly; static ranges work with matmul='fake'. Set ranges='dynamic' or matmul='fake'."
      )
    if self.matmul == "fp8" and self.bits != 8:
      raise ValueError(
          f"InputRule {self.pattern!r}: bits={self.bits} does not apply to fp8 products; leave bits=8."
      )

  def matches(self, path: str, module: Any = None) -> bool:
    """Whether the rule selects ``module``, at ``path``.

    Args:
      path: a module path, names joined by ``/``.
      module: the module (what a predicate pattern gets as its second argument).

    Returns:
      ``jaxcompress.core.spec.matches(pattern, path, module)``: the rule of
      ``jc.Rule``.

    Example:
      >>> import jaxcompress as jc
      >>> jc.quant.InputRule(pattern=r"block/Dense_\\d").matches("block/Dense_1")
      True
      >>> rule = jc.quant.InputRule(pattern=("head", lambda path, m: path.endswith("_0")))
      >>> rule.matches("block/Dense_0")
      True
    """
    return matches(self.pattern, path, module)

  def dot_general(self) -> QuantizedDotGeneral:
    """The ``dot_general`` of a real low-precision product.

    Returns:
      ``int8_dot_general(bits=bits)`` for ``matmul="int8"``, else
      ``fp8_dot_general()``.

    Example:
      >>> import jaxcompress as jc
      >>> jc.quant.InputRule(pattern="Dense_0", matmul="int8").dot_general().dtype
      'int8'
    """
    if self.matmul == "int8":
      return int8_dot_general(bits=self.bits)
    return fp8_dot_general()



# --------------------------------------------------------------------------
# Fake quantization of one input.
# --------------------------------------------------------------------------


def _input_format(bits: int) -> numerics.Format:
  return numerics.Format(bits=bits, narrow_range=True)


def _quant_tokens(x: Array, axes: Sequence[int], bits: int) -> Array:
  """Fake quantization with one scale per token (reduced over ``axes``), identity STE."""
  kept = tuple(i for i in range(x.ndim) if i not in axes)
  granularity = numerics.PerChannel(axis=kept) if kept else numerics.PerTensor()
  return fake_quant_ste(x, _input_format(bits), granularity)


def _quant_static(x: Array, absmax: Array, bits: int) -> Array:
  """Fake quantization on ``[-absmax, absmax]``, one scale, clipped STE."""
  fmt = _input_format(bits)
  scale, _ = numerics.scale_from_range(-absmax, absmax, fmt)
  scale = jnp.reshape(scale, (1,) * x.ndim)
  return fake_quant_ste(x, fmt, numerics.PerTensor(), scale=scale, estimator="clipped")


def _ema(absmax: Array, count: Array, x: Array, decay: float) -> tuple[Array, Array]:
  """Folds ``max|x|`` into the moving average ``(absmax, count)``."""
  # Finite values only: one NaN or inf activation must not poison the range.
  batch = jax.lax.stop_gradient(jnp.max(jnp.abs(numerics.finite_or_zero(x))).astype(jnp.float32))
  ema = calibration.ema_update(calibration.RangeEMA(-absmax, absmax, count), -batch, batch, decay)
  return ema.hi, ema.count


def _contracted_axes(module: Any, ndim: int) -> tuple[int, ...]:
  """The input axes a layer reduces over (``DenseGeneral`` may have several)."""
  if isinstance(module, (nn.DenseGeneral, nnx.LinearGeneral)):
    axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
    return tuple(a % ndim for a in axis)
  return (ndim - 1,)


def _split_input(args: tuple, kwargs: dict) -> tuple[Array, Callable[[Array], tuple[tuple, dict]]]:
  if args:
    return args[0], lambda x: ((x, *args[1:]), kwargs)
  if "inputs" in kwargs:
    return kwargs["inputs"], lambda x: (args, {**kwargs, "inputs": x})
  raise TypeError("A quantized layer was called without an input array.")


def _module_path(names: Sequence[Hashable]) -> str:
  """A module's path as weight rules write a leaf's (``block/Dense_1``, ``layers/0``)."""
  return path_str(tuple(jax.tree_util.DictKey(n) for n in names))


def _check_rules(rules: Sequence[InputRule] | InputRule) -> tuple[InputRule, ...]:
  rules = (rules,) if isinstance(rules, InputRule) else tuple(rules)
  for r in rules:
    if not isinstance(r, InputRule):
      raise TypeError(f"Expected jc.quant.InputRule objects, got {r!r}.")
  if not rules:
    raise ValueError("Give at least one InputRule.")
  return rules


def _unmatched_error(rule: InputRule, paths: Sequence[str], kinds: str, hint: str) -> ValueError:
  shown = ", ".join(repr(p) for p in paths[:20]) + (" ..." if len(paths) > 20 else "")
  return ValueError(
      f"InputRule pattern {rule.pattern!r} matches no {kinds} module. Patterns are regular "
      "expressions matched with re.fullmatch against module paths such as 'Dense_0' or "
      "'block/Dense_1' (or predicates over (path, module)); the paths are: "
      f"{shown or '(none)' + hint}."
  )


# --------------------------------------------------------------------------
# linen.
# --------------------------------------------------------------------------


class _Routed:
  """The ``dot_general`` of a linen clone made to run a real low-precision product."""

  def __init__(self, dot_general: QuantizedDotGeneral):
    self.dot_general = dot_general

  def __call__(self, *args, **kwargs):
    return self.dot_general(*args, **kwargs)


class _Interceptor:
  def __init__(self, rules: tuple[InputRule, ...], calibrate: bool):
    self.rules = rules
    self.calibrate = calibrate
    self.seen: list[str] = []
    self.used = [False] * len(rules)

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, _LINEN_TYPES):
      return next_fun(*args, **kwargs)
    if isinstance(getattr(module, "dot_general", None), _Routed):
      return next_fun(*args, **kwargs)  # our own clone, already handled
    path = _module_path(module.path)
    if path not in self.seen:
      self.seen.append(path)
    idx = next((i for i, r in enumerate(self.rules) if r.matches(path, module)), None)
    if idx is None:
      return next_fun(*args, **kwargs)
    self.used[idx] = True
    rule = self.rules[idx]
    if rule.matmul != "fake":
      if not isinstance(module, (nn.Dense, nn.DenseGeneral)):
        raise ValueError(
            f"InputRule {rule.pattern!r}: module {path!r} is a linen {type(module).__name__}, which "
            f"takes no dot_general, so matmul={rule.matmul!r} cannot run its product. Use "
            "matmul='fake' for it, or narrow the pattern to Dense/DenseGeneral modules."
        )
      routed = module.clone(parent=module.scope, dot_general=_Routed(rule.dot_general()), dot_general_cls=None)
      return routed(*args, **kwargs)
    x, rebuild = _split_input(args, kwargs)
    axes = _contracted_axes(module, x.ndim)
    if rule.ranges == "dynamic":
      xq = _quant_tokens(x, axes, rule.bits)
    else:
      xq = _quant_static(x, self._static_range(module, path, rule, x), rule.bits)
    args, kwargs = rebuild(xq)
    return next_fun(*args, **kwargs)

  def _static_range(self, module: nn.Module, path: str, rule: InputRule, x: Array) -> Array:
    if self.calibrate:
      if not module.is_mutable_collection(STATS_COLLECTION):
        raise ValueError(
            f"Calibrating the input range of {path!r} needs the {STATS_COLLECTION!r} collection to "
            f"be mutable: call model.apply(variables, ..., mutable=[{STATS_COLLECTION!r}]) inside "
            "quantize_inputs(rules, calibrate=True)."
        )
      absmax = module.variable(STATS_COLLECTION, "input_absmax", lambda: jnp.zeros((), jnp.float32))
      count = module.variable(STATS_COLLECTION, "count", lambda: jnp.zeros((), jnp.int32))
      absmax.value, count.value = _ema(absmax.value, count.value, x, rule.decay)
      return absmax.value
    if not module.has_variable(STATS_COLLECTION, "input_absmax"):
      raise ValueError(
          f"Module {path!r} has static input ranges (InputRule {rule.pattern!r}) but no "
          f"{STATS_COLLECTION!r} variables: run calibration batches first, "
          f"`with quantize_inputs(rules, calibrate=True): _, stats = model.apply(variables, x, "
          f"mutable=[{STATS_COLLECTION!r}])`, and pass the returned {STATS_COLLECTION!r} "
          "collection with the params."
      )
    return module.get_variable(STATS_COLLECTION, "input_absmax")


@contextlib.contextmanager
def quantize_inputs(rules: Sequence[InputRule] | InputRule, *, calibrate: bool = False) -> Iterator[None]:
  """Quantizes the inputs of the selected linen modules called inside the context.

  Selected ``Dense``, ``DenseGeneral``, ``Conv`` and ``Einsum`` modules (and
  their subclasses) see their input fake-quantized (``matmul="fake"``) or run
  their product in int8/fp8 (``matmul="int8"``/``"fp8"``). The first rule
  whose pattern matches a module path wins.

  Enter the context *inside* the function you ``jax.jit`` or differentiate (it
  acts while the model is traced). On exit, a rule that matched no module
  called inside the context raises ``ValueError``.

  Static ranges live in the ``"quant_stats"`` collection. With
  ``calibrate=True`` each call updates them (pass
  ``mutable=["quant_stats"]`` to ``apply``) and quantizes with the updated
  range; otherwise they are read from the variables given to ``apply``.

  Args:
    rules: ``InputRule`` objects.
    calibrate: update the moving averages of static ranges.

  Yields:
    Nothing; the interception is active inside the ``with`` block.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxcompress as jc
    >>> model = nn.Dense(2)
    >>> x = jnp.array([[0.6, -1.0, 0.26]])
    >>> params = model.init(jax.random.key(0), x)
    >>> with jc.quant.quantize_inputs([jc.quant.InputRule(pattern="", bits=2)]):
    ...   y = model.apply(params, x)
    >>> bool(jnp.allclose(y, model.apply(params, jnp.array([[1.0, -1.0, 0.0]]))))
    True
  """
  interceptor = _Interceptor(_check_rules(rules), calibrate)
  with nn.intercept_methods(interceptor):
    yield
  for rule, used in zip(interceptor.rules, interceptor.used):
    if not used:
      raise _unmatched_error(
          rule,
          interceptor.seen,
          "Dense, DenseGeneral, Conv or Einsum",
          " (no such module ran inside the context; a jitted function traced earlier does "
          "not run its Python code again: enter the context inside the function you jit)",
      )


# --------------------------------------------------------------------------
# NNX.
# --------------------------------------------------------------------------


class InputRange(nnx.Variable):
  """An NNX variable holding a calibrated static input range or its count.

  Not an ``nnx.Param``: optimizers built over ``nnx.Param`` leave it alone, and
  ``nnx.state(model, InputRange)`` selects every range of a model. Built as
  any ``nnx.Variable``, from the array it holds: ``InputRange(value)``.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> r = jc.quant.InputRange(jnp.float32(2.5))
    >>> float(r[...])
    2.5
  """


class QuantizedInput(nnx.Module):
  """Wraps an NNX layer so that its input is quantized before it runs.

  Built by ``quantize_nnx_inputs``. With ``matmul="fake"`` the input is
  fake-quantized and the wrapped layer called; with ``"int8"``/``"fp8"`` the
  wrapped layer's ``dot_general`` (``einsum_op`` for ``Einsum``) was replaced by
  a low-precision one when the wrapper was built.

  Attributes:
    inner: the wrapped layer.
    rule: the ``InputRule``.
    path: the layer's path in the model.
    absmax, count: static ranges: the moving average of ``max|x|`` and the
      number of calibration calls (``InputRange`` variables; ``None`` for
      dynamic ranges). Until the first calibration call the input passes
      through unquantized.
    calibrate: update the static range on each call. Turn on with
      ``nnx.view(model, calibrate=True)``.

  Args:
    inner: the layer to wrap (``Linear``, ``LinearGeneral``, ``Conv``, ``Einsum``).
    rule: the ``InputRule`` that selected it.
    path: its path in the model, for messages.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> from flax import nnx
    >>> layer = jc.quant.QuantizedInput(nnx.Linear(4, 2, rngs=nnx.Rngs(0)),
    ...                                 jc.quant.InputRule(pattern=""), "")
    >>> layer(jnp.ones((3, 4))).shape
    (3, 2)
  """

  def __init__(self, inner: nnx.Module, rule: InputRule, path: str):
    self.rule = rule
    self.path = path
    self.calibrate = False
    if rule.ranges == "static":
      self.absmax = InputRange(jnp.zeros((), jnp.float32))
      self.count = InputRange(jnp.zeros((), jnp.int32))
    else:
      self.absmax = self.count = None
    if rule.matmul != "fake":
      if isinstance(inner, (nnx.Linear, nnx.LinearGeneral)):
        inner.dot_general = rule.dot_general()
        if getattr(inner, "dot_general_cls", None) is not None:
          inner.dot_general_cls = None  # it would take precedence over dot_general
      elif isinstance(inner, nnx.Einsum):
        inner.einsum_op = rule.dot_general().einsum
      else:
        raise ValueError(
            f"InputRule {rule.pattern!r}: module {path!r} is an nnx.{type(inner).__name__}, which "
            f"has no dot_general, so matmul={rule.matmul!r} cannot run its product. Use "
            "matmul='fake' for it, or narrow the pattern to Linear/LinearGeneral/Einsum modules."
        )
    self.inner = inner

  def set_view(self, calibrate: bool | None = None) -> None:
    """Sets the calibration mode (used by ``nnx.view(model, calibrate=...)``).

    Args:
      calibrate: update static ranges on each call, or not; ``None`` keeps it.

    Returns:
      None.

    Example:
      >>> import jax.numpy as jnp, jaxcompress as jc
      >>> from flax import nnx
      >>> q = jc.quant.quantize_nnx_inputs(nnx.Linear(4, 2, rngs=nnx.Rngs(0)),
      ...                                  jc.quant.InputRule(pattern="", ranges="static"))
      >>> nnx.view(q, calibrate=True).calibrate, q.calibrate
      (True, False)
    """
    if calibrate is not None:
      self.calibrate = calibrate

  def __call__(self, *args, **kwargs):
    if self.rule.matmul != "fake":
      return self.inner(*args, **kwargs)
    x, rebuild = _split_input(args, kwargs)
    if self.rule.ranges == "dynamic":
      xq = _quant_tokens(x, _contracted_axes(self.inner, x.ndim), self.rule.bits)
    else:
      if self.calibrate:
        self.absmax[...], self.count[...] = _ema(self.absmax[...], self.count[...], x, self.rule.decay)
      xq = jnp.where(self.count[...] > 0, _quant_static(x, self.absmax[...], self.rule.bits), x)
    args, kwargs = rebuild(xq)
    return self.inner(*args, **kwargs)


def quantize_nnx_inputs(model: nnx.Module, rules: Sequence[InputRule] | InputRule) -> nnx.Module:
  """A clone of an NNX model whose selected layers quantize their inputs.

  Every ``nnx.Linear``, ``LinearGeneral``, ``Conv`` and ``Einsum`` (or subclass)
  whose path (``layers/0``, ``block/linear1``) fully matches a rule's pattern is
  replaced, in a clone (``nnx.clone``), by a ``QuantizedInput`` wrapping it; the
  first matching rule wins. The clone shares no state with ``model``, which is
  unchanged. A layer held at several paths is selected when any of them
  matches, and wrapped at every place it is held.

  Static ranges are calibrated on a view: ``cal = nnx.view(qmodel,
  calibrate=True)``; calls of ``cal`` (eager or under ``nnx.jit``) update the
  ``InputRange`` variables, which ``qmodel`` shares.

  Args:
    model: an NNX module.
    rules: ``InputRule`` objects.

  Returns:
    The quantized clone.

  Raises:
    ValueError: a rule matches no layer, or asks for a real low-precision
      product of a layer without a ``dot_general`` (``Conv``).

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> from flax import nnx
    >>> layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> qlayer = jc.quant.quantize_nnx_inputs(layer, [jc.quant.InputRule(pattern="", bits=2)])
    >>> x = jnp.array([[0.6, -1.0, 0.26]])
    >>> bool(jnp.allclose(qlayer(x), layer(jnp.array([[1.0, -1.0, 0.0]]))))
    True
  """
  rules = _check_rules(rules)
  clone = nnx.clone(model)
  # Every place a layer is held: (holder, key, layer, path). A shared layer has several.
  places = [(None, None, clone, ())] if isinstance(clone, _NNX_TYPES) else []
  for hpath, holder in nnx.iter_graph(clone):
    if isinstance(holder, (nnx.Pytree, list, dict, tuple)):
      places += [(holder, k, c, (*hpath, k)) for k, c in children(holder) if isinstance(c, _NNX_TYPES)]
  places.sort(key=lambda p: _module_path(p[3]))
  paths = sorted({_module_path(p[3]) for p in places})
  # A layer takes the first rule that matches any of its paths.
  selected: dict[int, tuple[int, str]] = {}
  for _, _, layer, path in places:
    idx = next((i for i, r in enumerate(rules) if r.matches(_module_path(path), layer)), None)
    if idx is not None and (id(layer) not in selected or idx < selected[id(layer)][0]):
      selected[id(layer)] = (idx, _module_path(path))
  used = {i for i, _ in selected.values()}
  for i, rule in enumerate(rules):
    if i not in used:
      raise _unmatched_error(rule, paths, "Linear, LinearGeneral, Conv or Einsum", "")
  wrappers: dict[int, QuantizedInput] = {}
  for holder, key, layer, path in places:
    if id(layer) not in selected:
      continue
    if id(layer) not in wrappers:
      idx, first_path = selected[id(layer)]
      wrappers[id(layer)] = QuantizedInput(layer, rules[idx], first_path)
    if holder is None:
      return wrappers[id(layer)]
    set_child(holder, key, wrappers[id(layer)], _module_path(path))
  return clone



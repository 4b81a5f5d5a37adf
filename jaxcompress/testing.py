"""The stage test kit: the invariants every compression stage keeps, as functions.

A stage author checks a new stage (or chain of stages) in one call::

    report = jc.testing.check_stage([MyStage()])   # raises AssertionError on a failure

or one invariant at a time, sharing one jitted run between checks::

    case = jc.testing.make_case([MyStage()], needs_grads=True)
    jitted = jc.testing.run(case)                  # jitted init, apply and 3 updates
    jc.testing.assert_jit_matches_eager(case, jitted=jitted)
    jc.testing.assert_no_retrace(case, jitted=jitted)

The checks (names as in ``CHECKS``):

- ``init_under_eval_shape``: ``spec.init`` traces under ``jax.eval_shape``
  (no host sync, no branch on a value) to the shapes and dtypes it gives when run;
- ``jit_matches_eager``: init, apply and updates give the same model params
  jitted and run op by op;
- ``dtypes_kept``: ``spec.apply`` gives every leaf the shape and dtype of its
  param, in float32 and bfloat16, after init and every update;
- ``no_retrace``: the jitted ``spec.update`` and ``spec.apply`` are traced once
  over several steps;
- ``state_structure_stable``: ``(trainable, state)`` keep their pytree
  structure, shapes and dtypes across updates;
- ``sharded_matches_single_device``: on a 2 x 4 mesh of 8 devices, with Auto
  and with Explicit axes, init allocates every leaf with the sharding
  ``spec.shardings`` gives, and apply after each update equals the
  single-device result (skipped with fewer than 8 devices);
- ``grads_reach_trainables``: a loss of the model params has a finite
  gradient, with the leaf's dtype and a non-zero entry, for every trainable leaf;
- ``masked_moments_zero``: training with ``jc.masked_optimizer(optax.adam)``
  keeps Adam's moments exactly zero wherever the stage's ``update_mask`` was
  False (skipped for stages without an ``update_mask``);
- ``training_reduces_loss``: 30 steps of ``jc.make_train_step`` on a parabola
  over the compressed leaves at least halve its loss (as optax checks that
  every optimizer minimizes a parabola);
- ``export_round_trip``: ``jc.export.decode(jc.export.export(...))`` gives
  ``spec.apply`` bit for bit (skipped for a stage without an export encoder).

Every check raises ``AssertionError`` with a message that names the check, the
leaf and what to fix; a check that does not apply raises
``unittest.SkipTest`` (which pytest reports as a skip). No check needs pytest.
"""

from __future__ import annotations

import dataclasses
import re
import unittest
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxcompress.core.paths import path_str
from jaxcompress.core.spec import Rule, Spec, matches
from jaxcompress.core.stage import Stage
from jaxcompress.train import TrainState, init_train_state, make_train_step, masked_optimizer

PyTree = Any

__all__ = [
    "CHECKS",
    "Case",
    "Run",
    "Training",
    "assert_dtypes_kept",
    "assert_export_round_trip",
    "assert_grads_reach_trainables",
    "assert_init_under_eval_shape",
    "assert_jit_matches_eager",
    "assert_masked_moments_zero",
    "assert_no_retrace",
    "assert_sharded_matches_single_device",
    "assert_state_structure_stable",
    "assert_training_reduces_loss",
    "check_stage",
    "example_params",
    "make_case",
    "run",
    "train",
]

#: The checks ``check_stage`` runs, in order.
CHECKS = (
    "init_under_eval_shape",
    "jit_matches_eager",
    "dtypes_kept",
    "no_retrace",
    "state_structure_stable",
    "sharded_matches_single_device",
    "grads_reach_trainables",
    "masked_moments_zero",
    "training_reduces_loss",
    "export_round_trip",
)

# --------------------------------------------------------------------------
# The case: a spec over params, with what its updates need.
# --------------------------------------------------------------------------


def example_params(dtype: Any = jnp.float32, seed: int = 0) -> dict:
  """The params the kit checks stages on by default: two Dense layers.

  ``Dense_0/kernel`` (16, 32), ``Dense_0/bias`` (32,), ``Dense_1/kernel``
  (32, 8) and ``Dense_1/bias`` (8,), standard normal.

  Args:
    dtype: the dtype of every leaf.
    seed: the PRNG seed.

  Returns:
    A nested dict of arrays, as a Flax linen model's params.

  Example:
    >>> from jaxcompress.testing import example_params
    >>> example_params()["Dense_1"]["kernel"].shape
    (32, 8)
  """
  k = jax.random.split(jax.random.key(seed), 4)
  return {
      "Dense_0": {
          "kernel": jax.random.normal(k[0], (16, 32), dtype),
          "bias": jax.random.normal(k[1], (32,), dtype),
      },
      "Dense_1": {
          "kernel": jax.random.normal(k[2], (32, 8), dtype),
          "bias": jax.random.normal(k[3], (8,), dtype),
      },
  }


def _example_specs() -> dict:
  return {
      "Dense_0": {"kernel": PartitionSpec("data", "model"), "bias": PartitionSpec("model")},
      "Dense_1": {"kernel": PartitionSpec("model", "data"), "bias": PartitionSpec()},
  }


def _default_spec(leaf: Any) -> PartitionSpec:
  """Shards the first axis over "data" (size 2) and the last over "model" (size 4)
  where they divide, as a tensor-parallel layout would."""
  shape = tuple(leaf.shape)
  if not shape:
    return PartitionSpec()
  axes: list[str | None] = [None] * len(shape)
  if shape[-1] % 4 == 0:
    axes[-1] = "model"
  if len(shape) >= 2 and shape[0] % 2 == 0:
    axes[0] = "data"
  return PartitionSpec(*axes)


@dataclasses.dataclass(frozen=True)
class Case:
  """A spec over params, with the inputs its updates need. Built by ``make_case``.

  Attributes:
    name: how messages name the case (the stages, by default).
    spec: a ``jc.Spec`` with one rule.
    params: the model params.
    key: the PRNG key passed to init and update, or ``None``.
    grads: the gradient passed to update (params' structure), or ``None``.
    stats: the statistics passed to update (``{path: array}``), or ``None``.
    param_specs: a ``PartitionSpec`` per param leaf, over the mesh axes
      ``("data", "model")`` of size (2, 4), for the sharded check.
  """

  name: str
  spec: Spec
  params: PyTree
  key: jax.Array | None
  grads: PyTree | None
  stats: Mapping[str, Any] | None
  param_specs: PyTree


def make_case(
    stages: Stage | Sequence[Stage],
    *,
    params: PyTree | None = None,
    dtype: Any = None,
    pattern: Any = r".*kernel",
    needs_grads: bool = False,
    needs_key: bool = False,
    stats: Mapping[str, Any] | None = None,
    param_specs: PyTree | None = None,
    name: str | None = None,
) -> Case:
  """Builds the ``Case`` the checks run: one rule of ``stages`` over ``params``.

  Args:
    stages: a stage, a list of stages (applied left to right) or a ``jc.Chain``.
    params: the params; by default ``example_params(dtype)``.
    dtype: cast the params' floating leaves to this dtype (``None``: keep).
    pattern: the rule's pattern (a regex, a ``(path, leaf)`` predicate, or a
      tuple of them); by default every kernel.
    needs_grads: pass a gradient (standard normal, params' structure) to update.
    needs_key: pass a PRNG key to init and update.
    stats: the ``stats`` update gets (``{path: array}``, e.g. activation norms).
    param_specs: a ``PartitionSpec`` per param leaf over the axes ``("data",
      "model")`` of a (2, 4) mesh; by default each leaf's first axis over
      "data" and its last over "model" where they divide.
    name: how messages name the case; by default the stages.

  Returns:
    The ``Case``.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.testing import make_case
    >>> case = make_case(jc.prune.magnitude(sparsity=0.5))
    >>> case.name, case.key is None
    ('Prune(sparsity=0.5)', True)
  """
  rule = Rule(pattern, stages)
  default = params is None
  if default:
    params = example_params(jnp.float32 if dtype is None else dtype)
  elif dtype is not None:
    params = jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )
  if param_specs is None:
    param_specs = _example_specs() if default else jax.tree_util.tree_map(_default_spec, params)
  grads = None
  if needs_grads:
    if default:
      grads = example_params(jnp.float32 if dtype is None else dtype, seed=2)
    else:
      leaves, treedef = jax.tree_util.tree_flatten(params)
      keys = jax.random.split(jax.random.key(2), len(leaves))
      grads = treedef.unflatten(
          [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
      )
  return Case(
      name=name or rule.chain.describe(),
      spec=Spec([rule]),
      params=params,
      key=jax.random.key(1) if needs_key else None,
      grads=grads,
      stats=dict(stats) if stats is not None else None,
      param_specs=param_specs,
  )


# --------------------------------------------------------------------------
# Runs.
# --------------------------------------------------------------------------


class Run(NamedTuple):
  """What ``run`` saw: the trainables, states and model params of every step.

  Attributes:
    trainables: ``trainable`` after init, then after each update.
    states: ``state`` after init, then after each update.
    outputs: ``spec.apply`` of each (trainable, state).
    traces: how many times each jitted function was traced:
      ``{"init": n, "apply": n, "update": n}`` (empty for an eager run).
  """

  trainables: list
  states: list
  outputs: list
  traces: dict


def run(case: Case, *, jit: bool = True, steps: int = 3) -> Run:
  """Runs init, apply and ``steps`` updates of the case, jitted or eagerly.

  Jitted, each of init, apply and update is one ``jax.jit`` function that
  counts its traces; the step is an int32 array, as in a training loop.
  Eagerly, the spec's methods are called as they are, op by op.

  Args:
    case: from ``make_case``.
    jit: jit the three functions, or not.
    steps: the number of updates.

  Returns:
    A ``Run``.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.testing import make_case, run
    >>> r = run(make_case(jc.quant.FakeQuant(bits=8)), steps=2)
    >>> len(r.outputs), r.traces
    (3, {'init': 1, 'apply': 1, 'update': 1})
  """
  spec = case.spec
  traces: dict[str, int] = {}

  def counted(name: str, fn: Callable) -> Callable:
    traces[name] = 0

    def traced(*args, **kwargs):
      traces[name] += 1
      return fn(*args, **kwargs)

    return jax.jit(traced)

  if jit:
    init = counted("init", lambda p, k: spec.init(p, key=k))
    apply = counted("apply", spec.apply)
    update = counted(
        "update", lambda t, s, i, g, st, k: spec.update(t, s, i, grads=g, stats=st, key=k)
    )
  else:
    init = lambda p, k: spec.init(p, key=k)
    apply = spec.apply
    update = lambda t, s, i, g, st, k: spec.update(t, s, i, grads=g, stats=st, key=k)
  t, s = init(case.params, case.key)
  trainables, states, outputs = [t], [s], [apply(t, s)]
  for i in range(steps):
    step = jnp.asarray(i, jnp.int32) if jit else i
    t, s = update(t, s, step, case.grads, case.stats, case.key)
    trainables.append(t)
    states.append(s)
    outputs.append(apply(t, s))
  return Run(trainables, states, outputs, traces)


class Training(NamedTuple):
  """What ``train`` saw over its steps.

  Attributes:
    losses: the loss at each step (before that step's update), a numpy array.
    masks: ``spec.update_masks`` of the state each step started from.
    opt_states: the optimizer state after each step.
    final: the last ``TrainState``.
    optimizer: the (masked) optimizer.
  """

  losses: np.ndarray
  masks: list
  opt_states: list
  final: TrainState
  optimizer: optax.GradientTransformation


def _parabola(case: Case) -> Callable[[PyTree], jax.Array]:
  """``loss(model_params)``: the mean over the leaves the spec compresses of
  ``mean((param - target)**2)``, for fixed targets of small random values."""
  rules = list(case.spec.owners(case.params).values())  # in the order of the leaves
  leaves = jax.tree_util.tree_leaves(case.params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  targets = [
      None if rule is None else 0.1 * jax.random.normal(k, x.shape, jnp.float32)
      for k, x, rule in zip(keys, leaves, rules)
  ]

  def loss(params):
    terms = [
        jnp.mean((p.astype(jnp.float32) - c) ** 2)
        for p, c in zip(jax.tree_util.tree_leaves(params), targets)
        if c is not None
    ]
    return sum(terms) / len(terms)

  return loss


def train(
    case: Case,
    *,
    steps: int = 30,
    learning_rate: float = 0.05,
    loss_fn: Callable[[PyTree], jax.Array] | None = None,
) -> Training:
  """Trains the case's params with ``jc.make_train_step`` and masked Adam.

  Args:
    case: from ``make_case``.
    steps: the number of training steps.
    learning_rate: Adam's learning rate.
    loss_fn: ``loss_fn(model_params) -> scalar``; by default a parabola over
      the leaves the spec compresses: the mean of ``(param - target)**2`` for
      a fixed target of small random values.

  Returns:
    A ``Training``.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.testing import make_case, train
    >>> tr = train(make_case(jc.quant.FakeQuant(bits=8)), steps=5)
    >>> bool(tr.losses[-1] < tr.losses[0])
    True
  """
  loss_fn = loss_fn or _parabola(case)
  opt = masked_optimizer(optax.adam(learning_rate))
  # The stats travel as the batch (traced, as a model's forward pass makes them).
  step = make_train_step(
      lambda p, stats: (loss_fn(p), stats),
      case.spec,
      opt,
      has_aux=True,
      stats_fn=lambda stats: stats,
      donate=False,
  )
  ts = init_train_state(case.spec, opt, case.params, key=case.key)
  losses, masks, opt_states = [], [], []
  for _ in range(steps):
    masks.append(case.spec.update_masks(ts.trainable, ts.spec_state))
    ts, metrics = step(ts, case.stats)
    losses.append(metrics["loss"])
    opt_states.append(ts.opt_state)
  return Training(np.asarray(jax.device_get(losses), np.float32), masks, opt_states, ts, opt)


# --------------------------------------------------------------------------
# Helpers for messages.
# --------------------------------------------------------------------------


def _fail(check: str, case: Case, message: str) -> AssertionError:
  return AssertionError(f"{check} ({case.name}): {message}")


def _skip(check: str, case: Case, message: str) -> unittest.SkipTest:
  return unittest.SkipTest(f"{check} ({case.name}): {message}")


def _avals(tree: PyTree) -> dict[str, tuple]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
      path_str(p): (tuple(np.shape(x)), str(getattr(x, "dtype", type(x).__name__)), getattr(x, "weak_type", False))
      for p, x in flat
  }


def _explain(before: PyTree, after: PyTree) -> str:
  """The first difference in structure, shapes, dtypes or weak types."""
  a, b = _avals(before), _avals(after)
  if list(a) != list(b):
    gone = [p for p in a if p not in b]
    new = [p for p in b if p not in a]
    return f"leaves {gone[:5]} are gone and leaves {new[:5]} appeared"
  for p in a:
    if a[p] != b[p]:
      (s0, d0, w0), (s1, d1, w1) = a[p], b[p]
      return (
          f"leaf {p!r} was shape {s0} {d0}{' (weak type)' if w0 else ''} and is now "
          f"shape {s1} {d1}{' (weak type)' if w1 else ''}"
      )
  ta, tb = jax.tree_util.tree_structure(before), jax.tree_util.tree_structure(after)
  if ta != tb:
    return f"the same leaves, but the pytree nodes or their static data differ: {ta} != {tb}"
  return "no difference in structure, shapes or dtypes"


def _as_f32(tree: PyTree) -> PyTree:
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)


def _close(check: str, case: Case, got: PyTree, want: PyTree, what: str, rtol: float, atol: float) -> None:
  try:
    chex.assert_trees_all_close(_as_f32(got), _as_f32(want), rtol=rtol, atol=atol)
  except AssertionError as e:
    raise _fail(check, case, f"{what}.\n{e}") from None


# --------------------------------------------------------------------------
# The checks.
# --------------------------------------------------------------------------


def assert_init_under_eval_shape(case: Case, *, jitted: Run | None = None) -> None:
  """``spec.init`` traces under ``jax.eval_shape`` to the shapes and dtypes it gives.

  Args:
    case: from ``make_case``.
    jitted: a jitted ``run`` of the case, to share (run if ``None``).

  Returns:
    None; raises ``AssertionError`` when init needs concrete values or its
    abstract output differs from its real one.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.testing import assert_init_under_eval_shape, make_case
    >>> assert_init_under_eval_shape(make_case(jc.quant.LSQ(bits=4)))
  """
  check = "init_under_eval_shape"
  try:
    t, s = jax.eval_shape(lambda p, k: case.spec.init(p, key=k), case.params, case.key)
    abstract = {"trainable": t, "state": s}
  except (
      jax.errors.ConcretizationTypeError,
      jax.errors.TracerArrayConversionError,
      jax.errors.TracerIntegerConversionError,
  ) as e:
    raise _fail(
        check, case,
        "spec.init reads the value of a traced array (a Python branch, int() or a host "
        "transfer), so it cannot run under jax.eval_shape or jax.jit. Compute with "
        f"jnp.where / lax.cond instead.\n{e}",
    ) from None
  jitted = jitted or run(case, steps=0)
  concrete = {"trainable": jitted.trainables[0], "state": jitted.states[0]}
  try:
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, concrete)
  except AssertionError as e:
    raise _fail(
        check, case,
        f"spec.init under jax.eval_shape differs from spec.init: {_explain(abstract, concrete)}. "
        f"Shapes and dtypes must follow from the params' shapes and dtypes alone.\n{e}",
    ) from None


def assert_jit_matches_eager(
    case: Case, *, jitted: Run | None = None, steps: int = 3, rtol: float = 1e-5, atol: float = 1e-5
) -> None:
  """Init, apply and updates give the same model params jitted and op by op.

  Args:
    case: from ``make_case``.
    jitted: a jitted ``run`` of the case with ``steps`` updates (run if ``None``).
    steps: the number of updates.
    rtol, atol: tolerances (the two paths may fuse floating-point work differently).

  Returns:
    None; raises ``AssertionError`` naming the first leaf that differs.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.testing import assert_jit_matches_eager, make_case
    >>> assert_jit_matches_eager(make_case(jc.quant.FakeQuant(bits=4)), steps=1)
  """
  jitted = jitted or run(case, steps=steps)
  eager = run(case, jit=False, steps=len(jitted.outputs) - 1)
  _close(
      "jit_matches_eager", case, eager.outputs, jitted.outputs,
      "spec.apply after init and each update differs between eager and jitted runs "
      "(outputs[i] is after update i; a stage must not depend on Python-side values that "
      "differ under tracing)",
      rtol, atol,
  )


def assert_dtypes_kept(case: Case, *, jitted: Run | None = None) -> None:
  """``spec.apply`` gives every leaf the shape and dtype of its param, at every step.

  Run it on cases of each dtype the stage supports (``make_case(..., dtype=jnp.bfloat16)``).

  Args:
    case: from ``make_case``.
    jitted: a jitted ``run`` of the case (run if ``None``).

  Returns:
    None; raises ``AssertionError`` naming the leaf, the step and the dtypes.

  Example:
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> from jaxcompress.testing import assert_dtypes_kept, make_case
    >>> assert_dtypes_kept(make_case(jc.quant.FakeQuant(bits=8), dtype=jnp.bfloat16))
  """
  jitted = jitted or run(case)
  want = _avals(case.params)
  for i, out in enumerate(jitted.outputs):
    got = _avals(out)
    for path, (shape, dtype, _) in want.items():
      if path not in got:
        raise _fail("dtypes_kept", case, f"spec.apply lost leaf {path!r}.")
      if got[path][:2] != (shape, dtype):
        when = "after init" if i == 0 else f"after update {i - 1}"
        raise _fail(
            "dtypes_kept", case,
            f"spec.apply {when} gives leaf {path!r} shape {got[path][0]} and dtype "
            f"{got[path][1]}, but the param has shape {shape} and dtype {dtype}. A stage's "
            "apply must return the value in the dtype it got (cast with "
            "`.astype(value.dtype)`; a float32 constant promotes bfloat16).",
        )


def assert_no_retrace(case: Case, *, jitted: Run | None = None) -> None:
  """The jitted ``spec.update`` and ``spec.apply`` are traced once over all steps.

  Args:
    case: from ``make_case``.
    jitted: a jitted ``run`` of the case (run if ``None``).

  Returns:
    None; raises ``AssertionError`` with the number of traces and the first
    input that changed between steps.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.testing import assert_no_retrace, make_case
    >>> assert_no_retrace(make_case(jc.quant.FakeQuant(bits=8)))
  """
  jitted = jitted or run(case)
  steps = len(jitted.outputs) - 1
  for name in ("update", "apply"):
    n = jitted.traces.get(name)
    if n is None:
      raise ValueError("assert_no_retrace needs a jitted run: pass jitted=run(case, jit=True).")
    if n > 1:
      pairs = [{"trainable": t, "state": s} for t, s in zip(jitted.trainables, jitted.states)]
      change = next(
          (f"from step {i} to step {i + 1}, {_explain(pairs[i], pairs[i + 1])}"
           for i in range(len(pairs) - 1) if _avals(pairs[i]) != _avals(pairs[i + 1])
           or jax.tree_util.tree_structure(pairs[i]) != jax.tree_util.tree_structure(pairs[i + 1])),
          "but no input changed shape, dtype or structure (a static argument or a new "
          "function object is made per call?)",
      )
      raise _fail(
          "no_retrace", case,
          f"jitted spec.{name} was traced {n} times in {steps} steps (once expected): "
          f"(trainable, state) changed {change}. spec.update must return trainables and "
          "states with the structure, shapes, dtypes and weak types it was given: keep "
          "counters in int32 arrays, not Python numbers or static fields, and cast results "
          "to the input's dtype.",
      )


def assert_state_structure_stable(case: Case, *, jitted: Run | None = None) -> None:
  """``(trainable, state)`` keep their pytree structure, shapes and dtypes across updates.

  Args:
    case: from ``make_case``.
    jitted: a jitted ``run`` of the case (run if ``None``).

  Returns:
    None; raises ``AssertionError`` naming the update and the leaf that changed.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.testing import assert_state_structure_stable, make_case
    >>> assert_state_structure_stable(make_case(jc.quant.LSQ(bits=4)))
  """
  jitted = jitted or run(case)
  first = {"trainable": jitted.trainables[0], "state": jitted.states[0]}
  struct = jax.tree_util.tree_structure(first)
  avals = {p: v[:2] for p, v in _avals(first).items()}
  for i, (t, s) in enumerate(zip(jitted.trainables[1:], jitted.states[1:])):
    pair = {"trainable": t, "state": s}
    if jax.tree_util.tree_structure(pair) != struct or {p: v[:2] for p, v in _avals(pair).items()} != avals:
      raise _fail(
          "state_structure_stable", case,
          f"update {i} changed (trainable, state) from what spec.init gave: "
          f"{_explain(first, pair)}. spec.update must return the structure, shapes and "
          "dtypes spec.init returned (a checkpoint, an optimizer state and a jitted step "
          "rely on it): choose with jnp.where rather than a Python branch, and keep "
          "counters as arrays.",
      )


def assert_sharded_matches_single_device(
    case: Case,
    *,
    axis_type: AxisType = AxisType.Auto,
    jitted: Run | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> None:
  """On a (2, 4) mesh of 8 devices, sharded init, updates and apply equal one device.

  ``spec.init`` runs under ``jax.jit(..., out_shardings=spec.shardings(...))``
  on params sharded by ``case.param_specs``; each leaf must come out with its
  derived sharding, and ``spec.apply`` after each update must equal the
  single-device run.

  Args:
    case: from ``make_case``.
    axis_type: the mesh's axis type, ``AxisType.Auto`` or ``AxisType.Explicit``.
    jitted: a single-device jitted ``run`` of the case (run if ``None``).
    rtol, atol: tolerances.

  Returns:
    None; raises ``unittest.SkipTest`` with fewer than 8 devices and
    ``AssertionError`` naming a leaf whose sharding or value differs.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.testing import assert_sharded_matches_single_device, make_case
    >>> assert_sharded_matches_single_device(make_case(jc.quant.FakeQuant(bits=8)))
  """
  check = "sharded_matches_single_device"
  devices = jax.devices()
  if len(devices) < 8:
    raise _skip(
        check, case,
        f"needs 8 devices, found {len(devices)}. On CPU, set "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported.",
    )
  jitted = jitted or run(case)
  spec = case.spec
  steps = len(jitted.outputs) - 1
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2, devices=devices[:8])
  with jax.set_mesh(mesh):
    p_sh = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), case.param_specs)
    params = jax.device_put(case.params, p_sh)
    t_sh, s_sh = spec.shardings(case.params, p_sh, key=case.key)
    init = jax.jit(lambda p, k: spec.init(p, key=k), out_shardings=(t_sh, s_sh))
    t, s = init(params, case.key)
    flat, _ = jax.tree_util.tree_flatten_with_path((t, s))
    for (kp, x), sh in zip(flat, jax.tree_util.tree_leaves((t_sh, s_sh))):
      if not x.sharding.is_equivalent_to(sh, x.ndim):
        raise _fail(
            check, case,
            f"jitted spec.init put leaf {path_str(kp)!r} (shape {x.shape}) on sharding "
            f"{x.sharding}, but spec.shardings says {sh}.",
        )
    update = jax.jit(
        lambda t, s, i, g, st, k: spec.update(t, s, i, grads=g, stats=st, key=k),
        out_shardings=(t_sh, s_sh),
    )
    apply = jax.jit(spec.apply)
    outs = [apply(t, s)]
    for i in range(steps):
      t, s = update(t, s, jnp.asarray(i, jnp.int32), case.grads, case.stats, case.key)
      outs.append(apply(t, s))
  _close(
      check, case, outs, jitted.outputs,
      f"spec.apply on a {axis_type.name} (2, 4) mesh differs from one device "
      "(outputs[i] is after update i)",
      rtol, atol,
  )


def assert_grads_reach_trainables(
    case: Case, *, jitted: Run | None = None, where: Any = None
) -> None:
  """A loss of the model params has a non-zero, finite gradient for every trainable leaf.

  The loss is ``sum(apply(trainable, state) * probe)`` for a fixed random probe,
  at the last state of the run; every floating trainable leaf (the weight and
  what the stages train: steps, codebooks, factors) must get a gradient of its
  own dtype, finite, with at least one non-zero entry.

  Args:
    case: from ``make_case``.
    jitted: a jitted ``run`` of the case (run if ``None``); its last step is used.
    where: which trainable leaves must get a non-zero gradient, as a rule
      pattern over their paths (``Dense_0/kernel/params/step_size``): a regex,
      a ``(path, leaf)`` predicate, or a tuple of them. ``None``: all.

  Returns:
    None; raises ``AssertionError`` naming the leaf.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.testing import assert_grads_reach_trainables, make_case
    >>> assert_grads_reach_trainables(make_case(jc.quant.LSQ(bits=4)))
  """
  check = "grads_reach_trainables"
  jitted = jitted or run(case)
  t, s = jitted.trainables[-1], jitted.states[-1]
  leaves, treedef = jax.tree_util.tree_flatten(case.params)
  keys = jax.random.split(jax.random.key(9), len(leaves))
  probe = treedef.unflatten([jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)])

  def loss(t):
    out = case.spec.apply(t, s)
    return sum(
        jnp.sum(o.astype(jnp.float32) * r)
        for o, r in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(probe))
    )

  grads = jax.jit(jax.grad(loss))(t)
  flat_t, _ = jax.tree_util.tree_flatten_with_path(t)
  flat_g = jax.tree_util.tree_leaves(grads)
  for (kp, x), g in zip(flat_t, flat_g):
    path = path_str(kp)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      continue
    if g.dtype != x.dtype or g.shape != x.shape:
      raise _fail(
          check, case,
          f"the gradient of trainable leaf {path!r} has shape {g.shape} and dtype {g.dtype}, "
          f"but the leaf has shape {x.shape} and dtype {x.dtype}.",
      )
    g = np.asarray(g, np.float32)
    if not np.all(np.isfinite(g)):
      raise _fail(
          check, case,
          f"the gradient of trainable leaf {path!r} has {int(np.sum(~np.isfinite(g)))} "
          "non-finite entries. Guard divisions and logs in apply (e.g. a zero scale).",
      )
    if (where is None or matches(where, path, x)) and not np.any(g):
      raise _fail(
          check, case,
          f"no gradient reaches trainable leaf {path!r}: it is zero everywhere, so the "
          "optimizer never changes it. Check that apply uses it through differentiable "
          "operations (a straight-through estimator around rounding, no stop_gradient), "
          "or pass `where=` to name the leaves that should train.",
      )


class _Count:
  """Entries of an optimizer-state leaf under a mask: non-zero where masked, masked."""

  def __init__(self, x: Any, mask: Any):
    masked = ~np.asarray(mask)
    self.nonzero = int(np.count_nonzero(np.asarray(x)[masked]))
    self.masked = int(np.sum(masked))


def _masked_entries(opt: optax.GradientTransformation, opt_state: PyTree, masks: PyTree) -> list:
  """``(path, count)`` for each optimizer-state leaf that mirrors a masked param."""
  counts = optax.tree_utils.tree_map_params(
      opt,
      lambda x, m: None if m is None or getattr(x, "shape", None) != m.shape else _Count(x, m),
      opt_state,
      masks,
      transform_non_params=lambda _: None,
      is_leaf=lambda x: x is None,
  )
  flat, _ = jax.tree_util.tree_flatten_with_path(counts)
  return [(path_str(kp), c) for kp, c in flat if isinstance(c, _Count)]


def assert_masked_moments_zero(case: Case, *, trained: Training | None = None) -> None:
  """Masked Adam's moments stay exactly zero wherever ``update_mask`` was False.

  After each step of ``train`` (``jc.masked_optimizer(optax.adam)``), every
  optimizer-state leaf that mirrors a masked weight must be zero where the mask
  the step used was False.

  Args:
    case: from ``make_case``.
    trained: a ``train`` of the case, to share (trained if ``None``).

  Returns:
    None; raises ``unittest.SkipTest`` for a stage without an ``update_mask``
    and ``AssertionError`` naming the step and the state leaf.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.testing import assert_masked_moments_zero, make_case, train
    >>> case = make_case(jc.prune.magnitude(sparsity=0.5))
    >>> assert_masked_moments_zero(case, trained=train(case, steps=2))
  """
  check = "masked_moments_zero"
  trained = trained or train(case)
  if not any(m is not None for m in jax.tree_util.tree_leaves(trained.masks)):
    raise _skip(check, case, "the stages have no update_mask (nothing for the optimizer to hold at zero).")
  masked_any = False
  for i, (masks, opt_state) in enumerate(zip(trained.masks, trained.opt_states)):
    for path, c in _masked_entries(trained.optimizer, opt_state, masks):
      masked_any |= c.masked > 0
      if c.nonzero:
        raise _fail(
            check, case,
            f"after training step {i}, optimizer state {path!r} is non-zero at {c.nonzero} of "
            f"the {c.masked} entries its update_mask holds at zero. update_mask must return the "
            "mask apply multiplies by (True = keep), with the weight's shape.",
        )
  if not masked_any:
    raise _fail(
        check, case,
        f"the update_mask kept every entry in {len(trained.masks)} steps, so the check "
        "proves nothing: use a sparsity that masks entries from the first steps.",
    )


def assert_training_reduces_loss(case: Case, *, trained: Training | None = None, factor: float = 0.5) -> None:
  """Training through the stages at least halves the loss (``factor``).

  Args:
    case: from ``make_case``.
    trained: a ``train`` of the case (30 steps of a parabola; trained if ``None``).
    factor: the last loss must be at most ``factor`` times the first.

  Returns:
    None; raises ``AssertionError`` with the losses.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.testing import assert_training_reduces_loss, make_case
    >>> assert_training_reduces_loss(make_case(jc.quant.FakeQuant(bits=8)))
  """
  trained = trained or train(case)
  losses = trained.losses
  if not np.all(np.isfinite(losses)) or not losses[-1] <= factor * losses[0]:
    shown = ", ".join(f"{x:.4g}" for x in losses[:: max(1, len(losses) // 6)])
    raise _fail(
        "training_reduces_loss", case,
        f"{len(losses)} steps of masked Adam took the loss from {losses[0]:.4g} to "
        f"{losses[-1]:.4g} (steps: {shown}); at most {factor} x the first loss was "
        "expected. The trainables must receive useful gradients through apply, and "
        "update must not undo the optimizer's steps.",
    )


def assert_export_round_trip(case: Case, *, jitted: Run | None = None) -> None:
  """``jc.export.decode(jc.export.export(...))`` is ``spec.apply`` bit for bit.

  Args:
    case: from ``make_case``.
    jitted: a jitted ``run`` of the case (run if ``None``); its last step is exported.

  Returns:
    None; raises ``unittest.SkipTest`` when a stage has no export encoder, and
    ``AssertionError`` naming a leaf that decodes differently.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.testing import assert_export_round_trip, make_case, run
    >>> case = make_case(jc.quant.FakeQuant(bits=8))
    >>> assert_export_round_trip(case, jitted=run(case, steps=0))
  """
  from jaxcompress import export as _export  # noqa: PLC0415 (export is optional here)

  check = "export_round_trip"
  jitted = jitted or run(case)
  t, s = jitted.trainables[-1], jitted.states[-1]
  try:
    artifact = _export.export(case.spec, t, s)
  except ValueError as e:
    if "has no encoder" in str(e):
      raise _skip(check, case, str(e)) from None
    raise _fail(check, case, f"jc.export.export raised: {e}") from None
  want = case.spec.apply(t, s)
  flat, _ = jax.tree_util.tree_flatten_with_path(_export.decode(artifact))
  for (kp, g), w in zip(flat, jax.tree_util.tree_leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    bits = f"u{w.dtype.itemsize}"
    same = g.shape == w.shape and g.dtype == w.dtype and np.array_equal(g.view(bits), w.view(bits))
    if not same:
      raise _fail(
          check, case,
          f"leaf {path_str(kp)!r} decodes to a value that is not spec.apply's bit for bit "
          f"({g.dtype}{g.shape} vs {w.dtype}{w.shape}); its encoder must store what apply computes.",
      )


# --------------------------------------------------------------------------
# Everything at once.
# --------------------------------------------------------------------------


def check_stage(
    stages: Stage | Sequence[Stage],
    *,
    params: PyTree | None = None,
    pattern: Any = r".*kernel",
    needs_grads: bool = False,
    needs_key: bool = False,
    stats: Mapping[str, Any] | None = None,
    param_specs: PyTree | None = None,
    dtypes: Sequence[Any] = (jnp.float32, jnp.bfloat16),
    skip: Sequence[str] = (),
) -> dict[str, str]:
  """Runs every check of ``CHECKS`` on a stage (or chain of stages).

  The checks share one jitted run (init, apply and three updates) and one
  training run (30 steps of masked Adam). All run even when one fails; the
  failures are then raised together.

  Args:
    stages: a stage, a list of stages or a ``jc.Chain``.
    params, pattern, needs_grads, needs_key, stats, param_specs: as for
      ``make_case``.
    dtypes: the param dtypes of ``dtypes_kept`` (the first is used by the
      other checks).
    skip: names of checks not to run.

  Returns:
    ``{check: "ok" or "skipped: why"}``, in the order of ``CHECKS``.

  Raises:
    AssertionError: one or more checks failed; the message lists each with its
      reason.
    ValueError: ``skip`` names a check that does not exist.

  Example:
    >>> import jaxcompress as jc
    >>> from jaxcompress.testing import check_stage
    >>> slow = ["sharded_matches_single_device", "training_reduces_loss", "export_round_trip"]
    >>> report = check_stage(jc.quant.FakeQuant(bits=8), skip=slow)
    >>> report["no_retrace"], report["masked_moments_zero"].split(":")[0], report["export_round_trip"]
    ('ok', 'skipped', 'skipped: asked')
  """
  unknown = [c for c in skip if c not in CHECKS]
  if unknown:
    raise ValueError(f"check_stage: skip names unknown checks {unknown}; the checks are {list(CHECKS)}.")
  kwargs = dict(pattern=pattern, needs_grads=needs_grads, needs_key=needs_key, stats=stats, param_specs=param_specs)
  case = make_case(stages, params=params, dtype=dtypes[0], **kwargs)
  shared: dict[str, Any] = {}

  def jitted() -> Run:
    if "run" not in shared:
      shared["run"] = run(case)
    return shared["run"]

  def trained() -> Training:
    if "train" not in shared:
      shared["train"] = train(case)
    return shared["train"]

  def dtypes_kept():
    assert_dtypes_kept(case, jitted=jitted())
    for dtype in dtypes[1:]:
      other = make_case(stages, params=params, dtype=dtype, **kwargs)
      assert_dtypes_kept(other)

  def sharded():
    for axis_type in (AxisType.Auto, AxisType.Explicit):
      assert_sharded_matches_single_device(case, axis_type=axis_type, jitted=jitted())

  body: dict[str, Callable[[], None]] = {
      "init_under_eval_shape": lambda: assert_init_under_eval_shape(case, jitted=jitted()),
      "jit_matches_eager": lambda: assert_jit_matches_eager(case, jitted=jitted()),
      "dtypes_kept": dtypes_kept,
      "no_retrace": lambda: assert_no_retrace(case, jitted=jitted()),
      "state_structure_stable": lambda: assert_state_structure_stable(case, jitted=jitted()),
      "sharded_matches_single_device": sharded,
      "grads_reach_trainables": lambda: assert_grads_reach_trainables(case, jitted=jitted()),
      "masked_moments_zero": lambda: assert_masked_moments_zero(case, trained=trained()),
      "training_reduces_loss": lambda: assert_training_reduces_loss(case, trained=trained()),
      "export_round_trip": lambda: assert_export_round_trip(case, jitted=jitted()),
  }
  report: dict[str, str] = {}
  failures: list[tuple[str, BaseException]] = []
  for name in CHECKS:
    if name in skip:
      report[name] = "skipped: asked"
      continue
    try:
      body[name]()
      report[name] = "ok"
    except unittest.SkipTest as e:
      report[name] = f"skipped: {e}"
    except Exception as e:  # noqa: BLE001 (reported with the others below)
      report[name] = "FAILED"
      failures.append((name, e))
  if failures:
    lines = [
        f"- {e}" if isinstance(e, AssertionError) else f"- {name}: raised {type(e).__name__}: {e}"
        for name, e in failures
    ]
    raise AssertionError(
        f"check_stage ({case.name}): {len(failures)} of {len(CHECKS) - len(skip)} checks failed:\n"
        + "\n".join(lines)
    ) from failures[0][1]
  return report

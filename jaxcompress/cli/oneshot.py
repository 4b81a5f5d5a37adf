"""One-shot compression of saved params by a recipe (``jaxcompress compress``).

``compress(params, recipe, calib)`` is the spec's one-shot path::

    spec = recipe.spec()
    trainable, state = spec.init(params)
    trainable, state = spec.update(trainable, state, 0, stats=norms)  # masks, clusters, factors
    # then GPTQ, layer by layer, for the kernels of quant.gptq rules

Calibration inputs (``calib``, ``(n, in)``) reach the layers of one kind of
model: an MLP whose params are top-level modules named ``<name>_<i>``
(``Dense_0``, ``Dense_1``, ... in the order of ``i``), each holding a 2-D
``kernel (in, out)`` and optionally a ``bias (out,)``, applied in order with
ReLU between layers (``dense_chain`` checks this and says what does not fit).
For such a model:

- ``stats`` for ``spec.update`` are the L2 norm of each input feature of each
  layer over the calibration inputs of the float model (what the Wanda
  criterion reads), keyed by the module path;
- GPTQ quantizes each kernel of a ``quant.gptq`` rule from the inputs that the
  layers before it give once *they* are compressed (GPTQ's sequential
  calibration), first layer first. Its result is stored in the spec as a
  ``FakeQuant(ranges="static")`` leaf: the trainable is the dequantized kernel
  and the state's scale (and zero point) are GPTQ's, so ``spec.apply`` gives
  GPTQ's kernel and ``jc.export`` stores GPTQ's integer codes (``store_codes``).

Other models are refused when the recipe needs calibration; capture each
layer's inputs in Python and call ``jc.quant.gptq_params`` there.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import jaxcompress as jc
from jaxcompress.cli.recipe import Recipe
from jaxcompress.core.paths import path_str

PyTree = Any
_LAYER = re.compile(r"^(.*?)(\d+)$")


def dense_chain(params: PyTree) -> list[str]:
  """The layer names of an MLP checkpoint, in order.

  Args:
    params: a params tree.

  Returns:
    The top-level module names, ordered by their trailing number.

  Raises:
    ValueError: saying which part of ``params`` is not a chain of Dense layers.

  Example:
    >>> import numpy as np
    >>> from jaxcompress.cli.oneshot import dense_chain
    >>> layer = lambda m, n: {"kernel": np.zeros((m, n), np.float32), "bias": np.zeros(n, np.float32)}
    >>> dense_chain({"Dense_10": layer(4, 2), "Dense_2": layer(8, 4)})
    ['Dense_2', 'Dense_10']
  """
  fix = (
      "The command line computes layer inputs for an MLP: top-level modules Dense_0, Dense_1, "
      "... (any name ending in its position), each with a 2-D kernel (in, out) and optionally "
      "a bias (out,), applied in order with relu between them. For another model, capture "
      "each layer's inputs in Python and call jc.quant.gptq_params (see docs/cli.md)."
  )
  if not isinstance(params, Mapping) or not params:
    raise ValueError(f"the checkpoint is a {type(params).__name__}, not a mapping of layers. {fix}")
  order = {}
  for name, layer in params.items():
    m = _LAYER.match(str(name))
    if m is None:
      raise ValueError(f"module {name!r} has no position number at the end of its name. {fix}")
    if not isinstance(layer, Mapping) or "kernel" not in layer or set(layer) - {"kernel", "bias"}:
      keys = sorted(layer) if isinstance(layer, Mapping) else type(layer).__name__
      raise ValueError(f"module {name!r} holds {keys}, not a kernel and an optional bias. {fix}")
    kernel = layer["kernel"]
    if np.ndim(kernel) != 2:
      raise ValueError(f"{name}/kernel has shape {np.shape(kernel)}, not (in, out). {fix}")
    if "bias" in layer and np.shape(layer["bias"]) != (np.shape(kernel)[1],):
      raise ValueError(
          f"{name}/bias has shape {np.shape(layer['bias'])}; the kernel {np.shape(kernel)} needs "
          f"({np.shape(kernel)[1]},). {fix}"
      )
    if int(m.group(2)) in order:
      raise ValueError(f"modules {order[int(m.group(2))]!r} and {name!r} have the same position. {fix}")
    order[int(m.group(2))] = name
  layers = [order[i] for i in sorted(order)]
  for a, b in zip(layers, layers[1:]):
    out, into = np.shape(params[a]["kernel"])[1], np.shape(params[b]["kernel"])[0]
    if out != into:
      raise ValueError(
          f"{a} gives {out} features but {b}/kernel takes {into}: the layers do not form a chain. {fix}"
      )
  return layers


def _layer(p: Mapping, x: jax.Array, last: bool) -> jax.Array:
  y = x @ p["kernel"]
  if "bias" in p:
    y = y + p["bias"]
  return y if last else jax.nn.relu(y)


def mlp_apply(params: PyTree, x: jax.Array, layers: list[str] | None = None) -> jax.Array:
  """The output of the MLP ``dense_chain`` describes: Dense layers with ReLU between.

  Args:
    params: the MLP's params.
    x: inputs ``(n, in)``.
    layers: the layer order (default: ``dense_chain(params)``).

  Returns:
    The last layer's output ``(n, out)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxcompress.cli.oneshot import mlp_apply
    >>> p = {"Dense_0": {"kernel": jnp.array([[1.0, -1.0]])}, "Dense_1": {"kernel": jnp.ones((2, 1))}}
    >>> mlp_apply(p, jnp.array([[2.0]])).tolist()  # relu([2, -2]) @ [1, 1]
    [[2.0]]
  """
  layers = dense_chain(params) if layers is None else layers
  for i, name in enumerate(layers):
    x = _layer(params[name], x, i == len(layers) - 1)
  return x


def check_calibration(calib: Any, params: PyTree, layers: list[str], source: str = "calib") -> jax.Array:
  """Calibration inputs as a float32 ``(n, in)`` array, checked against the first layer."""
  a = np.asarray(calib)
  want = np.shape(params[layers[0]]["kernel"])[0]
  if a.ndim < 2 or a.shape[-1] != want or a.size == 0:
    raise ValueError(
        f"{source}: the calibration inputs have shape {a.shape}; {layers[0]}/kernel takes "
        f"{want} features, so give an array of shape (n, {want})."
    )
  if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
    raise ValueError(f"{source}: the calibration inputs have dtype {a.dtype}; give numbers.")
  a = a.reshape(-1, want).astype(np.float32)
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{source}: the calibration inputs hold NaN or inf; drop those rows.")
  return jnp.asarray(a)


def input_norms(params: PyTree, calib: jax.Array, layers: list[str]) -> dict[str, jax.Array]:
  """``{layer: L2 norm of each input feature}`` over the float model's calibration inputs."""
  stats, x = {}, calib
  for i, name in enumerate(layers):
    stats[name] = jnp.linalg.norm(x, axis=0)
    x = _layer(params[name], x, i == len(layers) - 1)
  return stats


def store_codes(spec: jc.Spec, trainable: PyTree, state: PyTree, path: str,
                qarray: jc.quant.QArray) -> tuple[PyTree, PyTree]:
  """Puts a ``QArray`` (from ``jc.quant.gptq``) into a leaf that a static ``FakeQuant`` owns.

  The trainable becomes the dequantized array and the state's scale and zero
  point become the ``QArray``'s, so that ``spec.apply`` gives exactly
  ``jc.quant.dequantize(qarray)`` and ``jc.export`` stores its codes.

  Args:
    spec: the spec; the leaf's rule is one ``FakeQuant(ranges="static")`` of
      the ``QArray``'s format and granularity.
    trainable, state: from ``spec.init``/``spec.update``.
    path: the leaf path.
    qarray: the quantized leaf.

  Returns:
    The new ``(trainable, state)``; the inputs are not modified.

  Example (codes rounded to nearest here; ``compress`` stores GPTQ's):
    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> from jaxcompress.cli.oneshot import store_codes
    >>> w = {"w": jnp.array([[0.9, -2.0], [0.3, 1.0]])}
    >>> q = jc.quant.quantize_params(w, pattern="w", bits=4)["w"]
    >>> spec = jc.Spec([jc.Rule("w", [jc.quant.FakeQuant(bits=4, ranges="static")])])
    >>> t, s = store_codes(spec, *spec.init(w), "w", q)
    >>> bool((spec.apply(t, s)["w"] == jc.quant.dequantize(q)).all())
    True
  """
  is_state = lambda x: isinstance(x, jc.LeafState)
  flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_state)
  paths = [path_str(p) for p, _ in flat]
  if path not in paths:
    raise ValueError(f"store_codes: no leaf {path!r}; the paths are {paths[:20]}.")
  leaf = flat[paths.index(path)][1]
  stages = spec.rules[leaf.rule].stages if leaf.stages else ()
  if len(stages) != 1 or not isinstance(stages[0], jc.quant.FakeQuant) or stages[0].ranges != "static":
    raise ValueError(
        f"store_codes: leaf {path!r} must be owned by a rule of one FakeQuant(ranges='static'), "
        f"got {[s.describe() for s in stages]}."
    )
  stage, key = stages[0], spec.rules[leaf.rule].keys[0]
  if stage.fmt != qarray.fmt or stage.granularity != qarray.granularity:
    raise ValueError(
        f"store_codes: leaf {path!r} has {stage.describe()}, but the codes are "
        f"{qarray.fmt!r}, {qarray.granularity!r}; build the rule with the same format."
    )
  quant_state = leaf.stages[key]._replace(scale=qarray.scale, zero_point=qarray.zero_point)
  new_leaf = dataclasses.replace(leaf, stages={**leaf.stages, key: quant_state})
  state = treedef.unflatten([new_leaf if p == path else v for p, (_, v) in zip(paths, flat)])
  value = jc.quant.dequantize(qarray)
  t_flat, t_def = jax.tree_util.tree_flatten_with_path(trainable, is_leaf=is_state)
  trainable = t_def.unflatten([value if path_str(p) == path else v for p, v in t_flat])
  return trainable, state


def _owner_of_message(recipe: Recipe, owners: dict[str, int | None], message: str) -> int | None:
  for path, o in owners.items():
    if o is not None and re.search(rf"['\"]?{re.escape(path)}['\"]?", message):
      return o
  return None


def compress(params: PyTree, recipe: Recipe, calib: Any = None) -> tuple[jc.Spec, PyTree, PyTree]:
  """One-shot compression of ``params`` by ``recipe`` (see the module docstring).

  Args:
    params: the params tree (not modified).
    recipe: from ``load_recipe``/``parse_recipe``.
    calib: calibration inputs ``(n, in)`` for an MLP (``dense_chain``), or
      ``None``; needed by ``quant.gptq`` rules.

  Returns:
    ``(spec, trainable, state)``: ``jc.export.export(spec, trainable, state)``
    gives the artifact.

  Raises:
    RecipeError: a rule selects no leaf, or a stage refuses a leaf (at the
      rule's line).
    ValueError: calibration is needed but missing, or the model is not an MLP.

  Example:
    >>> import jax, jaxcompress as jc
    >>> from jaxcompress.cli.recipe import parse_recipe
    >>> from jaxcompress.cli.oneshot import compress
    >>> params = {"Dense_0": {"kernel": jax.numpy.array([[0.5, -1.0], [0.25, 1.5]])}}
    >>> recipe = parse_recipe('''
    ... [[rules]]
    ... pattern = ".*kernel"
    ... stages = [{ stage = "quant.FakeQuant", bits = 2 }]
    ... ''')
    >>> spec, t, s = compress(params, recipe)
    >>> spec.apply(t, s)["Dense_0"]["kernel"].tolist()  # 2-bit symmetric: one step per channel
    [[0.5, -1.5], [0.0, 1.5]]
  """
  owners = recipe.owners(params)
  gptq_paths = [p for p, o in owners.items() if o is not None and recipe.gptq[o] is not None]
  layers = None
  if calib is not None or gptq_paths:
    if calib is None:
      raise ValueError(
          f"the recipe quantizes {gptq_paths[0]!r} with quant.gptq, which needs calibration "
          "inputs: pass --calib DATA.npy, an array (n, in) of typical model inputs."
      )
    try:
      layers = dense_chain(params)
    except ValueError as e:
      raise ValueError(f"calibration inputs cannot reach this model's layers: {e}") from None
    calib = check_calibration(calib, params, layers)
  spec = recipe.spec()

  def refused(e: Exception) -> Exception:
    o = _owner_of_message(recipe, owners, str(e))
    return e if o is None else recipe.error(recipe.rule_line(o), str(e))

  try:
    trainable, state = spec.init(params)
    stats = input_norms(params, calib, layers) if layers is not None else None
    trainable, state = spec.update(trainable, state, 0, stats=stats)
  except (TypeError, ValueError) as e:
    raise refused(e) from None
  if gptq_paths:
    x = calib
    for i, name in enumerate(layers):
      path = f"{name}/kernel"
      if path in gptq_paths:
        o = owners[path]
        try:
          q = jc.quant.gptq(params[name]["kernel"], x, path=path, **recipe.gptq[o])
        except (TypeError, ValueError) as e:
          raise recipe.error(recipe.stage_line(o, 0), str(e)) from None
        trainable, state = store_codes(spec, trainable, state, path, q)
      if i < len(layers) - 1:
        x = _layer(spec.apply(trainable, state)[name], x, last=False)
  return spec, trainable, state


def output_agreement(params: PyTree, compressed: PyTree, calib: Any) -> dict[str, float]:
  """How close the compressed MLP's outputs are to the float one's on calibration inputs.

  Returns:
    ``{"relative_error": ||y_c - y|| / ||y||, "top1_agreement": fraction of rows
    whose argmax agrees}``.
  """
  layers = dense_chain(params)
  x = check_calibration(calib, params, layers)
  y, yc = mlp_apply(params, x, layers), mlp_apply(compressed, x, layers)
  err = float(jnp.linalg.norm(yc - y) / jnp.maximum(jnp.linalg.norm(y), 1e-30))
  agree = float(jnp.mean(jnp.argmax(yc, -1) == jnp.argmax(y, -1)))
  return {"relative_error": err, "top1_agreement": agree}


__all__ = [
    "check_calibration", "compress", "dense_chain", "input_norms", "mlp_apply",
    "output_agreement", "store_codes",
]

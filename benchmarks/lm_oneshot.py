"""One-shot compression of a small transformer LM, judged by validation perplexity.

The model is ``examples/tiny_lm.py`` (a byte-level GPT trained on the source
of Python's standard library), loaded from its Orbax checkpoint (trained
first when absent). Every method compresses the Dense kernels of the
transformer blocks (``q``, ``k``, ``v``, ``o``, ``up``, ``down``); the
embeddings, LayerNorms and output head stay in float32, as in the GPTQ and
SparseGPT papers. Calibration sequences are random windows of the training
text (``numpy.random.default_rng(1)``); perplexity is measured on the
validation files (``tiny_lm.VALID_MODULES``).

Methods (keys of ``ppl``, ``seconds`` (wall clock) and ``cpu_seconds`` (the
process's CPU time, all threads: on a shared machine the steadier figure);
times exclude the perplexity evaluation):

- ``float``: the trained model.
- ``w4_rtn``, ``w3_rtn``: round to nearest, asymmetric, one scale and zero
  point per group of ``group_size`` input rows (``jc.quant.quantize_params``).
  The group size is 128 for the full model: with ``d_model = 128`` that is
  one group per output for ``q``, ``k``, ``v``, ``o``, ``up`` and four for
  ``down`` (input 512); 32 for the quick model (``d_model = 64``).
- ``w4_gptq``, ``w3_gptq``: GPTQ (``jc.quant.gptq``), same format, 1%
  dampening.
- ``w4_awq``, ``w3_awq``: AWQ (``jc.oneshot.awq``), same format, a grid of 20
  exponents.
- ``w4_mxfp4``, ``w4_nvfp4``: round to nearest in the block-scaled 4-bit
  formats (blocks of 32 and 16 inputs).
- ``w8a8_naive``: int8 weights (per output channel) and int8 activations
  (per token), ``jc.oneshot.w8a8_matmul``; ``w8a8_smoothquant``: the same
  after SmoothQuant (alpha 0.5) from the float model's activations.
- ``s50_*`` (50% unstructured) and ``nm24_*`` (2:4): ``magnitude`` (no
  data; one threshold per kernel), ``wanda`` (scores compared within each
  output) and ``sparsegpt`` of ``jc.oneshot``.
- ``lowrank50``: each kernel ``(in, out)`` replaced by its truncated SVD of
  rank ``floor(in * out / (2 * (in + out)))`` (at most half its parameters),
  ``jc.lowrank.svd``; ``lowrank50_kd``: then the factors trained to match the
  float model's next-byte distribution (``jc.distill.soft_target_loss``,
  ``jc.distill.make_distill_step``) on training windows.
- ``w4_mxfp4_gptq``, ``w4_nvfp4_gptq``: GPTQ in the block-scaled formats.
- ``w3_gptq_lora``, ``nm24_sparsegpt_lora``: the ``w3_gptq`` and
  ``nm24_sparsegpt`` kernels as a frozen base with rank-8 LoRA adapters
  (``jc.lowrank.LoRA``, ``jc.lowrank.adapters_only``) trained by the same
  distillation; their seconds include the one-shot pass.

Every calibrated method runs through ``jaxcompress.oneshot.sequential``: block
by block, each block's kernels compressed from the inputs that the already
compressed blocks give it.

Targets (the orderings the papers report), in ``targets``: GPTQ's increase
of perplexity over float is at most half of RTN's, at 4 and 3 bits;
SparseGPT's and Wanda's each at most half of magnitude's, at 50% and at 2:4;
distillation recovers at least half of the low-rank increase.

``diagnostics.input_norm_max_over_median``: over the block layers' float
calibration inputs, the largest input-feature L2 norm over the median one
(the median and the largest over layers). Wanda, AWQ and SmoothQuant gain
from the few outlier features of large language models (norms about 100x the
median); a small model without them gives those methods little to work with.

Run: ``python benchmarks/lm_oneshot.py`` (``--quick``: the tiny model, 16
calibration sequences; ``--ckpt DIR``: the checkpoint folder; ``--only NAME
...``: some methods, without targets). The last line printed is one JSON
object; a line per method goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxcompress as jc
from jaxcompress import oneshot
from jaxcompress.core.paths import path_str
from jaxcompress.oneshot.sequential import sequential
from _common import cpu_info

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import tiny_lm  # noqa: E402

KERNELS = r"blocks/\d+/(attn/(q|k|v|o)|mlp/(up|down))/kernel"
# Calibration sequences (and per batch), validation windows, the quantization
# group size (it divides every kernel's input size), distillation steps and batch.
SETTINGS = {
    "full": dict(calib=256, calib_batch=32, eval_windows=512, group_size=128, kd_steps=100, kd_batch=32),
    "quick": dict(calib=16, calib_batch=16, eval_windows=64, group_size=32, kd_steps=20, kd_batch=16),
}


# --------------------------------------------------------------------------
# Params of a compressed model.
# --------------------------------------------------------------------------


def with_params(model: tiny_lm.TinyLM, state) -> tiny_lm.TinyLM:
  """A clone of ``model`` with ``state`` (an ``nnx.State`` of its params)."""
  clone = nnx.clone(model)
  nnx.update(clone, state)
  return clone


def params_of(model: tiny_lm.TinyLM):
  return nnx.state(model, nnx.Param)


def map_kernels(model: tiny_lm.TinyLM, fn: Callable[[str, jax.Array], jax.Array]):
  """The params with ``fn(path, kernel)`` at every block kernel (no calibration)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: fn(path_str(p), x) if re.fullmatch(KERNELS, path_str(p)) else x, params_of(model)
  )


def rtn(model, **fmt):
  """Round to nearest of every block kernel (one jitted call)."""
  quantize = lambda params: jc.quant.dequantize_params(jc.quant.quantize_params(params, pattern=KERNELS, **fmt))
  return jax.jit(quantize)(params_of(model))


# --------------------------------------------------------------------------
# w8a8: each block Linear replaced by a simulated int8 layer.
# --------------------------------------------------------------------------


class W8A8Linear(nnx.Module):
  """``w8a8_matmul(x, kernel, input_scale) + bias``: int8 activations per token, int8
  weights per output channel (the kernel may be SmoothQuant's ``diag(s) W``)."""

  def __init__(self, kernel: jax.Array, bias: jax.Array, input_scale: jax.Array | None):
    self.kernel = nnx.Param(kernel)
    self.bias = nnx.Param(bias)
    self.input_scale = None if input_scale is None else nnx.Variable(input_scale)

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = None if self.input_scale is None else self.input_scale[...]
    return oneshot.w8a8_matmul(x, self.kernel[...], input_scale=scale) + self.bias[...]


def w8a8_model(model: tiny_lm.TinyLM, smoothed: dict | None = None) -> tiny_lm.TinyLM:
  """A clone of ``model`` whose block Linears run as ``W8A8Linear``: with their own
  kernels, or with SmoothQuant's ``{path: (kernel, input_scale)}``."""
  clone = nnx.clone(model)
  for i, block in enumerate(clone.blocks):
    for part, names in (("attn", ("q", "k", "v", "o")), ("mlp", ("up", "down"))):
      holder = getattr(block, part)
      for name in names:
        layer = getattr(holder, name)
        path = f"blocks/{i}/{part}/{name}/kernel"
        kernel, scale = smoothed[path] if smoothed is not None else (layer.kernel[...], None)
        setattr(holder, name, W8A8Linear(kernel, layer.bias[...], scale))
  return clone


# --------------------------------------------------------------------------
# Low rank, and its distillation.
# --------------------------------------------------------------------------


def lowrank_spec(model: tiny_lm.TinyLM) -> jc.Spec:
  """``jc.lowrank.svd`` of every block kernel at rank ``floor(in * out / (2 * (in + out)))``."""
  ranks = {}
  for p, x in jax.tree_util.tree_flatten_with_path(params_of(model))[0]:
    path = path_str(p)
    if re.fullmatch(KERNELS, path):
      n_in, n_out = x.shape
      ranks[path] = (n_in * n_out) // (2 * (n_in + n_out))
  return jc.Spec([jc.Rule(KERNELS, [jc.lowrank.svd(rank=ranks)])])


def distill(model, spec, opt, start, train_data, steps, batch, seq_len, seed):
  """Trains ``spec``'s trainables (from the params ``start``) to match the float
  model's next-byte distribution; returns the params the model sees."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  forward = lambda p, tokens: nnx.merge(graphdef, p, rest)(tokens)
  ts = jc.init_train_state(spec, opt, start)

  def loss_fn(student, tokens, teacher_logits, step):
    return jc.distill.soft_target_loss(forward(student, tokens), teacher_logits).mean()

  step = jc.distill.make_distill_step(loss_fn, forward, spec, opt)
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    tokens = jnp.asarray(tiny_lm.random_windows(train_data, batch, seq_len, rng))
    ts, _ = step(ts, params, tokens)
  return spec.apply(ts.trainable, ts.spec_state)


def distill_lowrank(model, spec, train_data, steps, batch, seq_len, seed=2):
  """The low-rank factors trained by distillation from the float model."""
  opt = optax.adam(optax.cosine_decay_schedule(1e-3, steps))
  return distill(model, spec, opt, params_of(model), train_data, steps, batch, seq_len, seed)


def distill_lora(model, base, train_data, steps, batch, seq_len, rank=8, seed=3):
  """LoRA adapters on the one-shot compressed kernels (``base``, the frozen base),
  trained by distillation from the float model."""
  spec = jc.Spec([jc.Rule(KERNELS, [jc.lowrank.LoRA(rank, alpha=2.0 * rank)])])
  opt = jc.lowrank.adapters_only(optax.adam(optax.cosine_decay_schedule(1e-3, steps)))
  return distill(model, spec, opt, base, train_data, steps, batch, seq_len, seed)


# --------------------------------------------------------------------------
# The benchmark.
# --------------------------------------------------------------------------


def methods(model, batches, group, settings, train_data, seq_len, diagnostics):
  """``{name: () -> params}`` of every method; SmoothQuant's pass over the float
  model also fills ``diagnostics`` with the spread of the input features' norms."""
  grouped = jc.quant.PerGroup(size=group, axis=0)
  seq = lambda compress: sequential(model, batches, compress, pattern=r"blocks/\d+/.*")
  deq = jc.quant.dequantize

  def gptq(bits):
    return seq(lambda p, w, x: deq(jc.quant.gptq(w, x, bits=bits, symmetric=False, granularity=grouped, path=p)))

  def awq(bits):
    return seq(lambda p, w, x: oneshot.awq(w, x, bits=bits, group_size=group, path=p).kernel)

  def smoothquant():
    smoothed = {}

    def record(p, w, x):  # kernels unchanged: every block sees float activations
      sm = oneshot.smoothquant(w, x, alpha=0.5, path=p)
      smoothed[p] = (sm.kernel, sm.input_scale)
      norms = np.linalg.norm(np.asarray(x, np.float64), axis=0)
      ratios.append(float(norms.max() / np.median(norms)))
      return w

    ratios = []
    seq(record)
    # Outlier features, which Wanda, AWQ and SmoothQuant exploit, show as a few
    # input features with norms far above the median (about 100x in LLMs).
    diagnostics["input_norm_max_over_median"] = {
        "median_layer": round(float(np.median(ratios)), 2), "max_layer": round(max(ratios), 2)
    }
    return smoothed

  def lowrank(kd):
    spec = lowrank_spec(model)
    if not kd:
      trainable, state = spec.init(params_of(model))
      return spec.apply(trainable, state)
    return distill_lowrank(model, spec, train_data, settings["kd_steps"], settings["kd_batch"], seq_len)

  sparse = {"s50": dict(sparsity=0.5), "nm24": dict(n_m=(2, 4))}
  out = {
      "w4_rtn": lambda: rtn(model, bits=4, symmetric=False, granularity=grouped),
      "w4_gptq": lambda: gptq(4),
      "w4_awq": lambda: awq(4),
      "w3_rtn": lambda: rtn(model, bits=3, symmetric=False, granularity=grouped),
      "w3_gptq": lambda: gptq(3),
      "w3_awq": lambda: awq(3),
      "w4_mxfp4": lambda: rtn(model, dtype="mxfp4"),
      "w4_nvfp4": lambda: rtn(model, dtype="nvfp4"),
      "w8a8_naive": lambda: None,
      "w8a8_smoothquant": smoothquant,
  }
  for key, kw in sparse.items():
    out[f"{key}_magnitude"] = lambda kw=kw: map_kernels(model, lambda p, w: oneshot.magnitude(w, **kw, path=p).kernel)
    out[f"{key}_wanda"] = lambda kw=kw: seq(lambda p, w, x: oneshot.wanda(w, x, **kw, path=p).kernel)
    out[f"{key}_sparsegpt"] = lambda kw=kw: seq(lambda p, w, x: oneshot.sparsegpt(w, x, **kw, path=p).kernel)
  out["lowrank50"] = lambda: lowrank(False)
  out["lowrank50_kd"] = lambda: lowrank(True)
  fp4_gptq = lambda dtype: seq(lambda p, w, x: deq(jc.quant.gptq(w, x, dtype=dtype, path=p)))
  out["w4_mxfp4_gptq"] = lambda: fp4_gptq("mxfp4")
  out["w4_nvfp4_gptq"] = lambda: fp4_gptq("nvfp4")
  # Recovery with adapters: the one-shot result is the frozen base (its seconds
  # include the one-shot pass); the merged 2:4 result is no longer sparse.
  lora = lambda base: distill_lora(model, base, train_data, settings["kd_steps"], settings["kd_batch"], seq_len)
  out["w3_gptq_lora"] = lambda: lora(gptq(3))
  out["nm24_sparsegpt_lora"] = lambda: lora(
      seq(lambda p, w, x: oneshot.sparsegpt(w, x, n_m=(2, 4), path=p).kernel))
  return out


def model_of(name, model, result):
  if name == "w8a8_naive":
    return w8a8_model(model)
  if name == "w8a8_smoothquant":
    return w8a8_model(model, result)
  return with_params(model, result)


def increase(ppl: dict, name: str) -> float:
  return ppl[name] - ppl["float"]


def targets(ppl: dict) -> dict:
  t = {}
  for bits in ("w4", "w3"):
    t[f"{bits}_gptq_le_half_rtn"] = increase(ppl, f"{bits}_gptq") <= 0.5 * increase(ppl, f"{bits}_rtn")
  for key in ("s50", "nm24"):
    for m in ("sparsegpt", "wanda"):
      t[f"{key}_{m}_le_half_magnitude"] = increase(ppl, f"{key}_{m}") <= 0.5 * increase(ppl, f"{key}_magnitude")
  t["kd_recovers_half_lowrank"] = increase(ppl, "lowrank50_kd") <= 0.5 * increase(ppl, "lowrank50")
  for k in ("w3_gptq", "nm24_sparsegpt"):
    t[f"{k}_lora_recovers"] = increase(ppl, f"{k}_lora") < increase(ppl, k)
  return t


def main(quick: bool = False, ckpt: str | None = None, only: list[str] | None = None) -> dict:
  config = tiny_lm.CONFIGS["quick" if quick else "small"]
  settings = SETTINGS["quick" if quick else "full"]
  t0 = time.perf_counter()
  model, info = tiny_lm.load_or_train(config, ckpt)
  load_seconds = time.perf_counter() - t0
  train_data, valid_data = tiny_lm.load_corpus()
  rng = np.random.default_rng(1)
  calib = tiny_lm.random_windows(train_data, settings["calib"], config.seq_len, rng)
  batches = [jnp.asarray(calib[i : i + settings["calib_batch"]]) for i in range(0, len(calib), settings["calib_batch"])]
  windows = tiny_lm.valid_windows(valid_data, config.seq_len + 1, settings["eval_windows"])
  group = settings["group_size"]

  t0, c0 = time.perf_counter(), time.process_time()
  ppl = {"float": tiny_lm.perplexity(model, windows)}
  seconds, cpu_seconds = {"float": time.perf_counter() - t0}, {"float": time.process_time() - c0}
  diagnostics = {}
  for name, run in methods(model, batches, group, settings, train_data, config.seq_len, diagnostics).items():
    if only and name not in only:
      continue
    t0, c0 = time.perf_counter(), time.process_time()
    result = run()
    seconds[name], cpu_seconds[name] = time.perf_counter() - t0, time.process_time() - c0
    ppl[name] = tiny_lm.perplexity(model_of(name, model, result), windows)
    print(f"{name:18s} ppl {ppl[name]:8.4f}  {seconds[name]:6.1f} s  {cpu_seconds[name]:6.1f} cpu s",
          file=sys.stderr, flush=True)
  out = {
      "benchmark": "lm_oneshot",
      "quick": quick,
      "model": {k: getattr(config, k) for k in ("d_model", "n_layers", "n_heads", "d_ff", "seq_len")},
      "calibration": {"sequences": settings["calib"], "tokens": settings["calib"] * config.seq_len,
                      "group_size": group, "eval_windows": len(windows),
                      "eval_tokens": int(len(windows) * config.seq_len)},
      "ppl": {k: round(v, 4) for k, v in ppl.items()},
      "seconds": {k: round(v, 2) for k, v in seconds.items()},
      "cpu_seconds": {k: round(v, 2) for k, v in cpu_seconds.items()},
      "diagnostics": diagnostics,
      "checkpoint": {**info, "load_seconds": round(load_seconds, 1)},
  }
  if not only:
    out["targets"] = targets(ppl)
  return {**out, "backend": jax.default_backend(), "python": sys.version.split()[0]}


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="the tiny model, few calibration sequences")
  parser.add_argument("--ckpt", default=None, help="checkpoint folder (default: under the cache dir)")
  parser.add_argument("--only", nargs="*", default=None, help="run only these methods")
  args = parser.parse_args()
  print(json.dumps({**main(quick=args.quick, ckpt=args.ckpt, only=args.only), **cpu_info()}))

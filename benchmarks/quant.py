"""Quantization-aware training step time over the plain step.

CPU (default): 784-1024-1024-10 ReLU MLP (``flax.linen.Dense``), batch 256,
Adam, f32. GPU (``--gpu``): a Flax MLP block ``x + Dense(d)(gelu(Dense(ffn)(x)))``
with d=4096, ffn=16384, 8192 tokens, bf16 params and compute, Adam.

Every case is one ``jc.make_train_step`` over the same model and data; the
figures are ratios of its step time to the plain step's, measured side by side
in one process: each round runs every case in a shuffled order, one untimed
step then a block of timed steps, and a figure is the median over rounds of
the ratio of the mean step times within the round (``_common.paired_ratios``):

- ``fq_w8``: int8 fake-quantized kernels, one scale per output channel
  (``jc.quant.FakeQuant(bits=8)`` in a ``jc.Spec``, straight-through gradient).
  Target <= 1.05 CPU, <= 1.03 GPU.
- ``fq_w8_hand_ste``: the reference for ``fq_w8``: the same fake quantization
  written by hand into the loss as ``w + stop_gradient(q(w) - w)``, without
  jaxcompress (what BENCHMARKS.md calls plain-JAX STE).
- ``fq_w8a8``: the same as ``fq_w8``, plus int8 fake-quantized Dense inputs with dynamic
  per-token scales (``jc.quant.quantize_inputs``).
- ``int8_fwd``: the Dense products run in int8 with int32 accumulation
  (``jc.quant.int8_dot_general()`` as the layers' ``dot_general``: per-token
  input scales, per-channel kernel scales), backward in the original precision.
  Target <= 0.90 CPU, <= 0.88 GPU.
- ``fp8_fwd``: the same in float8_e4m3fn (``fp8_dot_general``). XLA on CPU has
  no fp8 matmul, so on CPU the fp8 values are multiplied as bfloat16 operands
  (``operand_dtype="bfloat16"``: exact, every e4m3 value is a bfloat16 value,
  f32 accumulation); ``fp8_fwd_native_operands`` gives the fp8 arrays to
  ``dot_general`` as they are (what the GPU run does).
- ``int8_fwd_intercepted``: ``int8_fwd`` set through
  ``quantize_inputs([InputRule(pattern=..., matmul="int8")])`` instead of the
  layers' argument (the same computation: its ratio should match).

``plain_ms`` is the plain step's median time (for orientation; compare ratios).

Run: ``python benchmarks/quant.py`` (``--quick``: a small MLP, a few steps, a
smoke run; ``--gpu``: the GPU block). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxcompress as jc
from jaxcompress import quant
from _common import cpu_info, interleaved, paired_ratios


class MLP(nn.Module):
  """ReLU MLP; ``dot_general`` (None: lax) runs every Dense product."""

  features: tuple[int, ...]
  dot_general: Any = None

  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(self.features):
      x = nn.Dense(f, dot_general=self.dot_general)(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


class Block(nn.Module):
  """Transformer MLP block, bf16: ``x + Dense(d)(gelu(Dense(ffn)(x)))``."""

  d: int
  ffn: int
  dot_general: Any = None

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, dot_general=self.dot_general)
    h = nn.gelu(nn.Dense(self.ffn, **kw)(x))
    return x + nn.Dense(self.d, **kw)(h)


def _setup(gpu: bool, quick: bool):
  """Model factory, inputs and loss for the chosen size."""
  key = jax.random.key(0)
  kx, ky = jax.random.split(key)
  if gpu:
    d, ffn, tokens = (512, 2048, 1024) if quick else (4096, 16384, 8192)
    make = lambda dg=None: Block(d, ffn, dot_general=dg)
    x = jax.random.normal(kx, (tokens, d), jnp.bfloat16)
    y = jax.random.normal(ky, (tokens, d), jnp.bfloat16)

    def loss(out, target):
      return jnp.mean(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)))

  else:
    sizes, batch = ((784, 256, 256, 10), 64) if quick else ((784, 1024, 1024, 10), 256)
    make = lambda dg=None: MLP(sizes[1:], dot_general=dg)
    x = jax.random.normal(kx, (batch, sizes[0]), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, sizes[-1])

    def loss(out, target):
      return optax.softmax_cross_entropy_with_integer_labels(out, target).mean()

  return make, (x, y), loss


def main(quick: bool = False, gpu: bool = False) -> dict:
  """Measures every case; returns the figures (ratios to the plain step).

  Args:
    quick: a small model and a few steps (smoke run).
    gpu: the bf16 MLP block instead of the CPU MLP.

  Returns:
    ``{"fq_w8": ..., "fq_w8a8": ..., "int8_fwd": ..., "fp8_fwd": ..., ...}``.
  """
  rounds, block, warmup = (2, 2, 1) if quick else (40, 5, 5)
  make, batch, loss = _setup(gpu, quick)
  opt = optax.adam(1e-4)
  params = make().init(jax.random.key(1), batch[0])["params"]
  every_input = [quant.InputRule(pattern=r"Dense_\d+")]
  fp8 = quant.fp8_dot_general(operand_dtype=None if gpu else "bfloat16")

  plain_spec = jc.Spec([])
  w8_spec = jc.Spec([jc.Rule(r".*kernel", [quant.FakeQuant(bits=8)])])

  def loss_fn(model, rules=None):
    def f(p, b):
      if rules is None:
        return loss(model.apply({"params": p}, b[0]), b[1])
      with quant.quantize_inputs(rules):
        return loss(model.apply({"params": p}, b[0]), b[1])

    return f

  def hand_ste_loss(p, b):  # the reference: plain-JAX STE written into the loss
    def fq(w):
      scale = jnp.max(jnp.abs(w), axis=0, keepdims=True) / 127.0
      scale = jnp.where(scale > 0, scale, 1.0)
      q = jnp.clip(jnp.round(w / scale), -128, 127) * scale
      return w + jax.lax.stop_gradient(q - w)

    p = jax.tree_util.tree_map_with_path(
        lambda path, w: fq(w) if path[-1].key == "kernel" else w, p
    )
    return loss(make().apply({"params": p}, b[0]), b[1])

  cases = {
      "plain": (plain_spec, loss_fn(make())),
      "fq_w8": (w8_spec, loss_fn(make())),
      "fq_w8_hand_ste": (plain_spec, hand_ste_loss),
      "fq_w8a8": (w8_spec, loss_fn(make(), every_input)),
      "int8_fwd": (plain_spec, loss_fn(make(quant.int8_dot_general()))),
      "fp8_fwd": (plain_spec, loss_fn(make(fp8))),
      "int8_fwd_intercepted": (
          plain_spec,
          loss_fn(make(), [quant.InputRule(pattern=r"Dense_\d+", matmul="int8")]),
      ),
  }
  if not gpu:
    cases["fp8_fwd_native_operands"] = (plain_spec, loss_fn(make(quant.fp8_dot_general())))

  runners = {}
  for name, (spec, lf) in cases.items():
    step = jc.make_train_step(lf, spec, opt)
    state = {"ts": jc.init_train_state(spec, opt, jax.tree.map(jnp.copy, params))}

    def run(step=step, state=state):
      state["ts"], metrics = step(state["ts"], batch)
      jax.block_until_ready(metrics["loss"])

    runners[name] = run

  ratios = paired_ratios(runners, "plain", rounds, block, warmup)
  plain_s = interleaved({"plain": runners["plain"]}, rounds * block, 1)["plain"]
  result: dict[str, Any] = {
      "device": jax.devices()[0].device_kind,
      "model": {
          (True, False): "mlp_block_d4096_ffn16384_t8192_bf16",
          (True, True): "quick_mlp_block_d512_ffn2048_t1024_bf16",
          (False, False): "mlp_784_1024_1024_10_b256_f32",
          (False, True): "quick_mlp_784_256_256_10_b64_f32",
      }[(gpu, quick)],
      "steps_measured": rounds * block,
      "plain_ms": round(plain_s * 1e3, 3),
  }
  for name in cases:
    if name != "plain":
      result[name] = round(ratios[name], 3)
  return result


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a small model, a few steps (smoke run)")
  parser.add_argument("--gpu", action="store_true", help="the bf16 MLP block (d=4096, ffn=16384, 8192 tokens)")
  args = parser.parse_args()
  print(json.dumps({**main(quick=args.quick, gpu=args.gpu), **cpu_info()}))

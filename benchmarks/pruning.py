"""Pruning overheads and the structured-shrink speed-up, 784-300-100-10 MLP, batch 256.

Figures: ratios of step times measured side by side in one process. Each of
40 rounds runs every variant in a shuffled order, 5 timed steps after one
untimed step; a figure is the median over rounds of the ratio of the mean step
times within a round (200 timed steps per variant, after 5 warm-up rounds).

- ``apply_ratio``: a compression-aware Adam step with magnitude-pruning masks at
  90% sparsity applied but not recomputed (``end_step=0``), over the plain Adam
  step written by hand with optax. Target <= 1.05 (jaxpruner 1.00).
- ``update_every_step_ratio``: the same with the magnitude masks recomputed on
  every step. Target <= 1.5 (jaxpruner 19.8 with a full argsort). Pruned
  weights are zeros, so most recomputes find the last masks still exact (one
  checking pass, see ``jaxcompress.core.select``).
- ``update_every_step_st_ratio``: the same, straight-through: the dense
  weights keep training, the masks change on every step (hundreds of weights
  of the first layer swap per step), so every recompute runs the radix select
  (one histogram pass over the band the last masks give, or two).
- ``shrink_speedup``: forward time of the MLP with 75% of the hidden channels
  pruned (kernel columns zeroed, full shapes) over the forward of the same
  model after ``jc.prune.shrink_dense_chain`` (784-75-25-10).
- ``per_output_select_speedup``: per-output masks (every output channel keeps
  10% of its weights, as ``jc.prune.PerOutput`` selects) of the first kernel,
  time with a per-row ``jax.lax.top_k`` over time with
  ``jaxcompress.core.select.topk_rows``; ``per_output_select_equal`` says
  the two masks are identical.

Run: ``python benchmarks/pruning.py`` (``--quick`` for a smoke run). The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import optax

import jaxcompress as jc
from jaxcompress.core.select import topk_rows
from _common import cross_entropy as loss_fn
from _common import cpu_info, init_mlp, mlp, paired_ratios

SIZES = (784, 300, 100, 10)
BATCH = 256
SPARSITY = 0.9
CHANNEL_SPARSITY = 0.75
CHAIN = [f"Dense_{i}" for i in range(len(SIZES) - 1)]


def train_step_ratios(rounds: int, block: int, warmup: int) -> dict[str, float]:
  params = init_mlp(jax.random.key(0), SIZES, bias_std=0.1)
  kx, ky = jax.random.split(jax.random.key(1))
  batch = (
      jax.random.normal(kx, (BATCH, SIZES[0]), jnp.float32),
      jax.random.randint(ky, (BATCH,), 0, SIZES[-1]),
  )

  # The plain step, as written by hand.
  adam = optax.adam(1e-3)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def plain_step(p, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, opt_state = adam.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  plain = {"state": (jax.tree.map(jnp.copy, params), adam.init(params))}

  def run_plain():
    p, o, loss = plain_step(*plain["state"], batch)
    loss.block_until_ready()
    plain["state"] = (p, o)

  def compressed(prune: jc.prune.Prune):
    spec = jc.Spec([jc.Rule(r"Dense_\d+/kernel", [prune])])
    opt = jc.masked_optimizer(optax.adam(1e-3))
    step = jc.make_train_step(loss_fn, spec, opt)
    box = {"ts": jc.init_train_state(spec, opt, jax.tree.map(jnp.copy, params))}

    def run():
      ts, metrics = step(box["ts"], batch)
      metrics["loss"].block_until_ready()
      box["ts"] = ts

    return run

  ratios = paired_ratios(
      {
          "plain": run_plain,
          # Masks made by spec.init and never recomputed: only applying them costs.
          "apply": compressed(jc.prune.magnitude(sparsity=SPARSITY, end_step=0)),
          # Masks recomputed (exact top-k) on every step.
          "update": compressed(jc.prune.magnitude(sparsity=SPARSITY, update_every=1)),
          # Straight-through: the dense weights keep training, so hundreds of
          # weights cross the threshold every step and every update selects.
          "update_st": compressed(
              jc.prune.magnitude(sparsity=SPARSITY, update_every=1, straight_through=True)
          ),
      },
      "plain",
      rounds,
      block,
      warmup,
  )
  return {
      "apply_ratio": ratios["apply"],
      "update_every_step_ratio": ratios["update"],
      "update_every_step_st_ratio": ratios["update_st"],
  }


def channel_prune(params: dict, fraction: float) -> dict:
  """Removes ``fraction`` of the output channels of each hidden layer (lowest column norm)."""
  hidden = "|".join(CHAIN[:-1])
  stage = jc.prune.magnitude(sparsity=fraction, structure=jc.prune.Channel())
  spec = jc.Spec([jc.Rule(f"({hidden})/kernel", [stage])])
  trainable, state = spec.init(params)
  return spec.apply(trainable, state)


def shrink_speedup(rounds: int, block: int, warmup: int) -> dict[str, float]:
  params = channel_prune(init_mlp(jax.random.key(2), SIZES, bias_std=0.1), CHANNEL_SPARSITY)
  small = jc.prune.shrink_dense_chain(params, CHAIN, activation=jax.nn.relu)
  x = jax.random.normal(jax.random.key(3), (BATCH, SIZES[0]), jnp.float32)
  full_fwd = jax.jit(mlp)
  small_fwd = jax.jit(mlp)
  err = float(jnp.max(jnp.abs(full_fwd(params, x) - small_fwd(small.params, x))))
  ratios = paired_ratios(
      {
          "small": lambda: small_fwd(small.params, x).block_until_ready(),
          "full": lambda: full_fwd(params, x).block_until_ready(),
      },
      "small",
      rounds,
      block,
      warmup,
  )
  return {
      "shrink_speedup": ratios["full"],
      "shrink_features": list(small.features),
      "shrink_max_abs_diff": err,
  }


def per_output_select_speedup(rounds: int, block: int, warmup: int) -> dict[str, float]:
  """Per-output (Wanda-style) masks of the first kernel: ``topk_rows`` against ``lax.top_k``."""
  scores = jnp.abs(init_mlp(jax.random.key(4), SIZES)["Dense_0"]["kernel"]).T  # (300, 784)
  k = int(round((1 - SPARSITY) * scores.shape[1]))

  @jax.jit
  def with_top_k(s):
    _, idx = jax.lax.top_k(s, k)
    rows = jnp.arange(s.shape[0])[:, None]
    return jnp.zeros(s.shape, jnp.bool_).at[rows, idx].set(True)

  with_rows = jax.jit(lambda s: topk_rows(s, k))
  same = bool(jnp.array_equal(with_top_k(scores), with_rows(scores)))
  ratios = paired_ratios(
      {
          "rows": lambda: with_rows(scores).block_until_ready(),
          "top_k": lambda: with_top_k(scores).block_until_ready(),
      },
      "rows",
      rounds,
      block,
      warmup,
  )
  return {"per_output_select_speedup": ratios["top_k"], "per_output_select_equal": same}


def main(quick: bool = False) -> dict:
  rounds, block, warmup = (2, 2, 1) if quick else (40, 5, 5)
  result = {
      "device": jax.devices()[0].device_kind,
      "mlp": list(SIZES),
      "batch": BATCH,
      "sparsity": SPARSITY,
      "steps_measured": rounds * block,
  }
  result.update(train_step_ratios(rounds, block, warmup))
  result.update(shrink_speedup(rounds, 4 * block, warmup))
  result.update(per_output_select_speedup(rounds, 4 * block, warmup))
  for k, v in result.items():
    if isinstance(v, float):
      result[k] = float(f"{v:.4g}")
  return result


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a few steps only (smoke run)")
  args = parser.parse_args()
  print(json.dumps({**main(quick=args.quick), **cpu_info()}))

import jax
import jax.numpy as jnp

import jaxcompress as jc
from tests.registry import Case


def _activation_norms():
  """Per-input-feature activation norms for the standard params (Wanda's statistic)."""
  k0, k1 = jax.random.split(jax.random.key(3))
  return {
      "Dense_0": jnp.abs(jax.random.normal(k0, (16,), jnp.float32)) + 0.1,
      "Dense_1/kernel": jnp.abs(jax.random.normal(k1, (32,), jnp.float32)) + 0.1,
  }


_GRADUAL = lambda: jc.schedules.linear(0.0, 0.8, end_step=4)

CASES = [
    Case("prune_magnitude", lambda: [jc.prune.magnitude(sparsity=_GRADUAL())]),
    Case(
        "prune_magnitude_global",
        lambda: [jc.prune.magnitude(sparsity=0.7, distribution=jc.prune.Global())],
    ),
    Case("prune_straight_through", lambda: [jc.prune.magnitude(sparsity=0.5, straight_through=True)]),
    Case(
        "prune_random",
        lambda: [jc.prune.Prune(sparsity=_GRADUAL(), criterion=jc.prune.Random())],
        needs_key=True,
    ),
    Case(
        "prune_saliency",
        lambda: [jc.prune.Prune(sparsity=0.6, criterion=jc.prune.Saliency())],
        needs_grads=True,
    ),
    Case(
        "prune_movement",
        lambda: [jc.prune.Prune(sparsity=0.6, criterion=jc.prune.Movement(), straight_through=True)],
        needs_grads=True,
    ),
    Case(
        "prune_wanda",
        lambda: [jc.prune.Prune(sparsity=0.5, criterion=jc.prune.Wanda())],
        stats=_activation_norms,
    ),
    Case("prune_nm_2_4", lambda: [jc.prune.Prune(structure=jc.prune.NM(2, 4))]),
    Case(
        "prune_block",
        lambda: [jc.prune.magnitude(sparsity=_GRADUAL(), structure=jc.prune.Block((4, 4)))],
    ),
    Case(
        "prune_channel",
        lambda: [jc.prune.magnitude(sparsity=0.5, structure=jc.prune.Channel(), update_every=2)],
    ),
    Case(
        "prune_per_output",
        lambda: [
            jc.prune.Prune(
                sparsity=0.5, criterion=jc.prune.Magnitude(), distribution=jc.prune.PerOutput()
            )
        ],
    ),
    Case("prune_erk", lambda: [jc.prune.magnitude(sparsity=_GRADUAL(), distribution=jc.prune.ERK())]),
    Case(
        "prune_rigl",
        lambda: [jc.prune.RigL(sparsity=0.8, end_step=10, update_every=1, distribution=jc.prune.ERK())],
        needs_grads=True,
    ),
    Case(
        "prune_set",
        lambda: [
            jc.prune.SET(sparsity=0.7, end_step=10, update_every=2)
        ],
        needs_key=True,
    ),
]

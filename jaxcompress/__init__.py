"""jaxcompress: model compression for JAX."""

from jaxcompress import checkpoint, cluster, distill, export, lowrank, oneshot, prune, quant, testing
from jaxcompress.core import schedules
from jaxcompress.core.chain import Chain
from jaxcompress.core.spec import Compressed, LeafState, Rule, Spec
from jaxcompress.core.stage import Stage, UpdateContext
from jaxcompress.train import (
    TrainState,
    compression_update,
    init_train_state,
    make_train_step,
    masked_optimizer,
    train_state_shardings,
)

__all__ = [
    "Chain",
    "Compressed",
    "LeafState",
    "Rule",
    "Spec",
    "Stage",
    "TrainState",
    "UpdateContext",
    "checkpoint",
    "cluster",
    "compression_update",
    "distill",
    "export",
    "init_train_state",
    "lowrank",
    "make_train_step",
    "masked_optimizer",
    "oneshot",
    "prune",
    "quant",
    "schedules",
    "testing",
    "train_state_shardings",
]

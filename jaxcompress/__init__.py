"""jaxcompress: model compression for JAX."""

from jaxcompress import prune
from jaxcompress.core import schedules
from jaxcompress.core.spec import Compressed, LeafState, Rule, Spec
from jaxcompress.core.stage import Stage, UpdateContext

__all__ = [
    "Compressed",
    "LeafState",
    "Rule",
    "Spec",
    "Stage",
    "UpdateContext",
    "prune",
    "schedules",
]

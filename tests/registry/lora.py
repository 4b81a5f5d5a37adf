"""LoRA adapters in the shared invariant suite: a frozen base plus a trainable delta.

The frozen weight gets no gradient (LoRA stops it at the base), and ``a`` gets
none while ``b`` is still zero, as it is through the suite's updates (which do
not train): the gradient reaches the biases and ``b``. tests/lowrank/test_lora.py
checks that it reaches ``a`` once ``b`` has trained.
"""

import jaxcompress as jc
from tests.registry import Case

_DELTA = r".*/bias|.*/params/lora/b"

CASES = [
    Case("lowrank_lora", lambda: [jc.lowrank.LoRA(4)], trains=_DELTA),
    Case(
        "lowrank_qlora_int4",
        lambda: [jc.quant.FakeQuant(bits=4), jc.lowrank.LoRA(4, alpha=8.0)],
        trains=_DELTA,
    ),
    Case(
        "lowrank_qlora_int4_f32_adapter",
        lambda: [jc.quant.FakeQuant(bits=4, granularity=jc.quant.PerGroup(size=8)),
                 jc.lowrank.LoRA(2, dtype="float32")],
        trains=_DELTA,
    ),
    Case(
        "lowrank_prune_nm24_then_lora",
        lambda: [jc.prune.Prune(structure=jc.prune.NM(2, 4)), jc.lowrank.LoRA(4)],
        trains=_DELTA,
    ),
]

"""Quantization stages in the shared invariant suite."""

import jaxcompress as jc
import jaxcompress.quant as jq
from tests.registry import Case

CASES = [
    Case("quant_fq_int8_per_channel", lambda: [jq.FakeQuant(bits=8)]),
    Case(
        "quant_fq_int8_static_mse_ema",
        lambda: [
            jq.FakeQuant(bits=8, ranges="static", calibration=jq.MSE(num=8), update_every=1, decay=0.5)
        ],
    ),
    Case(
        "quant_fq_int4_asym_per_group_static",
        lambda: [
            jq.FakeQuant(
                bits=4, symmetric=False, granularity=jq.PerGroup(size=8), ranges="static",
                update_every=2,
            )
        ],
    ),
    Case("quant_fq_fp8_e4m3", lambda: [jq.FakeQuant(dtype="float8_e4m3fn")]),
    Case(
        "quant_fq_int4_stochastic_static",
        lambda: [jq.FakeQuant(bits=4, ranges="static", rounding="stochastic")],
        needs_key=True,
    ),
    Case(
        "quant_fq_fp8_e5m2_stochastic",
        lambda: [jq.FakeQuant(dtype="float8_e5m2", rounding="stochastic")],
        needs_key=True,
    ),
    Case("quant_lsq_int4", lambda: [jq.LSQ(bits=4)]),
    Case(
        "quant_prune_then_fq_int4",
        lambda: [jc.prune.magnitude(sparsity=0.5), jq.FakeQuant(bits=4)],
    ),
    Case(
        "quant_prune_then_lsq_int8",
        lambda: [jc.prune.magnitude(sparsity=0.5), jq.LSQ(bits=8)],
    ),
    # Low-rank then quantize: each factor is fake-quantized, with its own step.
    Case("quant_lowrank_then_lsq_int8", lambda: [jc.lowrank.svd(rank=4), jq.LSQ(bits=8)]),
    # Block-scaled formats: 32-element MX blocks need 32 inputs (Dense_1; Dense_0 has 16).
    Case("quant_fq_mxfp4", lambda: [jq.FakeQuant(dtype="mxfp4")], pattern=r"Dense_1/kernel"),
    Case("quant_fq_mxfp8_e4m3", lambda: [jq.FakeQuant(dtype="mxfp8_e4m3")], pattern=r"Dense_1/kernel"),
    Case("quant_fq_nvfp4", lambda: [jq.FakeQuant(dtype="nvfp4")]),
    Case(
        "quant_prune_then_fq_nvfp4",
        lambda: [jc.prune.magnitude(sparsity=0.5), jq.FakeQuant(dtype="nvfp4")],
    ),
]

"""Quantization: numerics, straight-through estimators, calibration, stages, PTQ.

Weights are fake-quantized by spec stages (``FakeQuant``, ``LSQ``); activations
and low-precision matmuls live in ``activations`` and ``dot_general``.

Formats (``Format(dtype=...)``): integers of 2 to 8 bits, float8, and the
block-scaled formats ``"mxfp8_e4m3"``, ``"mxfp8_e5m2"``, ``"mxfp4"`` and
``"nvfp4"`` (``blockscaled``), which ``FakeQuant``, ``quantize``,
``quantize_params`` and ``gptq`` take like any other ``dtype``.
"""

# --- numerics, estimators, calibration, stages, post-training quantization ---
from jaxcompress.quant.numerics import (
    Format,
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    QArray,
    compute_scale,
    dequantize,
    fake_quant,
    quantize,
    scale_from_range,
)
from jaxcompress.quant.calibration import (
    MSE,
    AbsMax,
    Calibrator,
    MinMax,
    Percentile,
    RangeEMA,
    ema_init,
    ema_update,
)
from jaxcompress.quant.ptq import dequantize_params, gptq, gptq_params, quantize_params
from jaxcompress.quant.stages import LSQ, FakeQuant, QuantState
from jaxcompress.quant.ste import fake_quant_ste, lsq_fake_quant, pact_quant, round_ste

_NUMERICS_ALL = [
    "Format",
    "Granularity",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QArray",
    "compute_scale",
    "dequantize",
    "fake_quant",
    "quantize",
    "scale_from_range",
    "AbsMax",
    "Calibrator",
    "MSE",
    "MinMax",
    "Percentile",
    "RangeEMA",
    "ema_init",
    "ema_update",
    "dequantize_params",
    "gptq",
    "gptq_params",
    "quantize_params",
    "FakeQuant",
    "LSQ",
    "QuantState",
    "fake_quant_ste",
    "lsq_fake_quant",
    "pact_quant",
    "round_ste",
]

# --- activations and low-precision dot_general: imports and names go here ---
from jaxcompress.quant.activations import (
    InputRange,
    InputRule,
    QuantizedInput,
    quantize_inputs,
    quantize_nnx_inputs,
)
from jaxcompress.quant.dot_general import QuantizedDotGeneral, fp8_dot_general, int8_dot_general

_ACTIVATIONS_ALL: list[str] = [
    "InputRange",
    "InputRule",
    "QuantizedDotGeneral",
    "QuantizedInput",
    "fp8_dot_general",
    "int8_dot_general",
    "quantize_inputs",
    "quantize_nnx_inputs",
]

__all__ = _NUMERICS_ALL + _ACTIVATIONS_ALL

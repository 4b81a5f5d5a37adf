"""Low-rank factorization: kernels replaced by trainable factors.

``SVD`` factorizes Dense kernels ``W (in, out) ~ U (in, r) @ V (r, out)`` (conv
kernels as the matrix ``(h * w * in, out)``) by the truncated SVD; ``Tucker2``
factorizes conv kernels over their channel axes. The rank comes from a rank
rule: ``Fixed``, ``Fraction`` of full rank, ``Energy`` threshold, or one
parameter ``Budget`` shared by a rule's leaves.

The factors are the trainable leaves; ``spec.apply`` multiplies them out, so the
model is unchanged during training, and a ``quantize`` stage after ``SVD`` in a
rule quantizes each factor. For inference, ``factorized_params`` with
``factorized_dense`` (Flax linen) or ``factorize_nnx`` (Flax NNX) run each
factorized Dense layer as ``x @ U @ V``, never forming ``W``.

``LoRA`` adds a trainable low-rank delta to a frozen base (the weight after
the stages before it: QLoRA when they quantize it); ``export_lora`` stores the
base in its own encoding and the adapters apart, ``merge_lora`` folds them in.
"""

from __future__ import annotations

from jaxcompress.lowrank.factors import Factors, Tucker2Factors
from jaxcompress.lowrank.inference import (
    LowRankLinear,
    factorize_nnx,
    factorized_dense,
    factorized_params,
)
from jaxcompress.lowrank.lora import (
    Adapter,
    LoRA,
    LoRAArtifact,
    LoRAState,
    adapter_mask,
    adapters_only,
    add_lora,
    decode_lora,
    export_lora,
    lora_adapters,
    lora_base,
    merge_lora,
)
from jaxcompress.lowrank.ranks import Budget, Energy, Fixed, Fraction, RankRule
from jaxcompress.lowrank.stage import SVD, Tucker2, freeze_ranks, svd, tucker2

__all__ = [
    "Adapter",
    "Budget",
    "Energy",
    "Factors",
    "Fixed",
    "Fraction",
    "LoRA",
    "LoRAArtifact",
    "LoRAState",
    "LowRankLinear",
    "RankRule",
    "SVD",
    "Tucker2",
    "Tucker2Factors",
    "adapter_mask",
    "adapters_only",
    "add_lora",
    "decode_lora",
    "export_lora",
    "factorize_nnx",
    "factorized_dense",
    "factorized_params",
    "freeze_ranks",
    "lora_adapters",
    "lora_base",
    "merge_lora",
    "svd",
    "tucker2",
]

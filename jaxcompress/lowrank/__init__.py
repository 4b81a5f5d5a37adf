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
"""

from __future__ import annotations

from jaxcompress.lowrank.factors import Factors, Tucker2Factors
from jaxcompress.lowrank.inference import (
    LowRankLinear,
    factorize_nnx,
    factorized_dense,
    factorized_params,
)
from jaxcompress.lowrank.ranks import Budget, Energy, Fixed, Fraction, RankRule
from jaxcompress.lowrank.stage import SVD, Tucker2, freeze_ranks, svd, tucker2

__all__ = [
    "Budget",
    "Energy",
    "Factors",
    "Fixed",
    "Fraction",
    "LowRankLinear",
    "RankRule",
    "SVD",
    "Tucker2",
    "Tucker2Factors",
    "factorize_nnx",
    "factorized_dense",
    "factorized_params",
    "freeze_ranks",
    "svd",
    "tucker2",
]

"""Knowledge distillation: losses, intermediate features, a sharded teacher-student step.

Losses (``optax.losses`` style: unreduced, keyword-only, ``where=``):
``soft_target_loss`` (Hinton, forward KL with ``T^2``), ``reverse_kl_loss``,
``jensen_shannon_loss``, ``distillation_loss`` (soft and hard targets by
``alpha``), ``topk_distillation_loss`` (cached top-k teacher logits plus a rest
bucket); features: ``feature_mse_loss``, ``feature_cosine_loss`` with
``init_projection``/``apply_projection``, ``attention_transfer_loss``,
``rkd_distance_loss``, ``rkd_angle_loss``.

Intermediates: ``feature_paths``, ``select_features``, ``pair_features``.
Step: ``make_distill_step``. Offline: ``write_topk_cache``, ``load_topk_cache``.
"""

from jaxcompress.distill.cache import TopKCache, load_topk_cache, write_topk_cache
from jaxcompress.distill.features import (
    apply_projection,
    attention_transfer_loss,
    feature_cosine_loss,
    feature_mse_loss,
    init_projection,
    rkd_angle_loss,
    rkd_distance_loss,
)
from jaxcompress.distill.intermediates import FeaturePair, feature_paths, pair_features, select_features
from jaxcompress.distill.losses import (
    TopKLogits,
    distillation_loss,
    jensen_shannon_loss,
    reverse_kl_loss,
    soft_target_loss,
    topk_distillation_loss,
    topk_logits,
)
from jaxcompress.distill.step import make_distill_step

__all__ = [
    "FeaturePair",
    "TopKCache",
    "TopKLogits",
    "apply_projection",
    "attention_transfer_loss",
    "distillation_loss",
    "feature_cosine_loss",
    "feature_mse_loss",
    "feature_paths",
    "init_projection",
    "jensen_shannon_loss",
    "load_topk_cache",
    "make_distill_step",
    "pair_features",
    "reverse_kl_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "select_features",
    "soft_target_loss",
    "topk_distillation_loss",
    "topk_logits",
    "write_topk_cache",
]

"""Knowledge distillation: response-, feature- and relation-based losses, and the strategies that use them.

* :mod:`nanoopt.distill.losses`: pure loss functions (Hinton KD, decoupled KD, FitNets hints, attention transfer,
  RKD distance and angle, similarity-preserving), each with its paper and formula.
* :mod:`nanoopt.distill.adapters`: :class:`FeatureAdapter`, the trainable map between feature shapes.
* :mod:`nanoopt.distill.strategies`: the :class:`Distiller` loop (one or many teachers, feature pairs, compressed
  students), cross-model KD, born-again and deep-supervision self-distillation, deep mutual learning.

>>> import nanoopt as no
>>> from nanoopt import distill
>>> round(distill.kd_loss(no.Tensor([[1.0, 0.0]]), no.Tensor([[0.0, 1.0]]), temperature=1.0).item(), 4)
0.4621
"""

from nanoopt.distill.adapters import FeatureAdapter
from nanoopt.distill.losses import (
    attention_map,
    attention_transfer_loss,
    dkd_loss,
    hint_loss,
    kd_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_preserving_loss,
    soft_targets,
)
from nanoopt.distill.strategies import (
    DeepSupervision,
    DistillConfig,
    Distiller,
    FeaturePair,
    MutualLearning,
    SoftWeightSchedule,
    auxiliary_heads,
    born_again,
    confidence_weights,
    cross_model_distiller,
    recover,
)

__all__ = [
    "DeepSupervision", "DistillConfig", "Distiller", "FeatureAdapter", "FeaturePair", "MutualLearning",
    "SoftWeightSchedule",
    "attention_map", "attention_transfer_loss", "auxiliary_heads", "born_again", "confidence_weights",
    "cross_model_distiller", "dkd_loss", "hint_loss", "kd_loss", "recover", "rkd_angle_loss",
    "rkd_distance_loss", "similarity_preserving_loss", "soft_targets",
]

"""Pure loss functions: per-token divergences and the token-chunked distillation loss. No Trainer inside."""

from .chunked import auto_chunk_size, chunked_distillation_loss
from .divergences import (
    DIVERGENCE_NAMES,
    forward_kl,
    generalized_jsd,
    get_divergence,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    token_divergence,
    total_variation,
)
from .lm_head import LMHead
from .loss_output import DistillationLossOutput
from .sparse import SPARSE_TARGET_MODES, TopKTeacher, rest_log_prob_from_top_k
from .teacher_logits import DenseTeacher, HiddenStateTeacher, TeacherLogits

__all__ = [
    "DIVERGENCE_NAMES",
    "DenseTeacher",
    "DistillationLossOutput",
    "HiddenStateTeacher",
    "LMHead",
    "SPARSE_TARGET_MODES",
    "TeacherLogits",
    "TopKTeacher",
    "auto_chunk_size",
    "chunked_distillation_loss",
    "forward_kl",
    "generalized_jsd",
    "get_divergence",
    "rest_log_prob_from_top_k",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "token_divergence",
    "total_variation",
]

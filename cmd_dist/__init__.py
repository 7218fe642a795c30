"""cmd-dist: Confident knowledge selection followed by Mutual Distillation (CMD).

The paper's equations as pure tensor functions (import them into your own loop), plus a Ray
Train engine that trains N peers with them (``cmd-dist train``).
"""

from cmd_dist.data.noise import NOISE_KINDS, corrupt_labels, split_train_val
from cmd_dist.method.objectives import (
    OBJECTIVES,
    async_mkd_active_peer,
    cmd_losses,
    cmd_peer_loss,
    kdcl_losses,
    kdcl_teacher,
    kl_divergence,
    sync_mkd_losses,
    t2s_kd_loss,
    tfkd_reg_loss,
)
from cmd_dist.method.selection import KNOWLEDGE_MODES, confident_mask, knowledge_threshold, threshold_for_mode
from cmd_dist.method.selfkd import (
    SELF_KD_METHODS,
    ModelCertainty,
    cross_entropy,
    entropy,
    logistic,
    mconf_trust,
    proselflc_trust,
    refined_label,
    sample_confidence,
    self_kd_loss,
    uniform_entropy,
)

__version__ = "0.1.0"

__all__ = [
    "KNOWLEDGE_MODES",
    "NOISE_KINDS",
    "OBJECTIVES",
    "SELF_KD_METHODS",
    "ModelCertainty",
    "async_mkd_active_peer",
    "cmd_losses",
    "cmd_peer_loss",
    "confident_mask",
    "corrupt_labels",
    "cross_entropy",
    "entropy",
    "kdcl_losses",
    "kdcl_teacher",
    "kl_divergence",
    "knowledge_threshold",
    "logistic",
    "mconf_trust",
    "proselflc_trust",
    "refined_label",
    "sample_confidence",
    "self_kd_loss",
    "split_train_val",
    "sync_mkd_losses",
    "t2s_kd_loss",
    "tfkd_reg_loss",
    "threshold_for_mode",
    "uniform_entropy",
]

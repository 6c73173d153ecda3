"""[`DistillationLossOutput`]: what [`chunked_distillation_loss`] returns (the loss and the sums the trainer logs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DistillationLossOutput"]


@dataclass
class DistillationLossOutput:
    """Result of [`chunked_distillation_loss`].

    All sums run over the scored tokens: every row, or, when `labels` are given, the rows whose label is not `-100`.

    Attributes:
        loss (`torch.Tensor`): Scalar training loss `(alpha * CE_sum + (1 - alpha) * T^2 * D_sum) / normaliser`,
            differentiable with respect to the student hidden states and LM head. `CE_sum` is the sum of the chosen
            cross-entropy variant (plain, label-smoothed or DFT).
        distill_sum (`torch.Tensor`): Sum over tokens of the divergence at temperature `T`, before `T^2` and weights.
        ce_sum (`torch.Tensor` or `None`): Sum over tokens of the student's plain cross-entropy (negative
            log-likelihood) on the labels at `T = 1`, whatever `label_smoothing` and `ce_loss_type` are (for logging);
            `None` without labels.
        agree_count (`torch.Tensor`): Number of tokens where the student's and teacher's top-1 tokens agree.
        correct_count (`torch.Tensor` or `None`): Number of tokens where the student's top-1 token is the label.
        num_tokens (`int`): Number of tokens scored.
        entropy_sum (`torch.Tensor` or `None`): Sum over tokens of the entropy (nats) of the student's next-token
            distribution at `T = 1` over all its LM-head rows, like the `entropy` TRL's `SFTTrainer` logs. Always set
            by [`chunked_distillation_loss`]; `None` only as the default of a hand-built output.
    """

    loss: torch.Tensor
    distill_sum: torch.Tensor
    ce_sum: torch.Tensor | None
    agree_count: torch.Tensor
    correct_count: torch.Tensor | None
    num_tokens: int
    entropy_sum: torch.Tensor | None = None

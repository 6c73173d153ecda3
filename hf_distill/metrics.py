"""The distillation metrics a trainer logs beside `loss`: per-token means of each optimizer step."""

from __future__ import annotations

import torch

from .losses import DistillationLossOutput

__all__ = ["MAX_PENDING", "METRIC_NAMES", "DistillationMetricsMixin"]

MAX_PENDING = 256
"""Micro-batches whose metric totals may wait on the device before they are read back (bounds their memory)."""

METRIC_NAMES = ("distill_loss", "ce_loss", "teacher_agreement", "mean_token_accuracy", "entropy")
"""Logged per token: the divergence, the student's cross-entropy, teacher-student top-1 agreement, the student's
accuracy on the labels and its entropy."""


class DistillationMetricsMixin:
    """`_record_metrics`, `log` and `_accumulation_steps` for an `SFTTrainer` subclass (its `_metrics` dictionary).

    The metrics of each micro-batch are reduced on the device and read back only when the trainer logs, so a training
    step does not wait for the accelerator to report them."""

    def _accumulation_steps(self) -> int:
        # Set by `Trainer`'s training loop (smaller for the last step of an epoch); absent outside of `train()`
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def _record_metrics(
        self,
        mode: str,
        result: DistillationLossOutput,
        inputs: dict[str, torch.Tensor],
        num_items_in_batch: torch.Tensor | int | None,
    ) -> None:
        """Log per-token means, like `loss`: in training, sums over the micro-batches of one optimizer step divided by
        the step's token count (`num_items_in_batch`); in evaluation, per batch."""
        device = result.loss.device
        zero = torch.zeros((), device=device)

        def value(tensor: torch.Tensor | None) -> torch.Tensor:
            return (zero if tensor is None else tensor).to(device, torch.float32)

        per_step = mode == "train" and num_items_in_batch is not None
        if per_step:
            # Each rank's share of the step's tokens: `num_items_in_batch` is global when averaged across devices
            count = torch.as_tensor(num_items_in_batch).to(device, torch.float32)
            if self.args.average_tokens_across_devices:
                count = count / self.accelerator.num_processes
        else:
            count = torch.tensor(float(result.num_tokens), device=device)
        if mode == "train":
            if "attention_mask" in inputs:
                seen = inputs["attention_mask"].sum()
            else:
                seen = torch.tensor(inputs["input_ids"].numel())
        else:
            seen = zero
        local = torch.stack(
            [
                value(result.distill_sum),
                value(result.ce_sum),
                value(result.agree_count),
                value(result.correct_count),
                value(getattr(result, "entropy_sum", None)),
                count.reshape(()),
                value(seen),
            ]
        )
        # `gather`, not `gather_for_metrics`: the latter trims the last evaluation batch by sample count. The totals
        # stay on the device until `log` (or every `MAX_PENDING` micro-batches): no host sync per step
        totals = self.accelerator.gather(local.unsqueeze(0)).sum(0)
        scale = self._accumulation_steps() if per_step else 1
        pending = self.__dict__.setdefault("_pending_metrics", [])
        pending.append((mode, totals, scale))
        if len(pending) >= MAX_PENDING:
            self._flush_metrics()

    def _flush_metrics(self) -> None:
        """Read the pending per-micro-batch totals back (one host sync) into `_metrics`, where `log` averages them."""
        pending = self.__dict__.get("_pending_metrics") or []
        if not pending:
            return
        rows = torch.stack([totals.float() for _, totals, _ in pending]).cpu().tolist()
        for (mode, _, scale), (*totals, n, seen) in zip(pending, rows, strict=True):
            if n > 0:
                # Mean over micro-batches of (sum / step tokens * steps) = per-token mean of each step, averaged
                for name, total in zip(METRIC_NAMES, totals):
                    self._metrics[mode][name].append(total / n * scale)
            if mode == "train":
                self._total_train_tokens += int(seen)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]  # like SFTTrainer, in both modes
        pending.clear()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """`SFTTrainer.log`, after the pending metrics are read back."""
        self._flush_metrics()
        super().log(logs, start_time)

"""The output projection of a causal LM, as the chunked loss needs it: weight, bias and logit post-processing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _logit_scale(config) -> float:
    # Same rules as TRL's fused LM head: `logit_scale` (Cohere), `output_multiplier`, `lm_head_multiplier`
    # (Falcon-H1) multiply; `logits_scaling` (Granite, MiniCPM3) divides, except on HyperCLOVA X where it multiplies.
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


@dataclass
class LMHead:
    """An LM head `logits = softcap(scale * (hidden @ weight.T + bias))`, applied to a few tokens at a time.

    Args:
        weight (`torch.Tensor`): Projection of shape `[V, H]`.
        bias (`torch.Tensor`, *optional*): Bias of shape `[V]`.
        logit_scale (`float`, *optional*, defaults to `1.0`): Multiplier applied to the raw projection.
        softcap (`float`, *optional*): Final logit soft-capping (`softcap * tanh(x / softcap)`, Gemma 2).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    @property
    def vocab_rows(self) -> int:
        """Number of output rows (vocabulary entries, padding rows included)."""
        return self.weight.shape[0]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw projection `hidden @ weight.T + bias` in float32, before scaling and soft-capping."""
        weight = self.weight
        if hidden.device != weight.device:
            hidden = hidden.to(weight.device)
        if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(weight.device.type):
            hidden = hidden.to(weight.dtype)
        return F.linear(hidden, weight, self.bias).float()

    def transform(self, raw: torch.Tensor) -> torch.Tensor:
        """Apply the logit scale and soft-capping to a raw projection (differentiable)."""
        if self.logit_scale != 1.0:
            raw = raw * self.logit_scale
        if self.softcap is not None:
            raw = self.softcap * torch.tanh(raw / self.softcap)
        return raw

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final float32 logits for `hidden` of shape `[n, H]`."""
        return self.transform(self.project(hidden))

    @classmethod
    def from_model(cls, model: nn.Module) -> LMHead:
        """Read the LM head of a causal LM (or a PEFT model wrapping one).

        Raises:
            ValueError: If the model has no output embeddings, or the head is wrapped by a PEFT adapter (the chunked
                loss reads `lm_head.weight` directly, so an adapter there would never train).
        """
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError(
                f"{type(model).__name__} has no output embeddings (`lm_head`). Distillation needs a causal language "
                "model with an LM head (e.g. `AutoModelForCausalLM`)."
            )
        if not isinstance(head.weight, torch.Tensor) or head.weight.dim() != 2:
            raise ValueError(
                "The LM head is wrapped by an adapter or quantized in a way the chunked loss cannot read. Remove "
                "`'lm_head'` from the PEFT `target_modules` (keep it in `modules_to_save` if it must train)."
            )
        if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
            raise ValueError(
                "Applying a PEFT adapter to `lm_head` is not supported: the distillation loss reads `lm_head.weight` "
                "directly, so the adapter would never train. Remove `'lm_head'` from your `target_modules`."
            )
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return cls(
            weight=head.weight,
            bias=getattr(head, "bias", None),
            logit_scale=_logit_scale(config),
            softcap=getattr(config, "final_logit_softcapping", None),
        )

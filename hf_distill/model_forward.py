"""Run a model's own forward and keep what the chunked loss needs: the backbone's last hidden state.

The loss applies the LM heads itself, a chunk of tokens at a time, so it needs the hidden states the head would see.
Calling the model's own `forward` (rather than its backbone) keeps everything that forward does on the way: PEFT
prompt learning (virtual tokens prepended, or a prefix in the cache), vision-language models (images merged into the
text sequence), and the MoE load-balancing loss. The backbone's output is caught with a forward hook, and
`logits_to_keep=1` keeps the model's own LM head to a single position.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ModelForwardOutput:
    """What [`forward_hidden_states`] returns.

    Attributes:
        hidden (`torch.Tensor`): Last hidden state of the backbone, `[B, L, H]`, one row per input token (prompt
            learning's virtual tokens removed).
        aux_loss (`torch.Tensor`, *optional*): The MoE load-balancing loss the model's forward computed (unweighted),
            when router logits were requested.
    """

    hidden: torch.Tensor
    aux_loss: torch.Tensor | None = None


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (LoRA layers stay in place), or `model` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (everything before `lm_head`), also through a PEFT wrapper.

    Raises:
        ValueError: If the model exposes no separate backbone.
    """
    model = unwrap_peft(model)
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise ValueError(
            f"{type(model).__name__} exposes no backbone separate from its LM head (`base_model`), which the chunked "
            "distillation loss needs. Use an `AutoModelForCausalLM` model."
        )
    return body


@functools.cache
def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its first weight's device, or, for a model dispatched by a `device_map` with
    offloaded (meta) weights, the execution device of its accelerate hook."""
    hook = getattr(model, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def _accepts_logits_to_keep(model_class: type) -> bool:
    parameters = inspect.signature(model_class.forward).parameters
    return "logits_to_keep" in parameters


def is_prompt_learning(model: nn.Module) -> bool:
    """Whether `model` is a PEFT model with a prompt-learning adapter (prompt/prefix/P-tuning)."""
    active = getattr(model, "active_peft_config", None)
    return bool(getattr(active, "is_prompt_learning", False))


def forward_hidden_states(
    model: nn.Module, inputs: dict[str, Any], output_router_logits: bool | None = None
) -> ModelForwardOutput:
    """Run `model(**inputs)` and return the backbone's last hidden state (and the MoE aux loss).

    Inputs are moved to the model's device, so a teacher can live on another device than the batch. Prompt learning's
    virtual tokens are cut off the front, so row `i` of the result is the state after input token `i`.

    Args:
        model (`nn.Module`): A causal LM, a vision-language model with a text head, or a PEFT model wrapping one.
        inputs (`dict[str, Any]`): Model inputs without labels (`input_ids`, `attention_mask`, `pixel_values`, ...).
        output_router_logits (`bool`, *optional*): Passed on to MoE models (router logits -> `aux_loss`).

    Returns:
        [`ModelForwardOutput`]
    """
    device = input_device(model)
    kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    kwargs["use_cache"] = False
    if _accepts_logits_to_keep(type(unwrap_peft(model))):
        kwargs["logits_to_keep"] = 1
    if output_router_logits is not None:
        kwargs["output_router_logits"] = output_router_logits

    captured: list[torch.Tensor] = []

    def keep_hidden(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = backbone(model).register_forward_hook(keep_hidden)
    try:
        outputs = model(**kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"Expected the backbone of {type(unwrap_peft(model)).__name__} to run once per forward, it ran "
            f"{len(captured)} times."
        )
    hidden = captured[0]
    reference = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if reference is not None and hidden.shape[1] > reference.shape[1]:
        hidden = hidden[:, -reference.shape[1] :]  # prompt tuning / P-tuning prepend virtual tokens
    return ModelForwardOutput(hidden=hidden, aux_loss=getattr(outputs, "aux_loss", None))

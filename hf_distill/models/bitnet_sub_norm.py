"""Decoder models with BitNet sub-norms: an RMSNorm before `o_proj` and one before `down_proj` in every layer.

BitNet Distillation (arXiv 2510.13998) inserts these "SubLN" norms into the student before ternary training. For a
Llama student the result is exactly transformers' `bitnet` model type; for the other families below it is a new
model type, registered here: `<family>_bitnet_sub_norm` (`Qwen2`, `Qwen3`, `Mistral`), each the family's own model
plus the two norms (`self_attn.attn_sub_norm`, `mlp.ffn_sub_norm`, the names of transformers' `bitnet` model).

This file is self-contained (it imports only torch and transformers): `save_pretrained` copies it next to the
weights and writes an `auto_map`, so `from_pretrained(path, trust_remote_code=True)` loads such a checkpoint
without hf_distill installed; `import hf_distill` registers the types with the Auto classes, so it loads without
`trust_remote_code` too.
"""

from __future__ import annotations

import functools

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SUB_NORMS = (("self_attn", "o_proj", "attn_sub_norm"), ("mlp", "down_proj", "ffn_sub_norm"))
"""(block, projection, norm) names: the norm normalizes the projection's input."""


def _sub_norm_pre_hook(norm: nn.Module, module: nn.Module, args: tuple) -> tuple:
    return (norm(args[0]), *args[1:])


def _hook_projection(block: nn.Module, proj_name: str, norm_name: str) -> None:
    """Make `block.<proj_name>` normalize its input with `block.<norm_name>` (once per projection module)."""
    proj, norm = getattr(block, proj_name), getattr(block, norm_name)
    if getattr(proj, "_hf_distill_sub_norm", None) is not norm:
        proj.register_forward_pre_hook(functools.partial(_sub_norm_pre_hook, norm))
        object.__setattr__(proj, "_hf_distill_sub_norm", norm)  # a plain reference, not a registered submodule


def _ensure_projection_hook(proj_name: str, norm_name: str, block: nn.Module, args: tuple) -> None:
    # A pre-hook of the attention / MLP block: a projection replaced since the insertion (a quantizer swapping
    # linear layers, PEFT wrapping it) gets the sub-norm hook before it runs.
    _hook_projection(block, proj_name, norm_name)


def insert_sub_norms(model: nn.Module, eps: float | None = None) -> list[str]:
    """Insert the sub-norms into every decoder layer of `model` (in place) and return their names.

    A decoder layer is a module with `self_attn.o_proj` and `mlp.down_proj`; each norm is the layer's own RMSNorm
    class (that of `input_layernorm`), of the projection's input width, weight 1, on the projection's device and dtype.

    Args:
        model (`nn.Module`): A Llama-family causal LM.
        eps (`float`, *optional*): Norm epsilon; defaults to `model.config.rms_norm_eps`.

    Returns:
        `list[str]`: Names of the new norm modules (empty when the model has no such layer).

    Raises:
        ValueError: A layer has sub-norms already.
    """
    eps = getattr(getattr(model, "config", None), "rms_norm_eps", 1e-6) if eps is None else eps
    inserted: list[str] = []
    for name, layer in list(model.named_modules()):
        blocks = [getattr(layer, block, None) for block, _, _ in SUB_NORMS]
        if not all(isinstance(getattr(b, proj, None), nn.Linear) for b, (_, proj, _) in zip(blocks, SUB_NORMS)):
            continue
        norm_cls = type(layer.input_layernorm) if hasattr(layer, "input_layernorm") else nn.RMSNorm
        for block, (block_name, proj_name, norm_name) in zip(blocks, SUB_NORMS):
            if hasattr(block, norm_name):
                raise ValueError(f"`{name}.{block_name}` already has a `{norm_name}`: the model has sub-norms.")
            weight = getattr(block, proj_name).weight
            norm = norm_cls(getattr(block, proj_name).in_features, eps=eps)
            setattr(block, norm_name, norm.to(device=weight.device, dtype=weight.dtype))
            _hook_projection(block, proj_name, norm_name)
            block.register_forward_pre_hook(functools.partial(_ensure_projection_hook, proj_name, norm_name))
            inserted.append(f"{name}.{block_name}.{norm_name}")
    return inserted


class Qwen2BitNetSubNormConfig(Qwen2Config):
    """`Qwen2Config` of a Qwen2 model with BitNet sub-norms."""

    model_type = "qwen2_bitnet_sub_norm"


class Qwen2BitNetSubNormForCausalLM(Qwen2ForCausalLM):
    """`Qwen2ForCausalLM` with BitNet sub-norms before `o_proj` and `down_proj`."""

    config_class = Qwen2BitNetSubNormConfig

    def __init__(self, config: Qwen2BitNetSubNormConfig):
        super().__init__(config)
        insert_sub_norms(self)


class Qwen3BitNetSubNormConfig(Qwen3Config):
    """`Qwen3Config` of a Qwen3 model with BitNet sub-norms."""

    model_type = "qwen3_bitnet_sub_norm"


class Qwen3BitNetSubNormForCausalLM(Qwen3ForCausalLM):
    """`Qwen3ForCausalLM` with BitNet sub-norms before `o_proj` and `down_proj`."""

    config_class = Qwen3BitNetSubNormConfig

    def __init__(self, config: Qwen3BitNetSubNormConfig):
        super().__init__(config)
        insert_sub_norms(self)


class MistralBitNetSubNormConfig(MistralConfig):
    """`MistralConfig` of a Mistral model with BitNet sub-norms."""

    model_type = "mistral_bitnet_sub_norm"


class MistralBitNetSubNormForCausalLM(MistralForCausalLM):
    """`MistralForCausalLM` with BitNet sub-norms before `o_proj` and `down_proj`."""

    config_class = MistralBitNetSubNormConfig

    def __init__(self, config: MistralBitNetSubNormConfig):
        super().__init__(config)
        insert_sub_norms(self)


SUB_NORM_MODELS = {
    "qwen2": (Qwen2BitNetSubNormConfig, Qwen2BitNetSubNormForCausalLM),
    "qwen3": (Qwen3BitNetSubNormConfig, Qwen3BitNetSubNormForCausalLM),
    "mistral": (MistralBitNetSubNormConfig, MistralBitNetSubNormForCausalLM),
}
"""Base model type -> (config class, model class) of its sub-norm variant."""

for _config_cls, _model_cls in SUB_NORM_MODELS.values():
    _config_cls.register_for_auto_class()
    _model_cls.register_for_auto_class("AutoModelForCausalLM")


def register() -> None:
    """Register the sub-norm model types with `AutoConfig` and `AutoModelForCausalLM` (idempotent)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for config_cls, model_cls in SUB_NORM_MODELS.values():
        if config_cls.model_type not in CONFIG_MAPPING:
            AutoConfig.register(config_cls.model_type, config_cls)
            AutoModelForCausalLM.register(config_cls, model_cls)

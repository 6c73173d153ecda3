"""Turn a model's linear layers into [`BitLinear`] layers in place, optionally inserting BitNet sub-norms."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from torch import nn

from .bitlinear import BitLinear


def _matches(name: str, patterns: list[str]) -> bool:
    # transformers' `should_convert_module` rule: a pattern matches from the start up to a module boundary (also as
    # a regex), or as a suffix. Same syntax as `BitNetQuantConfig.modules_to_not_convert`.
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in patterns)


@dataclass
class BitNetConversion:
    """What [`convert_to_bitnet`] changed.

    Attributes:
        converted (`list[str]`): Names of the linear layers now [`BitLinear`].
        skipped (`list[str]`): Names of the linear layers kept in full precision.
        sub_norms (`list[str]`): Names of the inserted sub-norm modules (empty without `sub_norm=True`).
        modules_to_not_convert (`list[str]`): The patterns used (the defaults included).
    """

    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    sub_norms: list[str] = field(default_factory=list)
    modules_to_not_convert: list[str] = field(default_factory=list)


def default_modules_to_not_convert(model: nn.Module) -> list[str]:
    """The layers kept in full precision by default: the output head (and any linear tied to the input embeddings).

    Args:
        model (`nn.Module`): A transformers model.

    Returns:
        `list[str]`: Module names, usable as `modules_to_not_convert` patterns.
    """
    keep: list[str] = []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(m.weight) for m in (head, embed) if m is not None and getattr(m, "weight", None) is not None}
    for name, module in model.named_modules():
        if module is head or (isinstance(module, nn.Linear) and id(module.weight) in tied):
            keep.append(name)
    return keep or ["lm_head"]


def bitlinear_layers(model: nn.Module) -> dict[str, BitLinear]:
    """The [`BitLinear`] layers of a model, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}


def _sub_norm_pre_hook(norm: nn.Module, module: nn.Module, args: tuple) -> tuple:
    return (norm(args[0]), *args[1:])


def _hook_projection(parent: nn.Module, proj_name: str, norm_name: str) -> None:
    """Make `parent.<proj_name>` normalize its input with `parent.<norm_name>` (once per projection module)."""
    proj, norm = getattr(parent, proj_name), getattr(parent, norm_name)
    if getattr(proj, "_hf_distill_sub_norm", None) is not norm:
        proj.register_forward_pre_hook(functools.partial(_sub_norm_pre_hook, norm))
        object.__setattr__(proj, "_hf_distill_sub_norm", norm)  # a plain reference, not a registered submodule


def _ensure_projection_hook(proj_name: str, norm_name: str, parent: nn.Module, args: tuple) -> None:
    # A pre-hook of the attention / MLP block: if the projection was replaced since (a quantizer swapping linear
    # layers, PEFT wrapping it), the new module gets the sub-norm hook before it runs.
    _hook_projection(parent, proj_name, norm_name)


def _insert_sub_norms(model: nn.Module) -> list[str]:
    """RMSNorms before `o_proj` and `down_proj` of every decoder layer, named as in transformers' BitNet model."""
    eps = getattr(model.config, "rms_norm_eps", 1e-6)
    inserted: list[str] = []
    for name, module in model.named_modules():
        attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        o_proj, down_proj = getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)
        if not (isinstance(o_proj, nn.Linear) and isinstance(down_proj, nn.Linear)):
            continue
        norm_cls = type(module.input_layernorm) if hasattr(module, "input_layernorm") else None
        for parent, proj, attr in ((attn, o_proj, "attn_sub_norm"), (mlp, down_proj, "ffn_sub_norm")):
            if hasattr(parent, attr):
                raise ValueError(f"`{name}` already has a `{attr}`: the model has sub-norms already.")
            w = proj.weight
            norm = norm_cls(proj.in_features, eps=eps) if norm_cls is not None else nn.RMSNorm(proj.in_features, eps)
            norm.to(device=w.device, dtype=w.dtype)
            setattr(parent, attr, norm)
            proj_name = "o_proj" if parent is attn else "down_proj"
            _hook_projection(parent, proj_name, attr)
            parent.register_forward_pre_hook(functools.partial(_ensure_projection_hook, proj_name, attr))
            inserted.append(f"{name}.{'self_attn' if parent is attn else 'mlp'}.{attr}")
    if not inserted:
        raise ValueError(
            "sub_norm=True needs decoder layers with `self_attn.o_proj` and `mlp.down_proj` (Llama-family models: "
            f"Llama, Mistral, Qwen2/3, ...); `{type(model).__name__}` has none. Use sub_norm=False."
        )
    return inserted


def convert_to_bitnet(
    model: nn.Module,
    modules_to_not_convert: list[str] | None = None,
    sub_norm: bool = False,
    activation_bits: int = 8,
) -> BitNetConversion:
    """Replace the `nn.Linear` layers of `model` by [`BitLinear`] in place.

    Call it before the optimizer is built: the converted layers share the original parameters, but sub-norms add
    new ones. [`BitNetCallback`] does it at the right moment inside a `Trainer`.

    The model's config gets a transformers `BitNetQuantConfig` (`autobitlinear`, `online`), so `save_pretrained`
    writes a QAT checkpoint that stock `from_pretrained` reloads with ternary layers.

    Args:
        model (`nn.Module`): A transformers model (full precision; not already quantized).
        modules_to_not_convert (`list[str]`, *optional*): Names or patterns of linear layers to keep in full precision
            (transformers' syntax: a module-boundary prefix, a regex, or a suffix). Defaults to the output head.
            Embeddings and norms are never converted (they are not `nn.Linear`). A list given here replaces the
            default, as in transformers: include `"lm_head"` to keep the head.
        sub_norm (`bool`, *optional*, defaults to `False`): Insert an RMSNorm before `o_proj` and `down_proj` of each
            decoder layer (the SubLN of BitNet Distillation, arXiv 2510.13998), named `self_attn.attn_sub_norm` and
            `mlp.ffn_sub_norm` as in transformers' `bitnet` model. Llama-family models only.
        activation_bits (`int`, *optional*, defaults to `8`): Width of the activation integers.

    Returns:
        [`BitNetConversion`]

    Raises:
        ValueError: The model has no linear layer left to convert, or is already quantized or converted.
    """
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise ValueError(
            "The model is already quantized (loaded with a quantization_config). Convert a full-precision model."
        )
    if bitlinear_layers(model):
        raise ValueError("The model already has BitLinear layers: it was converted before.")
    patterns = list(
        default_modules_to_not_convert(model) if modules_to_not_convert is None else modules_to_not_convert
    )
    result = BitNetConversion(modules_to_not_convert=patterns)
    targets = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            (result.skipped if _matches(name, patterns) else targets).append(name)
    if not targets:
        kinds = sorted({type(m).__name__ for m in model.modules() if m.__class__.__name__ in ("Conv1D", "Linear")})
        raise ValueError(
            f"No linear layer of `{type(model).__name__}` can be converted to BitLinear: found "
            f"{len(result.skipped)} nn.Linear layers, all matched by modules_to_not_convert={patterns}"
            + (f"; other layer types: {kinds}" if kinds else "")
            + ". BitNet converts torch.nn.Linear only (GPT-2's Conv1D is not): check the patterns or the model."
        )
    for name in targets:
        model.set_submodule(name, BitLinear.from_linear(model.get_submodule(name), activation_bits))
    result.converted = targets
    if sub_norm:  # after the swap: the hooks go on the BitLinear layers
        result.sub_norms = _insert_sub_norms(model)
    config = getattr(model, "config", None)
    if config is not None:
        from transformers import BitNetQuantConfig

        config.quantization_config = BitNetQuantConfig(
            linear_class="autobitlinear", quantization_mode="online", modules_to_not_convert=patterns
        )
        config.bitnet_sub_norm = bool(sub_norm)
    return result


def set_bitnet_lambda(model: nn.Module, weight_lambda: float, activation_lambda: float | None = None) -> int:
    """Set the warm-up factors of every [`BitLinear`] of `model`.

    Args:
        model (`nn.Module`): A converted model (possibly wrapped by DDP/PEFT: submodules are searched).
        weight_lambda (`float`): Lambda for the weights, in `[0, 1]`.
        activation_lambda (`float`, *optional*): Lambda for the activations; defaults to `weight_lambda`.

    Returns:
        `int`: How many layers were set.
    """
    activation_lambda = weight_lambda if activation_lambda is None else activation_lambda
    for value in (weight_lambda, activation_lambda):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"A BitNet lambda must lie in [0, 1], got {value}.")
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    for layer in layers:
        layer.weight_lambda = float(weight_lambda)
        layer.activation_lambda = float(activation_lambda)
    return len(layers)

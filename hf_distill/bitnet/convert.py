"""Turn a model's linear layers into [`BitLinear`] layers in place, optionally inserting BitNet sub-norms."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .bitlinear import BitLinear


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


SUB_NORM_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
"""Model types `sub_norm=True` supports: Llama becomes transformers' `bitnet` type, the others hf_distill's own."""


LLAMA_LIKE_MODEL_TYPES = ("llama", "mistral", "bitnet")
"""Model types whose layout transformers' `bitnet` type can hold (with sub-norms)."""


def bitnet_incompatibilities(model: nn.Module) -> list[str]:
    """Why a Llama-like student cannot be transformers' `bitnet` model type (empty when it can)."""
    config = model.config
    reasons: list[str] = []
    if config.model_type not in LLAMA_LIKE_MODEL_TYPES:
        reasons.append(f"model_type {config.model_type!r} is not Llama's (supported: {LLAMA_LIKE_MODEL_TYPES})")
    if getattr(config, "mlp_bias", False):
        reasons.append("its MLP has biases (mlp_bias=True)")
    names = dict(model.named_modules())
    attn = next((m for n, m in names.items() if n.endswith(".self_attn")), None)
    if attn is not None:
        biases = {p: getattr(getattr(attn, p, None), "bias", None) is not None for p in ("q_proj", "o_proj")}
        if biases["q_proj"] != biases["o_proj"]:
            reasons.append("q/k/v have biases but o_proj has none (Qwen2-style attention)")
        extra = [p for p in ("q_norm", "k_norm") if hasattr(attn, p)]
        if extra:
            reasons.append(f"its attention has {'/'.join(extra)} (Qwen3-style)")
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        reasons.append(f"head_dim * num_attention_heads = {head_dim} * {heads} != hidden_size {hidden}")
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        reasons.append(f"it uses sliding-window attention (sliding_window={config.sliding_window})")
    return reasons


def has_sub_norms(model: nn.Module) -> bool:
    """Whether `model` has BitNet sub-norms (`attn_sub_norm` / `ffn_sub_norm` modules)."""
    return any(name.endswith(("attn_sub_norm", "ffn_sub_norm")) for name, _ in model.named_modules())


def _add_sub_norms(model: nn.Module) -> list[str]:
    """Insert the sub-norms and give the model the type that saves and reloads them (see `hf_distill.models`)."""
    from ..models.bitnet_sub_norm import SUB_NORM_MODELS, insert_sub_norms

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUB_NORM_FAMILIES:
        raise ValueError(
            f"sub_norm=True supports the model types {SUB_NORM_FAMILIES}; `{type(model).__name__}` is "
            f"{model_type!r}. Use sub_norm=False."
        )
    if model_type == "llama":
        from transformers import BitNetConfig

        reasons = bitnet_incompatibilities(model)
        if reasons:
            raise ValueError(
                "A Llama student with sub-norms becomes transformers' `bitnet` model type, but this one cannot: "
                f"{'; '.join(reasons)}. Use sub_norm=False."
            )
    inserted = insert_sub_norms(model)
    # The same weights and modules, saved under a type that has the sub-norms: stock transformers' `bitnet` for Llama
    # (Llama + these two norms), or hf_distill's registered `<family>_bitnet_sub_norm` (a subclass of the family's
    # config and model that only adds the norms). Only the classes change, no state.
    if model_type == "llama":
        config.__class__ = BitNetConfig
        config.architectures = ["BitNetForCausalLM"]
    else:
        config_cls, model_cls = SUB_NORM_MODELS[model_type]
        config.__class__ = config_cls
        model.__class__ = model_cls
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
            `mlp.ffn_sub_norm` as in transformers' `bitnet` model. Model types in `SUB_NORM_FAMILIES`: a Llama
            student's config becomes transformers' `BitNetConfig` (Llama + sub-norms is exactly that model), a
            Qwen2/Qwen3/Mistral student becomes hf_distill's registered `<family>_bitnet_sub_norm` type, so that
            `save_pretrained` writes a checkpoint that reloads with its sub-norms. A model that has sub-norms already
            (a `bitnet` model, or a reloaded student) keeps them.
        activation_bits (`int`, *optional*, defaults to `8`): Width of the activation integers.

    Returns:
        [`BitNetConversion`]

    Raises:
        ValueError: The model has no linear layer left to convert, or is already quantized or converted.
    """
    from transformers.quantizers.quantizers_utils import should_convert_module

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
            # transformers' own matching rule, so that a reload with these patterns converts the same layers
            (targets if should_convert_module(name, patterns) else result.skipped).append(name)
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
    if sub_norm and not has_sub_norms(model):  # after the swap: the hooks go on the BitLinear layers
        result.sub_norms = _add_sub_norms(model)
    config = getattr(model, "config", None)
    if config is not None:
        from transformers import BitNetQuantConfig

        config.quantization_config = BitNetQuantConfig(
            linear_class="autobitlinear", quantization_mode="online", modules_to_not_convert=patterns
        )
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

"""Load a BitNet QAT checkpoint (latent weights) back into a model with [`BitLinear`] layers."""

from __future__ import annotations

import os

from torch import nn

from .convert import convert_to_bitnet, set_bitnet_lambda


def load_bitnet_student(path: str | os.PathLike, dtype=None, **kwargs) -> nn.Module:
    """Load a checkpoint written by a BitNet training run (or by `hf-distill export --format qat`).

    The checkpoint holds the latent full-precision weights and a transformers `BitNetQuantConfig` in `autobitlinear`
    / `online` mode. Stock `from_pretrained` also loads it (with transformers' `AutoBitLinear`); this function gives
    hf_distill's [`BitLinear`] layers instead, at lambda 1, with the same layers kept in full precision (a student
    with sub-norms is saved as transformers' `bitnet` type or a type hf_distill registers, which has them), ready
    for more training or for the packed and GGUF exports.

    Args:
        path (`str` or `os.PathLike`): A local checkpoint folder (or a Hub id).
        dtype (`torch.dtype`, *optional*): Dtype to load in; defaults to the checkpoint's.
        **kwargs: Passed to `AutoConfig.from_pretrained` and `AutoModelForCausalLM.from_pretrained`.

    Returns:
        `nn.Module`: The model, with its config's `quantization_config` set as in the checkpoint.

    Raises:
        ValueError: The checkpoint is not a BitNet QAT checkpoint (no `quantization_config` with `quant_method:
            bitnet` in `autobitlinear`/`online` mode).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, **kwargs)
    quant = getattr(config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
    if not isinstance(quant, dict) or str(quant.get("quant_method", "")).lower() != "bitnet":
        raise ValueError(
            f"{path} is not a BitNet checkpoint: its config has no quantization_config with quant_method 'bitnet'. "
            "Train with BitNetCallback (or convert_to_bitnet) and save, or pass the full-precision model to "
            "convert_to_bitnet yourself."
        )
    if quant.get("linear_class") != "autobitlinear" or quant.get("quantization_mode") != "online":
        raise ValueError(
            f"{path} holds packed BitNet weights (linear_class={quant.get('linear_class')!r}, "
            f"quantization_mode={quant.get('quantization_mode')!r}), not latent QAT weights; load it with "
            "transformers' AutoModelForCausalLM.from_pretrained for inference."
        )
    del config.quantization_config
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **kwargs)
    convert_to_bitnet(model, quant.get("modules_to_not_convert"))  # sub-norms, if any, are part of the model type
    set_bitnet_lambda(model, 1.0)
    return model

"""Export (a): a BitNet QAT checkpoint (latent weights) that stock transformers loads and keeps training."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..bitnet import bitlinear_layers
from ._common import (
    ExportReport,
    atomic_output_dir,
    check_output_dir,
    dtype_name,
    export_config,
    export_tensors,
    file_sizes,
    modules_to_not_convert,
    resolve_student,
    save_extras,
    save_safetensors,
)

__all__ = ["export_qat"]


def export_qat(
    model_or_path: nn.Module | str | os.PathLike,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> ExportReport:
    """Write a BitNet student as a quantization-aware-training checkpoint for stock transformers.

    The checkpoint holds the latent full-precision weights (in the model's dtype) and a `BitNetQuantConfig` with
    `linear_class="autobitlinear"`, `quantization_mode="online"`: stock `AutoModelForCausalLM.from_pretrained` loads
    it with transformers' `AutoBitLinear` layers, which quantize the weights on the fly exactly as hf_distill's
    `BitLinear` at lambda 1 (same logits to float rounding), and can be trained further. `modules_to_not_convert`
    lists the exact names of the linear layers kept in full precision (the output head among them).

    A student converted with `sub_norm=True` is written as transformers' `bitnet` model type (Llama with an RMSNorm
    before `o_proj` and `down_proj`; same weight names), the only stock model that runs those norms. Students with
    sub-norms that are not Llama-like (MLP biases, Qwen2 q/k/v biases, Qwen3 q/k norms, `head_dim * heads !=
    hidden_size`, sliding windows) are refused.

    Args:
        model_or_path (`nn.Module`, `str` or `os.PathLike`): A model with `BitLinear` layers (from
            `convert_to_bitnet` or `BitNetCallback`), or the folder of a QAT checkpoint.
        output_dir (`str` or `os.PathLike`): Folder to write. Written to a temporary sibling first and renamed at the
            end, so a failure leaves nothing behind.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): Saved into `output_dir` as well.
        overwrite (`bool`, *optional*, defaults to `False`): Replace an existing non-empty `output_dir`.

    Returns:
        [`ExportReport`]: Files and sizes written.

    Raises:
        ValueError: The model has no `BitLinear` layer, the path is not a BitNet QAT checkpoint, the student has
            sub-norms but is not Llama-like, or `output_dir` is not empty and `overwrite` is `False`.
    """
    from transformers import BitNetQuantConfig

    check_output_dir(output_dir, overwrite, model_or_path)
    model, source = resolve_student(model_or_path)
    layers = bitlinear_layers(model)
    dtype = next(iter(layers.values())).weight.dtype
    report = ExportReport(format="qat", output=os.path.abspath(os.fspath(output_dir)), model_type="", dtype="")
    report.dtype = dtype_name(dtype)
    report.modules_to_not_convert = modules_to_not_convert(model)
    quantization_config = BitNetQuantConfig(
        linear_class="autobitlinear",
        quantization_mode="online",
        modules_to_not_convert=report.modules_to_not_convert,
    )
    config = export_config(model, dtype, quantization_config, report)
    tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in export_tensors(model).items()}
    report.ternary_layers = len(layers)
    report.ternary_weights = sum(layer.weight.numel() for layer in layers.values())
    report.linear_bytes = sum(layer.weight.numel() * torch.finfo(dtype).bits // 8 for layer in layers.values())
    with atomic_output_dir(output_dir, overwrite=overwrite, source=source) as tmp:
        save_safetensors(tensors, tmp)
        save_extras(model, config, tmp, tokenizer)
        report.files = file_sizes(tmp)
    return report

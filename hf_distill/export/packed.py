"""Export (b): packed 1.58-bit safetensors (2-bit ternary codes, four per byte) for stock transformers inference."""

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
    parse_dtype,
    resolve_student,
    save_extras,
    save_safetensors,
)

__all__ = ["LINEAR_CLASSES", "export_packed"]

LINEAR_CLASSES = ("bitlinear", "autobitlinear")
"""transformers classes that load packed BitNet weights (`BitNetQuantConfig.linear_class`)."""


def export_packed(
    model_or_path: nn.Module | str | os.PathLike,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    linear_class: str = "bitlinear",
    dtype: torch.dtype | str = torch.bfloat16,
    overwrite: bool = False,
) -> ExportReport:
    """Write a BitNet student as packed 1.58-bit safetensors that stock `from_pretrained` loads for inference.

    Every `BitLinear` layer is stored at lambda 1 as its ternary codes, packed four per byte in transformers' layout
    (a `uint8` tensor `[out_features / 4, in_features]` whose row `r` holds the rows `r, r + R, r + 2R, r + 3R` with
    `R = out_features / 4`, in bits 0-1, 2-3, 4-5, 6-7, each code stored plus one), and one scale `weight_scale` of
    shape `[1]`. The config gets `quant_method: bitnet`, `quantization_mode: offline`, the chosen `linear_class` and
    the exact names of the linear layers kept in full precision (the output head among them). Every other tensor
    (embeddings, norms, the head, biases) is written in `dtype`, which transformers' BitNet loader requires.

    The scale convention depends on the class that loads it:

    - `"bitlinear"` (transformers' `BitLinear`, the default; what `microsoft/bitnet-b1.58-2B-4T` uses): it multiplies
      the `int8` activations by the unpacked codes and divides by `input_scale * weight_scale`, so
      `weight_scale = 1 / alpha`;
    - `"autobitlinear"` (transformers' `AutoBitLinear`, offline): it multiplies the fake-quantized activations by the
      codes, adds the bias, and multiplies everything by `weight_scale = alpha`; the bias is therefore stored as
      `bias / alpha`.

    Here `alpha = max(mean|W|, 1e-5)` is the absmean scale of the latent weight `W` (`codes * alpha = Q(W)`).

    A student with sub-norms is written as transformers' `bitnet` model type, as in [`export_qat`].

    Args:
        model_or_path (`nn.Module`, `str` or `os.PathLike`): A model with `BitLinear` layers, or the folder of a QAT
            checkpoint.
        output_dir (`str` or `os.PathLike`): Folder to write (through a temporary sibling renamed at the end).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): Saved into `output_dir` as well.
        linear_class (`str`, *optional*, defaults to `"bitlinear"`): `"bitlinear"` or `"autobitlinear"`.
        dtype (`torch.dtype` or `str`, *optional*, defaults to `torch.bfloat16`): Dtype of the scales and of every
            tensor that is not ternary; also the dtype transformers computes in.
        overwrite (`bool`, *optional*, defaults to `False`): Replace an existing non-empty `output_dir`.

    Returns:
        [`ExportReport`]: Files and sizes written; `bits_per_weight` is the size of the packed layers (codes and
        scales) per weight, 2 plus the scale (`2 + 8 * 2 / (in * out)` in bfloat16).

    Raises:
        ValueError: Bad input as in [`export_qat`], an unknown `linear_class` or `dtype`, or a ternary layer whose
            `out_features` is not a multiple of 4 (transformers' packed layers cannot hold it; keep that layer in
            full precision with `convert_to_bitnet(modules_to_not_convert=[...])` and retrain, or use the QAT
            export).
    """
    from transformers import BitNetQuantConfig
    from transformers.integrations.bitnet import VALUES_PER_ITEM, pack_weights

    if linear_class not in LINEAR_CLASSES:
        raise ValueError(f"linear_class must be one of {LINEAR_CLASSES}, got {linear_class!r}.")
    dtype = parse_dtype(dtype)
    check_output_dir(output_dir, overwrite, model_or_path)
    model, source = resolve_student(model_or_path)
    layers = bitlinear_layers(model)
    unaligned = [f"{name} (out_features={m.out_features})" for name, m in layers.items() if m.out_features % 4]
    if unaligned:
        raise ValueError(
            f"Packed BitNet weights hold {VALUES_PER_ITEM} rows per byte: out_features must be a multiple of "
            f"{VALUES_PER_ITEM}, which these ternary layers are not: {', '.join(unaligned)}. Keep them in full "
            "precision (convert_to_bitnet(modules_to_not_convert=[..., 'lm_head'])) or use the QAT export."
        )
    report = ExportReport(
        format="packed",
        output=os.path.abspath(os.fspath(output_dir)),
        model_type="",
        dtype=dtype_name(dtype),
        linear_class=linear_class,
    )
    report.modules_to_not_convert = modules_to_not_convert(model)
    quantization_config = BitNetQuantConfig(
        linear_class=linear_class,
        quantization_mode="offline",
        modules_to_not_convert=report.modules_to_not_convert,
    )
    config = export_config(model, dtype, quantization_config, report)

    tensors: dict[str, torch.Tensor] = {}
    packed_layers = {f"{name}.{param}": name for name in layers for param in ("weight", "bias")}
    for key, tensor in export_tensors(model).items():
        name = packed_layers.get(key)
        if name is None:
            tensors[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            continue
        if key.endswith(".bias"):
            continue  # written with its weight
        layer = layers[name]
        codes, alpha = layer.ternary_weight()
        alpha = alpha.reshape(1)
        scale = (alpha if linear_class == "autobitlinear" else 1.0 / alpha).to(dtype)
        tensors[key] = pack_weights(codes.to(torch.int8).cpu().clone())
        tensors[f"{name}.weight_scale"] = scale
        if layer.bias is not None:
            bias = layer.bias.detach().float()
            if linear_class == "autobitlinear":  # AutoBitLinear scales `x @ codes.T + bias` as a whole
                bias = bias / scale.float()
            tensors[f"{name}.bias"] = bias.to(dtype)
        report.ternary_layers += 1
        report.ternary_weights += layer.weight.numel()
        report.linear_bytes += tensors[key].numel() + scale.numel() * scale.element_size()
    with atomic_output_dir(output_dir, overwrite=overwrite, source=source) as tmp:
        save_safetensors(tensors, tmp)
        save_extras(model, config, tmp, tokenizer)
        report.files = file_sizes(tmp)
    return report

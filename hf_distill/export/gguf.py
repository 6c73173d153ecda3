"""Export a BitNet student (ternary [`BitLinear`] layers) to a GGUF file that llama.cpp runs with its TQ types.

Two llama.cpp architectures fit the Llama-family students of `convert_to_bitnet`:

- `llama`: students without sub-norms. As in `convert_hf_to_gguf.py` (`LlamaModel.permute`), the rows of `q_proj` and
  `k_proj` are permuted per head, because llama.cpp's `llama` rotary embedding pairs adjacent dimensions where
  transformers pairs dimension `i` with `i + head_dim / 2`.
- `bitnet`: students with sub-norms (`attn_sub_norm`, `ffn_sub_norm`). Its rotary embedding is the NeoX one, the same
  as transformers', so nothing is permuted; it has no `output` tensor (the head is the token embedding), so the
  student needs tied embeddings.

The ternary weights `codes * alpha` of each [`BitLinear`] are stored as `TQ2_0` (2.06 bits per weight) or `TQ1_0`
(1.69 bits per weight): both keep the ternary codes exactly and `alpha` as one fp16 scale per block of 256, so the
stored weight is the trained one up to the fp16 rounding of `alpha`. Their rows (`in_features`) must be multiples of
256; other ternary weights fall back to F16. Norms are F32, embeddings and a full-precision head F16.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

try:
    import gguf
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "The GGUF export needs the `gguf` package: pip install 'hf-distill[export]' (or pip install gguf)."
    ) from exc

from ..bitnet.bitlinear import BitLinear
from .gguf_vocab import build_gguf_vocab, write_gguf_vocab

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "bitnet", "mistral_bitnet_sub_norm")
"""Config `model_type`s of the students the GGUF export handles (Llama-family, no biases, SiLU gated MLP): a Llama
student with sub-norms has transformers' `bitnet` type (Llama + sub-norms), a Mistral one hf_distill's
`mistral_bitnet_sub_norm`."""

TERNARY_TYPES = ("TQ2_0", "TQ1_0", "F16")
_BLOCK = 256  # QK_K: the TQ block size along a row

# HF module path (under `model.`) -> gguf tensor; `{bid}` is the layer index.
_LAYER_TENSORS = {
    "input_layernorm": gguf.MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj": gguf.MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": gguf.MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": gguf.MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": gguf.MODEL_TENSOR.ATTN_OUT,
    "self_attn.attn_sub_norm": gguf.MODEL_TENSOR.ATTN_SUB_NORM,
    "post_attention_layernorm": gguf.MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj": gguf.MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": gguf.MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": gguf.MODEL_TENSOR.FFN_DOWN,
    "mlp.ffn_sub_norm": gguf.MODEL_TENSOR.FFN_SUB_NORM,
}
_GLOBAL_TENSORS = {
    "model.embed_tokens": gguf.MODEL_TENSOR.TOKEN_EMBD,
    "model.norm": gguf.MODEL_TENSOR.OUTPUT_NORM,
    "lm_head": gguf.MODEL_TENSOR.OUTPUT,
}


@dataclass
class GGUFExportReport:
    """What [`export_gguf`] wrote.

    Attributes:
        path (`str`): The GGUF file.
        arch (`str`): llama.cpp architecture (`"llama"` or `"bitnet"`).
        ternary_type (`str`): `"TQ2_0"` or `"TQ1_0"`.
        tensor_types (`dict[str, int]`): Number of tensors per GGML type (`{"TQ2_0": 14, "F32": 9, ...}`).
        file_size (`int`): Size of the file in bytes.
        bits_per_ternary_weight (`float`): Stored bits per weight over all ternary layers (F16 fallbacks included).
        ternary_weights (`int`): Number of weights of the ternary layers.
        fallback_tensors (`list[str]`): Ternary tensors stored as F16 because their rows are not a multiple of 256.
    """

    path: str
    arch: str
    ternary_type: str
    tensor_types: dict[str, int] = field(default_factory=dict)
    file_size: int = 0
    bits_per_ternary_weight: float = 0.0
    ternary_weights: int = 0
    fallback_tensors: list[str] = field(default_factory=list)


def _unsupported(model: nn.Module, reason: str) -> ValueError:
    return ValueError(
        f"Cannot export `{type(model).__name__}` to GGUF: {reason}. Supported: Llama-family students "
        f"(config model_type in {list(SUPPORTED_MODEL_TYPES)}, no attention/MLP biases, SiLU gated MLP, default or "
        "linear RoPE) converted with convert_to_bitnet; llama.cpp arch 'llama' without sub-norms, 'bitnet' with "
        "sub-norms (and tied embeddings)."
    )


def _rope(config: Any, model: nn.Module) -> tuple[float, float | None]:
    """RoPE base and linear scaling factor (None: no scaling) of a transformers config."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "full_attention" in params:
        params = params["full_attention"]
    params = dict(params) if isinstance(params, dict) else {}
    legacy = getattr(config, "rope_scaling", None)
    if not params and isinstance(legacy, dict):
        params = dict(legacy)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear" and params.get("factor") is not None:
        return float(theta), float(params["factor"])
    raise _unsupported(model, f"RoPE type {rope_type!r} is not handled by this export (default and linear are)")


def _check_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(model, f"model_type {model_type!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise _unsupported(model, f"{flag}=True (llama.cpp's ternary archs have no biases here)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise _unsupported(model, f"hidden_act={config.hidden_act!r}")
    window = getattr(config, "sliding_window", None)
    if window is not None and window < getattr(config, "max_position_embeddings", 0):
        raise _unsupported(model, f"sliding-window attention (sliding_window={window})")
    return config


def _tensor_name(arch: gguf.MODEL_ARCH, param: str) -> tuple[gguf.MODEL_TENSOR, str] | None:
    """The gguf tensor of an HF parameter name (`model.layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight`)."""
    module, _, suffix = param.rpartition(".")
    if module in _GLOBAL_TENSORS:
        kind, bid = _GLOBAL_TENSORS[module], None
    else:
        parts = module.split(".", 3)
        if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            return None
        kind, bid = _LAYER_TENSORS.get(parts[3]), int(parts[2])
        if kind is None:
            return None
    if kind not in gguf.MODEL_TENSORS[arch]:
        return None
    return kind, gguf.TENSOR_NAMES[kind].format(bid=bid) + "." + suffix


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """`LlamaModel.permute` of `convert_hf_to_gguf.py`: rotate-half row order -> interleaved pairs, per head."""
    rows = weights.shape[0]
    return weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _is_tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return head is None or (embed is not None and head.weight is embed.weight)


def _load(model_or_path: nn.Module | str | os.PathLike, tokenizer: Any) -> tuple[nn.Module, Any]:
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
        source = getattr(getattr(model, "config", None), "_name_or_path", None)
    else:
        from ..bitnet.load import load_bitnet_student

        source = os.fspath(model_or_path)
        model = load_bitnet_student(source)
    if tokenizer is None:
        if source and os.path.isdir(source):
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"No tokenizer could be loaded from {source}: pass tokenizer=...") from exc
        else:
            raise ValueError("The GGUF file needs the tokenizer: pass tokenizer=... (the student's tokenizer).")
    return model, tokenizer


def export_gguf(
    model_or_path: nn.Module | str | os.PathLike,
    output_path: str | os.PathLike,
    tokenizer: Any = None,
    ternary_type: str = "TQ2_0",
    arch: str | None = None,
    overwrite: bool = False,
) -> GGUFExportReport:
    """Write a BitNet student as a GGUF file for llama.cpp, with its ternary layers in a TQ type.

    Args:
        model_or_path (`nn.Module`, `str` or `os.PathLike`): A model converted with [`convert_to_bitnet`] (it has
            [`BitLinear`] layers; their lambdas do not matter: the fully quantized weights are exported), or the
            folder of a BitNet QAT checkpoint (loaded with [`load_bitnet_student`]).
        output_path (`str` or `os.PathLike`): The `.gguf` file to write.
        tokenizer (`PreTrainedTokenizerFast`, *optional*): The student's tokenizer; defaults to the one saved with the
            checkpoint. Byte-level BPE tokenizers (GPT-2, Llama-3 and Qwen2 style) are supported.
        ternary_type (`str`, *optional*, defaults to `"TQ2_0"`): `"TQ2_0"` (2.06 bits per weight, the faster one),
            `"TQ1_0"` (1.69 bits per weight), or `"F16"` (the same ternary values unpacked, 16 bits: a baseline, or
            for a llama.cpp build without the TQ types).
        arch (`str`, *optional*): llama.cpp architecture, `"llama"` or `"bitnet"`; defaults to `"bitnet"` when the
            student has sub-norms and `"llama"` otherwise (these are also the only valid choices).
        overwrite (`bool`, *optional*, defaults to `False`): Replace an existing file.

    Returns:
        [`GGUFExportReport`]

    Raises:
        ValueError: The model has no [`BitLinear`] layer, its architecture or tokenizer cannot be expressed in GGUF
            for llama.cpp, or an argument is invalid. Nothing is written then.
        FileExistsError: `output_path` exists and `overwrite` is False.
    """
    if ternary_type not in TERNARY_TYPES:
        raise ValueError(f"ternary_type must be one of {list(TERNARY_TYPES)}, got {ternary_type!r}.")
    output_path = os.fspath(output_path)
    if os.path.exists(output_path) and not overwrite:
        raise FileExistsError(f"{output_path} exists: pass overwrite=True to replace it.")
    model, tokenizer = _load(model_or_path, tokenizer)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}
    if not layers:
        raise ValueError(
            f"`{type(model).__name__}` has no BitLinear layer: the GGUF export writes BitNet students. Convert the "
            "model with convert_to_bitnet (and train it) first, or load a BitNet QAT checkpoint."
        )
    config = _check_config(model)
    params = dict(model.named_parameters())
    has_sub_norms = any("_sub_norm." in name for name in params)
    tied = _is_tied(model)
    if arch is None:
        arch = "bitnet" if has_sub_norms else "llama"
    if arch not in ("llama", "bitnet"):
        raise ValueError(f"arch must be 'llama' or 'bitnet' (or None to choose), got {arch!r}.")
    if arch == "llama" and has_sub_norms:
        raise ValueError(
            "The student has sub-norms (attn_sub_norm / ffn_sub_norm), which llama.cpp's 'llama' arch does not "
            "have: use arch='bitnet'."
        )
    n_embd, n_head = config.hidden_size, config.num_attention_heads
    n_head_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or n_embd // n_head
    if arch == "bitnet":
        if not has_sub_norms:
            raise ValueError(
                "llama.cpp's 'bitnet' arch needs sub-norms before o_proj and down_proj: convert with "
                "convert_to_bitnet(..., sub_norm=True), or export with arch='llama'."
            )
        if not tied:
            raise ValueError(
                "llama.cpp's 'bitnet' arch has no output tensor (it uses the token embedding as the head), but this "
                "student has an untied lm_head: train it with tie_word_embeddings=True to export it as 'bitnet' "
                "(llama.cpp has no arch for sub-norms with an untied head)."
            )
        if head_dim * n_head != n_embd:
            raise ValueError(
                f"llama.cpp's 'bitnet' arch needs head_dim * num_attention_heads == hidden_size, got {head_dim} * "
                f"{n_head} != {n_embd}."
            )
    if isinstance(model.get_output_embeddings(), BitLinear) and tied:
        raise ValueError(
            "The lm_head is a BitLinear tied to the input embeddings: GGUF cannot store one tensor both ternary (as "
            "the head) and full precision (as the embedding). Keep the head in full precision (the default)."
        )
    rope_theta, rope_linear = _rope(config, model)
    gguf_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    qtype = gguf.GGMLQuantizationType[ternary_type]
    block = 1 if ternary_type == "F16" else _BLOCK  # F16 (the unpacked baseline) has no row-size constraint

    # Map and convert every tensor before touching the disk: an unsupported model fails here with nothing written.
    vocab_size = int(model.get_input_embeddings().weight.shape[0])
    vocab = build_gguf_vocab(tokenizer, vocab_size, config)  # an unsupported tokenizer fails before any conversion
    tensors: list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]] = []
    unmapped: list[str] = []
    fallback: list[str] = []
    ternary_bits = ternary_weights = 0
    for pname, param in params.items():
        mapped = _tensor_name(gguf_arch, pname)
        module_name = pname.rpartition(".")[0]
        if mapped is None or pname.endswith(".bias"):
            unmapped.append(pname)
            continue
        kind, gname = mapped
        layer = layers.get(module_name)
        if layer is not None:
            codes, alpha = layer.ternary_weight()
            data = (codes.float() * alpha.float()).cpu().numpy()
        else:
            data = param.detach().float().cpu().numpy()
        if arch == "llama" and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            data = _permute(data, n_head if kind == gguf.MODEL_TENSOR.ATTN_Q else n_head_kv)
        if layer is not None:
            if ternary_type == "F16":
                stored, dtype = data.astype(np.float16), qtype
            elif data.shape[-1] % block == 0:
                stored, dtype = gguf.quants.quantize(data, qtype), qtype
            else:
                stored, dtype = data.astype(np.float16), gguf.GGMLQuantizationType.F16
                fallback.append(gname)
                logger.warning(
                    "%s (%s): %d input features are not a multiple of %d, stored as F16 instead of %s.",
                    gname, module_name, data.shape[-1], _BLOCK, ternary_type,
                )  # fmt: skip
            ternary_bits += stored.nbytes * 8
            ternary_weights += data.size
        elif data.ndim == 1:
            stored, dtype = data.astype(np.float32), gguf.GGMLQuantizationType.F32
        else:
            stored, dtype = data.astype(np.float16), gguf.GGMLQuantizationType.F16
        tensors.append((gname, stored, dtype))
    if unmapped:
        raise _unsupported(
            model, f"{len(unmapped)} parameters have no llama.cpp '{arch}' tensor (first: {unmapped[:3]})"
        )
    if arch == "llama" and tied and any(n == "output.weight" for n, _, _ in tensors):
        tensors = [t for t in tensors if t[0] != "output.weight"]  # llama.cpp reuses token_embd

    out_dir = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=out_dir, prefix=f".{os.path.basename(output_path)}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_path, arch)
        name = getattr(config, "_name_or_path", "") or type(model).__name__
        writer.add_name(os.path.basename(str(name).rstrip("/")) or type(model).__name__)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(n_embd)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(rope_theta)
        if rope_linear is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope_linear)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        if head_dim * n_head != n_embd:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_vocab_size(vocab_size)
        n_ternary = sum(t[2] == qtype for t in tensors)
        packed = n_ternary and ternary_type != "F16"
        writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{ternary_type}"] if packed else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_gguf_vocab(writer, vocab)
        for gname, stored, dtype in tensors:
            writer.add_tensor(gname, stored, raw_dtype=dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_path, output_path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    report = GGUFExportReport(
        path=output_path,
        arch=arch,
        ternary_type=ternary_type,
        tensor_types=dict(Counter(dtype.name for _, _, dtype in tensors)),
        file_size=os.path.getsize(output_path),
        bits_per_ternary_weight=ternary_bits / ternary_weights if ternary_weights else 0.0,
        ternary_weights=ternary_weights,
        fallback_tensors=fallback,
    )
    logger.info(
        "Wrote %s (arch %s, %s, %.2f bits per ternary weight, %d bytes).",
        output_path, arch, report.tensor_types, report.bits_per_ternary_weight, report.file_size,
    )  # fmt: skip
    return report


__all__ = ["GGUFExportReport", "SUPPORTED_MODEL_TYPES", "TERNARY_TYPES", "export_gguf"]

"""Pieces shared by the BitNet exports: the student to export, the `bitnet` model type, and the atomic writer."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..bitnet import BitLinear, bitlinear_layers, load_bitnet_student

__all__ = [
    "ExportReport",
    "atomic_output_dir",
    "check_output_dir",
    "export_config",
    "export_tensors",
    "modules_to_not_convert",
    "resolve_student",
    "save_extras",
    "save_safetensors",
]

MAX_SHARD_BYTES = 5 * 1024**3
"""Largest safetensors file written (transformers' default shard size)."""


@dataclass
class ExportReport:
    """What an export wrote.

    Attributes:
        format (`str`): `"qat"`, `"packed"` or `"gguf"`.
        output (`str`): The folder (or file) written.
        model_type (`str`): `model_type` of the exported config (`"bitnet"` for a student with sub-norms).
        dtype (`str`): Dtype of the tensors that are not ternary (`"float32"`, `"bfloat16"`, ...).
        files (`dict[str, int]`): Size in bytes of every file written, by name.
        ternary_layers (`int`): Number of linear layers stored as ternary weights (latent weights for `qat`).
        ternary_weights (`int`): Number of weights in those layers.
        linear_bytes (`int`): Bytes those layers take in the weight files (weights and scales, without biases).
        modules_to_not_convert (`list[str]`): Linear layers kept in full precision (written to the config).
        linear_class (`str`, *optional*): transformers class that loads the packed layers.
        notes (`list[str]`): Anything worth telling the user (conversions, warnings).
    """

    format: str
    output: str
    model_type: str
    dtype: str
    files: dict[str, int] = field(default_factory=dict)
    ternary_layers: int = 0
    ternary_weights: int = 0
    linear_bytes: int = 0
    modules_to_not_convert: list[str] = field(default_factory=list)
    linear_class: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Bytes of all the files written."""
        return sum(self.files.values())

    @property
    def weights_bytes(self) -> int:
        """Bytes of the weight files (`*.safetensors`, `*.gguf`)."""
        return sum(size for name, size in self.files.items() if name.endswith((".safetensors", ".gguf")))

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight of the ternary linear layers in the files (about 2 for `packed`, 16 or 32 for `qat`)."""
        return 8.0 * self.linear_bytes / self.ternary_weights if self.ternary_weights else float("nan")

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = [
            f"Exported ({self.format}) to {self.output}",
            f"  model_type={self.model_type}, dtype={self.dtype}"
            + (f", linear_class={self.linear_class}" if self.linear_class else ""),
            f"  ternary linear layers: {self.ternary_layers} ({self.ternary_weights:,} weights), "
            f"{_size(self.linear_bytes)}, {self.bits_per_weight:.3f} bits/weight",
            f"  weight files: {_size(self.weights_bytes)}; all files: {_size(self.total_bytes)} "
            f"({len(self.files)} files)",
            f"  kept in full precision: {', '.join(self.modules_to_not_convert) or 'none'}",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, with the derived sizes."""
        out = dict(self.__dict__)
        out.update(
            total_bytes=self.total_bytes, weights_bytes=self.weights_bytes, bits_per_weight=self.bits_per_weight
        )
        return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def resolve_student(model_or_path: nn.Module | str | os.PathLike) -> tuple[nn.Module, str | None]:
    """The student to export: an in-memory model with [`BitLinear`] layers, or one loaded from a QAT checkpoint.

    Args:
        model_or_path (`nn.Module`, `str` or `os.PathLike`): A converted model, or the folder of a BitNet QAT
            checkpoint (loaded with [`load_bitnet_student`]).

    Returns:
        `tuple[nn.Module, str | None]`: The model and the checkpoint folder (`None` for an in-memory model).

    Raises:
        ValueError: The model has no `BitLinear` layer, or the path is not a BitNet QAT checkpoint.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        if not os.path.isdir(path):
            raise ValueError(f"{path} is not a folder: pass a BitNet QAT checkpoint folder or an in-memory model.")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path} is not a model checkpoint (no config.json).")
        try:
            model = load_bitnet_student(path)
        except OSError as error:
            raise ValueError(f"{path} cannot be loaded as a BitNet checkpoint: {error}") from None
        return model.eval(), path
    if not isinstance(model_or_path, nn.Module):
        raise ValueError(f"Expected a model or a checkpoint path, got {type(model_or_path).__name__}.")
    model = model_or_path
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            "The model was loaded with a transformers quantizer (its layers are transformers' AutoBitLinear or "
            "BitLinear, not hf_distill's): pass the checkpoint folder instead, which is loaded with "
            "load_bitnet_student."
        )
    layers = bitlinear_layers(model)
    if not layers:
        raise ValueError(
            f"`{type(model).__name__}` has no BitLinear layer: it was not trained with BitNet. Convert it with "
            "hf_distill.bitnet.convert_to_bitnet (or train it with BitNetCallback) before exporting."
        )
    if getattr(model, "config", None) is None:
        raise ValueError("The model has no `config`: only transformers models can be exported.")
    partial = sorted({(m.weight_lambda, m.activation_lambda) for m in layers.values()} - {(1.0, 1.0)})
    if partial:
        warnings.warn(
            f"The model's BitLinear lambdas are {partial}, not 1: the warm-up is not finished. The export stores "
            "the fully quantized model (lambda 1), which computes something else than the model in memory.",
            stacklevel=3,
        )
    return model, None


def modules_to_not_convert(model: nn.Module) -> list[str]:
    """Exact names of the `nn.Linear` layers kept in full precision (the output head among them).

    Checked with transformers' own matching rule: loading with this list converts exactly the `BitLinear` layers.
    """
    from transformers.quantizers.quantizers_utils import should_convert_module

    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    kept = sorted(name for name, m in linears.items() if not isinstance(m, BitLinear))
    wrong = [name for name, m in linears.items() if should_convert_module(name, kept) != isinstance(m, BitLinear)]
    if wrong:
        raise ValueError(
            f"modules_to_not_convert={kept} would not reproduce which layers are ternary (first mismatch: {wrong[0]})."
        )
    return kept


def export_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied weights written once (the first name wins, as in `save_pretrained`)."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if any(part.startswith("_hf_distill") for part in name.split(".")):
            continue  # hf_distill's private references (a sub-norm seen from its projection), not weights
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tied and tensor.numel() and key in seen:
            continue
        seen.setdefault(key, name)
        out[name] = tensor.detach()
    return out


def export_config(model: nn.Module, dtype: torch.dtype, quantization_config: Any, report: ExportReport) -> Any:
    """Config to write: a copy of the model's (or its `bitnet` form), with `quantization_config` and `dtype` set."""
    import copy

    config = copy.deepcopy(model.config)  # a student with sub-norms is `bitnet` or a registered type already
    config.quantization_config = quantization_config
    config.dtype = dtype
    report.model_type = config.model_type
    return config


def save_safetensors(tensors: dict[str, torch.Tensor], folder: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write `tensors` as `model.safetensors`, or as shards with `model.safetensors.index.json` when large."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous().cpu()
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, file), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def save_extras(model: nn.Module, config: Any, folder: str, tokenizer: Any = None) -> None:
    """Write the config (with the model's own code and `auto_map` for a type registered by hf_distill), the
    generation config (when the model has one) and the tokenizer."""
    if getattr(model, "_auto_class", None) is not None:  # hf_distill's sub-norm types: trust_remote_code loads them
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, folder, config=config)
    config.save_pretrained(folder)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False, source: Any = None) -> str:
    """The absolute `output_dir`, after checking it can be written (see [`atomic_output_dir`]).

    Raises:
        ValueError: `output_dir` is a file, is `source`, or is a non-empty folder and `overwrite` is `False`.
    """
    source = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    output_dir = os.path.abspath(os.fspath(output_dir))
    if source is not None and os.path.abspath(source) == output_dir:
        raise ValueError(f"output_dir {output_dir} is the checkpoint being exported: write to another folder.")
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise ValueError(f"output_dir {output_dir} exists and is not a folder.")
        if os.listdir(output_dir) and not overwrite:
            raise ValueError(f"output_dir {output_dir} exists and is not empty: pass overwrite=True to replace it.")
    return output_dir


@contextlib.contextmanager
def atomic_output_dir(
    output_dir: str | os.PathLike, overwrite: bool = False, source: str | None = None
) -> Iterator[str]:
    """Yield a temporary sibling folder of `output_dir`, renamed to `output_dir` when the block succeeds.

    A failure inside the block removes the temporary folder and leaves `output_dir` as it was: nothing is ever
    half-written.

    Args:
        output_dir (`str` or `os.PathLike`): The final folder.
        overwrite (`bool`, *optional*, defaults to `False`): Replace an existing non-empty `output_dir`.
        source (`str`, *optional*): The checkpoint exported, which `output_dir` must not be.

    Raises:
        ValueError: `output_dir` is a file, is `source`, or is a non-empty folder and `overwrite` is `False`.
    """
    output_dir = check_output_dir(output_dir, overwrite, source)
    parent, name = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(output_dir):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(output_dir, os.path.join(old, name))
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sizes(folder: str) -> dict[str, int]:
    """Size in bytes of every file under `folder`, by relative path."""
    sizes = {}
    for root, _, files in os.walk(folder):
        for file in files:
            path = os.path.join(root, file)
            sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
    return dict(sorted(sizes.items()))


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"`."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating dtype from a `torch.dtype` or its name (`"bfloat16"`, `"bf16"`, `"float32"`, ...)."""
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    if isinstance(dtype, str):
        name = aliases.get(dtype.lower().removeprefix("torch."), dtype.lower().removeprefix("torch."))
        dtype = getattr(torch, name, None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}.")
    return dtype

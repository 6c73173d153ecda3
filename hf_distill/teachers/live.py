"""A live teacher: a model in this process, frozen, on any device and dtype.

This module loads the teacher (following the student's loading options unless told otherwise), keeps it apart from the
student, finds its tokenizer when it can, and freezes it. Vocabulary checks live in `vocab.py`; the forward that gives
the hidden states in `hf_distill.model_forward`.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel
from transformers.utils import logging

from ..model_forward import backbone, unwrap_peft
from .vocab import CROSS_TOKENIZER_HINT, VocabularyWarning, resolve_distill_vocab_size

__all__ = [
    "CROSS_TOKENIZER_HINT",
    "VocabularyWarning",
    "backbone",
    "check_modalities",
    "freeze",
    "load_teacher",
    "resolve_distill_vocab_size",
    "separate_from_student",
    "student_config",
    "teacher_init_kwargs",
    "try_load_tokenizer",
    "unwrap_peft",
]

logger = logging.get_logger(__name__)

INHERITED_INIT_KWARGS = ("dtype", "attn_implementation", "revision", "trust_remote_code")
"""`from_pretrained` options a teacher given by name/path takes from the student unless `teacher_model_init_kwargs`
sets them."""


def _resolve_dtype(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    dtype = kwargs.get("dtype", kwargs.pop("torch_dtype", None))
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(
                f"Unsupported teacher dtype {dtype!r} in `teacher_model_init_kwargs`. Use 'bfloat16', 'float16', "
                "'float32' or 'auto'."
            )
        dtype = getattr(torch, dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    return kwargs


def teacher_init_kwargs(student: Any, args: Any) -> dict[str, Any]:
    """`from_pretrained` keyword arguments for a teacher given by name or path.

    The teacher follows the student's loading options (`dtype`, `attn_implementation`, `revision`,
    `trust_remote_code`): from `args.model_init_kwargs` when the student is loaded by name, from the loaded student
    itself otherwise (its dtype and attention implementation). Values in `args.teacher_model_init_kwargs` win.

    Args:
        student (`str` or `nn.Module`): The student, as given to the trainer.
        args ([`DistillationConfig`]): The training configuration.
    """
    inherited: dict[str, Any] = {}
    if isinstance(student, str):
        student_kwargs = dict(args.model_init_kwargs or {})
        inherited = {k: student_kwargs[k] for k in INHERITED_INIT_KWARGS if k in student_kwargs}
    else:
        model = unwrap_peft(student)
        dtype = getattr(model, "dtype", None)
        if isinstance(dtype, torch.dtype):
            inherited["dtype"] = dtype
        attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if attn:
            inherited["attn_implementation"] = attn
    if getattr(args, "trust_remote_code", False):
        inherited.setdefault("trust_remote_code", True)
    return {**inherited, **(args.teacher_model_init_kwargs or {})}


def load_teacher(name_or_path: str, init_kwargs: dict[str, Any] | None = None) -> PreTrainedModel:
    """Load a teacher with `AutoModelForCausalLM.from_pretrained` (or the image-text class for a vision-language
    model), with a clear error when it cannot be found.

    Args:
        name_or_path (`str`): Hub model id or local directory.
        init_kwargs (`dict`, *optional*): Extra `from_pretrained` keyword arguments (`dtype` may be a string).

    Raises:
        ValueError: If nothing loadable is found at `name_or_path`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    kwargs = _resolve_dtype(init_kwargs or {})
    local = os.path.expanduser(name_or_path)
    # A Hub id is "name" or "org/name"; anything else with path separators is meant as a local directory
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if looks_local and not os.path.isdir(local):
        raise ValueError(
            f"Teacher model path {name_or_path!r} does not exist. Pass `teacher_model` (or "
            "`teacher_model_name_or_path`) as a directory written by `save_pretrained`, a Hub model id, or an "
            "already-loaded model."
        )
    try:
        config_kwargs = {k: kwargs[k] for k in ("revision", "trust_remote_code") if k in kwargs}
        config = AutoConfig.from_pretrained(local, **config_kwargs)
        auto_class = AutoModelForCausalLM
        if hasattr(config, "vision_config") and type(config) not in AutoModelForCausalLM._model_mapping:
            auto_class = AutoModelForImageTextToText
        return auto_class.from_pretrained(local, **kwargs)
    except (OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " The Hugging Face Hub is offline (HF_HUB_OFFLINE is set)." if offline else ""
        if not os.path.isdir(local):
            hint += f" No local folder {name_or_path!r} exists either (looked in {os.getcwd()})."
        inherited = [k for k in ("revision", "trust_remote_code") if k in kwargs]
        if inherited:
            hint += (
                f" The teacher was loaded with {', '.join(f'{k}={kwargs[k]!r}' for k in inherited)}, taken from the "
                "student's options unless `teacher_model_init_kwargs` sets them."
            )
        raise ValueError(
            f"Could not load the teacher model {name_or_path!r}: {str(error).rstrip('.')}.{hint} Pass a local "
            "directory written by `save_pretrained` (with config.json and weights), a reachable Hub model id, or a "
            "loaded model as `teacher_model=`."
        ) from error


def try_load_tokenizer(source: str | None, revision: str | None = None):
    """Best-effort tokenizer for a teacher given by name/path: a local folder, the local Hub cache, or the Hub when
    online; `None` when none can be found."""
    if not source:
        return None
    kwargs = {"revision": revision} if revision else {}
    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(source), **kwargs)
    except Exception:  # noqa: BLE001 - any failure simply means "no tokenizer to compare against"
        return None


def _shares_parameters(a: nn.Module, b: nn.Module) -> bool:
    pointers = {p.data_ptr() for p in a.parameters()}
    return any(p.data_ptr() in pointers for p in b.parameters())


def separate_from_student(teacher: nn.Module, student: Any) -> nn.Module:
    """The teacher, copied when it is the student itself or shares weights with it (self-distillation).

    Freezing a teacher that shares the student's weights would freeze the student (0 trainable parameters, loss 0):
    the copy is a frozen snapshot of the student as it is now.
    """
    if isinstance(student, nn.Module) and (teacher is student or _shares_parameters(teacher, student)):
        warnings.warn(
            "The teacher is the student itself (or shares its weights). Using a frozen copy of the student as it is "
            "now as the teacher (self-distillation), which costs the memory of a second model. Pass a separate "
            "teacher model to avoid the copy.",
            UserWarning,
            stacklevel=3,
        )
        return copy.deepcopy(teacher)
    return teacher


def _is_vision_language(model: Any) -> bool:
    config = model if not isinstance(model, nn.Module) else getattr(unwrap_peft(model), "config", None)
    return getattr(config, "vision_config", None) is not None


def student_config(name_or_path: str, args: Any) -> Any:
    """The config of a student given by name/path (cheap: no weights), or `None` when it cannot be read here (the
    student's own loading then reports the problem)."""
    from transformers import AutoConfig

    kwargs = {k: v for k, v in (args.model_init_kwargs or {}).items() if k in ("revision", "trust_remote_code")}
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(name_or_path), **kwargs)
    except Exception:  # noqa: BLE001 - SFTTrainer's own loading gives the user-facing error
        return None


def check_modalities(student: Any, teacher: Any) -> None:
    """Refuse a vision-language teacher with a text-only student, and the reverse.

    Args:
        student (`nn.Module` or `PretrainedConfig`): The student model, or its config.
        teacher (`nn.Module` or `PretrainedConfig`): The teacher model, or its config.

    Raises:
        ValueError: If exactly one of the two models takes images.
    """
    if student is None or teacher is None:
        return  # unknown yet (checked again once the model is loaded)
    student_vlm, teacher_vlm = _is_vision_language(student), _is_vision_language(teacher)
    if student_vlm == teacher_vlm:
        return
    which = "teacher" if teacher_vlm else "student"
    other = "student" if teacher_vlm else "teacher"
    raise ValueError(
        f"The {which} is a vision-language model (it takes images) but the {other} is text-only. Both must see the "
        "same inputs: use a vision-language model on both sides (e.g. a smaller model of the same family), or "
        f"text-only models on both sides (e.g. the {which}'s language model alone, on text-only data)."
    )


def freeze(model: nn.Module) -> nn.Module:
    """Put a teacher in eval mode with no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model

"""A live teacher: a causal LM in this process, frozen, on any device and dtype.

This module loads the teacher, checks that it speaks the student's vocabulary, and runs the backbone of either model
to get last hidden states (the LM head is applied later, a chunk of tokens at a time, by the loss).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel
from transformers.utils import logging

logger = logging.get_logger(__name__)

CROSS_TOKENIZER_HINT = (
    "Logit distillation compares the two next-token distributions token by token, so the teacher and the student must "
    "share one tokenizer. Pick a teacher from the student's model family, or use a cross-tokenizer method such as "
    "ULD (TRL's `trl.experimental.gold.GOLDTrainer`)."
)


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


def load_teacher(name_or_path: str, init_kwargs: dict[str, Any] | None = None) -> PreTrainedModel:
    """Load a teacher with `AutoModelForCausalLM.from_pretrained`, with a clear error when it cannot be found.

    Args:
        name_or_path (`str`): Hub model id or local directory.
        init_kwargs (`dict`, *optional*): Extra `from_pretrained` keyword arguments (`dtype` may be a string).

    Raises:
        ValueError: If nothing loadable is found at `name_or_path`.
    """
    from transformers import AutoModelForCausalLM

    kwargs = _resolve_dtype(init_kwargs or {})
    # A Hub id is "name" or "org/name"; anything else with path separators is meant as a local directory
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ValueError(
            f"Teacher model path {name_or_path!r} does not exist. Pass `teacher_model` (or "
            "`teacher_model_name_or_path`) as a directory written by `save_pretrained`, a Hub model id, or an "
            "already-loaded model."
        )
    try:
        return AutoModelForCausalLM.from_pretrained(os.path.expanduser(name_or_path), **kwargs)
    except (OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " The Hugging Face Hub is offline (HF_HUB_OFFLINE is set)." if offline else ""
        raise ValueError(
            f"Could not load the teacher model {name_or_path!r}: {str(error).rstrip('.')}.{hint} Pass a local "
            "directory written by `save_pretrained` (with config.json and weights), a reachable Hub model id, or a "
            "loaded model as `teacher_model=`."
        ) from error


def try_load_tokenizer(source: str | None):
    """Best-effort tokenizer for a teacher given by name/path; `None` when none can be found locally."""
    if not source:
        return None
    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(source))
    except Exception:  # noqa: BLE001 - any failure simply means "no tokenizer to compare against"
        return None


def _first_vocab_difference(student_vocab: dict[str, int], teacher_vocab: dict[str, int]) -> str:
    inverse = {i: t for t, i in teacher_vocab.items()}
    for token, index in sorted(student_vocab.items(), key=lambda item: item[1]):
        if inverse.get(index) != token:
            return f"id {index} is {token!r} for the student but {inverse.get(index)!r} for the teacher"
    return f"the student has {len(student_vocab)} tokens and the teacher {len(teacher_vocab)}"


def resolve_distill_vocab_size(
    student_rows: int,
    teacher_rows: int,
    tokenizer=None,
    teacher_tokenizer=None,
    requested: int | None = None,
) -> int:
    """Number of leading vocabulary columns to compare between student and teacher logits.

    Rules: explicit `requested` wins (it must fit both heads); equal row counts compare all rows; different row counts
    (padded embedding matrices of one tokenizer, e.g. 151936 vs 152064) compare the first `len(tokenizer)` rows. When a
    teacher tokenizer is known, it must map every token to the same id as the student's.

    Raises:
        ValueError: If the tokenizers differ, or the row counts cannot come from one tokenizer.
    """
    if tokenizer is not None and teacher_tokenizer is not None:
        student_vocab, teacher_vocab = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if student_vocab != teacher_vocab:
            raise ValueError(
                "The teacher's tokenizer differs from the student's: "
                f"{_first_vocab_difference(student_vocab, teacher_vocab)}. {CROSS_TOKENIZER_HINT}"
            )
    smallest = min(student_rows, teacher_rows)
    if requested is not None:
        if requested > smallest:
            raise ValueError(
                f"`distill_vocab_size={requested}` is larger than the LM heads allow (student {student_rows} rows, "
                f"teacher {teacher_rows} rows). Use at most {smallest}."
            )
        return requested
    n_tokens = len(tokenizer) if tokenizer is not None else None
    if n_tokens is not None and n_tokens > smallest:
        raise ValueError(
            f"The tokenizer has {n_tokens} tokens but the {'teacher' if teacher_rows < student_rows else 'student'} "
            f"LM head has only {smallest} rows, so the two models do not share this tokenizer. {CROSS_TOKENIZER_HINT}"
        )
    if student_rows == teacher_rows:
        return student_rows
    if n_tokens is None:
        raise ValueError(
            f"The student LM head has {student_rows} rows and the teacher's {teacher_rows}. If they share a tokenizer "
            "and only the padding differs, pass the tokenizer (`processing_class`) or set `distill_vocab_size` to its "
            f"length. Otherwise: {CROSS_TOKENIZER_HINT}"
        )
    logger.info(
        f"Student ({student_rows} rows) and teacher ({teacher_rows} rows) LM heads differ only by padding; comparing "
        f"the first {n_tokens} vocabulary entries (the tokenizer's length)."
    )
    return n_tokens


def freeze(model: nn.Module) -> nn.Module:
    """Put a teacher in eval mode with no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


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


def last_hidden_state(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the backbone of `model` on `inputs` and return its last hidden state `[B, L, H]`.

    Inputs are moved to the model's device, so a teacher can live on another device than the batch.
    """
    device = next(model.parameters()).device
    moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    moved["use_cache"] = False
    return backbone(model)(**moved).last_hidden_state

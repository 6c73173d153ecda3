"""Sampling completions with a model (student or teacher) and rebuilding a collator-style batch from them."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from .prompts import extract_prompts

__all__ = ["build_completion_batch", "generate_completions", "on_policy_batch"]


class _VocabLimit(LogitsProcessor):
    """Never sample ids >= `limit` (a teacher's padded embedding rows that the student does not have)."""

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.size(-1) > self.limit:
            scores = scores.clone()
            scores[:, self.limit :] = -float("inf")
        return scores


def _as_list(token_ids: int | Sequence[int] | None) -> list[int]:
    if token_ids is None:
        return []
    if isinstance(token_ids, int):
        return [token_ids]
    if torch.is_tensor(token_ids):
        return [int(t) for t in token_ids.flatten().tolist()]
    return [int(t) for t in token_ids]


def _unwrap(model: nn.Module) -> nn.Module:
    """Remove DDP / DataParallel / DeepSpeed / torch.compile containers; a PEFT model stays a PEFT model."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def generate_completions(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    tokenizer: Any,
    generation_config: GenerationConfig,
    max_new_tokens: int | None,
    device: torch.device | str | None = None,
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """Sample one completion per prompt with `model` (the student, or the teacher for sequence-level KD).

    The prompts are left-padded into one batch and passed to `model.generate` under `torch.no_grad()` with the
    model in eval mode (no dropout; gradient checkpointing is inactive in eval mode, so the KV cache is used); each
    module's train/eval mode is restored afterwards. A completion is cut after its first EOS token (the EOS is
    kept); a completion that never reaches an EOS keeps its `max_new_tokens` tokens. `generation_config` is copied,
    never modified.

    Wrapped models: DDP / DataParallel / DeepSpeed / `torch.compile` containers are removed with
    `accelerate.utils.extract_model_from_parallel`; a PEFT model is used as is (its `generate` runs the adapters).
    Sharded parameters (DeepSpeed ZeRO-3, FSDP) are not gathered here: unwrap the model with TRL's
    `trl.models.utils.unwrap_model_for_generation(model, accelerator)` context and pass the model it yields, on
    every rank at the same step (see [`GenerationSchedule`]).

    Args:
        model (`nn.Module`): A causal LM with `generate` (transformers or PEFT), possibly wrapped (see above).
        prompts (`Sequence[Sequence[int]]`): Prompt token ids, one list per row, without padding (not empty).
        tokenizer: The tokenizer (or processor), for the pad id (its pad token, else its EOS token) and the EOS
            id when `generation_config` has none.
        generation_config (`transformers.GenerationConfig`): Sampling settings, e.g. from
            [`GenerationSettings.to_generation_config`]. Its `eos_token_id` (else the model's, else the tokenizer's)
            is both the stop condition and the truncation point. `num_return_sequences` must be 1.
        max_new_tokens (`int`, *optional*): Overrides `generation_config.max_new_tokens` when not `None`.
        device (`torch.device` or `str`, *optional*): Where to put the inputs; defaults to the model's device.
        vocab_limit (`int`, *optional*): Never generate ids >= `vocab_limit`. Set it to the student's vocabulary
            size when a teacher with a larger (padded) embedding matrix generates: ids past the student's rows would
            crash the student's embedding lookup.

    Returns:
        `list[list[int]]`: The completion token ids of each prompt, in order, without prompt or padding.
    """
    if len(prompts) == 0:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("Every prompt must have at least one token to generate from.")
    generation_config = copy.deepcopy(generation_config)
    if max_new_tokens is not None:
        generation_config.max_new_tokens = int(max_new_tokens)
    if (generation_config.num_return_sequences or 1) != 1:
        raise ValueError("On-policy generation samples one completion per prompt: set `num_return_sequences=1`.")

    unwrapped = _unwrap(model)
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    pad_token_id = generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_token_id is None:
        raise ValueError("No pad token id: set `generation_config.pad_token_id` or the tokenizer's pad/EOS token.")
    generation_config.pad_token_id = pad_token_id
    eos_ids = _as_list(generation_config.eos_token_id)
    if not eos_ids:  # what `generate` would fall back to, made explicit so the truncation below uses the same ids
        eos_ids = _as_list(getattr(getattr(unwrapped, "generation_config", None), "eos_token_id", None))
    if not eos_ids and tok.eos_token_id is not None:
        eos_ids = [tok.eos_token_id]
    generation_config.eos_token_id = eos_ids or None

    device = torch.device(device) if device is not None else _model_device(unwrapped)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1

    extra: dict[str, Any] = {}
    if vocab_limit is not None:
        extra["logits_processor"] = LogitsProcessorList([_VocabLimit(int(vocab_limit))])

    modes = {module: module.training for module in unwrapped.modules()}
    unwrapped.eval()
    try:
        with torch.no_grad():
            output = unwrapped.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=generation_config,
                **extra,
            )
    finally:
        for module, training in modes.items():
            module.training = training
    sequences = output.sequences if hasattr(output, "sequences") else output
    completions = sequences[:, width:].cpu()

    completion_ids = []
    for row in completions.tolist():
        for i, token_id in enumerate(row):
            if token_id in eos_ids:
                row = row[: i + 1]
                break
        completion_ids.append(row)
    return completion_ids


def build_completion_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    max_length: int | None = None,
    padding_side: Literal["right", "left"] = "right",
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Prompts and completions as a collated batch, like TRL's `DataCollatorForLanguageModeling` would build it.

    Each row is `prompt + completion`; `labels` are the completion tokens and `-100` on the prompt and the padding;
    `attention_mask` is 1 on real tokens. All three are `torch.long` (`int64`), padded on `padding_side` (the SFT
    collator pads on the right) to the longest row, on `device` (CPU by default, as the collator; the trainer moves
    batches to the model's device).

    Keep the default right padding for training: with left padding, a transformers forward without `position_ids`
    numbers positions from the first column, padding included, so the rows are shifted with respect to generation
    (which derives positions from the attention mask); pass `position_ids = attention_mask.cumsum(-1) - 1` then.
    (TRL's `GKDTrainer` trains on its left-padded `generate` output without position ids.)

    Args:
        prompts (`Sequence[Sequence[int]]`): Prompt token ids per row.
        completions (`Sequence[Sequence[int]]`): Completion token ids per row (may be empty).
        pad_token_id (`int`): Id filling the padding of `input_ids`.
        max_length (`int`, *optional*): Longest row allowed: the completion is cut to fit, the prompt is always
            kept whole (a row whose prompt already fills `max_length` has no labelled token).
        padding_side (`str`, *optional*, defaults to `"right"`): `"right"` or `"left"`.
        device (`torch.device` or `str`, *optional*): Device of the returned tensors.

    Returns:
        `dict[str, torch.Tensor]`: `input_ids`, `attention_mask` and `labels`, each `[B, L]`.

    Raises:
        ValueError: If the lists differ in length, a prompt is longer than `max_length`, or `padding_side` is
            unknown.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions.")
    if padding_side not in ("right", "left"):
        raise ValueError(f"`padding_side` must be 'right' or 'left', got {padding_side!r}.")
    if len(prompts) == 0:
        raise ValueError("Cannot build a batch from zero rows.")
    rows, row_labels = [], []
    for prompt, completion in zip(prompts, completions):
        prompt, completion = list(prompt), list(completion)
        if max_length is not None:
            if len(prompt) > max_length:
                raise ValueError(
                    f"A prompt of {len(prompt)} tokens does not fit `max_length={max_length}`; the prompt is never "
                    "truncated (only the completion is)."
                )
            completion = completion[: max_length - len(prompt)]
        rows.append(prompt + completion)
        row_labels.append([-100] * len(prompt) + completion)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, row_labels)):
        span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        input_ids[i, span] = torch.as_tensor(row, dtype=torch.long)
        attention_mask[i, span] = 1
        labels[i, span] = torch.as_tensor(lab, dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def on_policy_batch(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    tokenizer: Any,
    generation_config: GenerationConfig,
    max_new_tokens: int | None,
    max_length: int | None,
    vocab_limit: int | None = None,
    prompt_end: Literal["first", "last"] = "first",
) -> dict[str, torch.Tensor]:
    """Replace a batch's completions by `model`'s samples: [`extract_prompts`] → [`generate_completions`] →
    [`build_completion_batch`].

    The result has only `input_ids`, `attention_mask` and `labels` (right-padded, `int64`, on the device of
    `batch["input_ids"]`); other keys of `batch` (e.g. `position_ids`) describe the old sequences and are dropped.

    Args:
        model (`nn.Module`): The generating model: the student (on-policy) or the teacher (sequence-level KD).
        batch (`Mapping[str, Any]`): A collated SFT batch (see [`extract_prompts`]).
        tokenizer: The tokenizer (or processor), for the pad and EOS ids.
        generation_config (`transformers.GenerationConfig`): Sampling settings.
        max_new_tokens (`int`, *optional*): Overrides `generation_config.max_new_tokens` when not `None`.
        max_length (`int`, *optional*): Longest row of the result (completions are cut to fit).
        vocab_limit (`int`, *optional*): Never generate ids >= `vocab_limit` (see [`generate_completions`]).
        prompt_end (`str`, *optional*, defaults to `"first"`): See [`extract_prompts`].

    Returns:
        `dict[str, torch.Tensor]`: The new batch.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = tok.eos_token_id
    prompts = extract_prompts(batch, pad_token_id, prompt_end=prompt_end)
    completions = generate_completions(
        model,
        prompts,
        tokenizer=tokenizer,
        generation_config=generation_config,
        max_new_tokens=max_new_tokens,
        vocab_limit=vocab_limit,
    )
    device = torch.as_tensor(batch["input_ids"]).device
    return build_completion_batch(
        prompts, completions, pad_token_id=pad_token_id, max_length=max_length, padding_side="right", device=device
    )

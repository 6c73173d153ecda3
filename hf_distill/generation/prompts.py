"""The prompt of each row of a collated SFT batch: the tokens before the first (or last) labelled one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

__all__ = ["extract_prompts"]

_PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx", "max_length_q", "max_length_k")
_MULTIMODAL_KEYS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "image_sizes")


def extract_prompts(
    batch: Mapping[str, Any], pad_token_id: int | None, *, prompt_end: Literal["first", "last"] = "first"
) -> list[list[int]]:
    """The prompt tokens of each row of a collated SFT batch.

    TRL's SFT data preparation folds the prompt/completion split into `labels` (`-100` on the prompt with
    `completion_only_loss`, on everything but the assistant turns with `assistant_only_loss`), and
    `DataCollatorForLanguageModeling` right-pads `input_ids` with the pad id, `labels` with `-100` and
    `attention_mask` with 0. The prompt of a row is its (attended) tokens before the first labelled one (label not
    `-100`). A row whose labels are all `-100` (its completion was truncated away) has its whole sequence as prompt.

    Args:
        batch (`Mapping[str, Any]`): A collated batch with `input_ids` and `labels` (`[B, L]`, labels not shifted)
            and, optionally, `attention_mask` (either padding side works).
        pad_token_id (`int`, *optional*): Pad id, used to find the padding when the batch has no `attention_mask`.
        prompt_end (`str`, *optional*, defaults to `"first"`): `"first"`: the prompt ends before the first labelled
            token (a multi-turn conversation keeps only its first user turn). `"last"`: before the start of the last
            labelled span, i.e. every earlier turn is prompt, like GKD's chat collator (which uses all messages but
            the last as the prompt).

    Returns:
        `list[list[int]]`: One list of token ids per row, without padding.

    Raises:
        ValueError: If the batch is padding-free / packed (several sequences per row), has images (vision-language
            batches are not supported) or no `labels`, or if a row has no masked prefix (its first token is
            labelled, as in language-modeling data): on-policy generation needs prompt-completion data or
            conversational data with `assistant_only_loss=True`.
    """
    if prompt_end not in ("first", "last"):
        raise ValueError(f"`prompt_end` must be 'first' or 'last', got {prompt_end!r}.")
    if "input_ids" not in batch or "labels" not in batch:
        raise ValueError("On-policy generation needs a batch with `input_ids` and `labels` to find the prompts.")
    input_ids = torch.as_tensor(batch["input_ids"])
    labels = torch.as_tensor(batch["labels"])
    if input_ids.dim() != 2 or labels.shape != input_ids.shape:
        raise ValueError(
            f"Expected `input_ids` and `labels` of the same shape [batch, length], got {tuple(input_ids.shape)} and "
            f"{tuple(labels.shape)}."
        )
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        real = torch.as_tensor(attention_mask).bool()
    elif pad_token_id is not None:
        real = _non_padding(input_ids, pad_token_id)
    else:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    _refuse_packed(batch, real)
    multimodal = [key for key in _MULTIMODAL_KEYS if key in batch]
    if multimodal:
        raise ValueError(
            f"On-policy / sequence-level generation does not support vision-language batches yet (found {multimodal}):"
            " the prompts would be generated from without their images."
        )

    input_ids, labels, real = input_ids.cpu(), labels.cpu(), real.cpu()
    prompts = []
    for row in range(input_ids.size(0)):
        ids = input_ids[row][real[row]]
        lab = labels[row][real[row]]
        labelled = (lab != -100).nonzero().flatten()
        if labelled.numel() == 0:  # completion truncated away: the whole sequence is the prompt
            prompts.append(ids.tolist())
            continue
        if prompt_end == "first":
            end = int(labelled[0])
        else:  # start of the last labelled span
            gaps = (labelled[1:] - labelled[:-1] > 1).nonzero().flatten()
            end = int(labelled[int(gaps[-1]) + 1]) if gaps.numel() else int(labelled[0])
        if end == 0:
            raise ValueError(
                f"Row {row} of the batch has no prompt: its first token is already labelled (no `-100` prefix in "
                "`labels`). On-policy and sequence-level distillation (`lmbda` > 0 or `seq_kd`) generate a "
                "completion for each prompt, so they need prompt-completion data ('prompt'/'completion' columns, "
                "with `completion_only_loss`) or conversational data with `assistant_only_loss=True`; "
                "language-modeling ('text') data has no prompt to generate from."
            )
        prompts.append(ids[:end].tolist())
    return prompts


def _non_padding(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Without an attention mask: padding = the run of pad ids at the start (left) or end (right) of each row."""
    is_pad = input_ids == pad_token_id
    # a position is padding if every position before it (left pad) or after it (right pad) is padding too
    left = is_pad.int().cumprod(dim=1).bool()
    right = is_pad.flip(1).int().cumprod(dim=1).flip(1).bool()
    return ~(left | right)


def _refuse_packed(batch: Mapping[str, Any], real: torch.Tensor) -> None:
    message = (
        "On-policy / sequence-level distillation cannot use padding-free or packed batches (several sequences "
        "flattened into one row): regenerated completions change every sequence's length. Use `padding_free=False` "
        "and `packing=False` with `lmbda` > 0 or `seq_kd`."
    )
    if any(key in batch for key in _PACKED_KEYS):
        raise ValueError(message)
    position_ids = batch.get("position_ids")
    if position_ids is None:
        return
    position_ids = torch.as_tensor(position_ids)
    if position_ids.dim() != 2 or position_ids.shape != real.shape:  # e.g. 3D multimodal-rope positions
        return
    resets = (position_ids[:, 1:] <= position_ids[:, :-1]) & real[:, 1:] & real[:, :-1]
    if bool(resets.any()):
        raise ValueError(message)

"""The generation half of on-policy and sequence-level distillation (GKD).

Generalized Knowledge Distillation ([Agarwal et al., 2023](https://huggingface.co/papers/2306.13649), TRL's
`GKDTrainer`) trains on completions that are not always the dataset's: with probability `lmbda` a step's completions
are sampled from the student itself (on-policy), and with `seq_kd=True` the remaining steps use completions sampled
from the teacher (sequence-level KD). This module holds the pieces, independent of the trainer:

- [`GenerationSchedule`]: which source ("dataset", "student" or "teacher") a training step uses, reproducibly and
  identically on every process.
- [`GenerationSettings`]: the sampling settings, turned into a `transformers.GenerationConfig`.
- [`extract_prompts`]: the prompt of each row of a collated SFT batch (the tokens before the first labelled one).
- [`generate_completions`]: sample a completion per prompt with a model (student or teacher).
- [`build_completion_batch`]: prompts + completions back into a collator-style batch (`input_ids`,
  `attention_mask`, `labels` with -100 on the prompt and padding).
- [`on_policy_batch`]: the three above in a row.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

__all__ = [
    "COMPLETION_SOURCES",
    "GenerationSchedule",
    "GenerationSettings",
    "build_completion_batch",
    "extract_prompts",
    "generate_completions",
    "on_policy_batch",
]

COMPLETION_SOURCES = ("dataset", "student", "teacher")
"""Where a training step's completions come from."""

_PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx", "max_length_q", "max_length_k")
_MULTIMODAL_KEYS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "image_sizes")


# ----------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------


@dataclass
class GenerationSchedule:
    """Which source a training step's completions come from, with GKD's semantics.

    TRL's `GKDTrainer.training_step` does

    ```python
    if random.random() <= lmbda:  # student generates (on-policy)
        ...
    elif seq_kd:  # teacher generates (sequence-level KD)
        ...
    # else: the dataset's completions
    ```

    (older TRL releases generated with the teacher first when `seq_kd` and then overwrote the result with the
    student's samples with probability `lmbda`: the same outcome, with a wasted teacher generation). So a step is
    `"student"` with probability `lmbda`, otherwise `"teacher"` if `seq_kd`, otherwise `"dataset"`. The draw here is
    `u < lmbda` with `u` uniform in `[0, 1)`, so `lmbda=0` is never and `lmbda=1` always on-policy (GKD's `<=` is
    on-policy with probability `lmbda + 2**-53`).

    Reproducibility and agreement across processes: GKD draws from Python's global `random`, whose state differs
    between ranks as soon as anything consumes it unevenly (or when it is seeded per device, as TRL's
    `DistillationTrainer` does with `set_seed(seed, device_specific=True)`). Ranks that disagree generate on some
    ranks and not on others, which deadlocks generation under DeepSpeed ZeRO-3 / FSDP (parameter gathering is
    collective) and makes steps uneven in time. Here the draw never touches global state:

    - [`source_for_step`][hf_distill.generation.GenerationSchedule.source_for_step] is a pure function of
      `(seed, step)`: a fresh `random.Random` seeded from both (a string seed, hashed with SHA-512, so it does not
      depend on `PYTHONHASHSEED`). Pass the same training seed on every rank (`args.seed`, not a device-specific
      one) and the same step counter (count micro-batches, i.e. calls to `training_step`, not optimizer steps, so
      that the steps of a gradient-accumulation cycle draw independently); every rank then decides the same, and a
      run resumed from a checkpoint at step `n` continues the same sequence of decisions.
    - [`next_source`][hf_distill.generation.GenerationSchedule.next_source] keeps its own counter (starting at 0)
      and calls `source_for_step`; it agrees across ranks as long as every rank calls it exactly once per step.

    Args:
        lmbda (`float`, *optional*, defaults to `0.0`):
            Probability, in `[0, 1]`, that a step trains on the student's own samples.
        seq_kd (`bool`, *optional*, defaults to `False`):
            Whether the steps that are not on-policy train on the teacher's samples instead of the dataset's.
        seed (`int`, *optional*, defaults to `0`):
            The training seed (the same on every process).
    """

    lmbda: float = 0.0
    seq_kd: bool = False
    seed: int = 0
    _step: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.lmbda) <= 1.0:
            raise ValueError(f"`lmbda` must be in [0, 1], got {self.lmbda}.")

    @property
    def uses_generation(self) -> bool:
        """Whether any step can generate (`lmbda > 0` or `seq_kd`): if not, no generation setup is needed."""
        return self.lmbda > 0 or self.seq_kd

    def source_for_step(self, step: int) -> Literal["dataset", "student", "teacher"]:
        """The completion source of training step `step` (a pure function of `seed`, `step`, `lmbda`, `seq_kd`).

        Args:
            step (`int`): The step index (count micro-batches, identically on every process).

        Returns:
            `"student"`, `"teacher"` or `"dataset"`.
        """
        u = random.Random(f"hf_distill.gkd:{self.seed}:{int(step)}").random()
        if u < self.lmbda:
            return "student"
        if self.seq_kd:
            return "teacher"
        return "dataset"

    def next_source(self) -> Literal["dataset", "student", "teacher"]:
        """The source of the next step (the schedule's own counter, from 0); see [`source_for_step`].

        Returns:
            `"student"`, `"teacher"` or `"dataset"`.
        """
        source = self.source_for_step(self._step)
        self._step += 1
        return source

    def state_dict(self) -> dict[str, int]:
        """The counter of [`next_source`], to save with a checkpoint."""
        return {"step": self._step}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore the counter saved by [`state_dict`]."""
        self._step = int(state["step"])


# ----------------------------------------------------------------------------------------------------
# Sampling settings
# ----------------------------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    """Sampling settings for on-policy / sequence-level generation, as a `transformers.GenerationConfig`.

    The defaults follow TRL's `DistillationTrainer` (`temperature=1.0`, `top_p=1.0`, `top_k=0`,
    `max_completion_length=512`); TRL's experimental `GKDTrainer` differs in `temperature=0.9` and
    `max_new_tokens=128` (and sets `use_cache=False` under gradient checkpointing, which is not needed here: the model
    generates in eval mode, where checkpointing is inactive).

    `top_k=0` disables top-k filtering and must be explicit: `generate` fills every field left at `None` from the
    model's `generation_config` and then from the global defaults, and the global default is `top_k=50`, so an unset
    `top_k` silently samples from the 50 most likely tokens only (so does `top_k=None` in `generation_kwargs`).

    Args:
        max_new_tokens (`int`, *optional*, defaults to `512`):
            Maximum number of tokens generated per completion (TRL's `max_completion_length`, GKD's
            `max_new_tokens`).
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature (> 0). Only the sampling one: the distillation loss has its own temperature.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1.0 keeps all).
        top_k (`int`, *optional*, defaults to `0`):
            Keep the `top_k` most likely tokens; `0` disables top-k filtering.
        min_p (`float`, *optional*):
            Drop tokens less likely than `min_p` times the most likely one.
        repetition_penalty (`float`, *optional*, defaults to `1.0`):
            Penalty on tokens already in the prompt or the completion (1.0: none).
        do_sample (`bool`, *optional*, defaults to `True`):
            Sample (GKD and TRL always do); `False` is greedy decoding.
        generation_kwargs (`dict[str, Any]`, *optional*):
            Any other `GenerationConfig` fields, merged last (they override the ones above and the token ids).
    """

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    do_sample: bool = True
    generation_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {self.max_new_tokens}.")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0 when sampling, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"`top_k` must be >= 0 (0 disables it), got {self.top_k}.")

    def to_generation_config(
        self,
        *,
        tokenizer: Any = None,
        model: nn.Module | None = None,
        pad_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
    ) -> GenerationConfig:
        """Build the `GenerationConfig`.

        Token ids, like TRL's `DistillationTrainer`: the pad id is `pad_token_id`, else the tokenizer's pad token,
        else its EOS token. The EOS ids are `eos_token_id` if given, else the tokenizer's EOS id together with every
        EOS id of the model's `generation_config` (e.g. an end-of-turn token), so that a completion ends at any of
        them. `generation_kwargs` is merged last.

        Args:
            tokenizer (*optional*): Tokenizer (or processor) supplying the pad, EOS and BOS ids.
            model (`nn.Module`, *optional*): Model whose `generation_config.eos_token_id` adds stop ids.
            pad_token_id (`int`, *optional*): Pad id, overriding the tokenizer's.
            eos_token_id (`int` or `list[int]`, *optional*): EOS id(s), overriding the tokenizer's and the model's.

        Returns:
            `transformers.GenerationConfig`.
        """
        tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
        if pad_token_id is None and tok is not None:
            pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if eos_token_id is None:
            eos_ids: list[int] = []
            if tok is not None and tok.eos_token_id is not None:
                eos_ids.append(tok.eos_token_id)
            model_gc = getattr(_unwrap(model), "generation_config", None) if model is not None else None
            for token_id in _as_list(getattr(model_gc, "eos_token_id", None)):
                if token_id not in eos_ids:
                    eos_ids.append(token_id)
            eos_token_id = eos_ids or None
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(self.max_new_tokens),
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "pad_token_id": pad_token_id,
            "eos_token_id": eos_token_id,
            "disable_compile": True,
        }
        if tok is not None and getattr(tok, "bos_token_id", None) is not None:
            kwargs["bos_token_id"] = tok.bos_token_id
        kwargs.update(self.generation_kwargs or {})
        return GenerationConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# Batch
# ----------------------------------------------------------------------------------------------------


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

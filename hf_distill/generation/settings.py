"""Sampling settings for on-policy / sequence-level generation, turned into a `transformers.GenerationConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import GenerationConfig

from .completions import _as_list, _unwrap

__all__ = ["GenerationSettings"]


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

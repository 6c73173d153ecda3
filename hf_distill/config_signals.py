"""The teacher-signal fields of [`DistillationConfig`]: a teacher cache, and on-policy / sequence-level generation.

Kept apart from `config.py` so each file stays one concept: these fields decide where the teacher's targets and the
trained completions come from; `config.py` decides how the loss compares them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SPARSE_TARGET_CHOICES = ("bucket", "renormalize")
DEFAULT_MAX_NEW_TOKENS = 128
"""Completion length of generated batches when neither `max_new_tokens` nor `max_completion_length` is set (GKD's)."""


@dataclass
class TeacherSignalFields:
    """Mixed into [`DistillationConfig`]; documented there."""

    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Folder of a teacher cache made by `hf-distill cache-teacher`: train from its top-k log-probs "
            "and load no teacher model."
        },
    )
    sparse_targets: str = field(
        default="bucket",
        metadata={
            "help": "With a teacher cache, how the mass outside the top-k is treated: 'bucket' (a rest bucket) or "
            "'renormalize' (both distributions renormalised over the top-k).",
            "choices": list(SPARSE_TARGET_CHOICES),
        },
    )
    lmbda: float | None = field(
        default=None,
        metadata={
            "help": "Probability that a batch trains on the student's own generations (on-policy, GKD's lmbda). "
            "Default: 1.0 for a prompt-only dataset (there is nothing else to train on), else 0.0."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={"help": "Sequence-level KD: train on the teacher's generations when the student's are not used."},
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": f"Tokens generated per completion (GKD's name; default {DEFAULT_MAX_NEW_TOKENS})."},
    )
    max_completion_length: int | None = field(
        default=None,
        metadata={"help": "Same as `max_new_tokens` (trl.DistillationTrainer's name); set one of the two."},
    )
    generation_temperature: float | None = field(
        default=None,
        metadata={"help": "Sampling temperature of generated completions (default: `temperature`)."},
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of generated completions, in (0, 1]."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling of generated completions (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling of generated completions."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty of generation (> 0)."})
    generation_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Extra `GenerationConfig` keyword arguments (dict or JSON string), applied last."},
    )

    def _validate_signal_fields(self) -> None:
        if isinstance(self.generation_kwargs, str):
            try:
                self.generation_kwargs = json.loads(self.generation_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"`generation_kwargs` must be a dict or a JSON object string, got {self.generation_kwargs!r} "
                    f"({error})."
                ) from None
        if self.generation_kwargs is not None and not isinstance(self.generation_kwargs, dict):
            raise ValueError(f"`generation_kwargs` must be a dict, got {type(self.generation_kwargs).__name__}.")
        if self.sparse_targets not in SPARSE_TARGET_CHOICES:
            raise ValueError(
                f"`sparse_targets={self.sparse_targets!r}` is not supported: use 'bucket' (keep the mass outside the "
                "top-k as one bucket) or 'renormalize' (renormalise over the top-k)."
            )
        if self.lmbda is not None and not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(
                f"`lmbda` must be in [0, 1], got {self.lmbda}: it is the probability that a batch trains on the "
                "student's own generations."
            )
        if (
            self.max_new_tokens is not None
            and self.max_completion_length is not None
            and self.max_new_tokens != self.max_completion_length
        ):
            raise ValueError(
                f"`max_new_tokens={self.max_new_tokens}` and `max_completion_length={self.max_completion_length}` "
                "are the same setting under two names (GKD's and trl.DistillationTrainer's); set one of them."
            )
        length = self.max_new_tokens if self.max_new_tokens is not None else self.max_completion_length
        if length is not None and length <= 0:
            raise ValueError(f"`max_new_tokens` must be a positive integer, got {length}.")
        self.max_new_tokens = self.max_completion_length = length if length is not None else DEFAULT_MAX_NEW_TOKENS
        if self.generation_temperature is not None and not self.generation_temperature > 0:
            raise ValueError(f"`generation_temperature` must be > 0, got {self.generation_temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"`top_k` must be >= 0 (0 turns it off), got {self.top_k}.")
        if not self.repetition_penalty > 0:
            raise ValueError(f"`repetition_penalty` must be > 0, got {self.repetition_penalty}.")
        if self.teacher_cache is not None and (self.seq_kd or (self.lmbda or 0.0) > 0.0):
            raise ValueError(
                "`teacher_cache` holds the teacher's targets for the dataset's own completions; generated completions "
                "(`lmbda > 0` or `seq_kd=True`) need a live teacher to score them. Drop `teacher_cache`, or set "
                "`lmbda=0` and `seq_kd=False`."
            )

    @property
    def uses_generation(self) -> bool:
        """Whether some batches train on generated completions (`lmbda > 0` or `seq_kd`)."""
        return bool(self.seq_kd or (self.lmbda or 0.0) > 0.0)

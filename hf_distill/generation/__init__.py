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

`vllm_backend` (imported on its own, not re-exported: it is only used with `use_vllm=True`) samples the student's
completions with vLLM through TRL's `VLLMGeneration` and returns the batch `on_policy_batch` would.
"""

from .completions import build_completion_batch, generate_completions, on_policy_batch
from .prompts import extract_prompts
from .schedule import COMPLETION_SOURCES, GenerationSchedule
from .settings import GenerationSettings

__all__ = [
    "COMPLETION_SOURCES",
    "GenerationSchedule",
    "GenerationSettings",
    "build_completion_batch",
    "extract_prompts",
    "generate_completions",
    "on_policy_batch",
]

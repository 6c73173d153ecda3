"""On-policy and sequence-level distillation inside [`DistillationTrainer`]: which batches train on generated
completions, and how a batch is swapped for one.

Each micro-batch asks the [`GenerationSchedule`] where its completions come from (GKD's semantics: the student's own
samples with probability `lmbda`, else the teacher's with `seq_kd=True`, else the dataset's). A generated batch keeps
the dataset's prompts and replaces their completions; the loss then scores the generated tokens exactly as it scores
dataset completions (the same divergence, temperature and masks).

Normalisation: the trainer counts a step's tokens (`num_items_in_batch`) before its micro-batches run, from the
dataset's completions. A generated micro-batch has other completions, so its loss is normalised by its own token count
(over all processes when `average_tokens_across_devices`) times the accumulation steps: each generated micro-batch
weighs `1 / gradient_accumulation_steps` of the step, as GKD's per-batch mean does.

Prompt-only datasets (a `prompt` column and no `completion`, plain or conversational) get an empty completion, so that
SFT's preparation keeps them and marks where each prompt ends; such data needs generated completions for every batch
(`lmbda=1`, or `seq_kd=True`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .generation import GenerationSchedule, GenerationSettings, on_policy_batch
from .generation.vllm_backend import VLLMStudentGenerator

__all__ = ["OnPolicyGenerator", "OnPolicyTrainingMixin", "add_empty_completions", "is_prompt_only"]


def is_prompt_only(dataset: Any) -> bool:
    """Whether `dataset` has a `prompt` column and no `completion` (nor any other trainable text column)."""
    from trl.data_utils import get_dataset_column_names

    if dataset is None or isinstance(dataset, dict):
        return False
    columns = set(get_dataset_column_names(dataset) or [])
    return "prompt" in columns and "completion" not in columns and not {"text", "messages", "input_ids"} & columns


def add_empty_completions(dataset: Any) -> Any:
    """Give each prompt an empty completion (an empty assistant turn for conversational prompts), for SFT's data path.

    SFT then tokenises the prompt (with the generation prompt of the chat template) and marks only the end-of-sequence
    tokens as the completion: [`extract_prompts`] finds each prompt's end there, and generation fills the rest.
    """

    def empty(example: dict[str, Any]) -> dict[str, Any]:
        prompt = example["prompt"]
        return {"completion": [{"role": "assistant", "content": ""}] if isinstance(prompt, list) else ""}

    return dataset.map(empty)


class OnPolicyGenerator:
    """Swaps a trainer's micro-batches for generated ones, following `lmbda` / `seq_kd`.

    Args:
        args ([`DistillationConfig`]): `lmbda` (resolved), `seq_kd`, `max_new_tokens`, sampling settings, `seed`.
        processing_class: The student's tokenizer or processor.
        vocab_limit (`int`): The distilled vocabulary size: the teacher never samples ids the student lacks.

    With `args.use_vllm`, the student's samples come from vLLM (`vllm`, a [`VLLMStudentGenerator`]; vLLM is imported
    here, so a missing install fails when the trainer is built); the teacher's always from `transformers` `generate`.
    """

    def __init__(self, args: Any, processing_class: Any, vocab_limit: int):
        self.args = args
        self.processing_class = processing_class
        self.vocab_limit = vocab_limit
        self.schedule = GenerationSchedule(lmbda=float(args.lmbda or 0.0), seq_kd=bool(args.seq_kd), seed=args.seed)
        self.settings = GenerationSettings(
            max_new_tokens=args.max_new_tokens,
            temperature=args.generation_temperature or args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            generation_kwargs=args.generation_kwargs,
        )
        use_vllm = bool(getattr(args, "use_vllm", False))
        self.vllm = VLLMStudentGenerator(args, processing_class, self.settings) if use_vllm else None
        self.micro_step: int | None = None  # set from the trainer's global step at the first micro-batch
        self.counts = {"dataset": 0, "student": 0, "teacher": 0}

    def next_source(self, global_step: int, accumulation_steps: int) -> str:
        """The source of the next micro-batch: `"dataset"`, `"student"` or `"teacher"` (the same on every process)."""
        if self.micro_step is None:  # a resumed run continues the same sequence of decisions
            self.micro_step = global_step * accumulation_steps
        source = self.schedule.source_for_step(self.micro_step)
        self.micro_step += 1
        self.counts[source] += 1
        return source

    def generate(self, model: nn.Module, inputs: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """`inputs` with its completions replaced by `model`'s samples (`model` unwrapped, ready to generate)."""
        config = self.settings.to_generation_config(tokenizer=self.processing_class, model=model)
        return on_policy_batch(
            model,
            inputs,
            tokenizer=self.processing_class,
            generation_config=config,
            max_new_tokens=self.args.max_new_tokens,
            max_length=self.args.max_length,
            vocab_limit=self.vocab_limit if source == "teacher" else None,
            prompt_end="last",  # GKD's: in a multi-turn conversation every turn before the last trained one
        )


class OnPolicyTrainingMixin:
    """`training_step` that swaps a micro-batch for generated completions when the trainer's `_generator` (an
    [`OnPolicyGenerator`], or `None`) says so. Goes before the `Trainer` class in the bases."""

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], num_items_in_batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`Trainer.training_step`, after swapping the batch's completions for generated ones when the `lmbda` /
        `seq_kd` schedule says so (see `hf_distill/on_policy.py`)."""
        if self._generator is None and getattr(self.args, "use_vllm", False):
            raise ValueError(
                "`use_vllm=True` generates the student's completions, but no batch is generated (`lmbda=0`, the "
                "default for a dataset with completions): set `lmbda > 0`, or drop `use_vllm`."
            )
        if self._generator is not None:
            source = self._generator.next_source(self.state.global_step, self.args.gradient_accumulation_steps)
            if source != "dataset":
                inputs, num_items_in_batch = self._generated_batch(model, inputs, source)
            self._metrics["train"]["on_policy"].append(float(source == "student"))
        return super().training_step(model, inputs, num_items_in_batch)

    def _generated_batch(
        self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], source: str
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        from trl.models import unwrap_model_for_generation

        if source == "student" and self._generator.vllm is not None:  # the engine gathers and syncs the weights
            batch = self._generator.vllm.batch(self.model, self.accelerator, inputs, self.state.global_step)
        elif source == "student":
            with unwrap_model_for_generation(model, self.accelerator) as unwrapped:
                batch = self._generator.generate(unwrapped, inputs, source)
        else:
            batch = self._generator.generate(self.accelerator.unwrap_model(self.teacher_model), inputs, source)
        # The step's token count was taken from the dataset's completions: this micro-batch is normalised by its own
        # (over all processes, like `num_items_in_batch`), weighing 1 / accumulation steps of the step
        count = (batch["labels"][:, 1:] != -100).sum()
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return batch, count * self._accumulation_steps()

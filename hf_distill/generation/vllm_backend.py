"""vLLM as an optional fast path for the student's on-policy samples (`use_vllm=True`), on TRL's `VLLMGeneration`.

TRL's [`VLLMGeneration`](https://github.com/huggingface/trl/blob/main/trl/generation/vllm_generation.py) owns the
engine: in `"colocate"` mode an `vllm.LLM` in the training process (built from the student's `name_or_path`, then fed
the trained weights), in `"server"` mode a client of a `trl vllm-serve` process. Its `sync_weights()` copies the
student's current weights into the engine (gathering ZeRO-3 / FSDP shards and merging PEFT adapters); its
`generate(prompts=token ids, ...)` returns the completion ids. This module builds it from a [`DistillationConfig`],
syncs before generating whenever the weights may have changed, and returns the same collated batch as
[`on_policy_batch`] (prompts from [`extract_prompts`], completions cut after their first EOS, rebuilt by
[`build_completion_batch`]), so the rest of training does not know which backend generated.

vLLM is imported only when `use_vllm=True`, and only the student generates with it: the teacher's sequence-level
completions (`seq_kd`) are refused with `use_vllm` (they would need a second engine holding the teacher's weights).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .completions import _as_list, build_completion_batch
from .prompts import extract_prompts
from .settings import GenerationSettings

__all__ = ["VLLMStudentGenerator", "import_vllm_generation", "vllm_installed"]


def vllm_installed() -> bool:
    """Whether the `vllm` package can be imported (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def import_vllm_generation() -> type:
    """TRL's `VLLMGeneration` class, after checking that vLLM is installed (the one import point of vLLM here).

    Returns:
        `type`: `trl.generation.vllm_generation.VLLMGeneration`.

    Raises:
        ImportError: If the `vllm` package is not installed.
    """
    if not vllm_installed():
        raise ImportError(
            "`use_vllm=True` needs the `vllm` package, which is not installed: `pip install vllm` (a version TRL "
            "supports, see `pip install trl[vllm]`), or set `use_vllm=False` to generate with `transformers`."
        )
    from trl.generation.vllm_generation import VLLMGeneration

    return VLLMGeneration


class VLLMStudentGenerator:
    """Generates the student's on-policy completions with vLLM, in the form [`on_policy_batch`] returns.

    The engine is built at the first generation (the trainer's model and accelerator are ready then), with the
    sampling settings of `settings` and the `vllm_*` fields of `args`, like trl.DistillationTrainer builds it. The
    student's weights are copied into the engine before the first generation of every optimizer step (they only
    change at optimizer steps, so the micro-batches of one accumulation cycle share one sync).

    Args:
        args ([`DistillationConfig`]): `use_vllm` and the `vllm_*` fields, `max_length`, batch size and accumulation
            steps (they bound the engine's concurrent sequences), `trust_remote_code`.
        processing_class: The student's tokenizer or processor.
        settings ([`GenerationSettings`]): The sampling settings (the ones the `transformers` path uses).

    Raises:
        ImportError: If vLLM is not installed (checked here, when the trainer is built).
    """

    def __init__(self, args: Any, processing_class: Any, settings: GenerationSettings):
        self.vllm_generation_class = import_vllm_generation()
        self.args = args
        self.processing_class = processing_class
        self.settings = settings
        self.engine: Any = None
        self._synced_step: int | None = None

    def _eos_ids(self, model: nn.Module) -> list[int]:
        # the same stop ids as the `transformers` path: the tokenizer's EOS and every EOS of the model's generation
        # config (e.g. an end-of-turn token)
        config = self.settings.to_generation_config(tokenizer=self.processing_class, model=model)
        return _as_list(config.eos_token_id)

    def _build(self, model: nn.Module, accelerator: Any) -> Any:
        args, settings = self.args, self.settings
        if args.vllm_mode == "colocate" and not getattr(model, "name_or_path", None):
            raise ValueError(
                "vLLM's colocate mode builds its engine from the student's `name_or_path` (then copies the trained "
                "weights in), but this student has none: save it with `save_pretrained` and pass its folder as the "
                "model, or use `vllm_mode='server'`."
            )
        generation_kwargs = dict(settings.generation_kwargs or {})
        generation_kwargs.setdefault("stop_token_ids", self._eos_ids(model))
        return self.vllm_generation_class(
            model=model,
            accelerator=accelerator,
            processing_class=self.processing_class,
            mode=args.vllm_mode,
            structured_outputs_regex=args.vllm_structured_outputs_regex,
            server_base_url=args.vllm_server_base_url,
            server_host=args.vllm_server_host,
            server_port=args.vllm_server_port,
            server_timeout=args.vllm_server_timeout,
            group_port=args.vllm_group_port,
            tensor_parallel_size=args.vllm_tensor_parallel_size,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            max_model_length=args.vllm_max_model_length,
            max_num_seqs=args.per_device_train_batch_size
            * args.vllm_tensor_parallel_size
            * args.gradient_accumulation_steps,
            enable_sleep_mode=args.vllm_enable_sleep_mode,
            model_impl=args.vllm_model_impl,
            trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
            repetition_penalty=settings.repetition_penalty,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            min_p=settings.min_p,
            max_completion_length=int(settings.max_new_tokens),
            logprobs=None,  # the loss uses the teacher's full distribution, not the sampled log-probs
            generation_kwargs=generation_kwargs,
        )

    def generate_completions(
        self, model: nn.Module, accelerator: Any, prompts: Sequence[Sequence[int]], global_step: int
    ) -> list[list[int]]:
        """One completion per prompt from the engine, cut after its first EOS (kept), like `generate_completions`.

        Args:
            model (`nn.Module`): The trainer's student (`trainer.model`: not unwrapped for generation, the engine
                gathers sharded parameters itself when it syncs).
            accelerator (`accelerate.Accelerator`): The trainer's accelerator.
            prompts (`Sequence[Sequence[int]]`): Prompt token ids, one list per row, without padding.
            global_step (`int`): The trainer's optimizer step: the weights are synced when it changed.

        Returns:
            `list[list[int]]`: The completion token ids of each prompt, in order.
        """
        if self.engine is None:
            self.engine = self._build(model, accelerator)
        if self._synced_step != global_step:
            self.engine.sync_weights()
            self._synced_step = global_step
        prompts = [[int(t) for t in prompt] for prompt in prompts]
        _, completion_ids, _, _ = self.engine.generate(prompts=prompts, images=None, num_generations=1)
        if len(completion_ids) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(completion_ids)} completions for {len(prompts)} prompts.")
        eos_ids = set(self._eos_ids(model))
        completions = []
        for row in completion_ids:
            row = [int(t) for t in row]
            end = next((i + 1 for i, token_id in enumerate(row) if token_id in eos_ids), len(row))
            completions.append(row[:end])
        return completions

    def batch(
        self, model: nn.Module, accelerator: Any, inputs: dict[str, Any], global_step: int
    ) -> dict[str, torch.Tensor]:
        """`inputs` with its completions replaced by the student's vLLM samples (the form of [`on_policy_batch`]).

        Args:
            model (`nn.Module`): The trainer's student.
            accelerator (`accelerate.Accelerator`): The trainer's accelerator.
            inputs (`dict[str, Any]`): A collated SFT batch.
            global_step (`int`): The trainer's optimizer step.

        Returns:
            `dict[str, torch.Tensor]`: `input_ids`, `attention_mask` and `labels`, right-padded, on the device of
            `inputs["input_ids"]`.
        """
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        prompts = extract_prompts(inputs, pad_token_id, prompt_end="last")
        completions = self.generate_completions(model, accelerator, prompts, global_step)
        return build_completion_batch(
            prompts,
            completions,
            pad_token_id=pad_token_id,
            max_length=self.args.max_length,
            padding_side="right",
            device=torch.as_tensor(inputs["input_ids"]).device,
        )

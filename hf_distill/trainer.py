"""`DistillationTrainer`: TRL's `SFTTrainer` with a teacher, for logit distillation.

One training step: batch -> student backbone (last hidden states) -> teacher backbone (no grad) -> chunked loss
over the labelled tokens (`alpha * CE + (1 - alpha) * T^2 * divergence`, both LM heads applied a chunk at a time)
-> backward.
Everything else (dataset formats, packing, masks, PEFT, gradient checkpointing, mixed precision, logging, saving) is
SFTTrainer's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import PreTrainedModel, TrainingArguments
from trl import SFTTrainer
from trl.data_utils import get_dataset_column_names
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import disable_dropout_in_model

from .config import DistillationConfig
from .losses import DistillationLossOutput, HiddenStateTeacher, LMHead, chunked_distillation_loss
from .teachers.live import (
    freeze,
    last_hidden_state,
    load_teacher,
    resolve_distill_vocab_size,
    try_load_tokenizer,
    unwrap_peft,
)

_METRIC_NAMES = ("distill_loss", "ce_loss", "teacher_agreement", "mean_token_accuracy")


def check_dataset_columns(dataset: Any, args: DistillationConfig, has_formatting_func: bool, name: str) -> None:
    """Fail early, with the fix, when a dataset has none of the columns SFT-style distillation can train on.

    Raises:
        ValueError: If no accepted format (language modeling, prompt-completion, conversational, pre-tokenized) is
            recognised.
    """
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, value in dataset.items():
            check_dataset_columns(value, args, has_formatting_func, f"{name}[{key!r}]")
        return
    if not isinstance(dataset, Dataset | IterableDataset):
        return  # SFTTrainer reports unsupported types itself
    columns = set(get_dataset_column_names(dataset) or [])
    if not columns and isinstance(dataset, IterableDataset):
        return  # streaming dataset with unknown features: SFTTrainer inspects the first example
    skip_prepare = bool((args.dataset_kwargs or {}).get("skip_prepare_dataset", False))
    if skip_prepare:
        if "input_ids" not in columns:
            raise ValueError(
                f"The {name} dataset has columns {sorted(columns)} but `skip_prepare_dataset=True` needs tokenized "
                "examples with an 'input_ids' column (and 'labels' to mask tokens). Tokenize it first, or drop "
                "`skip_prepare_dataset`."
            )
        return
    accepted = (
        "input_ids" in columns
        or args.dataset_text_field in columns
        or {"prompt", "completion"} <= columns
        or "messages" in columns
        or "conversations" in columns
        or has_formatting_func
    )
    if accepted:
        return
    if "prompt" in columns:
        raise ValueError(
            f"The {name} dataset has a 'prompt' column but no 'completion': prompt-only data needs on-policy "
            "generation, which this trainer does not do yet. Add a 'completion' column (prompt-completion format)."
        )
    raise ValueError(
        f"The {name} dataset has columns {sorted(columns)}, none of which DistillationTrainer can train on. Provide "
        f"one of: a '{args.dataset_text_field}' column (language modeling; set `dataset_text_field` to use another "
        "column), 'prompt' + 'completion' columns, a 'messages' column (conversational), a tokenized 'input_ids' "
        "column, or a `formatting_func`."
    )


class DistillationTrainer(SFTTrainer):
    """Distil a teacher into a student with the SFTTrainer interface.

    Change `SFTTrainer`/`SFTConfig` to `DistillationTrainer`/[`DistillationConfig`] and pass `teacher_model=`:
    everything SFTTrainer accepts keeps working, and the loss becomes
    `alpha * CE + (1 - alpha) * temperature**2 * divergence(student || teacher)` over the same tokens SFT trains on
    (so `completion_only_loss` and `assistant_only_loss` masks apply to the distillation term too).

    The loss never builds full `[tokens, vocab]` logits for both models: both LM heads are applied a chunk of tokens at
    a time (see [`chunked_distillation_loss`]).

    Args:
        model (`str` or [`~transformers.PreTrainedModel`] or `peft.PeftModel`):
            The student, as in `SFTTrainer`.
        teacher_model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            The teacher, loaded or as a name/path. Defaults to `args.teacher_model_name_or_path`.
        args ([`DistillationConfig`], *optional*):
            Configuration; a plain `SFTConfig`/`TrainingArguments` is converted.
        teacher_processing_class (`PreTrainedTokenizerBase`, *optional*):
            The teacher's tokenizer, to check it matches the student's. Loaded from the teacher's path when possible.
        **kwargs:
            Every other `SFTTrainer` argument (`train_dataset`, `eval_dataset`, `processing_class`, `peft_config`,
            `data_collator`, `callbacks`, `formatting_func`, ...).
    """

    _tag_names = ["trl", "sft", "distillation", "hf_distill"]
    _name = "Distillation"

    def __init__(
        self,
        model: str | PreTrainedModel | nn.Module,
        teacher_model: str | PreTrainedModel | nn.Module | None = None,
        args: DistillationConfig | TrainingArguments | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset] | None = None,
        teacher_processing_class: Any = None,
        formatting_func: Callable[[dict], str] | None = None,
        **kwargs: Any,
    ):
        args = self._coerce_args(args, model)
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError(
                "DistillationTrainer needs a teacher: pass `teacher_model=` (a model or a name/path) or set "
                "`teacher_model_name_or_path` in DistillationConfig."
            )
        has_formatting_func = formatting_func is not None
        check_dataset_columns(train_dataset, args, has_formatting_func, "train")
        check_dataset_columns(eval_dataset, args, has_formatting_func, "eval")

        teacher_source = teacher_model if isinstance(teacher_model, str) else None
        if isinstance(teacher_model, str):
            teacher_model = load_teacher(teacher_model, args.teacher_model_init_kwargs)
        elif args.teacher_model_init_kwargs:
            raise ValueError(
                "`teacher_model_init_kwargs` only applies when the teacher is given by name or path, but "
                "`teacher_model` is already a loaded model. Load it with those arguments yourself, or pass its path."
            )

        super().__init__(
            model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, formatting_func=formatting_func,
            **kwargs,
        )  # fmt: skip

        if args.disable_dropout:
            disable_dropout_in_model(self.model)
        self._forward_redirection = _ForwardRedirection()

        if teacher_processing_class is None:
            # The teacher's own repository/directory; for a loaded teacher only a local directory (no download)
            source = teacher_source or getattr(getattr(teacher_model, "config", None), "_name_or_path", None)
            if source and (teacher_source or os.path.isdir(source)):
                teacher_processing_class = try_load_tokenizer(source)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        teacher_tokenizer = getattr(teacher_processing_class, "tokenizer", teacher_processing_class)
        student_head = LMHead.from_model(unwrap_peft(self.model))
        teacher_head = LMHead.from_model(teacher_model)
        self.distill_vocab_size = resolve_distill_vocab_size(
            student_head.vocab_rows,
            teacher_head.vocab_rows,
            tokenizer=tokenizer,
            teacher_tokenizer=teacher_tokenizer,
            requested=args.distill_vocab_size,
        )
        self.teacher_model = self._place_teacher(freeze(teacher_model))

    @staticmethod
    def _coerce_args(args: Any, model: Any) -> DistillationConfig:
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            return DistillationConfig(f"{(name or 'model').rstrip('/').split('/')[-1]}-Distill")
        if isinstance(args, DistillationConfig):
            return args
        if isinstance(args, TrainingArguments):
            values = args.to_dict()
            values["hub_token"] = args.hub_token
            return DistillationConfig(**values)
        raise TypeError(f"`args` must be a DistillationConfig, got {type(args).__name__}.")

    def _place_teacher(self, teacher: nn.Module) -> nn.Module:
        if self.args.teacher_device is not None:
            return teacher.to(self.args.teacher_device)
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            return prepare_deepspeed(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # The loss ------------------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Distillation loss of one micro-batch, normalised by `num_items_in_batch` when given."""
        mode = "train" if model.training else "eval"
        unwrapped = self.accelerator.unwrap_model(model)
        # Run the whole loss inside the wrapper's forward (DDP/FSDP see every parameter it uses, `lm_head` included)
        result: DistillationLossOutput = self._forward_redirection(
            model, unwrapped, self._distillation_loss, unwrapped, inputs, num_items_in_batch
        )
        loss = result.loss
        # Like SFTTrainer: `num_items_in_batch` counts the tokens of every rank, and DDP averages the gradients
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and model.training:
            loss = loss * self.accelerator.num_processes
        self._record_metrics(mode, result, inputs)
        if return_outputs:
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss

    def _distillation_loss(
        self, student: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None
    ) -> DistillationLossOutput:
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", "seq_lengths")}
        student_hidden = last_hidden_state(student, model_inputs)
        with torch.no_grad():
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            teacher_hidden = last_hidden_state(teacher, model_inputs)
        if "shift_labels" in inputs:  # pre-shifted (context/sequence parallelism)
            targets = inputs["shift_labels"]
        else:
            student_hidden, teacher_hidden, targets = student_hidden[:, :-1], teacher_hidden[:, :-1], labels[:, 1:]
        mask = targets != -100
        student_head = LMHead.from_model(unwrap_peft(student))
        device = student_head.weight.device
        mask = mask.to(student_hidden.device)
        return chunked_distillation_loss(
            student_hidden[mask].to(device),
            student_head,
            HiddenStateTeacher(teacher_hidden[mask.to(teacher_hidden.device)], LMHead.from_model(teacher), device),
            targets.to(student_hidden.device)[mask].to(device),
            divergence=self.args.divergence,
            temperature=self.args.temperature,
            alpha=self.args.alpha,
            beta=self.args.beta,
            skew_alpha=self.args.skew_alpha,
            vocab_size=self.distill_vocab_size,
            num_items_in_batch=num_items_in_batch,
            chunk_size=self.args.loss_chunk_size,
        )

    def _record_metrics(self, mode: str, result: DistillationLossOutput, inputs: dict[str, torch.Tensor]) -> None:
        device = result.loss.device
        local = torch.stack(
            [
                result.distill_sum.to(device, torch.float32),
                (result.ce_sum if result.ce_sum is not None else torch.zeros((), device=device)).to(torch.float32),
                result.agree_count.to(device, torch.float32),
                (result.correct_count if result.correct_count is not None else torch.zeros((), device=device)).to(
                    device, torch.float32
                ),
                torch.tensor(float(result.num_tokens), device=device),
            ]
        )
        # `gather`, not `gather_for_metrics`: the latter trims the last evaluation batch by sample count
        totals = self.accelerator.gather(local.unsqueeze(0)).sum(0)
        n = totals[4].item()
        if n > 0:
            for name, value in zip(_METRIC_NAMES, totals[:4].tolist()):
                self._metrics[mode][name].append(value / n)
        if mode == "train":
            if "attention_mask" in inputs:
                seen = inputs["attention_mask"].sum()
            else:
                seen = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
            self._total_train_tokens += int(self.accelerator.gather(seen.reshape(1)).sum().item())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

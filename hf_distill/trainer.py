"""`DistillationTrainer`: TRL's `SFTTrainer` with a teacher, for logit distillation.

One training step: batch -> student forward (last hidden states; autocast, PEFT, images and the MoE aux loss as in the
model's own forward) -> teacher forward (no grad) -> chunked loss over the labelled tokens
(`alpha * CE + (1 - alpha) * T^2 * divergence`, both LM heads applied a chunk at a time) -> backward.
Everything else (dataset formats, packing, masks, PEFT, gradient checkpointing, mixed precision, logging, saving) is
SFTTrainer's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import EvalPrediction, PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, TrainingArguments
from transformers.utils import logging
from trl import SFTTrainer
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import disable_dropout_in_model

from .config import DistillationConfig
from .dataset_checks import check_dataset_columns
from .losses import DistillationLossOutput, HiddenStateTeacher, LMHead, TopKTeacher, chunked_distillation_loss
from .metrics import DistillationMetricsMixin
from .model_card import write_model_card
from .model_forward import forward_hidden_states, unwrap_peft
from .on_policy import OnPolicyGenerator, OnPolicyTrainingMixin, add_empty_completions, is_prompt_only
from .resumable import ResumableTrainerMixin
from .teachers.cache import TeacherCache
from .teachers.cached import open_training_cache, write_training_cache
from .teachers.cached_batches import CACHED_TARGETS_KEY, CachedBatchTargets, cache_collator, fetch_cached_targets
from .teachers.live import (
    check_modalities,
    freeze,
    load_teacher,
    separate_from_student,
    student_config,
    teacher_init_kwargs,
    try_load_tokenizer,
)
from .teachers.placement import place_teacher, teacher_lm_head
from .teachers.vocab import check_teacher_can_read, resolve_distill_vocab_size, teacher_input_limit

logger = logging.get_logger(__name__)

__all__ = ["DistillationTrainer", "check_dataset_columns"]


class DistillationTrainer(ResumableTrainerMixin, OnPolicyTrainingMixin, DistillationMetricsMixin, SFTTrainer):
    """Distil a teacher into a student with the SFTTrainer interface.

    Change `SFTTrainer`/`SFTConfig` to `DistillationTrainer`/[`DistillationConfig`] and pass `teacher_model=`:
    everything SFTTrainer accepts keeps working, and the loss becomes
    `alpha * CE + (1 - alpha) * temperature**2 * divergence(student || teacher)` over the same tokens SFT trains on
    (so `completion_only_loss` and `assistant_only_loss` masks apply to the distillation term too).

    The loss never builds full `[tokens, vocab]` logits for both models: both LM heads are applied a chunk of tokens at
    a time (see [`chunked_distillation_loss`]).

    Runs can be resumed after any crash: checkpoints appear only once complete, `train(resume_from_checkpoint="auto")`
    picks the newest complete one, and a [`CheckpointResumer`] (added by default; remove it with
    `trainer.remove_callback(CheckpointResumer)`) saves and raises [`TrainingPreempted`] on SIGTERM/SIGINT/SIGUSR1.
    See `docs/resume.md`.

    Args:
        model (`str` or [`~transformers.PreTrainedModel`] or `peft.PeftModel`):
            The student, as in `SFTTrainer`: a loaded model (dense, MoE, vision-language, PEFT-wrapped) or a name/path
            loaded with `args.model_init_kwargs`.
        teacher_model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            The teacher, loaded or as a name/path. Defaults to `args.teacher_model_name_or_path`. A teacher given by
            name/path follows the student's `dtype`, `attn_implementation`, `revision` and `trust_remote_code` unless
            `args.teacher_model_init_kwargs` sets them. The student itself (self-distillation) is copied.
        args ([`DistillationConfig`], *optional*):
            Configuration; a plain `SFTConfig`/`TrainingArguments` is converted with every field kept.
        data_collator:
            As in `SFTTrainer`.
        train_dataset:
            As in `SFTTrainer`.
        eval_dataset:
            As in `SFTTrainer`.
        processing_class:
            As in `SFTTrainer`.
        compute_metrics:
            As in `SFTTrainer`.
        callbacks:
            As in `SFTTrainer`.
        optimizers:
            As in `SFTTrainer`.
        optimizer_cls_and_kwargs:
            As in `SFTTrainer`.
        preprocess_logits_for_metrics:
            As in `SFTTrainer`.
        quantization_config:
            As in `SFTTrainer`.
        peft_config:
            As in `SFTTrainer`.
        formatting_func:
            As in `SFTTrainer`.
        compute_loss_func (`Callable`, *optional*):
            Not supported (the loss is the distillation loss): passing one raises a `ValueError`.
        teacher_processing_class (`PreTrainedTokenizerBase` or `ProcessorMixin`, *optional*):
            The teacher's tokenizer or processor, to check that it matches the student's. Found from the teacher's
            name/path when possible; without it a warning says the vocabularies could not be checked.
    """

    _tag_names = ["trl", "sft", "distillation", "hf_distill"]
    _name = "Distillation"

    def __init__(
        self,
        model: str | PreTrainedModel | nn.Module,
        teacher_model: str | PreTrainedModel | nn.Module | None = None,
        args: DistillationConfig | TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | Any | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        quantization_config: Any = None,
        peft_config: Any = None,
        formatting_func: Callable[[dict], str] | None = None,
        teacher_processing_class: PreTrainedTokenizerBase | Any | None = None,
    ):
        args = self._coerce_args(args, model)
        if compute_loss_func is not None:
            raise ValueError(
                "`compute_loss_func` is not supported by DistillationTrainer: its loss is the distillation loss "
                "(`alpha * CE + (1 - alpha) * T^2 * divergence`). Choose the divergence and CE options in "
                "DistillationConfig, or subclass DistillationTrainer and override `compute_loss`."
            )
        if args.teacher_cache is not None:
            if teacher_model is not None:
                raise ValueError(
                    "Pass either a `teacher_model` or a `teacher_cache`, not both: with a cache no teacher is loaded."
                )
            self._teacher_name_or_path = args.teacher_model_name_or_path  # only named in the model card
        else:
            teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
            if teacher_model is None:
                raise ValueError(
                    "DistillationTrainer needs a teacher: pass `teacher_model=` (a model or a name/path), set "
                    "`teacher_model_name_or_path` in DistillationConfig, or give a `teacher_cache`."
                )
        has_formatting_func = formatting_func is not None
        prompt_only = is_prompt_only(train_dataset)
        if args.lmbda is None:  # a prompt-only dataset has nothing but generated completions to train on
            args.lmbda = 1.0 if prompt_only else 0.0
        if prompt_only:
            if args.lmbda < 1.0 and not args.seq_kd:
                raise ValueError(
                    f"The train dataset has prompts and no completions, so every batch needs generated completions, "
                    f"but `lmbda={args.lmbda}` trains on the dataset's completions in the other batches. Use "
                    "`lmbda=1.0` (on-policy), `seq_kd=True` (the teacher's completions otherwise), or add a "
                    "'completion' column."
                )
            train_dataset = add_empty_completions(train_dataset)
        if is_prompt_only(eval_dataset):
            eval_dataset = add_empty_completions(eval_dataset)
        check_dataset_columns(train_dataset, args, has_formatting_func, "train")
        check_dataset_columns(eval_dataset, args, has_formatting_func, "eval")

        teacher_kwargs = teacher_init_kwargs(model, args)
        if teacher_model is None:
            pass
        elif isinstance(teacher_model, str):
            self._teacher_name_or_path = teacher_model
            teacher_model = load_teacher(teacher_model, teacher_kwargs)
        elif args.teacher_model_init_kwargs:
            raise ValueError(
                "`teacher_model_init_kwargs` only applies when the teacher is given by name or path, but "
                "`teacher_model` is already a loaded model. Load it with those arguments yourself, or pass its path."
            )
        else:
            self._teacher_name_or_path = getattr(getattr(teacher_model, "config", None), "_name_or_path", None)
        if teacher_model is not None:
            teacher_model = separate_from_student(teacher_model, model)
            # Before anything is moved or trained (a student given by name: from its config alone)
            check_modalities(model if isinstance(model, nn.Module) else student_config(model, args), teacher_model)

        super().__init__(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        self.install_resumer()
        if args.disable_dropout:
            disable_dropout_in_model(self.model)
        self._forward_redirection = _ForwardRedirection()
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        student_head = LMHead.from_model(unwrap_peft(self.model))
        self.teacher_cache: TeacherCache | None = None
        self._generator = None
        if teacher_model is None:  # the teacher's targets come from a cache
            if args.uses_generation:
                raise ValueError(
                    "Generated completions (`lmbda > 0`, `seq_kd=True`, or a prompt-only dataset) need a live teacher "
                    "to score them; a teacher cache only covers the dataset's own completions."
                )
            self.teacher_cache = open_training_cache(args.teacher_cache, args, tokenizer, student_head.vocab_rows)
            # The lookup runs in the collator, off the step; evaluation's rows must be in the cache too (checked now)
            self.data_collator = cache_collator(self.data_collator, self.teacher_cache, self.eval_dataset, args)
            self.distill_vocab_size = self.teacher_cache.vocab_size
            self._teacher_name_or_path = self._teacher_name_or_path or self.teacher_cache.key.get("teacher")
            self._teacher_input_limit = None
            self.teacher_model = None
            return
        check_modalities(self.model, teacher_model)
        if teacher_processing_class is None:
            revision = teacher_kwargs.get("revision") if isinstance(self._teacher_name_or_path, str) else None
            teacher_processing_class = try_load_tokenizer(self._teacher_name_or_path, revision)
        teacher_tokenizer = getattr(teacher_processing_class, "tokenizer", teacher_processing_class)
        teacher_head = LMHead.from_model(teacher_model)
        self.distill_vocab_size = resolve_distill_vocab_size(
            student_head.vocab_rows,
            teacher_head.vocab_rows,
            tokenizer=tokenizer,
            teacher_tokenizer=teacher_tokenizer,
            requested=args.distill_vocab_size,
            teacher_config=getattr(teacher_model, "config", None),
        )
        self._teacher_input_limit = teacher_input_limit(teacher_model, teacher_tokenizer, unwrap_peft(self.model))
        self.teacher_model = place_teacher(freeze(teacher_model), self.accelerator, args.teacher_device)
        if args.uses_generation:
            self._generator = OnPolicyGenerator(args, self.processing_class, self.distill_vocab_size)

    @staticmethod
    def _coerce_args(args: Any, model: Any) -> DistillationConfig:
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            return DistillationConfig(f"{(name or 'model').rstrip('/').split('/')[-1]}-Distill")
        if isinstance(args, DistillationConfig):
            return args
        if isinstance(args, TrainingArguments):
            values = args.to_dict()
            # `to_dict` masks every `*_token` field (hub_token, but also SFTConfig's eos_token / pad_token)
            for name in values:
                if name.endswith("_token"):
                    values[name] = getattr(args, name)
            return DistillationConfig(**values)
        raise TypeError(f"`args` must be a DistillationConfig, got {type(args).__name__}.")

    # The teacher cache ------------------------------------------------------------------------------------------

    def write_teacher_cache(
        self,
        root: str,
        *,
        k: int,
        logprob_bits: int = 8,
        batch_size: int | None = None,
        rows_per_shard: int = 1024,
        show_progress: bool = True,
        tail_samples: int = 0,
        seed: int = 0,
        include_eval: bool = True,
    ) -> TeacherCache:
        """Run the teacher once over the prepared training set (and `eval_dataset`, if any, with `include_eval`) and
        store its top-k log-probs for later runs.

        The rows are this trainer's own (same tokenisation, truncation, masks and collator), so a run with
        `DistillationConfig(teacher_cache=cache.path)` finds every batch row in the cache and loads no teacher. The
        cache lands in `root/<key hash>/`: rerunning with the same inputs reuses it without a teacher forward, and an
        interrupted write resumes. `tail_samples > 0` samples that many of the k ids from the teacher's tail (an
        unbiased target, forward KL only). See [`write_training_cache`] for the arguments.

        Returns:
            [`TeacherCache`]: The complete cache (`cache.path` is the folder to train from).
        """
        options = dict(logprob_bits=logprob_bits, batch_size=batch_size, rows_per_shard=rows_per_shard, seed=seed)
        options.update(show_progress=show_progress, tail_samples=tail_samples, include_eval=include_eval)
        return write_training_cache(self, root, k=k, **options)

    # The loss ------------------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Distillation loss of one micro-batch, normalised by `num_items_in_batch` when given.

        MoE students add `router_aux_loss_coef * aux_loss` exactly as `SFTTrainer` does (averaged over the
        accumulation steps), and log `aux_loss`.
        """
        mode = "train" if model.training else "eval"
        unwrapped = self.accelerator.unwrap_model(model)
        # Run the whole loss inside the wrapper's forward (DDP/FSDP see every parameter it uses, `lm_head` included)
        result, aux_loss = self._forward_redirection(
            model, unwrapped, self._distillation_loss, unwrapped, inputs, num_items_in_batch
        )
        loss = result.loss
        # Like SFTTrainer: `num_items_in_batch` counts the tokens of every rank, and DDP averages the gradients
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and model.training:
            loss = loss * self.accelerator.num_processes
        if aux_loss is not None:
            # Like SFTTrainer: a per-micro-batch mean, averaged over the accumulation steps when `Trainer` leaves
            # gradient accumulation to the loss
            steps = self._accumulation_steps() if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device) / steps
            gathered = self.accelerator.gather_for_metrics(aux_loss.detach().reshape(1))
            self._metrics[mode]["aux_loss"].append(gathered.mean().item())
        self._record_metrics(mode, result, inputs, num_items_in_batch)
        if return_outputs:
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss

    def _distillation_loss(
        self, student: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None
    ) -> tuple[DistillationLossOutput, torch.Tensor | None]:
        cached = inputs.pop(CACHED_TARGETS_KEY, None)  # added by the cache's collator, not a model input
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", "seq_lengths")}
        pre_shifted = "shift_labels" in inputs  # context/sequence parallelism
        # The same autocast accelerate wraps the prepared model's forward in: the forward redirection above replaced
        # that forward, and a teacher on its own device was never prepared
        with self.accelerator.autocast():
            router_logits = True if self.aux_loss_enabled else None  # like SFTTrainer
            student_out = forward_hidden_states(student, model_inputs, output_router_logits=router_logits)
            student_hidden = student_out.hidden
            if pre_shifted:
                targets = inputs["shift_labels"]
            else:
                student_hidden, targets = student_hidden[:, :-1], labels[:, 1:]
            mask = (targets != -100).to(student_hidden.device)
            student_head = LMHead.from_model(unwrap_peft(student))
            device = student_head.weight.device
            teacher = self._teacher_targets(model_inputs, labels, mask, pre_shifted, device, cached)
            args = self.args
            result = chunked_distillation_loss(
                student_hidden[mask].to(device),
                student_head,
                teacher,
                targets.to(student_hidden.device)[mask].to(device),
                divergence=args.divergence,
                temperature=args.temperature,
                alpha=args.alpha,
                beta=args.beta if args.beta is not None else 0.5,
                skew_alpha=args.skew_alpha,
                vocab_size=self.distill_vocab_size,
                num_items_in_batch=num_items_in_batch,
                chunk_size=args.loss_chunk_size,
                label_smoothing=args.label_smoothing_factor if args.loss_type == "nll" else 0.0,
                ce_loss_type=args.loss_type,
                sparse_targets=args.sparse_targets,
                labels_all_scored=True,  # selected with `mask` above
            )
        return result, (student_out.aux_loss if self.aux_loss_enabled else None)

    def _teacher_targets(
        self,
        model_inputs: dict[str, torch.Tensor],
        labels: torch.Tensor,
        mask: torch.Tensor,
        pre_shifted: bool,
        device: torch.device,
        cached: CachedBatchTargets | None = None,
    ) -> HiddenStateTeacher | TopKTeacher:
        """The teacher's side of the loss for the selected positions: cached top-k targets, or a live forward."""
        if self.teacher_cache is not None:  # fetched by the collator; here only for batches that bypassed it
            if cached is None:
                attention_mask = model_inputs.get("attention_mask")
                cached = fetch_cached_targets(
                    self.teacher_cache, model_inputs["input_ids"], labels, attention_mask, pre_shifted
                )
            return cached.to_teacher(device)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        check_teacher_can_read(model_inputs.get("input_ids"), self._teacher_input_limit, tokenizer)
        with torch.no_grad():
            hidden = forward_hidden_states(teacher, model_inputs).hidden
        if not pre_shifted:
            hidden = hidden[:, :-1]
        return HiddenStateTeacher(hidden[mask.to(hidden.device)], teacher_lm_head(teacher), device)

    # Saving --------------------------------------------------------------------------------------------------------

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        *,
        output_dir: str | None = None,
    ) -> None:
        """Write `README.md` and the `training_curves.png` plot into `output_dir`: the teacher, the student's origin,
        the distillation settings, the evaluation metrics (also as a `model-index`), the command that started the
        run and the library versions.

        Called with every checkpoint and by `save_model` (so the final save has a card too); `dataset_name` and
        `tags` given once are remembered for the cards written later. Override it to change or skip the card.

        Args:
            model_name (`str`, *optional*): Name of the model (default: the last part of `hub_model_id`, else the
                output folder's name).
            dataset_name (`str`, *optional*): Hub id of the training dataset (`datasets` metadata).
            tags (`str` or `list[str]`, *optional*): Extra tags.
            output_dir (`str`, *optional*): Folder to write into (default: `args.output_dir`).
        """
        if not self.is_world_process_zero():
            return
        if dataset_name is not None:
            self._card_dataset_name = dataset_name
        if tags is not None:
            self._card_tags = [tags] if isinstance(tags, str) else list(tags)
        if model_name is None:
            hub_model_id = self.args.hub_model_id
            model_name = hub_model_id.split("/")[-1] if hub_model_id else None
        model_tags = getattr(unwrap_peft(self.model), "model_tags", None) or []
        write_model_card(
            self,
            output_dir or self.args.output_dir,
            model_name=model_name,
            dataset_name=getattr(self, "_card_dataset_name", None),
            tags=[*self._tag_names, *model_tags, *getattr(self, "_card_tags", [])],
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the student as `Trainer.save_model` does, then write its model card and training-curves plot beside
        it (main process only; checkpoints get one too)."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            self.create_model_card(output_dir=output_dir or self.args.output_dir)

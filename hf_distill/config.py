"""`DistillationConfig`: every distillation knob, on top of TRL's `SFTConfig`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from .config_signals import TeacherSignalFields
from .config_vllm import VLLMFields
from .losses.divergences import DIVERGENCE_NAMES

DEFAULT_BETA = 0.5


def check_device_exists(device: str, name: str) -> None:
    """Raise a clear error when `device` is not a device string torch knows, or names a device this machine lacks.

    Raises:
        ValueError: If the device cannot be parsed or is not available here.
    """
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"`{name}={device!r}` is not a device torch knows ({error}). Use e.g. 'cpu', 'cuda', 'cuda:1', 'mps' or "
            "'xpu:0'."
        ) from None
    if parsed.type == "cpu":
        return
    backend = getattr(torch, parsed.type, None)
    available = bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())
    if not available:
        raise ValueError(
            f"`{name}={device!r}` asks for a {parsed.type} device, but none is available on this machine. Use 'cpu' "
            "or leave it unset to share the student's device."
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(
            f"`{name}={device!r}` names {parsed.type} device {parsed.index}, but this machine has {count} "
            f"({', '.join(f'{parsed.type}:{i}' for i in range(count))})."
        )


def _accelerator_supports_bf16() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available

    return bool(is_torch_bf16_gpu_available())


@dataclass
class DistillationConfig(VLLMFields, TeacherSignalFields, SFTConfig):
    r"""Configuration for [`DistillationTrainer`]: an [`~trl.SFTConfig`] plus the distillation parameters.

    Everything `SFTConfig` accepts works unchanged (dataset formats, packing, `completion_only_loss`,
    `assistant_only_loss`, PEFT, gradient checkpointing, bf16/fp16). The training loss is

    `alpha * CE(student, labels) + (1 - alpha) * temperature**2 * D(student || teacher at temperature)`,

    averaged over the tokens that carry a label (the same tokens SFT trains on), with exact normalisation under
    gradient accumulation.

    Parameters:
        teacher_model_name_or_path (`str`, *optional*):
            Name or local path of the teacher, loaded with `AutoModelForCausalLM.from_pretrained` when the trainer is
            not given a `teacher_model`.
        teacher_model_init_kwargs (`dict[str, Any]` or `str`, *optional*):
            Keyword arguments for the teacher's `from_pretrained` (e.g. `{"dtype": "bfloat16"}`; a JSON string on the
            command line). `dtype` accepts `"bfloat16"`, `"float16"`, `"float32"` or `"auto"`. A teacher given by
            name or path follows the student's `dtype`, `attn_implementation`, `revision` and `trust_remote_code`
            (from `model_init_kwargs`, or from the loaded student); values set here win.
        teacher_device (`str`, *optional*):
            Device the teacher runs on (e.g. `"cuda:1"` or `"cpu"`). By default it shares the student's device. Its
            hidden states are moved to the student's device for the loss. A device this machine does not have is
            refused when the config is built.
        divergence (`str`, *optional*):
            Distillation divergence: `"forward_kl"` (KL(teacher || student)), `"reverse_kl"`, `"generalized_jsd"`
            (uses `beta`), `"total_variation"`, `"skew_kl"` or `"skew_reverse_kl"` (use `skew_alpha`). Default:
            `"generalized_jsd"` when `beta` is set (as in TRL's GKD and DistillationTrainer, whose loss is the
            generalized JSD), else `"forward_kl"`.
        beta (`float`, *optional*):
            Teacher weight of the generalized JSD mixture, in `[0, 1]`: `0` is forward KL, `1` reverse KL (as in TRL).
            Setting it selects `divergence="generalized_jsd"` (a ported TRL script keeps its meaning); with another
            divergence it is refused. Defaults to `0.5` with the generalized JSD, and stays `None` otherwise.
        skew_alpha (`float`, *optional*, defaults to `0.1`):
            Skew of the skew KL divergences (DistiLLM), in `[0, 1)`.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature applied to both student and teacher logits in the distillation term; the term is
            multiplied by `temperature**2` so its gradient scale does not depend on it.
        alpha (`float`, *optional*, defaults to `0.0`):
            Weight of the hard-label cross-entropy, in `[0, 1]`; the distillation term gets `1 - alpha`. `0` is pure
            distillation, `1` is plain SFT (the teacher is then only used for logging).
        distill_vocab_size (`int`, *optional*):
            Number of leading vocabulary columns compared. By default: all of them when both LM heads have the same
            number of rows, else the tokenizer's length (models of one family often pad their embedding matrices to
            different sizes, e.g. 151936 vs 152064 rows for one tokenizer).
        loss_chunk_size (`int`, *optional*):
            Tokens per chunk of the loss. By default chosen so that one float32 `[chunk, vocab]` logits tile is about
            16 MiB (at least 64 tokens). Smaller chunks lower peak memory; larger ones can be a little faster.
        disable_dropout (`bool`, *optional*, defaults to `True`):
            Whether to disable dropout in the student (the teacher always runs in eval mode).
        teacher_cache (`str`, *optional*):
            Folder of a teacher cache made by `hf-distill cache-teacher` (or
            `DistillationTrainer.write_teacher_cache`): the loss then uses the cached top-k teacher log-probs and no
            teacher model is loaded. The cache must match the training set-up (tokenizer, max length, packing, masks,
            temperature); a mismatch is a clear error.
        sparse_targets (`str`, *optional*, defaults to `"bucket"`):
            With a teacher cache, how the teacher mass outside the top-k is treated: `"bucket"` keeps it as one
            "rest" bucket, `"renormalize"` renormalises both distributions over the top-k (see the losses docs).
        lmbda (`float`, *optional*):
            Probability that a batch trains on the student's own generations (on-policy distillation, GKD's `lmbda`).
            Default: `1.0` for a prompt-only dataset (nothing else to train on), else `0.0`.
        seq_kd (`bool`, *optional*, defaults to `False`):
            Sequence-level KD: batches that do not use the student's generations train on the teacher's.
        max_new_tokens (`int`, *optional*, defaults to `128`):
            Tokens generated per completion. `max_completion_length` (trl.DistillationTrainer's name) is the same
            setting.
        generation_temperature (`float`, *optional*):
            Sampling temperature of generated completions; by default `temperature` (as in trl.DistillationTrainer;
            GKD's `temperature` is only a sampling temperature: set `generation_temperature` for that meaning).
        top_p, top_k, min_p, repetition_penalty, generation_kwargs:
            Sampling settings of generated completions, as in trl.DistillationTrainer (`top_k=0`: off).
        use_vllm (`bool`, *optional*, defaults to `False`):
            Generate the student's on-policy completions with vLLM instead of `transformers` `generate` (needs
            `pip install vllm` and `lmbda > 0`; not with `seq_kd`). `vllm_mode` (`"colocate"` or `"server"`) and the
            other `vllm_*` fields have trl.DistillationConfig's names and defaults (see `docs/on_policy.md`).

    SFT's cross-entropy options act on the hard-label term: `label_smoothing_factor` and `loss_type="dft"` change the
    `alpha`-weighted cross-entropy exactly as they change `SFTTrainer`'s loss (and need `alpha > 0`).

    Unlike `SFTConfig`, an unset `bf16` stays off on machines without a bf16-capable accelerator (TRL turns it on
    and then refuses to run on a CPU-only machine unless `use_cpu=True`).
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs", "generation_kwargs"]

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Name or local path of the teacher model (used when no `teacher_model` is passed)."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments (dict or JSON string) for the teacher's `from_pretrained`."},
    )
    teacher_device: str | None = field(
        default=None,
        metadata={"help": "Device for the teacher, e.g. 'cuda:1' or 'cpu'. Default: the student's device."},
    )
    divergence: str | None = field(
        default=None,
        metadata={
            "help": "Distillation divergence (default: generalized_jsd when `beta` is set, else forward_kl).",
            "choices": list(DIVERGENCE_NAMES),
        },
    )
    beta: float | None = field(
        default=None,
        metadata={
            "help": "Generalized JSD teacher weight in [0, 1]: 0 = forward KL, 1 = reverse KL. Setting it selects "
            "divergence=generalized_jsd (default 0.5 there)."
        },
    )
    skew_alpha: float = field(default=0.1, metadata={"help": "Skew of the skew (reverse) KL, in [0, 1)."})
    temperature: float = field(
        default=1.0,
        metadata={"help": "Distillation temperature (> 0); the term is scaled by temperature**2."},
    )
    alpha: float = field(
        default=0.0,
        metadata={"help": "Weight of the hard-label cross-entropy in [0, 1]; distillation gets 1 - alpha."},
    )
    distill_vocab_size: int | None = field(
        default=None,
        metadata={"help": "Leading vocabulary columns compared (default: shared rows, or the tokenizer length)."},
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per loss chunk (default: ~16 MiB float32 logits tiles, >= 64 tokens)."},
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in the student."})

    def __post_init__(self):
        if isinstance(self.teacher_model_init_kwargs, str):
            try:
                self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"`teacher_model_init_kwargs` must be a dict or a JSON object string, got "
                    f"{self.teacher_model_init_kwargs!r} ({error})."
                ) from None
        self._resolve_divergence()
        self._validate_distillation_fields()
        self._validate_signal_fields()
        self._validate_vllm_fields()
        if self.bf16 is None and not self.fp16 and not self.use_cpu and not _accelerator_supports_bf16():
            # TRL turns bf16 on by default, which fails outright on a machine without a bf16 accelerator
            self.bf16 = False
        super().__post_init__()

    def _resolve_divergence(self) -> None:
        # TRL's GKD and DistillationTrainer lose with the generalized JSD of `beta`: a ported script that sets `beta`
        # keeps that meaning instead of having it silently ignored by another divergence
        if self.divergence is None:
            self.divergence = "generalized_jsd" if self.beta is not None else "forward_kl"
        if self.divergence == "generalized_jsd":
            self.beta = DEFAULT_BETA if self.beta is None else self.beta
        elif self.beta is not None:
            raise ValueError(
                f"`beta={self.beta}` is the teacher weight of the generalized JSD, but `divergence="
                f"{self.divergence!r}` does not use it. Drop `beta`, or set `divergence='generalized_jsd'` (what "
                "TRL's GKD and DistillationTrainer use)."
            )

    def _validate_distillation_fields(self) -> None:
        if self.divergence not in DIVERGENCE_NAMES:
            raise ValueError(
                f"`divergence={self.divergence!r}` is not supported. Choose one of: {', '.join(DIVERGENCE_NAMES)}."
            )
        if not self.temperature > 0:
            raise ValueError(
                f"`temperature` must be > 0, got {self.temperature}. Use 1.0 for the plain distributions; values "
                "above 1 soften them."
            )
        if self.beta is not None and not 0.0 <= self.beta <= 1.0:
            raise ValueError(
                f"`beta` must be in [0, 1], got {self.beta}. It is the teacher's weight in the generalized JSD "
                "mixture: 0 gives forward KL, 1 gives reverse KL."
            )
        if not 0.0 <= self.skew_alpha < 1.0:
            raise ValueError(f"`skew_alpha` must be in [0, 1), got {self.skew_alpha}. DistiLLM uses 0.1.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"`alpha` must be in [0, 1], got {self.alpha}. It weights the hard-label cross-entropy; the "
                "distillation term gets 1 - alpha."
            )
        if self.distill_vocab_size is not None and self.distill_vocab_size <= 0:
            raise ValueError(f"`distill_vocab_size` must be a positive integer, got {self.distill_vocab_size}.")
        if self.loss_chunk_size is not None and self.loss_chunk_size <= 0:
            raise ValueError(f"`loss_chunk_size` must be a positive integer, got {self.loss_chunk_size}.")
        if self.teacher_model_init_kwargs is not None and not isinstance(self.teacher_model_init_kwargs, dict):
            raise ValueError(
                f"`teacher_model_init_kwargs` must be a dict, got {type(self.teacher_model_init_kwargs).__name__}."
            )
        if self.teacher_device is not None:
            check_device_exists(self.teacher_device, "teacher_device")
        if self.alpha == 0.0 and self.label_smoothing_factor > 0:
            raise ValueError(
                f"`label_smoothing_factor={self.label_smoothing_factor}` smooths the hard-label cross-entropy, which "
                "`alpha=0.0` turns off (the loss is pure distillation: the teacher's distribution is already soft). "
                "Set `alpha > 0` to mix in a smoothed cross-entropy, or drop `label_smoothing_factor`."
            )
        if self.alpha == 0.0 and self.loss_type == "dft":
            raise ValueError(
                "`loss_type='dft'` reweights the hard-label cross-entropy, which `alpha=0.0` turns off (the loss is "
                "pure distillation). Set `alpha > 0` to mix in a DFT cross-entropy, or use `loss_type='nll'`."
            )

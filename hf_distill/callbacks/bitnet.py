"""`BitNetCallback`: ternary (1.58-bit) quantization-aware training for any `Trainer`."""

from __future__ import annotations

import logging
from collections.abc import Callable

from transformers import TrainerCallback

from ..bitnet.convert import BitNetConversion, convert_to_bitnet, set_bitnet_lambda
from ..bitnet.schedule import LambdaSchedule

logger = logging.getLogger(__name__)


class BitNetCallback(TrainerCallback):
    """Converts the student to BitNet b1.58 when the trainer is built, and drives the lambda warm-up.

    Works with [`DistillationTrainer`], TRL's `SFTTrainer` and plain `transformers.Trainer`:
    `Trainer(..., callbacks=[BitNetCallback()])`. At `on_init_end` (before the optimizer exists) every `nn.Linear`
    of the model except the output head (and `modules_to_not_convert`) becomes a [`BitLinear`] sharing the same
    parameters; embeddings and norms stay in full precision. Before every optimizer step the lambdas are set from
    the schedules, as a function of `state.global_step`, so a resumed run continues the warm-up exactly.

    Args:
        modules_to_not_convert (`list[str]`, *optional*): Linear layers kept in full precision (transformers'
            pattern syntax). Defaults to the output head. A list replaces the default: include `"lm_head"`.
        schedule (`str`, `Callable[[int], float]` or [`LambdaSchedule`], *optional*, defaults to `"linear"`): Warm-up
            of the weight quantization: `"linear"` (over `warmup_steps`), `"constant"` (`constant_lambda`), or a
            callable `step -> lambda`.
        warmup_steps (`int`, *optional*, defaults to `1000`): Length of the linear warm-up (the HF blog's best).
        constant_lambda (`float`, *optional*, defaults to `1.0`): Lambda of the constant schedule.
        activation_schedule (same types as `schedule`, *optional*): Warm-up of the activation quantization; defaults
            to the weight schedule.
        sub_norm (`bool`, *optional*, defaults to `False`): Insert BitNet Distillation's sub-norms (an RMSNorm before
            `o_proj` and `down_proj`) in Llama-family students.
        activation_bits (`int`, *optional*, defaults to `8`): Width of the activation integers.

    Raises:
        ValueError: At trainer construction, when the model has no convertible layer, is a PEFT model, or the
            trainer was given a ready-made optimizer (it would not see the sub-norms and would hold stale
            references).
    """

    def __init__(
        self,
        modules_to_not_convert: list[str] | None = None,
        schedule: str | Callable[[int], float] | LambdaSchedule = "linear",
        warmup_steps: int = 1000,
        constant_lambda: float = 1.0,
        activation_schedule: str | Callable[[int], float] | LambdaSchedule | None = None,
        sub_norm: bool = False,
        activation_bits: int = 8,
    ) -> None:
        if not 2 <= activation_bits <= 16:
            raise ValueError(f"activation_bits must lie in [2, 16], got {activation_bits}.")
        self.modules_to_not_convert = modules_to_not_convert
        self.weight_schedule = self._schedule(schedule, warmup_steps, constant_lambda)
        self.activation_schedule = (
            self.weight_schedule
            if activation_schedule is None
            else self._schedule(activation_schedule, warmup_steps, constant_lambda)
        )
        self.sub_norm = sub_norm
        self.activation_bits = activation_bits
        self.conversion: BitNetConversion | None = None
        self._model = None

    @staticmethod
    def _schedule(kind, warmup_steps: int, value: float) -> LambdaSchedule:
        return kind if isinstance(kind, LambdaSchedule) else LambdaSchedule(kind, warmup_steps, value)

    def lambdas(self, step: int) -> tuple[float, float]:
        """The (weight, activation) lambdas at optimizer step `step`."""
        return self.weight_schedule(step), self.activation_schedule(step)

    def convert(self, model) -> BitNetConversion:
        """Convert `model` now (what `on_init_end` does); for use without a `Trainer`."""
        if hasattr(model, "peft_config"):
            raise ValueError(
                "BitNetCallback trains every linear layer of the student, but the model is a PEFT model: LoRA "
                "adapters on ternary layers are not supported. Pass the base model without a peft_config."
            )
        self.conversion = convert_to_bitnet(model, self.modules_to_not_convert, self.sub_norm, self.activation_bits)
        self._model = model
        set_bitnet_lambda(model, *self.lambdas(0))
        logger.info(
            "BitNet: %d linear layers ternary, %d kept in full precision (%s), %d sub-norms; lambda %s",
            len(self.conversion.converted),
            len(self.conversion.skipped),
            ", ".join(self.conversion.skipped) or "none",
            len(self.conversion.sub_norms),
            self.weight_schedule.describe(),
        )
        return self.conversion

    def describe_for_card(self) -> str | None:
        """One line for the model card: what is ternary and how lambda was scheduled (`None` before conversion)."""
        if self.conversion is None:
            return None
        c = self.conversion
        text = (
            f"ternary BitNet b1.58 ({len(c.converted)} linear layers; {', '.join(c.skipped) or 'none'} kept in full "
            f"precision), {self.activation_bits}-bit activations, lambda warm-up {self.weight_schedule.describe()}"
        )
        if self.activation_schedule is not self.weight_schedule:
            text += f" (activations: {self.activation_schedule.describe()})"
        return text + (", with BitNet Distillation sub-norms" if c.sub_norms else "")

    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is not None:
            raise ValueError(
                "BitNetCallback must convert the model before the optimizer is built, but the trainer was given an "
                "optimizer. Let the trainer build it (drop `optimizers=`), or call BitNetCallback().convert(model) "
                "before creating your optimizer."
            )
        if model is None:
            raise ValueError("BitNetCallback needs the trainer's model at on_init_end; none was passed.")
        if self.conversion is None:
            self.convert(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.conversion is None:
            raise RuntimeError("BitNetCallback was added after the trainer was built: pass it in `callbacks=`.")
        set_bitnet_lambda(model if model is not None else self._model, *self.lambdas(state.global_step))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        set_bitnet_lambda(model if model is not None else self._model, *self.lambdas(state.global_step))

"""`BitNetArguments`: the `--bitnet*` flags of `hf-distill distill` (and YAML recipe keys)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .schedule import SCHEDULE_KINDS


@dataclass
class BitNetArguments:
    """Options to train a ternary (BitNet b1.58) student; they build a [`BitNetCallback`].

    Args:
        bitnet (`bool`, *optional*, defaults to `False`): Train a ternary student.
        bitnet_schedule (`str`, *optional*, defaults to `"linear"`): Lambda warm-up, `linear` or `constant`.
        bitnet_warmup_steps (`int`, *optional*, defaults to `1000`): Steps of the linear warm-up.
        bitnet_lambda (`float`, *optional*, defaults to `1.0`): Lambda of the constant schedule.
        bitnet_sub_norm (`bool`, *optional*, defaults to `False`): Insert BitNet Distillation's sub-norms.
        bitnet_modules_to_not_convert (`list[str]`, *optional*): Linear layers kept in full precision.
    """

    bitnet: bool = field(
        default=False,
        metadata={
            "help": "Train a ternary (BitNet b1.58, 1.58-bit) student: every linear layer except lm_head becomes a "
            "BitLinear before the optimizer is built. Export the result with `hf-distill export`."
        },
    )
    bitnet_schedule: str = field(
        default="linear",
        metadata={"help": "BitNet lambda warm-up: linear (0 -> 1 over --bitnet_warmup_steps) or constant."},
    )
    bitnet_warmup_steps: int = field(default=1000, metadata={"help": "Steps of the linear BitNet warm-up."})
    bitnet_lambda: float = field(default=1.0, metadata={"help": "Lambda of the constant BitNet schedule, in [0, 1]."})
    bitnet_sub_norm: bool = field(
        default=False,
        metadata={"help": "Insert BitNet Distillation's sub-norms before o_proj and down_proj (Llama/Qwen/Mistral)."},
    )
    bitnet_modules_to_not_convert: list[str] | None = field(
        default=None,
        metadata={"help": "Linear layers kept in full precision (replaces the default lm_head: include it)."},
    )

    def __post_init__(self) -> None:
        if self.bitnet_schedule not in SCHEDULE_KINDS:
            raise ValueError(f"--bitnet_schedule must be one of {SCHEDULE_KINDS}, got {self.bitnet_schedule!r}.")
        if self.bitnet_warmup_steps < 0:
            raise ValueError(f"--bitnet_warmup_steps must be >= 0, got {self.bitnet_warmup_steps}.")
        if not 0.0 <= self.bitnet_lambda <= 1.0:
            raise ValueError(f"--bitnet_lambda must lie in [0, 1], got {self.bitnet_lambda}.")
        if not self.bitnet:
            changed = [
                name
                for name, default in (
                    ("bitnet_schedule", "linear"),
                    ("bitnet_warmup_steps", 1000),
                    ("bitnet_lambda", 1.0),
                    ("bitnet_sub_norm", False),
                    ("bitnet_modules_to_not_convert", None),
                )
                if getattr(self, name) != default
            ]
            if changed:
                raise ValueError(f"--{changed[0]} has no effect without --bitnet: add --bitnet true.")

    def callback(self):
        """The [`BitNetCallback`] these options describe, or `None` without `bitnet`."""
        if not self.bitnet:
            return None
        from ..callbacks.bitnet import BitNetCallback

        return BitNetCallback(
            modules_to_not_convert=self.bitnet_modules_to_not_convert,
            schedule=self.bitnet_schedule,
            warmup_steps=self.bitnet_warmup_steps,
            constant_lambda=self.bitnet_lambda,
            sub_norm=self.bitnet_sub_norm,
        )

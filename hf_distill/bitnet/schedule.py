"""Warm-up schedules of the BitNet quantization strength lambda (`x + lambda * (Q(x) - x).detach()`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

SCHEDULE_KINDS = ("linear", "constant")
"""Named schedules; a callable `step -> lambda` is the custom one."""


@dataclass(frozen=True)
class LambdaSchedule:
    """Lambda as a function of the optimizer step.

    - `linear`: `min(step / warmup_steps, 1)`, from full precision at step 0 to fully quantized at `warmup_steps`
      (the HF blog "Fine-tuning LLMs to 1.58bit" found 1000 steps best);
    - `constant`: always `value` (`1.0`: quantized from the first step, as in the BitNet papers);
    - custom: any callable `step -> lambda` with values in `[0, 1]`.

    Because lambda depends on the step only, a resumed run continues the warm-up where it stopped.

    Args:
        kind (`str` or `Callable[[int], float]`, *optional*, defaults to `"linear"`): The schedule.
        warmup_steps (`int`, *optional*, defaults to `1000`): Steps of the linear warm-up.
        value (`float`, *optional*, defaults to `1.0`): Lambda of the constant schedule.
    """

    kind: str | Callable[[int], float] = "linear"
    warmup_steps: int = 1000
    value: float = 1.0

    def __post_init__(self) -> None:
        if not callable(self.kind) and self.kind not in SCHEDULE_KINDS:
            raise ValueError(
                f"Unknown lambda schedule {self.kind!r}: use one of {SCHEDULE_KINDS} or a callable step -> lambda."
            )
        if self.kind == "linear" and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"The constant lambda must lie in [0, 1], got {self.value}.")

    def __call__(self, step: int) -> float:
        """Lambda at optimizer step `step` (0 before the first update)."""
        if callable(self.kind):
            value = float(self.kind(step))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"The custom lambda schedule returned {value} at step {step}; it must lie in [0, 1].")
            return value
        if self.kind == "constant":
            return float(self.value)
        return 1.0 if self.warmup_steps == 0 else min(step / self.warmup_steps, 1.0)

    def describe(self) -> str:
        """A short human-readable form (for logs and model cards)."""
        if callable(self.kind):
            return f"custom ({getattr(self.kind, '__name__', type(self.kind).__name__)})"
        return f"constant {self.value:g}" if self.kind == "constant" else f"linear over {self.warmup_steps} steps"

"""Which source ("dataset", "student" or "teacher") a training step's completions come from, with GKD's semantics."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["COMPLETION_SOURCES", "GenerationSchedule"]

COMPLETION_SOURCES = ("dataset", "student", "teacher")
"""Where a training step's completions come from."""


@dataclass
class GenerationSchedule:
    """Which source a training step's completions come from, with GKD's semantics.

    TRL's `GKDTrainer.training_step` does

    ```python
    if random.random() <= lmbda:  # student generates (on-policy)
        ...
    elif seq_kd:  # teacher generates (sequence-level KD)
        ...
    # else: the dataset's completions
    ```

    (older TRL releases generated with the teacher first when `seq_kd` and then overwrote the result with the
    student's samples with probability `lmbda`: the same outcome, with a wasted teacher generation). So a step is
    `"student"` with probability `lmbda`, otherwise `"teacher"` if `seq_kd`, otherwise `"dataset"`. The draw here is
    `u < lmbda` with `u` uniform in `[0, 1)`, so `lmbda=0` is never and `lmbda=1` always on-policy (GKD's `<=` is
    on-policy with probability `lmbda + 2**-53`).

    Reproducibility and agreement across processes: GKD draws from Python's global `random`, whose state differs
    between ranks as soon as anything consumes it unevenly (or when it is seeded per device, as TRL's
    `DistillationTrainer` does with `set_seed(seed, device_specific=True)`). Ranks that disagree generate on some
    ranks and not on others, which deadlocks generation under DeepSpeed ZeRO-3 / FSDP (parameter gathering is
    collective) and makes steps uneven in time. Here the draw never touches global state:

    - [`source_for_step`][hf_distill.generation.GenerationSchedule.source_for_step] is a pure function of
      `(seed, step)`: a fresh `random.Random` seeded from both (a string seed, hashed with SHA-512, so it does not
      depend on `PYTHONHASHSEED`). Pass the same training seed on every rank (`args.seed`, not a device-specific
      one) and the same step counter (count micro-batches, i.e. calls to `training_step`, not optimizer steps, so
      that the steps of a gradient-accumulation cycle draw independently); every rank then decides the same, and a
      run resumed from a checkpoint at step `n` continues the same sequence of decisions.
    - [`next_source`][hf_distill.generation.GenerationSchedule.next_source] keeps its own counter (starting at 0)
      and calls `source_for_step`; it agrees across ranks as long as every rank calls it exactly once per step.

    Args:
        lmbda (`float`, *optional*, defaults to `0.0`):
            Probability, in `[0, 1]`, that a step trains on the student's own samples.
        seq_kd (`bool`, *optional*, defaults to `False`):
            Whether the steps that are not on-policy train on the teacher's samples instead of the dataset's.
        seed (`int`, *optional*, defaults to `0`):
            The training seed (the same on every process).
    """

    lmbda: float = 0.0
    seq_kd: bool = False
    seed: int = 0
    _step: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.lmbda) <= 1.0:
            raise ValueError(f"`lmbda` must be in [0, 1], got {self.lmbda}.")

    @property
    def uses_generation(self) -> bool:
        """Whether any step can generate (`lmbda > 0` or `seq_kd`): if not, no generation setup is needed."""
        return self.lmbda > 0 or self.seq_kd

    def source_for_step(self, step: int) -> Literal["dataset", "student", "teacher"]:
        """The completion source of training step `step` (a pure function of `seed`, `step`, `lmbda`, `seq_kd`).

        Args:
            step (`int`): The step index (count micro-batches, identically on every process).

        Returns:
            `"student"`, `"teacher"` or `"dataset"`.
        """
        u = random.Random(f"hf_distill.gkd:{self.seed}:{int(step)}").random()
        if u < self.lmbda:
            return "student"
        if self.seq_kd:
            return "teacher"
        return "dataset"

    def next_source(self) -> Literal["dataset", "student", "teacher"]:
        """The source of the next step (the schedule's own counter, from 0); see [`source_for_step`].

        Returns:
            `"student"`, `"teacher"` or `"dataset"`.
        """
        source = self.source_for_step(self._step)
        self._step += 1
        return source

    def state_dict(self) -> dict[str, int]:
        """The counter of [`next_source`], to save with a checkpoint."""
        return {"step": self._step}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore the counter saved by [`state_dict`]."""
        self._step = int(state["step"])

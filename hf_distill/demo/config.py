"""Settings of the demo ([`DemoConfig`]) and their validation.

This module imports neither torch nor transformers, so that `hf-distill demo` rejects a bad flag at once, before the
seconds it takes to import them and long before any training.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from .models import MAX_SEQUENCE_LENGTH, STUDENT_SPEC, TEACHER_SPEC, TinyModelSpec

DIVERGENCES = ("forward_kl", "reverse_kl", "generalized_jsd", "total_variation", "skew_kl", "skew_reverse_kl")
"""Divergences the demo accepts: `hf_distill.DIVERGENCE_NAMES`, repeated here so that checking them needs no torch
(a test keeps both in step)."""

MAX_SEED = 2**32 - 2
"""Largest seed: numpy seeds must be below `2**32`, and the student is initialised with `seed + 1`."""


def longest_example_length(max_digits: int) -> int:
    """Tokens of the longest demo example with `max_digits`-digit operands: BOS, prompt, completion and EOS.

    The prompt `a+b=` has `2 w + 2` characters; the completion has the aligned operands (`2 w + 1`), one 9-character
    line per column and the answer line (`#### ` and `w + 1` characters), each after a newline: `12 w + 9`; the
    tokenizer adds BOS and TRL appends EOS. One token per character.
    """
    return 14 * max_digits + 13


MAX_DIGITS = max(w for w in range(1, MAX_SEQUENCE_LENGTH) if longest_example_length(w) <= MAX_SEQUENCE_LENGTH)
"""Most digits an operand may have: longer problems would not fit the models' [`MAX_SEQUENCE_LENGTH`] (17)."""


def count_addition_problems(min_digits: int, max_digits: int) -> int:
    """Number of distinct problems `a + b` whose operands have `min_digits` to `max_digits` digits (0 has one)."""
    numbers = sum(10 if d == 1 else 9 * 10 ** (d - 1) for d in range(min_digits, max_digits + 1))
    return numbers * numbers


class DemoConfigError(ValueError):
    """An invalid [`DemoConfig`] setting.

    Args:
        field (`str` or `None`): The offending field of [`DemoConfig`], or `None` when several fields conflict.
        problem (`str`): What is wrong, worded to follow the field's name (e.g. `"must be >= 1, got 0."`).
    """

    def __init__(self, field: str | None, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(problem if field is None else f"`{field}` {problem}")


@dataclass
class DemoConfig:
    """Settings of [`run_demo`]. The defaults take about 3-5 minutes on two CPU cores.

    Every value is checked on creation (and again by `dataclasses.replace`), and [`DemoConfig.validate`] also checks
    that `output_dir` can be written; [`run_demo`] calls it before anything else, so a bad setting fails at once, not
    after minutes of training.

    Args:
        output_dir (`str`, *optional*, defaults to `"outputs/demo"`): Where the teacher, the student and
            `results.json` are written.
        teacher_steps (`int`, *optional*, defaults to `300`): Optimizer steps of the teacher's SFT.
        student_steps (`int`, *optional*, defaults to `400`): Optimizer steps of the student's distillation.
        batch_size (`int`, *optional*, defaults to `64`): Examples per step (both trainings).
        teacher_learning_rate (`float`, *optional*, defaults to `3e-3`): Peak learning rate of the teacher.
        student_learning_rate (`float`, *optional*, defaults to `3e-3`): Peak learning rate of the student.
        eval_size (`int`, *optional*, defaults to `200`): Held-out problems used for perplexity and exact match.
        divergence (`str`, *optional*, defaults to `"forward_kl"`): Distillation divergence (see
            [`hf_distill.DistillationConfig`]). With the default settings forward KL at temperature 1 gave the best
            student (99% exact match, against 92.5% for the same student trained with plain SFT, 80% with
            temperature 2 and 0% with `generalized_jsd` in 400 steps: the teacher's distributions are almost one-hot
            on this task, which starves the JSD of gradient).
        temperature (`float`, *optional*, defaults to `1.0`): Distillation temperature, > 0.
        alpha (`float`, *optional*, defaults to `0.0`): Weight of the hard-label cross-entropy in the student's loss,
            in `[0, 1]`.
        sft_baseline (`bool`, *optional*, defaults to `False`): Also train the same student with plain SFT (same
            steps, data and seed) and report it, to see what the teacher adds.
        min_digits (`int`, *optional*, defaults to `2`): Fewest digits of an operand, at least 1.
        max_digits (`int`, *optional*, defaults to `4`): Most digits of an operand, from `min_digits` to
            [`MAX_DIGITS`].
        teacher_spec ([`TinyModelSpec`], *optional*): Teacher shape, defaults to [`TEACHER_SPEC`].
        student_spec ([`TinyModelSpec`], *optional*): Student shape, defaults to [`STUDENT_SPEC`].
        seed (`int`, *optional*, defaults to `0`): Seed of the data, the initialisations and the training, from 0
            to [`MAX_SEED`].
        num_threads (`int`, *optional*): CPU threads for torch; defaults to the idle available cores (1 to 8).
        show_progress (`bool`, *optional*, defaults to `True`): Show the stage messages, progress bars and training
            logs. With `False` the demo prints nothing (errors and warnings aside).

    Raises:
        DemoConfigError: (a `ValueError`) naming the first invalid field.
    """

    output_dir: str = "outputs/demo"
    teacher_steps: int = 300
    student_steps: int = 400
    batch_size: int = 64
    teacher_learning_rate: float = 3e-3
    student_learning_rate: float = 3e-3
    eval_size: int = 200
    divergence: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.0
    sft_baseline: bool = False
    min_digits: int = 2
    max_digits: int = 4
    teacher_spec: TinyModelSpec = TEACHER_SPEC
    student_spec: TinyModelSpec = STUDENT_SPEC
    seed: int = 0
    num_threads: int | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        self._check_values()

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """Smoke-test settings (a few seconds of training, numbers meaningless); `overrides` win."""
        settings: dict[str, Any] = {"teacher_steps": 20, "student_steps": 10, "batch_size": 16, "eval_size": 16}
        settings.update(overrides)
        return cls(**settings)

    def validate(self) -> None:
        """Check every setting, and that `output_dir` is (or can be created as) a writable directory.

        Nothing is created or written.

        Raises:
            DemoConfigError: (a `ValueError`) naming the first invalid field.
        """
        self._check_values()
        self._check_output_dir()

    def _check_values(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise DemoConfigError("output_dir", f"must be a non-empty path, got {self.output_dir!r}.")
        for name in ("teacher_steps", "student_steps", "batch_size", "eval_size"):
            _check_int(self, name, low=1)
        for name in ("teacher_learning_rate", "student_learning_rate"):
            _check_float(self, name)
            if not getattr(self, name) > 0:
                raise DemoConfigError(name, f"must be > 0, got {getattr(self, name)!r}.")
        if self.divergence not in DIVERGENCES:
            raise DemoConfigError("divergence", f"must be one of {', '.join(DIVERGENCES)}; got {self.divergence!r}.")
        _check_float(self, "temperature")
        if not self.temperature > 0:
            raise DemoConfigError(
                "temperature", f"must be > 0, got {self.temperature!r} (1.0 distils the plain distributions)."
            )
        _check_float(self, "alpha")
        if not 0.0 <= self.alpha <= 1.0:
            raise DemoConfigError(
                "alpha",
                f"must be in [0, 1], got {self.alpha!r} (the weight of the hard-label cross-entropy; the "
                "distillation term gets 1 - alpha).",
            )
        _check_bool(self, "sft_baseline")
        _check_int(self, "min_digits", low=1, high=MAX_DIGITS)
        _check_int(self, "max_digits", low=1, high=MAX_DIGITS)
        if self.max_digits < self.min_digits:
            raise DemoConfigError("max_digits", f"must be >= min_digits ({self.min_digits}), got {self.max_digits}.")
        for name in ("teacher_spec", "student_spec"):
            if not isinstance(getattr(self, name), TinyModelSpec):
                raise DemoConfigError(name, f"must be a TinyModelSpec, got {type(getattr(self, name)).__name__}.")
        _check_int(self, "seed", low=0, high=MAX_SEED)
        if self.num_threads is not None:
            _check_int(self, "num_threads", low=1)
        _check_bool(self, "show_progress")
        needed = self.batch_size * max(self.teacher_steps, self.student_steps) + self.eval_size
        available = count_addition_problems(self.min_digits, self.max_digits)
        if needed > available:
            raise DemoConfigError(
                None,
                f"The demo needs {needed:,} distinct problems (batch size x the larger step count, plus the eval "
                f"size), but only {available:,} additions have {self.min_digits}-{self.max_digits} digit operands: "
                "use fewer steps, a smaller batch or eval size, or more digits.",
            )

    def _check_output_dir(self) -> None:
        path = os.path.abspath(self.output_dir)
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise DemoConfigError("output_dir", f"must be a directory, but {self.output_dir!r} is a file.")
            if not os.access(path, os.W_OK | os.X_OK):
                raise DemoConfigError("output_dir", f"is not writable: {self.output_dir!r}.")
            for name in ("teacher", "student", "student_sft"):
                sub = os.path.join(path, name)
                if os.path.exists(sub) and not os.path.isdir(sub):
                    raise DemoConfigError(
                        "output_dir", f"holds a file {name!r} where the demo saves a model: {sub!r}."
                    )
            results = os.path.join(path, "results.json")
            if os.path.isdir(results):
                raise DemoConfigError("output_dir", f"holds a directory where results.json goes: {results!r}.")
            return
        parent = os.path.dirname(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise DemoConfigError("output_dir", f"cannot be created: {parent!r} is a file, not a directory.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise DemoConfigError("output_dir", f"cannot be created: {parent!r} is not writable.")


def _check_int(config: DemoConfig, name: str, low: int, high: int | None = None) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DemoConfigError(name, f"must be an integer, got {value!r}.")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise DemoConfigError(name, f"must be {bounds}, got {value}.")


def _check_float(config: DemoConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DemoConfigError(name, f"must be a finite number, got {value!r}.")


def _check_bool(config: DemoConfig, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, bool):
        raise DemoConfigError(name, f"must be True or False, got {value!r}.")

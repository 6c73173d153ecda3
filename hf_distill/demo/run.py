"""The demo pipeline: data -> tokenizer -> teacher (SFT) -> student (distillation) -> evaluation -> saved student.

[`run_demo`] is what `hf-distill demo` calls. It trains everything from scratch on the generated arithmetic task, so
it needs no network, and it is deterministic given the seed (up to floating point non-determinism across machines).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from .arithmetic import make_arithmetic_splits
from .config import DemoConfig, DemoConfigError
from .evaluate import exact_match_accuracy, held_out_perplexity
from .models import MAX_SEQUENCE_LENGTH, TinyModelSpec, build_tiny_model, count_parameters
from .tokenizer import build_char_tokenizer

__all__ = [
    "DemoConfig",
    "DemoConfigError",
    "configure_threads",
    "distil_student",
    "evaluate_model",
    "format_results",
    "run_demo",
    "train_student_sft",
    "train_teacher",
]


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's CPU thread count.

    By default: the cores this process may use that are not already busy (judged by the 1-minute load average),
    at least 1 and at most 8. Tiny models gain little from many threads, and threads competing for busy cores
    slow them down several times over.

    Args:
        num_threads (`int`, *optional*): Threads to use, overriding the default.

    Returns:
        `int`: The thread count set.
    """
    if num_threads is None:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        try:
            busy = int(os.getloadavg()[0])
        except (AttributeError, OSError):  # not available on Windows
            busy = 0
        num_threads = max(1, min(available - busy, available, 8))
    torch.set_num_threads(num_threads)
    return num_threads


def _common_training_args(config: DemoConfig, steps: int, learning_rate: float, output_dir: str) -> dict[str, Any]:
    # Arguments shared by the teacher's SFTConfig and the student's DistillationConfig. Tiny models train fine in
    # float32 everywhere, and without activation checkpointing (TRL turns it on by default).
    return {
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": config.batch_size,
        "learning_rate": learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": max(1, steps // 20),
        "weight_decay": 0.0,
        "adam_beta2": 0.99,
        "max_grad_norm": 1.0,
        "logging_steps": max(1, steps // 5),
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "fp16": False,
        "activation_checkpointing": False,
        "max_length": MAX_SEQUENCE_LENGTH,
        "completion_only_loss": True,
        "seed": config.seed,
        "data_seed": config.seed,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
        "disable_tqdm": not config.show_progress,
    }


def train_teacher(config: DemoConfig, train_dataset, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Train the teacher from scratch with TRL's `SFTTrainer` (completion-only loss) and save it with the tokenizer.

    Args:
        config ([`DemoConfig`]): Demo settings.
        train_dataset (`datasets.Dataset`): Prompt-completion training data.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The demo tokenizer.

    Returns:
        [`~transformers.PreTrainedModel`]: The trained teacher, also saved to `<output_dir>/teacher`.
    """
    from trl import SFTConfig, SFTTrainer

    teacher_dir = os.path.join(config.output_dir, "teacher")
    model = build_tiny_model(config.teacher_spec, tokenizer, seed=config.seed)
    args = SFTConfig(**_common_training_args(config, config.teacher_steps, config.teacher_learning_rate, teacher_dir))
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer)
    _drop_log_printer(trainer, config)
    trainer.train()
    trainer.save_model(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    return trainer.model


def train_student_sft(config: DemoConfig, train_dataset, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Baseline: the student trained with plain SFT on the same data, steps and seed as the distilled one.

    Args:
        config ([`DemoConfig`]): Demo settings.
        train_dataset (`datasets.Dataset`): Prompt-completion training data.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The demo tokenizer.

    Returns:
        [`~transformers.PreTrainedModel`]: The SFT student (not saved).
    """
    from trl import SFTConfig, SFTTrainer

    model = build_tiny_model(config.student_spec, tokenizer, seed=config.seed + 1)
    run_dir = os.path.join(config.output_dir, "student_sft")
    args = SFTConfig(**_common_training_args(config, config.student_steps, config.student_learning_rate, run_dir))
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer)
    _drop_log_printer(trainer, config)
    trainer.train()
    return trainer.model


def distil_student(
    config: DemoConfig, teacher: PreTrainedModel, train_dataset, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel:
    """Distil a freshly initialised student from `teacher` with [`hf_distill.DistillationTrainer`] and save it.

    Args:
        config ([`DemoConfig`]): Demo settings (divergence, temperature, alpha, steps, ...).
        teacher ([`~transformers.PreTrainedModel`]): The trained teacher.
        train_dataset (`datasets.Dataset`): Prompt-completion training data.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The demo tokenizer (shared by both models).

    Returns:
        [`~transformers.PreTrainedModel`]: The distilled student, also saved with the tokenizer to
        `<output_dir>/student`.
    """
    from hf_distill import DistillationConfig, DistillationTrainer

    student_dir = os.path.join(config.output_dir, "student")
    model = build_tiny_model(config.student_spec, tokenizer, seed=config.seed + 1)
    args = DistillationConfig(
        **_common_training_args(config, config.student_steps, config.student_learning_rate, student_dir),
        divergence=config.divergence,
        temperature=config.temperature,
        alpha=config.alpha,
    )
    trainer = DistillationTrainer(
        model=model,
        teacher_model=teacher,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        teacher_processing_class=tokenizer,  # the in-memory teacher has no saved tokenizer to check; it is this one
    )
    _drop_log_printer(trainer, config)
    trainer.train()
    trainer.save_model(student_dir)
    tokenizer.save_pretrained(student_dir)
    return trainer.model


def evaluate_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset, show_progress: bool = True):
    """Parameter count, completion perplexity and exact-match accuracy of `model` on `dataset`.

    Args:
        model ([`~transformers.PreTrainedModel`]): Model to score.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): Its tokenizer.
        dataset (`datasets.Dataset`): Held-out prompt-completion data with an `"answer"` column.
        show_progress (`bool`, *optional*, defaults to `True`): Show progress bars.

    Returns:
        `dict[str, float]`: `parameters`, `perplexity` and `exact_match`.
    """
    return {
        "parameters": count_parameters(model),
        "perplexity": held_out_perplexity(model, tokenizer, dataset, show_progress=show_progress),
        "exact_match": exact_match_accuracy(model, tokenizer, dataset, show_progress=show_progress),
    }


def format_results(results: dict[str, Any]) -> str:
    """Human-readable table of [`run_demo`]'s results."""
    rows = [("model", "params", "perplexity", "exact match", "train time")]
    for key, label in (
        ("teacher", "teacher (SFT)"),
        ("student", "student (distilled)"),
        ("student_sft", "student (SFT only)"),
    ):
        if key not in results:
            continue
        r = results[key]
        rows.append(
            (
                label,
                f"{r['parameters'] / 1e6:.2f}M",
                f"{r['perplexity']:.3f}",
                f"{100 * r['exact_match']:.1f}%",
                f"{r['train_seconds']:.0f}s",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    n = results["eval_size"]
    lines.append("")
    lines.append(
        f"Held-out: {n} unseen problems; perplexity over completion tokens, exact match of the final answer "
        "(greedy decoding)."
    )
    lines.append(
        f"Distillation: {results['divergence']}, temperature {results['temperature']}, alpha {results['alpha']}."
    )
    lines.append(f"Total time: {results['total_seconds']:.0f}s on {results['num_threads']} CPU thread(s).")
    lines.append(f"Student saved to {results['student_dir']}")
    lines.append(f"Teacher saved to {results['teacher_dir']}")
    return "\n".join(lines)


def run_demo(config: DemoConfig | None = None, return_models: bool = False, **overrides: Any) -> dict[str, Any]:
    """Run the whole demo: train a teacher, distil a student, evaluate both, save the student.

    Args:
        config ([`DemoConfig`], *optional*): Settings; defaults to `DemoConfig()`.
        return_models (`bool`, *optional*, defaults to `False`): Also return the models and tokenizer under
            `"teacher_model"`, `"student_model"` and `"tokenizer"`.
        **overrides: Fields of [`DemoConfig`] to replace, e.g. `run_demo(teacher_steps=100, seed=1)`.

    Returns:
        `dict[str, Any]`: `"teacher"` and `"student"` (and `"student_sft"` with `sft_baseline`), each a dict of
        `parameters`, `perplexity`, `exact_match` and `train_seconds`; plus `"student_dir"`, `"teacher_dir"`,
        `"eval_size"`, `"train_size"`, `"divergence"`, `"temperature"`, `"alpha"`, `"num_threads"`, `"seed"` and
        `"total_seconds"`. The same (without the models) is written to `<output_dir>/results.json`.

    Raises:
        DemoConfigError: (a `ValueError`) if a setting is invalid or `output_dir` cannot be written; raised before
            anything is trained or written.
    """
    config = replace(config or DemoConfig(), **overrides)
    config.validate()  # before anything is trained or written
    start = time.perf_counter()
    num_threads = configure_threads(config.num_threads)
    set_seed(config.seed)
    os.makedirs(config.output_dir, exist_ok=True)
    with _library_output(config.show_progress):
        n_train = config.batch_size * max(config.teacher_steps, config.student_steps)
        train_dataset, eval_dataset = make_arithmetic_splits(
            n_train, config.eval_size, seed=config.seed, min_digits=config.min_digits, max_digits=config.max_digits
        )
        train_dataset = train_dataset.remove_columns("answer")
        tokenizer = build_char_tokenizer()

        example = eval_dataset[0]
        _say(
            f"Task: {config.min_digits}-{config.max_digits} digit addition with worked steps; "
            f"{len(train_dataset)} training and {len(eval_dataset)} held-out problems. Example:\n"
            f"{example['prompt']}{example['completion']}",
            config.show_progress,
        )

        results: dict[str, Any] = {}
        models: dict[str, PreTrainedModel] = {}
        stages = [
            (
                "teacher",
                f"Training the teacher ({_millions(config.teacher_spec, tokenizer)} parameters) from scratch with "
                f"SFTTrainer, {config.teacher_steps} steps",
                lambda: train_teacher(config, train_dataset, tokenizer),
            ),
            (
                "student",
                f"Distilling the student ({_millions(config.student_spec, tokenizer)} parameters) with "
                f"DistillationTrainer ({config.divergence}), {config.student_steps} steps",
                lambda: distil_student(config, models["teacher"], train_dataset, tokenizer),
            ),
        ]
        if config.sft_baseline:
            stages.append(
                (
                    "student_sft",
                    f"Baseline: training the same student with plain SFT, {config.student_steps} steps",
                    lambda: train_student_sft(config, train_dataset, tokenizer),
                )
            )
        for i, (name, message, train) in enumerate(stages, start=1):
            _say(f"\n[{i}/{len(stages)}] {message}", config.show_progress)
            stage_start = time.perf_counter()
            models[name] = train()
            train_seconds = time.perf_counter() - stage_start
            _say(f"Evaluating on {len(eval_dataset)} held-out problems", config.show_progress)
            results[name] = {
                **evaluate_model(models[name], tokenizer, eval_dataset, config.show_progress),
                "train_seconds": train_seconds,
            }

    results.update(
        {
            "student_dir": os.path.join(config.output_dir, "student"),
            "teacher_dir": os.path.join(config.output_dir, "teacher"),
            "train_size": len(train_dataset),
            "eval_size": len(eval_dataset),
            "divergence": config.divergence,
            "temperature": config.temperature,
            "alpha": config.alpha,
            "seed": config.seed,
            "num_threads": num_threads,
            "total_seconds": time.perf_counter() - start,
            "config": {k: v for k, v in asdict(config).items() if not k.endswith("_spec")},
        }
    )
    with open(os.path.join(config.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    if return_models:
        results.update(teacher_model=models["teacher"], student_model=models["student"], tokenizer=tokenizer)
        if "student_sft" in models:
            results["student_sft_model"] = models["student_sft"]
    return results


def _millions(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerBase) -> str:
    vocab, h, n = len(tokenizer), spec.hidden_size, spec.num_hidden_layers
    # embeddings + untied head + per layer: attention (4 h^2), MLP (3 h * intermediate), two norms; final norm
    count = 2 * vocab * h + n * (4 * h * h + 3 * h * spec.intermediate_size + 2 * h) + h
    return f"{count / 1e6:.2f}M"


def _say(message: str, enabled: bool) -> None:
    if enabled:
        print(message, flush=True)


def _drop_log_printer(trainer, config: DemoConfig) -> None:
    # With `disable_tqdm=True` the Trainer swaps its progress bar for `PrinterCallback`, which prints every log dict
    # (`{'loss': ..., 'grad_norm': ...}`); quiet runs want neither. The logs still reach `trainer.state.log_history`.
    if not config.show_progress:
        from transformers import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)


@contextmanager
def _library_output(show_progress: bool) -> Iterator[None]:
    # The dataset map bars of the trainers are noise here, whatever `show_progress`; a quiet run also hides the
    # transformers bars (e.g. "Writing model shards" when saving) and the info/warning logs of transformers, datasets
    # and hf_distill (Python warnings stay). All is restored afterwards, Hugging Face Hub's own progress bar settings
    # included (transformers' switch flips them).
    import importlib
    import logging

    import datasets
    from transformers.utils import logging as transformers_logging

    # the module: `huggingface_hub.utils.tqdm` as an attribute is its tqdm class
    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")

    hub_states = dict(getattr(hub_tqdm, "progress_bar_states", {}))
    own_logger = logging.getLogger("hf_distill")
    own_level = own_logger.level
    saved = (
        datasets.is_progress_bar_enabled(),
        transformers_logging.is_progress_bar_enabled(),
        transformers_logging.get_verbosity(),
        datasets.logging.get_verbosity(),
    )
    datasets.disable_progress_bars()
    if not show_progress:
        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        datasets.logging.set_verbosity_error()
        own_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        datasets_bars, transformers_bars, transformers_verbosity, datasets_verbosity = saved
        if datasets_bars:
            datasets.enable_progress_bars()
        if transformers_bars and not transformers_logging.is_progress_bar_enabled():
            transformers_logging.enable_progress_bar()
        transformers_logging.set_verbosity(transformers_verbosity)
        datasets.logging.set_verbosity(datasets_verbosity)
        own_logger.setLevel(own_level)
        if hasattr(hub_tqdm, "progress_bar_states"):
            hub_tqdm.progress_bar_states.clear()
            hub_tqdm.progress_bar_states.update(hub_states)

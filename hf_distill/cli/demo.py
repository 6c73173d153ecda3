"""`hf-distill demo`: train a tiny teacher on generated arithmetic, distil a smaller student, compare them.

Needs no download and runs in a few minutes on a laptop CPU; `--quick` is a seconds-long smoke test. Every flag is
checked (by [`hf_distill.demo.config.DemoConfig`]) before torch is even imported: a bad value ends the command at once
with a usage error (exit code 2), never after minutes of training.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hf_distill.demo.config import DIVERGENCES, MAX_DIGITS, MAX_SEED, DemoConfig, DemoConfigError

__all__ = ["DIVERGENCES", "add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `demo` sub-command to `subparsers` (an `argparse` sub-parsers action)."""
    default, quick = DemoConfig(), DemoConfig.quick()
    parser = subparsers.add_parser(
        "demo",
        help="Self-contained distillation demo (no download, a few minutes on CPU).",
        description=(
            "Train a small Llama teacher from scratch on multi-digit addition with worked steps, distil a smaller "
            "student from it with DistillationTrainer, and print both models' held-out perplexity (completion "
            "tokens) and exact-match accuracy (greedy decoding). Needs no network access."
        ),
    )
    parser.add_argument(
        "--output-dir",
        metavar="DIR",
        default=default.output_dir,
        help=f"Where the teacher, student and results.json go (default: {default.output_dir}).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="Smoke test: a few training steps only (seconds; numbers meaningless)."
    )
    parser.add_argument(
        "--teacher-steps",
        metavar="N",
        type=int,
        default=None,
        help=f"Teacher SFT steps (default: {default.teacher_steps}, quick: {quick.teacher_steps}).",
    )
    parser.add_argument(
        "--student-steps",
        metavar="N",
        type=int,
        default=None,
        help=f"Student distillation steps (default: {default.student_steps}, quick: {quick.student_steps}).",
    )
    parser.add_argument(
        "--batch-size",
        metavar="N",
        type=int,
        default=None,
        help=f"Examples per step (default: {default.batch_size}, quick: {quick.batch_size}).",
    )
    parser.add_argument(
        "--teacher-learning-rate",
        metavar="LR",
        type=float,
        default=None,
        help=f"Peak learning rate of the teacher (default: {default.teacher_learning_rate:g}).",
    )
    parser.add_argument(
        "--student-learning-rate",
        metavar="LR",
        type=float,
        default=None,
        help=f"Peak learning rate of the student (default: {default.student_learning_rate:g}).",
    )
    parser.add_argument(
        "--eval-size",
        metavar="N",
        type=int,
        default=None,
        help=f"Held-out problems to evaluate on (default: {default.eval_size}, quick: {quick.eval_size}).",
    )
    parser.add_argument(
        "--divergence",
        metavar="NAME",
        choices=DIVERGENCES,
        default=None,
        help=f"Distillation divergence: {', '.join(DIVERGENCES)} (default: {default.divergence}).",
    )
    parser.add_argument(
        "--temperature",
        metavar="T",
        type=float,
        default=None,
        help=f"Distillation temperature, > 0 (default: {default.temperature}).",
    )
    parser.add_argument(
        "--alpha",
        metavar="A",
        type=float,
        default=None,
        help=f"Weight of the hard-label cross-entropy, in [0, 1] (default: {default.alpha}).",
    )
    parser.add_argument(
        "--min-digits",
        metavar="N",
        type=int,
        default=None,
        help=f"Fewest digits of an operand (default: {default.min_digits}).",
    )
    parser.add_argument(
        "--max-digits",
        metavar="N",
        type=int,
        default=None,
        help=f"Most digits of an operand, at most {MAX_DIGITS} (default: {default.max_digits}).",
    )
    parser.add_argument(
        "--sft-baseline",
        action="store_true",
        help="Also train the student with plain SFT (same steps) to compare with distillation.",
    )
    parser.add_argument(
        "--seed",
        metavar="N",
        type=int,
        default=default.seed,
        help=f"Random seed, 0 to {MAX_SEED} (default: {default.seed}).",
    )
    parser.add_argument(
        "--num-threads",
        metavar="N",
        type=int,
        default=None,
        help="CPU threads (default: idle available cores, 1 to 8).",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="Print only the final results table (and errors): no stage messages, progress bars or training logs.",
    )
    parser.set_defaults(handler=run, error=parser.error)
    return parser


def run(args: argparse.Namespace) -> int:
    """Handler of `hf-distill demo`: run the demo with the parsed `args` and print the comparison table.

    Every setting is checked first; an invalid one is reported as a usage error (`hf-distill demo: error: ...` on
    stderr, exit code 2) before anything is trained.
    """
    overrides = {
        "output_dir": str(args.output_dir),
        "teacher_steps": args.teacher_steps,
        "student_steps": args.student_steps,
        "batch_size": args.batch_size,
        "teacher_learning_rate": args.teacher_learning_rate,
        "student_learning_rate": args.student_learning_rate,
        "eval_size": args.eval_size,
        "divergence": args.divergence,
        "temperature": args.temperature,
        "alpha": args.alpha,
        "min_digits": args.min_digits,
        "max_digits": args.max_digits,
        "seed": args.seed,
        "num_threads": args.num_threads,
        "sft_baseline": args.sft_baseline,
        "show_progress": not args.no_progress,
    }
    flags = {field: "--" + field.replace("_", "-") for field in overrides if field != "show_progress"}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    try:
        config = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
        config.validate()
    except DemoConfigError as error:
        message = f"argument {flags[error.field]}: {error.problem}" if error.field in flags else str(error)
        return _usage_error(args, message)

    from hf_distill.demo.run import format_results, run_demo  # torch, transformers: only once the flags are good

    results = run_demo(config)
    if config.show_progress:
        print()
    print(format_results(results))
    return 0


def _usage_error(args: argparse.Namespace, message: str) -> int:
    error = getattr(args, "error", None)
    if error is not None:
        error(message)  # argparse: usage and "hf-distill demo: error: <message>" on stderr, then exit code 2
    print(f"hf-distill demo: error: {message}", file=sys.stderr)
    return 2

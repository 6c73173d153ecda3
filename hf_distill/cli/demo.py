"""`hf-distill demo`: train a tiny teacher on generated arithmetic, distil a smaller student, compare them.

Needs no download and runs in a few minutes on a laptop CPU; `--quick` is a seconds-long smoke test.
"""

from __future__ import annotations

import argparse
from typing import Any

DIVERGENCES = ("forward_kl", "reverse_kl", "generalized_jsd", "total_variation", "skew_kl", "skew_reverse_kl")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `demo` sub-command to `subparsers` (an `argparse` sub-parsers action)."""
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
        default="outputs/demo",
        help="Where the teacher, student and results.json go (default: outputs/demo).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="Smoke test: a few training steps only (seconds; numbers meaningless)."
    )
    parser.add_argument("--teacher-steps", type=int, default=None, help="Teacher SFT steps (default: 300, quick: 20).")
    parser.add_argument(
        "--student-steps", type=int, default=None, help="Student distillation steps (default: 400, quick: 10)."
    )
    parser.add_argument("--batch-size", type=int, default=None, help="Examples per step (default: 64, quick: 16).")
    parser.add_argument(
        "--eval-size", type=int, default=None, help="Held-out problems to evaluate on (default: 200, quick: 16)."
    )
    parser.add_argument(
        "--divergence", choices=DIVERGENCES, default=None, help="Distillation divergence (default: forward_kl)."
    )
    parser.add_argument("--temperature", type=float, default=None, help="Distillation temperature (default: 1.0).")
    parser.add_argument(
        "--alpha", type=float, default=None, help="Weight of the hard-label cross-entropy, in [0, 1] (default: 0.0)."
    )
    parser.add_argument(
        "--sft-baseline",
        action="store_true",
        help="Also train the student with plain SFT (same steps) to compare with distillation.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Random seed (default: 0).")
    parser.add_argument(
        "--num-threads", type=int, default=None, help="CPU threads (default: idle available cores, 1 to 8)."
    )
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars and training logs.")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Handler of `hf-distill demo`: run the demo with the parsed `args` and print the comparison table."""
    from hf_distill.demo.run import DemoConfig, format_results, run_demo

    overrides = {
        "output_dir": str(args.output_dir),
        "teacher_steps": args.teacher_steps,
        "student_steps": args.student_steps,
        "batch_size": args.batch_size,
        "eval_size": args.eval_size,
        "divergence": args.divergence,
        "temperature": args.temperature,
        "alpha": args.alpha,
        "seed": args.seed,
        "num_threads": args.num_threads,
        "sft_baseline": args.sft_baseline,
        "show_progress": not args.no_progress,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    config = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    results = run_demo(config)
    print()
    print(format_results(results))
    return 0

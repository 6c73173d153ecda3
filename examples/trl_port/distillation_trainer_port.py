"""On-policy distillation written for `trl.DistillationTrainer`, run unchanged by hf_distill.

    python examples/trl_port/distillation_trainer_port.py --tiny                  # hf_distill, tiny local models
    python examples/trl_port/distillation_trainer_port.py --tiny --backend trl    # the original TRL script
    python examples/trl_port/distillation_trainer_port.py                         # Qwen3-1.7B -> Qwen3-0.6B

This is a TRL script: a prompt-only dataset (the student generates every completion, the teacher scores it) and the
fields such scripts set (`beta`, `temperature`, `max_completion_length`, `top_p`, `top_k`, `generation_kwargs`, ...).
The two backends differ by the import in `import_trainer` and nothing else (`tests/test_trl_port.py` checks it).

`beta` is set explicitly: TRL's default is `1.0` (reverse KL), hf_distill's default divergence is the forward KL. With
`temperature != 1` hf_distill's loss is TRL's times `temperature**2` (see docs/porting_from_trl.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def import_trainer(backend: str):
    """The import: the only lines in which the TRL script and its hf_distill port differ."""
    if backend == "trl":
        from trl import DistillationConfig, DistillationTrainer
    else:
        from hf_distill import DistillationConfig, DistillationTrainer
    return DistillationConfig, DistillationTrainer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("hf_distill", "trl"), default="hf_distill")
    parser.add_argument("--student", default="Qwen/Qwen3-0.6B")
    parser.add_argument("--teacher", default="Qwen/Qwen3-1.7B")
    parser.add_argument("--dataset", default="trl-lib/DeepMath-103K", help="Dataset with a 'prompt' column.")
    parser.add_argument("--output-dir", default="outputs/trl-port-distillation")
    parser.add_argument("--beta", type=float, default=1.0, help="Generalized JSD weight (TRL's default: 1.0).")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-completion-length", type=int, default=256)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--generation-kwargs", default=None, help="JSON, e.g. '{\"do_sample\": false}'.")
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tiny", action="store_true", help="Tiny local models and data (no download, CPU).")
    return parser.parse_args(argv)


def tiny_prompts(n: int):
    """Conversational prompts (the user turns of the tiny chat data)."""
    from _tiny import chat_dataset

    return chat_dataset(n).map(lambda row: {"prompt": row["messages"][:1]}, remove_columns=["messages"])


def build(argv=None):
    """The trainer the script trains (`main` trains it); the tests call this to compare the two backends."""
    args = parse_args(argv)
    DistillationConfig, DistillationTrainer = import_trainer(args.backend)

    if args.tiny:  # local stand-ins, loaded by path exactly like Hub models
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        from _tiny import save_pair

        args.teacher, args.student = save_pair(os.path.join(args.output_dir, "tiny-models"))
        args.max_steps, args.max_completion_length = min(args.max_steps, 5), min(args.max_completion_length, 8)
        train_dataset = tiny_prompts(args.batch_size * args.gradient_accumulation_steps * args.max_steps)
    else:
        from datasets import load_dataset

        train_dataset = load_dataset(args.dataset, split="train").select_columns(["prompt"])

    config = DistillationConfig(
        output_dir=args.output_dir,
        beta=args.beta,
        temperature=args.temperature,
        max_completion_length=args.max_completion_length,
        top_p=args.top_p,
        top_k=args.top_k,
        generation_kwargs=json.loads(args.generation_kwargs) if args.generation_kwargs else None,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=not args.tiny,
        gradient_checkpointing=not args.tiny,
    )
    return DistillationTrainer(
        model=args.student, teacher_model=args.teacher, args=config, train_dataset=train_dataset
    )


def main(argv=None) -> dict:
    trainer = build(argv)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {"first_loss": losses[0], "last_loss": losses[-1], "steps": trainer.state.global_step}
    if trainer.accelerator.is_main_process:
        print("trl port summary:", json.dumps(summary))
        if not all(math.isfinite(loss) for loss in losses):
            raise SystemExit("the training loss is not finite")
    return summary


if __name__ == "__main__":
    main()

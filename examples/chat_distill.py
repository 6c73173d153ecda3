"""Distil a chat model on a conversational ("messages") dataset with the Python API.

    python examples/chat_distill.py                       # Qwen3-1.7B -> Qwen3-0.6B on trl-lib/Capybara
    accelerate launch examples/chat_distill.py            # the same on every GPU accelerate is configured for
    python examples/chat_distill.py --tiny                # tiny local models and data: seconds on a CPU, no download

The dataset's `messages` are rendered with the student's chat template, exactly as `SFTTrainer` does; the teacher
scores the same tokens. With `--assistant-only-loss` only the assistant turns are scored (both the cross-entropy and
the distillation term); it needs a chat template with `{% generation %}` markers.
"""

from __future__ import annotations

import argparse
import json
import math
import os


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="Qwen/Qwen3-0.6B", help="Student model (Hub id or path).")
    parser.add_argument("--teacher", default="Qwen/Qwen3-1.7B", help="Teacher model, same tokenizer as the student.")
    parser.add_argument("--dataset", default="trl-lib/Capybara", help="Conversational dataset (Hub id or path).")
    parser.add_argument("--split", default="train")
    parser.add_argument("--output-dir", default="outputs/chat-distill")
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.1, help="Weight of the hard-label cross-entropy.")
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=2, help="Per-device batch size.")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--assistant-only-loss", action="store_true", help="Score the assistant turns only.")
    parser.add_argument("--tiny", action="store_true", help="Tiny local models and data (no download, CPU).")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from accelerate import PartialState
    from datasets import load_dataset

    from hf_distill import DistillationConfig, DistillationTrainer

    if args.tiny:  # local stand-ins: the same code path as Hub models, loaded by path
        from _tiny import chat_dataset, save_pair

        with PartialState().main_process_first():
            args.teacher, args.student = save_pair(os.path.join(args.output_dir, "tiny-models"))
        train_dataset = chat_dataset(64)
        args.max_steps, args.batch_size, args.gradient_accumulation_steps = min(args.max_steps, 30), 8, 1
        args.learning_rate, args.max_length = 3e-3, 64
    else:
        train_dataset = load_dataset(args.dataset, split=args.split)

    config = DistillationConfig(
        output_dir=args.output_dir,
        divergence=args.divergence,
        temperature=args.temperature,
        alpha=args.alpha,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        assistant_only_loss=args.assistant_only_loss,
        logging_steps=1 if args.tiny else 10,
        save_strategy="no",
        report_to="none",
        # the teacher follows the student's loading options; bf16 weights halve its memory on a GPU
        model_init_kwargs={"dtype": "auto"},
        activation_checkpointing=not args.tiny,
    )
    trainer = DistillationTrainer(
        model=args.student, teacher_model=args.teacher, args=config, train_dataset=train_dataset
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json: the logged losses and metrics
    return summarize(trainer)


def summarize(trainer) -> dict:
    """Print and return the first and last logged training loss."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {"first_loss": losses[0], "last_loss": losses[-1], "steps": trainer.state.global_step}
    if trainer.accelerator.is_main_process:
        print("hf_distill example summary:", json.dumps(summary))
        if not all(math.isfinite(loss) for loss in losses):
            raise SystemExit("the training loss is not finite")
    return summary


if __name__ == "__main__":
    main()

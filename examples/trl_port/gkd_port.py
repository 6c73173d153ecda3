"""Generalized Knowledge Distillation written for TRL's `GKDTrainer`, run unchanged by hf_distill.

    python examples/trl_port/gkd_port.py --tiny                  # hf_distill, tiny local models
    python examples/trl_port/gkd_port.py --tiny --backend trl    # the original GKD script
    python examples/trl_port/gkd_port.py                         # Qwen3-1.7B -> Qwen3-0.6B on trl-lib/Capybara

A GKD script: a conversational (`messages`) dataset, and the fields GKD scripts set (`lmbda`, `beta`, `temperature`,
`max_new_tokens`, `seq_kd`, ...). The two backends differ by the import in `import_trainer` and nothing else
(`tests/test_trl_port.py` checks it): `GKDConfig` / `GKDTrainer` become hf_distill's `DistillationConfig` /
`DistillationTrainer` under the same names.

What keeps the meaning (see docs/porting_from_trl.md):

- `beta` is set explicitly (GKD's default is `0.5`; hf_distill's default divergence is the forward KL);
- `assistant_only_loss=True`: GKD's collator trains on the last assistant turn only, SFT on every token unless asked;
  GKD ignores the field, so the script stays a valid GKD script;
- `temperature`: GKD's loss ignores it (it only samples at it); hf_distill's loss uses it (times `temperature**2`)
  and samples at it. The two losses agree at `temperature=1`, the default here.
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
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    else:
        from hf_distill import DistillationConfig as GKDConfig, DistillationTrainer as GKDTrainer  # noqa: I001
    return GKDConfig, GKDTrainer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("hf_distill", "trl"), default="hf_distill")
    parser.add_argument("--student", default="Qwen/Qwen3-0.6B")
    parser.add_argument("--teacher", default="Qwen/Qwen3-1.7B")
    parser.add_argument("--dataset", default="trl-lib/Capybara", help="Conversational dataset (`messages`).")
    parser.add_argument("--output-dir", default="outputs/trl-port-gkd")
    parser.add_argument("--lmbda", type=float, default=0.5, help="Probability of an on-policy (student) batch.")
    parser.add_argument("--beta", type=float, default=0.5, help="Generalized JSD weight (GKD's default: 0.5).")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seq-kd", action="store_true", help="Off-policy batches use the teacher's samples.")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tiny", action="store_true", help="Tiny local models and data (no download, CPU).")
    return parser.parse_args(argv)


def build(argv=None):
    """The trainer the script trains (`main` trains it); the tests call this to compare the two backends."""
    args = parse_args(argv)
    GKDConfig, GKDTrainer = import_trainer(args.backend)
    from transformers import AutoTokenizer

    if args.tiny:  # local stand-ins, loaded by path exactly like Hub models
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        from _tiny import chat_dataset, save_pair

        args.teacher, args.student = save_pair(os.path.join(args.output_dir, "tiny-models"))
        args.max_steps, args.max_new_tokens, args.max_length = min(args.max_steps, 5), min(args.max_new_tokens, 8), 64
        train_dataset = chat_dataset(args.batch_size * args.gradient_accumulation_steps * args.max_steps)
    else:
        from datasets import load_dataset

        train_dataset = load_dataset(args.dataset, split="train")

    config = GKDConfig(
        output_dir=args.output_dir,
        lmbda=args.lmbda,
        beta=args.beta,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        seq_kd=args.seq_kd,
        max_length=args.max_length,
        assistant_only_loss=True,
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
    return GKDTrainer(
        model=args.student,
        teacher_model=args.teacher,
        args=config,
        train_dataset=train_dataset,
        processing_class=AutoTokenizer.from_pretrained(args.student),
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

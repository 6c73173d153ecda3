"""The embedded arithmetic task through the Python API: train a teacher, distil a smaller student, compare them.

    python examples/arithmetic_distill.py                 # about 3-5 minutes on two CPU cores, no download
    python examples/arithmetic_distill.py --tiny          # seconds: a smoke test (numbers meaningless)
    python examples/arithmetic_distill.py --teacher outputs/demo/teacher   # reuse the teacher `hf-distill demo` saved
    accelerate launch examples/arithmetic_distill.py

`hf-distill demo` runs the same pipeline; this script spells it out with the library's building blocks
(`hf_distill.demo`: task generator, character tokenizer, tiny Llama models, evaluation) and the two trainers, so it
can be copied and changed: swap the divergence, the temperature, the student's shape, the data.
"""

from __future__ import annotations

import argparse
import json
import math
import os


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="outputs/arithmetic-distill")
    parser.add_argument("--teacher", default=None, help="A saved teacher to reuse instead of training one.")
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="A few steps on smaller models: a smoke test.")
    return parser.parse_args(argv)


def training_args(args: argparse.Namespace, steps: int, output_dir: str) -> dict:
    """Settings shared by the teacher's `SFTConfig` and the student's `DistillationConfig`."""
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        adam_beta2=0.99,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        bf16=False,
        activation_checkpointing=False,  # tiny models: no need to trade compute for memory
        completion_only_loss=True,  # score the worked solution, not the prompt
        max_length=256,
        seed=args.seed,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    from hf_distill import DistillationConfig, DistillationTrainer
    from hf_distill.demo import (
        STUDENT_SPEC,
        TEACHER_SPEC,
        TinyModelSpec,
        build_char_tokenizer,
        build_tiny_model,
        exact_match_accuracy,
        held_out_perplexity,
        make_arithmetic_splits,
    )

    teacher_spec, student_spec = TEACHER_SPEC, STUDENT_SPEC
    if args.tiny:
        args.teacher_steps, args.student_steps = min(args.teacher_steps, 20), min(args.student_steps, 12)
        args.batch_size, args.eval_size = 16, 16
        teacher_spec = TinyModelSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        student_spec = TinyModelSpec(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    set_seed(args.seed)

    # 1. Data: prompt-completion pairs ("4738+295=" -> worked column steps, then "#### 5033"); disjoint splits.
    n_train = args.batch_size * max(args.teacher_steps, args.student_steps)
    train, held_out = make_arithmetic_splits(n_train=n_train, n_eval=args.eval_size, seed=args.seed)
    tokenizer = build_char_tokenizer()

    # 2. Teacher: trained from scratch with plain SFT (or loaded).
    if args.teacher:
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher)
    else:
        teacher_dir = os.path.join(args.output_dir, "teacher")
        sft = SFTTrainer(
            model=build_tiny_model(teacher_spec, tokenizer, seed=args.seed),
            args=SFTConfig(**training_args(args, args.teacher_steps, teacher_dir)),
            train_dataset=train,
            processing_class=tokenizer,
        )
        sft.train()
        sft.save_model(teacher_dir)
        teacher = sft.model

    # 3. Student: a smaller model distilled from the teacher's token distributions.
    student_dir = os.path.join(args.output_dir, "student")
    config = DistillationConfig(
        **training_args(args, args.student_steps, student_dir),
        divergence=args.divergence,
        temperature=args.temperature,
        alpha=args.alpha,
    )
    trainer = DistillationTrainer(
        model=build_tiny_model(student_spec, tokenizer, seed=args.seed + 1),
        teacher_model=teacher,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        teacher_processing_class=tokenizer,  # an in-memory teacher carries no tokenizer to check against
    )
    trainer.train()
    trainer.save_model(student_dir)
    trainer.save_state()

    # 4. Evaluation on held-out problems: completion perplexity and exact match of the final answer.
    results = {}
    if trainer.accelerator.is_main_process:
        for name, model in (("teacher", teacher), ("student", trainer.model)):
            results[name] = {
                "perplexity": held_out_perplexity(model, tokenizer, held_out, show_progress=False),
                "exact_match": exact_match_accuracy(model, tokenizer, held_out, show_progress=False),
            }
            scores = results[name]
            print(f"{name}: perplexity {scores['perplexity']:.3f}, exact match {scores['exact_match']:.1%}")
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results.update(first_loss=losses[0], last_loss=losses[-1], steps=trainer.state.global_step)
        print("hf_distill example summary:", json.dumps(results))
        if not all(math.isfinite(loss) for loss in losses):
            raise SystemExit("the training loss is not finite")
    return results


if __name__ == "__main__":
    main()

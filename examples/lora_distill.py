"""Distil into a LoRA adapter on a frozen student (PEFT): only the adapter trains, the teacher is a full model.

    python examples/lora_distill.py                       # Qwen3-8B teacher -> LoRA on Qwen3-1.7B, trl-lib/Capybara
    accelerate launch examples/lora_distill.py            # multi-GPU
    python examples/lora_distill.py --tiny                # tiny local models and data: seconds on a CPU, no download

`peft_config=` is passed exactly as to `SFTTrainer`. The distillation loss flows through the adapted student; the
base weights stay frozen, and `save_model` writes the adapter only (load it with `peft.AutoPeftModelForCausalLM`).
An adapter on `lm_head` is refused: the loss reads the student's LM head directly.
"""

from __future__ import annotations

import argparse
import os

from chat_distill import summarize


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="Qwen/Qwen3-1.7B", help="Base model the adapter is trained on.")
    parser.add_argument("--teacher", default="Qwen/Qwen3-8B", help="Teacher model, same tokenizer as the student.")
    parser.add_argument("--dataset", default="trl-lib/Capybara", help="Any SFT dataset (Hub id or path).")
    parser.add_argument("--split", default="train")
    parser.add_argument("--output-dir", default="outputs/lora-distill")
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.1, help="Weight of the hard-label cross-entropy.")
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=2, help="Per-device batch size.")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true", help="Tiny local models and data (no download, CPU).")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from accelerate import PartialState
    from datasets import load_dataset
    from peft import LoraConfig

    from hf_distill import DistillationConfig, DistillationTrainer

    if args.tiny:
        from _tiny import chat_dataset, save_pair

        with PartialState().main_process_first():
            args.teacher, args.student = save_pair(os.path.join(args.output_dir, "tiny-models"))
        train_dataset = chat_dataset(64)
        args.max_steps, args.batch_size, args.gradient_accumulation_steps = min(args.max_steps, 30), 8, 1
        args.learning_rate, args.max_length, args.lora_r = 1e-2, 64, 8
    else:
        train_dataset = load_dataset(args.dataset, split=args.split)

    peft_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",  # every linear layer of the decoder; PEFT leaves lm_head out
        task_type="CAUSAL_LM",
    )
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
        logging_steps=1 if args.tiny else 10,
        save_strategy="no",
        report_to="none",
        model_init_kwargs={"dtype": "auto"},
        activation_checkpointing=not args.tiny,
    )
    trainer = DistillationTrainer(
        model=args.student,
        teacher_model=args.teacher,
        args=config,
        train_dataset=train_dataset,
        peft_config=peft_config,
    )
    if trainer.accelerator.is_main_process:
        trainer.model.print_trainable_parameters()
    trainer.train()
    trainer.save_model(args.output_dir)  # the adapter (adapter_config.json + adapter_model.safetensors)
    trainer.save_state()
    return summarize(trainer)


if __name__ == "__main__":
    main()

"""Distil a full-precision teacher into a ternary (1.58-bit) BitNet student, then export it.

    python examples/bitnet_distill.py            # SmolLM2-1.7B-Instruct -> ternary SmolLM2-360M on trl-lib/Capybara
    python examples/bitnet_distill.py --tiny     # tiny local models and data: seconds on a CPU, no download

`BitNetCallback` turns every linear layer of the student except `lm_head` into a ternary `BitLinear` when the trainer
is built (before the optimizer), and warms the quantization in linearly: `W + lambda * (Q(W) - W).detach()` with
lambda rising from 0 to 1 over `--warmup-steps`. The trainer saves a QAT checkpoint (latent weights + a transformers
`bitnet` quantization config: stock `from_pretrained` reloads it), and the script exports packed 1.58-bit safetensors
(`<output-dir>/packed`, loadable by stock transformers) and, with `--gguf`, a TQ2_0 GGUF for llama.cpp. The same
with the CLI: `hf-distill export --model <output-dir> --output DIR --format packed|gguf`.
"""

from __future__ import annotations

import argparse
import os

from chat_distill import summarize


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="HuggingFaceTB/SmolLM2-360M")
    parser.add_argument("--teacher", default="HuggingFaceTB/SmolLM2-1.7B-Instruct", help="Same tokenizer.")
    parser.add_argument("--dataset", default="trl-lib/Capybara")
    parser.add_argument("--split", default="train")
    parser.add_argument("--output-dir", default="outputs/bitnet-distill")
    parser.add_argument("--max-steps", type=int, default=5000)
    parser.add_argument("--warmup-steps", type=int, default=1000, help="Steps of the linear lambda warm-up.")
    parser.add_argument("--sub-norm", action="store_true", help="Insert BitNet Distillation's sub-norms.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--gguf", action="store_true", help="Also export a TQ2_0 GGUF (needs `pip install gguf`).")
    parser.add_argument("--tiny", action="store_true", help="Tiny local models and data (no download, CPU).")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from datasets import load_dataset

    from hf_distill import BitNetCallback, DistillationConfig, DistillationTrainer
    from hf_distill.export import export_gguf, export_packed

    if args.tiny:
        from _tiny import chat_dataset, save_pair

        args.teacher, args.student = save_pair(os.path.join(args.output_dir, "tiny-models"))
        train_dataset = chat_dataset(64)
        args.max_steps, args.warmup_steps, args.batch_size = 30, 10, 8
        args.learning_rate, args.max_length = 3e-3, 64
    else:
        train_dataset = load_dataset(args.dataset, split=args.split)

    config = DistillationConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        alpha=0.5,  # half distillation, half cross-entropy on the labels
        logging_steps=1 if args.tiny else 10,
        save_strategy="no",
        report_to="none",
    )
    bitnet = BitNetCallback(schedule="linear", warmup_steps=args.warmup_steps, sub_norm=args.sub_norm)
    trainer = DistillationTrainer(
        model=args.student,
        teacher_model=args.teacher,
        args=config,
        train_dataset=train_dataset,
        callbacks=[bitnet],
    )
    trainer.train()
    trainer.save_model(args.output_dir)  # the QAT checkpoint: latent weights + the bitnet quantization config
    trainer.save_state()

    model, tokenizer = trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class
    if trainer.accelerator.is_main_process:
        packed = export_packed(model, os.path.join(args.output_dir, "packed"), tokenizer=tokenizer, overwrite=True)
        print(packed.summary())
        if args.gguf:
            gguf = export_gguf(model, os.path.join(args.output_dir, "model-tq2_0.gguf"), tokenizer, overwrite=True)
            print(gguf)
    return summarize(trainer)


if __name__ == "__main__":
    main()

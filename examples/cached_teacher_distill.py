"""Distil from a teacher cache: run the teacher once over the data, then train the student without it.

    python examples/cached_teacher_distill.py             # Qwen3-1.7B -> Qwen3-0.6B on trl-lib/Capybara
    python examples/cached_teacher_distill.py --tiny      # tiny local models and data: seconds on a CPU, no download

Step 1 builds a trainer with the teacher and calls `trainer.write_teacher_cache(...)`: the teacher's top-k log-probs
of every scored token, tokenised exactly as training sees them, go to `<cache-dir>/<key hash>/` (rerunning reuses it;
an interrupted write resumes). Step 2 trains with `DistillationConfig(teacher_cache=cache.path)`: no teacher is
loaded. The same with the CLI: `hf-distill cache-teacher ... --cache_dir DIR`, then `hf-distill distill ...
--teacher_cache DIR/<key hash>`.
"""

from __future__ import annotations

import argparse
import os

from chat_distill import summarize


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="Qwen/Qwen3-0.6B")
    parser.add_argument("--teacher", default="Qwen/Qwen3-1.7B", help="Same tokenizer as the student.")
    parser.add_argument("--dataset", default="trl-lib/Capybara")
    parser.add_argument("--split", default="train")
    parser.add_argument("--output-dir", default="outputs/cached-teacher-distill")
    parser.add_argument("--cache-dir", default="outputs/teacher-caches")
    parser.add_argument("--top-k", type=int, default=64, help="Teacher tokens kept per scored position.")
    parser.add_argument("--logprob-bits", type=int, default=8, choices=[32, 16, 8, 4])
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument(
        "--dataloader-num-workers", type=int, default=2, help="Processes that look up and decode the cached targets."
    )
    parser.add_argument("--tiny", action="store_true", help="Tiny local models and data (no download, CPU).")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from datasets import load_dataset

    from hf_distill import DistillationConfig, DistillationTrainer

    if args.tiny:
        from _tiny import chat_dataset, save_pair

        args.teacher, args.student = save_pair(os.path.join(args.output_dir, "tiny-models"))
        train_dataset = chat_dataset(64)
        args.max_steps, args.batch_size, args.learning_rate, args.max_length = 30, 8, 3e-3, 64
        args.top_k = 16
    else:
        train_dataset = load_dataset(args.dataset, split=args.split)

    def config(**extra) -> DistillationConfig:
        return DistillationConfig(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            max_length=args.max_length,
            logging_steps=1 if args.tiny else 10,
            save_strategy="no",
            report_to="none",
            **extra,
        )

    # 1. The teacher, once: its top-k targets for every scored token of the prepared training set
    writer = DistillationTrainer(
        model=args.student, teacher_model=args.teacher, args=config(), train_dataset=train_dataset
    )
    cache = writer.write_teacher_cache(args.cache_dir, k=args.top_k, logprob_bits=args.logprob_bits)
    print(f"teacher cache: {cache.path} ({len(cache)} rows, {cache.bytes_per_logit:.2f} bytes per kept logit)")
    del writer  # the teacher is not needed any more

    # 2. The student, from the cache: no teacher model is loaded
    # (the cache lookup runs in the DataLoader workers while the previous step trains)
    trainer = DistillationTrainer(
        model=args.student,
        args=config(teacher_cache=str(cache.path), dataloader_num_workers=args.dataloader_num_workers),
        train_dataset=train_dataset,
    )
    assert trainer.teacher_model is None
    trainer.train()
    trainer.save_model(args.output_dir)
    trainer.save_state()
    return summarize(trainer)


if __name__ == "__main__":
    main()

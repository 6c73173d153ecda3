"""Worker for tests/test_distributed.py: one short distillation run, single process or under torchrun."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from tiny import lm_dataset, make_model, make_tokenizer  # noqa: E402

from hf_distill import DistillationConfig, DistillationTrainer  # noqa: E402


def main(output_dir: str, per_device_batch: int, cache_root: str | None = None) -> None:
    """Train 3 steps; with `cache_root`, from a top-k teacher cache there (written by the first, single-process run,
    then found complete by the others) instead of the live teacher."""
    tokenizer = make_tokenizer()
    student = make_model(len(tokenizer), seed=1)
    teacher = make_model(len(tokenizer), hidden_size=48, seed=2)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8)
    args = DistillationConfig(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
        max_steps=3,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        use_cpu=True,
        bf16=False,
        dataloader_pin_memory=False,
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
        alpha=0.3,
        temperature=2.0,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=lm_dataset(12), processing_class=tokenizer
    )
    if cache_root is not None:
        cache = trainer.write_teacher_cache(cache_root, k=16, show_progress=False)
        args.teacher_cache = str(cache.path)
        trainer = DistillationTrainer(
            model=make_model(len(tokenizer), seed=1),
            args=args,
            train_dataset=lm_dataset(12),
            processing_class=tokenizer,
        )
        assert trainer.teacher_model is None
    trainer.train()
    trainer.save_model(output_dir)
    if trainer.accelerator.is_main_process:
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        Path(output_dir, "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4])

"""Training run for tests/test_checkpoint_resume.py, meant to be killed and rerun.

    python tests/resume_worker.py api OUTPUT_DIR         # DistillationTrainer on tiny in-memory models
    python tests/resume_worker.py cli ARGS...            # `hf-distill distill ARGS...`

Both resume with `resume_from_checkpoint="auto"`. Markers on stdout tell the test where the run is: `STEP n` before
each optimizer step and `IN_SAVE n` in the middle of writing checkpoint n (between the model and the optimizer), where
the run sleeps `RESUME_WORKER_SAVE_SLEEP` seconds so that a kill lands during the write.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny import lm_dataset, make_model, make_tokenizer  # noqa: E402

from hf_distill import DistillationConfig, DistillationTrainer  # noqa: E402

MAX_STEPS = 6


def _install_markers() -> None:
    """Print markers from inside training (and sleep in the middle of each checkpoint write)."""
    step = DistillationTrainer.training_step
    save = DistillationTrainer._save_optimizer_and_scheduler

    def training_step(self, *args, **kwargs):
        print(f"STEP {self.state.global_step + 1}", flush=True)
        time.sleep(float(os.environ.get("RESUME_WORKER_STEP_SLEEP", "0")))
        return step(self, *args, **kwargs)

    def save_optimizer(self, output_dir):
        print(f"IN_SAVE {self.state.global_step}", flush=True)
        time.sleep(float(os.environ.get("RESUME_WORKER_SAVE_SLEEP", "0")))
        return save(self, output_dir)

    DistillationTrainer.training_step = training_step
    DistillationTrainer._save_optimizer_and_scheduler = save_optimizer


def config(output_dir: str, **overrides) -> DistillationConfig:
    """The deterministic CPU configuration the tests train with (SGD; saves at every step)."""
    values = dict(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        max_steps=MAX_STEPS,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="linear",
        report_to="none",
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        max_length=32,
        dataloader_pin_memory=False,
        dataloader_num_workers=0,
        seed=0,
        alpha=0.3,
        temperature=2.0,
    )
    values.update(overrides)
    return DistillationConfig(**values)


def build_trainer(
    output_dir: str, trainer_cls=DistillationTrainer, callbacks=None, **overrides
) -> DistillationTrainer:
    """A `DistillationTrainer` over tiny models (student seed 1, teacher seed 2) and 16 rows of text."""
    tokenizer = make_tokenizer()
    student = make_model(len(tokenizer), seed=1)
    teacher = make_model(len(tokenizer), hidden_size=48, seed=2)
    return trainer_cls(
        model=student,
        teacher_model=teacher,
        args=config(output_dir, **overrides),
        train_dataset=lm_dataset(16),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def main(argv: list[str]) -> int:
    _install_markers()
    if argv[0] == "api":
        from hf_distill.callbacks import PREEMPTED_EXIT_CODE, TrainingPreempted

        if "LOCAL_RANK" in os.environ:  # under torchrun: say which process is which, so a test can signal one
            print(f"RANK {os.environ['RANK']} PID {os.getpid()}", flush=True)
        trainer = build_trainer(argv[1])
        try:
            trainer.train(resume_from_checkpoint="auto")
        except TrainingPreempted:
            return PREEMPTED_EXIT_CODE
        trainer.save_model()
        print("DONE", flush=True)
        return 0
    from hf_distill.cli.main import main as cli_main

    return cli_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

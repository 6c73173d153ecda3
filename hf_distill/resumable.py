"""Resuming after a crash, a kill or a preemption, for a `transformers.Trainer` subclass (docs/resume.md).

[`ResumableTrainerMixin`] goes before the `Trainer` class in the bases: `train(resume_from_checkpoint="auto")` picks
the newest complete checkpoint, checkpoints are written to a staging folder and renamed into place only once
complete, and a [`CheckpointResumer`] callback turns a preemption signal into a saved checkpoint and a
[`TrainingPreempted`] exception.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers.utils import logging

from . import checkpoints
from .callbacks.checkpoint_resumer import CheckpointResumer, TrainingPreempted
from .model_forward import unwrap_peft

logger = logging.get_logger(__name__)

__all__ = ["ResumableTrainerMixin"]


class ResumableTrainerMixin:
    """Resume from the newest complete checkpoint, write checkpoints atomically, stop cleanly on preemption.

    Call [`install_resumer`] at the end of the trainer's `__init__`.
    """

    def install_resumer(self) -> None:
        """Add a [`CheckpointResumer`] unless one is there, and set up the checkpoint bookkeeping."""
        if not any(isinstance(callback, CheckpointResumer) for callback in self.callback_handler.callbacks):
            self.add_callback(CheckpointResumer())  # save and stop on SIGTERM/SIGINT/SIGUSR1; see `train`
        self._last_checkpoint: str | None = None
        self._checkpoint_staging_root: str | None = None

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ):
        """`Trainer.train`, with `resume_from_checkpoint="auto"` and a clean stop on preemption signals.

        Args:
            resume_from_checkpoint (`str` or `bool`, *optional*):
                `"auto"`: resume from the newest complete checkpoint in `output_dir` (incomplete ones are skipped
                with a warning naming the file at fault, and kept), or start fresh, saying so, when there is none.
                A path: resume from that checkpoint (it must exist and be complete). `True`: like `"auto"`, but no
                checkpoint is an error. Default: `args.resume_from_checkpoint`.
            trial: As in `Trainer.train`.
            ignore_keys_for_eval: As in `Trainer.train`.

        Returns:
            `TrainOutput`: As `Trainer.train`.

        Raises:
            ValueError: If the checkpoint named does not exist, is incomplete, or was saved by a model of other
                shapes (nothing is deleted).
            TrainingPreempted: After a SIGTERM/SIGINT/SIGUSR1 stopped training and a checkpoint was saved.
        """
        if resume_from_checkpoint is None:
            resume_from_checkpoint = self.args.resume_from_checkpoint
        checkpoint = self.resolve_resume_checkpoint(resume_from_checkpoint)
        resumer = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, CheckpointResumer)), None)
        try:
            output = super().train(
                resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
            )
        finally:
            if resumer is not None:  # also when training failed (no `on_train_end` then)
                resumer.restore_signal_handlers()
        if resumer is not None and resumer.preempted:
            raise TrainingPreempted(resumer.received, self.state.global_step, self._last_checkpoint)
        return output

    def resolve_resume_checkpoint(self, value: str | bool | None) -> str | None:
        """The checkpoint folder `train` resumes from (`None`: start fresh), checked to be complete and to fit.

        Args:
            value (`str` or `bool`, *optional*): `resume_from_checkpoint` as `train` takes it.

        Returns:
            `str` or `None`: The checkpoint folder, or `None` to start fresh.

        Raises:
            ValueError: A named checkpoint that does not exist, is incomplete or does not fit the model.
        """
        if value is None or value is False:
            return None
        output_dir = self.args.output_dir
        if value is True or (isinstance(value, str) and value.lower() == "auto"):
            found = checkpoints.find_resumable_checkpoint(output_dir, save_only_model=self.args.save_only_model)
            if found.path is None:
                if value is True:
                    raise ValueError(
                        f"`resume_from_checkpoint=True` but {output_dir} holds no complete checkpoint. Use 'auto' to "
                        "start fresh when there is none."
                    )
                logger.warning(f"No complete checkpoint in {output_dir}: starting training from scratch.")
                return None
            logger.warning(f"Resuming training from {found.path} (step {found.step}).")
            path = found.path
        else:
            path = str(value)
            if not os.path.exists(path):
                raise ValueError(
                    f"`resume_from_checkpoint={path!r}` does not exist. Give an existing `checkpoint-N` folder, or "
                    "'auto' to resume from the newest complete checkpoint in `output_dir` (or start fresh)."
                )
            problem = checkpoints.checkpoint_problem(path)
            if problem is not None:
                raise ValueError(
                    f"`resume_from_checkpoint={path!r}` is not a complete checkpoint: {problem}. Give a "
                    "`checkpoint-N` folder written by the Trainer, or 'auto' to pick the newest complete one."
                )
        checkpoints.check_checkpoint_matches_model(path, unwrap_peft(self.model))
        return path

    def _get_output_dir(self, trial: Any) -> str:
        # Private `Trainer` method (transformers 5.24): `_save_checkpoint` writes `<this>/checkpoint-N`; while it runs
        # here, "this" is the staging folder, so the checkpoint becomes visible only once complete
        if self._checkpoint_staging_root is not None:
            return self._checkpoint_staging_root
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # Private `Trainer` method (transformers 5.24 writes `checkpoint-N` in place, then rotates): here every process
        # writes into `<output_dir>/.hf_distill-staging/checkpoint-N`; once all are done, the main process fsyncs and
        # renames it to `checkpoint-N`, then rotates among complete checkpoints only.
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging_root = os.path.join(run_dir, checkpoints.STAGING_DIR)
        if self.args.should_save:
            checkpoints.clear_staging(staging_root)
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)  # (its rotation sees the staging folder alone: deletes nothing)
        finally:
            self._checkpoint_staging_root = None
        self.accelerator.wait_for_everyone()  # every process has written its files (RNG states, shards)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.state.best_model_checkpoint == staged:
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        if self.args.should_save:
            checkpoints.publish_checkpoint(staged, final)
            checkpoints.rotate_complete_checkpoints(
                run_dir,
                self.args.save_total_limit,
                keep=(self.state.best_model_checkpoint,),
                save_only_model=self.args.save_only_model,
            )
        self.accelerator.wait_for_everyone()
        self._last_checkpoint = final

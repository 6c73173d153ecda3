"""`CheckpointResumer`: on SIGTERM / SIGINT / SIGUSR1, finish the step, save a checkpoint and stop training.

Clusters preempt jobs with a signal (SLURM sends SIGUSR1 or SIGTERM some time before the kill; Kubernetes and spot
instances send SIGTERM). The callback turns the first signal into "finish the current optimizer step, write a
checkpoint, stop"; [`DistillationTrainer`] then raises [`TrainingPreempted`], which `hf-distill distill` turns into
exit code [`PREEMPTED_EXIT_CODE`] (75). Rerunning the same command with `--resume_from_checkpoint auto` continues from
that checkpoint. A second signal exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from transformers import TrainerCallback
from transformers.utils import logging

__all__ = ["PREEMPTED_EXIT_CODE", "CheckpointResumer", "TrainingPreempted"]

logger = logging.get_logger(__name__)

PREEMPTED_EXIT_CODE = 75
"""Exit code of `hf-distill distill` after a preemption signal was handled (`EX_TEMPFAIL`: rerun to resume)."""


class TrainingPreempted(RuntimeError):
    """Training stopped early on a preemption signal, after saving a checkpoint to resume from.

    Attributes:
        signal_name (`str`): The signal received (`"SIGTERM"`, `"SIGINT"`, `"SIGUSR1"`).
        global_step (`int`): The last optimizer step completed (and saved).
        checkpoint (`str` or `None`): The checkpoint written at that step.
    """

    def __init__(self, signal_name: str, global_step: int, checkpoint: str | None):
        self.signal_name = signal_name
        self.global_step = global_step
        self.checkpoint = checkpoint
        super().__init__(
            f"Training was stopped by {signal_name} after step {global_step}; checkpoint saved to {checkpoint}. "
            "Rerun the same command with `resume_from_checkpoint='auto'` (`--resume_from_checkpoint auto`) to "
            "continue from it."
        )


class CheckpointResumer(TrainerCallback):
    """Save and stop cleanly when the job is asked to stop (SIGTERM, SIGINT, SIGUSR1).

    Signal handlers are installed at `on_train_begin` and the previous ones restored at `on_train_end` (and by
    [`restore_signal_handlers`], which `DistillationTrainer` also calls when training fails). The first signal sets a
    flag; at the end of the current optimizer step the callback asks the trainer to save a checkpoint and stop. With
    several processes the flag is all-reduced at each step end, so every rank stops at the same step (one rank
    receiving the signal is enough). A second signal exits the process at once with code `128 + signal`.

    `DistillationTrainer` adds one automatically (`DistillationConfig.save_on_preemption=True`) and raises
    [`TrainingPreempted`] after such a stop. With a plain `Trainer`, add it yourself and check
    [`preempted`](#CheckpointResumer.preempted) after `train()` returns.

    Args:
        signals (`tuple[str, ...]`, *optional*, defaults to `("SIGTERM", "SIGINT", "SIGUSR1")`): Signals to handle
            (names not available on this platform are ignored).
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1")):
        self.signals = tuple(name for name in signals if hasattr(signal, name))
        self.received: str | None = None
        self.preempted = False
        self.stopped_at_step: int | None = None
        self._previous: dict[int, object] = {}

    # Signal handling ----------------------------------------------------------------------------------------------

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if signum == signal.SIGINT:  # Ctrl-C twice: Python's own interrupt (a notebook's kernel survives it)
                print("hf_distill: second Ctrl-C: interrupting now, without saving.", file=sys.stderr, flush=True)
                raise KeyboardInterrupt
            print(f"hf_distill: second signal ({name}) received: exiting now, without saving.", file=sys.stderr)
            sys.stderr.flush()
            os._exit(128 + signum)
        self.received = name
        print(
            f"hf_distill: {name} received: finishing the current step, then saving a checkpoint and stopping "
            "(send it again to exit at once).",
            file=sys.stderr,
            flush=True,
        )

    def install_signal_handlers(self) -> None:
        """Install the handlers (main thread only; elsewhere Python cannot, and a warning says so)."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("CheckpointResumer: not in the main thread, so no signal handlers are installed.")
            return
        for name in self.signals:
            signum = getattr(signal, name)
            if signum not in self._previous:
                self._previous[signum] = signal.signal(signum, self._handle)

    def restore_signal_handlers(self) -> None:
        """Put back the handlers that were there before `install_signal_handlers`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    # Callback events ----------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = None
        self.preempted = False
        self.stopped_at_step = None
        self.install_signal_handlers()

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received(args):
            self.preempted = True
            self.stopped_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_signal_handlers()

    def _any_rank_received(self, args) -> bool:
        local = self.received is not None
        import torch.distributed as dist

        if args.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return local
        import torch

        flag = torch.tensor([1 if local else 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = "a signal on another process"
        return bool(flag.item())

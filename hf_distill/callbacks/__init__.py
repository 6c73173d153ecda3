"""Trainer callbacks shipped with hf_distill."""

from .bitnet import BitNetCallback
from .checkpoint_resumer import PREEMPTED_EXIT_CODE, CheckpointResumer, TrainingPreempted

__all__ = ["PREEMPTED_EXIT_CODE", "BitNetCallback", "CheckpointResumer", "TrainingPreempted"]

"""hf_distill: knowledge distillation for Hugging Face transformers and TRL.

Change `from trl import SFTTrainer, SFTConfig` to `from hf_distill import DistillationTrainer, DistillationConfig` and
pass `teacher_model=`. Heavy submodules are imported lazily, on first attribute access.
"""

import importlib as _importlib
import typing as _typing

__version__ = "0.1.0"

_LAZY = {
    "BitLinear": "hf_distill.bitnet",
    "BitNetCallback": "hf_distill.callbacks",
    "LambdaSchedule": "hf_distill.bitnet",
    "convert_to_bitnet": "hf_distill.bitnet",
    "CheckpointResumer": "hf_distill.callbacks",
    "PREEMPTED_EXIT_CODE": "hf_distill.callbacks",
    "TrainingPreempted": "hf_distill.callbacks",
    "IncompleteCheckpointWarning": "hf_distill.checkpoints",
    "ResumePoint": "hf_distill.checkpoints",
    "find_resumable_checkpoint": "hf_distill.checkpoints",
    "DistillationConfig": "hf_distill.config",
    "DistillationTrainer": "hf_distill.trainer",
    "check_dataset_columns": "hf_distill.dataset_checks",
    "DIVERGENCE_NAMES": "hf_distill.losses",
    "DenseTeacher": "hf_distill.losses",
    "DistillationLossOutput": "hf_distill.losses",
    "HiddenStateTeacher": "hf_distill.losses",
    "LMHead": "hf_distill.losses",
    "chunked_distillation_loss": "hf_distill.losses",
    "token_divergence": "hf_distill.losses",
    "TopKTeacher": "hf_distill.losses",
    "TeacherCache": "hf_distill.teachers.cache",
    "TeacherCacheError": "hf_distill.teachers.cache_keys",
    "load_teacher": "hf_distill.teachers.live",
    "resolve_distill_vocab_size": "hf_distill.teachers.vocab",
    "VocabularyWarning": "hf_distill.teachers.vocab",
}

__all__ = [
    "BitLinear",
    "BitNetCallback",
    "LambdaSchedule",
    "convert_to_bitnet",
    "DIVERGENCE_NAMES",
    "PREEMPTED_EXIT_CODE",
    "CheckpointResumer",
    "DenseTeacher",
    "DistillationConfig",
    "DistillationLossOutput",
    "DistillationTrainer",
    "HiddenStateTeacher",
    "IncompleteCheckpointWarning",
    "LMHead",
    "ResumePoint",
    "TeacherCache",
    "TeacherCacheError",
    "TopKTeacher",
    "TrainingPreempted",
    "VocabularyWarning",
    "check_dataset_columns",
    "chunked_distillation_loss",
    "find_resumable_checkpoint",
    "load_teacher",
    "resolve_distill_vocab_size",
    "token_divergence",
]

if _typing.TYPE_CHECKING:
    from .bitnet import BitLinear, LambdaSchedule, convert_to_bitnet
    from .callbacks import PREEMPTED_EXIT_CODE, BitNetCallback, CheckpointResumer, TrainingPreempted
    from .checkpoints import IncompleteCheckpointWarning, ResumePoint, find_resumable_checkpoint
    from .config import DistillationConfig
    from .dataset_checks import check_dataset_columns
    from .losses import (
        DIVERGENCE_NAMES,
        DenseTeacher,
        DistillationLossOutput,
        HiddenStateTeacher,
        LMHead,
        TopKTeacher,
        chunked_distillation_loss,
        token_divergence,
    )
    from .teachers.cache import TeacherCache
    from .teachers.cache_keys import TeacherCacheError
    from .teachers.live import load_teacher
    from .teachers.vocab import VocabularyWarning, resolve_distill_vocab_size
    from .trainer import DistillationTrainer


from .registration import install as _install_registration  # noqa: E402

_install_registration()  # the model types of hf_distill.models, once transformers' Auto classes load


def __getattr__(name: str) -> object:
    # Names of `_LAZY` are imported on first access and then cached as module globals.
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_distill' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The public API only: not the helpers above, nor the submodules that importing a name binds here.
    return sorted({*__all__, "__version__"})

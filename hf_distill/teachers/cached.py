"""A teacher cache in training: writing one from a trainer's own data path, and reading its targets batch by batch.

The cache is made from the trainer's prepared dataset and collator (the same tokenisation, truncation, masks and
padding the training step sees), so a training batch row finds its record by [`row_key`] whatever the shuffling. The
key records what changes the content; the part that must match at training time (tokenizer, max length, packing,
masks, temperature) is compared when the trainer opens the cache, and a mismatch is a clear error naming the fields.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cache import TeacherCache
from .cache_keys import (
    TeacherCacheError,
    cache_dir_for,
    cache_key,
    fingerprint_model,
    fingerprint_tokenizer,
)
from .cache_writer import check_tail_samples
from .cached_batches import eval_datasets

if TYPE_CHECKING:
    from ..trainer import DistillationTrainer

logger = logging.getLogger(__name__)

__all__ = [
    "check_sampled_tail_divergence",
    "open_training_cache",
    "training_key",
    "write_training_cache",
]


def training_key(args: Any, tokenizer: Any) -> dict[str, Any]:
    """The part of a cache key that a training run must match: what decides the rows and the scored positions.

    Args:
        args ([`DistillationConfig`]): The training configuration.
        tokenizer: The student's tokenizer (the one that tokenised the dataset).

    Returns:
        `dict`: JSON-serialisable key fields.
    """
    return {
        "tokenizer": fingerprint_tokenizer(tokenizer),
        "max_length": args.max_length,
        "truncation_mode": getattr(args, "truncation_mode", None),
        "packing": bool(args.packing),
        "padding_free": bool(args.padding_free),
        "completion_only_loss": args.completion_only_loss,
        "assistant_only_loss": bool(args.assistant_only_loss),
        "dataset_text_field": args.dataset_text_field,
        "pad_to_multiple_of": args.pad_to_multiple_of,
    }


def _refuse_packing(args: Any) -> None:
    if args.packing or args.padding_free:
        raise ValueError(
            "A teacher cache is keyed by each training row, but with `packing` or `padding_free` the collator "
            "concatenates a batch's rows into one, which changes with the shuffling. Set `packing=False` and "
            "`padding_free=False` to use a teacher cache."
        )


def write_training_cache(
    trainer: DistillationTrainer,
    root: str | os.PathLike,
    *,
    k: int,
    logprob_bits: int = 8,
    batch_size: int | None = None,
    rows_per_shard: int = 1024,
    show_progress: bool = True,
    tail_samples: int = 0,
    seed: int = 0,
    include_eval: bool = True,
) -> TeacherCache:
    """Run the trainer's teacher once over its prepared training set (and evaluation sets) and store the top-k targets
    (resumable).

    The cache goes to `root/<key hash>/`: the same inputs find the same folder (and a complete cache there means no
    teacher forward at all); another teacher, tokenizer, dataset, max length, k, temperature or precision gets
    another folder. The teacher runs under the trainer's autocast, as in a training step.

    Args:
        trainer ([`DistillationTrainer`]): A trainer built with a teacher model (not from a cache).
        root (`str` or `os.PathLike`): Folder that holds caches, one sub-folder per key.
        k (`int`): Tokens kept per scored position.
        logprob_bits (`int`, *optional*, defaults to `8`): 32 (exact), 16, 8 or 4 bits per stored log-prob.
        batch_size (`int`, *optional*): Rows per teacher forward; defaults to `per_device_train_batch_size`.
        rows_per_shard (`int`, *optional*, defaults to `1024`): Rows per shard (the unit of resumption).
        show_progress (`bool`, *optional*, defaults to `True`): Show a progress bar with tokens/s.
        tail_samples (`int`, *optional*, defaults to `0`): Of the `k` ids per position, how many are sampled from the
            teacher's tail instead of being its next most likely ids (`0 <= tail_samples < k`): an unbiased target,
            for `divergence="forward_kl"` only (see [`write_teacher_cache`] and `docs/teacher_cache.md`).
        seed (`int`, *optional*, defaults to `0`): Seed of the tail sampling (part of the key when `tail_samples > 0`).
        include_eval (`bool`, *optional*, defaults to `True`): Also cache the rows of the trainer's `eval_dataset`
            (after the training rows; their fingerprints and row counts join the key), so that a run from the cache
            can evaluate. Without an `eval_dataset` nothing changes.

    Returns:
        [`TeacherCache`]: The complete cache; `cache.path` is the folder to pass as `teacher_cache`.

    Raises:
        ValueError: If the trainer has no teacher model, uses packing, `k` exceeds the distilled vocabulary, or
            `tail_samples` is not in `[0, k)`.
    """
    from .cache_builder import write_teacher_cache

    args = trainer.args
    if trainer.teacher_model is None:
        raise ValueError("This trainer reads a teacher cache and has no teacher model to write one with.")
    _refuse_packing(args)
    if trainer.train_dataset is None:
        raise ValueError("The trainer has no `train_dataset` to run the teacher over.")
    if k > trainer.distill_vocab_size:
        raise ValueError(
            f"k={k} is larger than the distilled vocabulary ({trainer.distill_vocab_size} tokens): use at most "
            f"{trainer.distill_vocab_size}."
        )
    check_tail_samples(tail_samples, k)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    key = {
        **training_key(args, tokenizer),
        "teacher": trainer._teacher_name_or_path,
        "teacher_fingerprint": fingerprint_model(teacher),
        "dataset_fingerprint": getattr(trainer.train_dataset, "_fingerprint", None),
        "num_rows": len(trainer.train_dataset),
    }
    rows = [trainer.train_dataset]
    evals = eval_datasets(trainer.eval_dataset) if include_eval else []
    if evals:  # only then: a cache of the training rows alone keeps its key
        key["eval_dataset_fingerprints"] = [getattr(dataset, "_fingerprint", None) for dataset in evals]
        key["eval_num_rows"] = [len(dataset) for dataset in evals]
        rows += evals
    full_key = cache_key(
        key,
        vocab_size=trainer.distill_vocab_size,
        k=k,
        temperature=args.temperature,
        logprob_bits=logprob_bits,
        tail_samples=tail_samples,
        seed=seed,
    )
    path = cache_dir_for(root, full_key)
    with trainer.accelerator.autocast():
        return write_teacher_cache(
            teacher,
            ChainedRows(rows),
            path,
            key=key,
            k=k,
            temperature=args.temperature,
            logprob_bits=logprob_bits,
            batch_size=batch_size or args.per_device_train_batch_size,
            rows_per_shard=rows_per_shard,
            collate=trainer.data_collator,
            vocab_size=trainer.distill_vocab_size,
            show_progress=show_progress,
            tail_samples=tail_samples,
            seed=seed,
        )


class ChainedRows(Sequence):
    """Several datasets read as one sequence of rows, in order (the rows a cache is written from)."""

    def __init__(self, datasets: list[Any]):
        self.datasets = datasets
        self.starts = np.cumsum([0] + [len(dataset) for dataset in datasets]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = bisect.bisect_right(self.starts, index) - 1
        return self.datasets[part][index - self.starts[part]]


def open_training_cache(path: str | os.PathLike, args: Any, tokenizer: Any, student_vocab_rows: int) -> TeacherCache:
    """Open the cache named by `DistillationConfig.teacher_cache` and check that it fits this training run.

    Args:
        path (`str` or `os.PathLike`): The cache folder (`cache.path` of [`write_training_cache`]).
        args ([`DistillationConfig`]): The training configuration.
        tokenizer: The student's tokenizer.
        student_vocab_rows (`int`): Rows of the student's LM head.

    Returns:
        [`TeacherCache`]

    Raises:
        TeacherCacheError: A missing, incomplete or corrupt cache, or one made for other settings (the message names
            the fields that differ).
        ValueError: Packing, a `distill_vocab_size` other than the cache's, a student head smaller than it, or a
            cache with a sampled tail and a divergence other than `"forward_kl"`.
    """
    _refuse_packing(args)
    folder = Path(path)
    if not folder.exists():
        raise TeacherCacheError(
            f"teacher_cache={str(path)!r} does not exist. Make it with `hf-distill cache-teacher` (it prints the "
            "folder to pass here)."
        )
    expected = {**training_key(args, tokenizer), "temperature": args.temperature}
    # Shuffled batches visit shards at random: each lookup reads its row's bytes from the mapped shard
    cache = TeacherCache.open(folder, expected_key=expected)
    if args.distill_vocab_size is not None and args.distill_vocab_size != cache.vocab_size:
        raise ValueError(
            f"`distill_vocab_size={args.distill_vocab_size}` but the teacher cache compares {cache.vocab_size} "
            "vocabulary columns. Drop `distill_vocab_size` or rebuild the cache with it."
        )
    if cache.vocab_size > student_vocab_rows:
        raise ValueError(
            f"The teacher cache covers {cache.vocab_size} vocabulary columns but the student's LM head has only "
            f"{student_vocab_rows} rows: the cache was made for another student vocabulary."
        )
    check_sampled_tail_divergence(cache, args.divergence)
    return cache


def check_sampled_tail_divergence(cache: TeacherCache, divergence: str) -> None:
    """Refuse a divergence other than forward KL with a cache whose tail is sampled (`cache.tail_samples > 0`).

    Such a cache stores an unbiased estimate `p_hat` of the teacher's distribution (`E[p_hat] = p`). Forward KL
    against `p_hat` is a cross-entropy against it plus a constant, linear in `p_hat`, so its gradient is an unbiased
    estimate of the full forward-KL gradient. Every other divergence needs the teacher's probability of tokens that
    were not drawn (or is not linear in the teacher's probabilities), so it would train towards a biased target.

    Args:
        cache ([`TeacherCache`]): The open cache.
        divergence (`str`): `DistillationConfig.divergence`.

    Raises:
        ValueError: If `cache.tail_samples > 0` and `divergence != "forward_kl"`.
    """
    if cache.tail_samples and divergence != "forward_kl":
        raise ValueError(
            f"The teacher cache at {cache.path} samples its tail ({cache.tail_samples} of its k={cache.k} ids per "
            f"position are random draws from the teacher's tail): it is an unbiased estimate of the teacher's "
            f"distribution only for divergence='forward_kl', got divergence={divergence!r}. Train with "
            "divergence='forward_kl', or use a cache written with tail_samples=0 (the exact top k)."
        )

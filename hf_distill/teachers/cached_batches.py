"""Cached teacher targets fetched with the batch: the lookup and decode run in the data loader, off the training step.

[`CacheTargetsCollator`] wraps the trainer's collator. After the batch is collated (CPU tensors), it computes each
row's [`row_key`], looks the rows up in the [`TeacherCache`] and decodes their top-k targets into a
[`CachedBatchTargets`] stored in the batch under [`CACHED_TARGETS_KEY`]. So this CPU work runs in the DataLoader's
worker processes when `dataloader_num_workers > 0` (overlapping the previous step), never reads a tensor back from
the accelerator (the keys come from the CPU batch), and the token-id range check is done once on the CPU instead of
with a host sync in the loss. The DataLoader's pin-memory thread pins the targets with the rest of the batch, and the
trainer copies them to the device asynchronously.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..losses import TopKTeacher
from .cache import TeacherCache
from .cache_keys import RowNotCachedError, TeacherCacheError, batch_row_keys

__all__ = [
    "CACHED_TARGETS_KEY",
    "CacheTargetsCollator",
    "CachedBatchTargets",
    "cache_collator",
    "check_rows_cached",
    "fetch_cached_targets",
]

CACHED_TARGETS_KEY = "hf_distill_cached_teacher_targets"
"""Batch key of the [`CachedBatchTargets`] added by [`CacheTargetsCollator`] (removed before the model's forward)."""


@dataclass
class CachedBatchTargets:
    """The cached top-k targets of one batch's scored positions, row-major, on the CPU until [`to_teacher`].

    Not a tensor and without a `to` method on purpose: `Trainer._prepare_inputs` and accelerate leave it where it is,
    and [`to_teacher`] moves it with non-blocking copies. The DataLoader pins it through [`pin_memory`].

    Attributes:
        token_ids (`torch.Tensor`): `[N, k]` token ids.
        log_probs (`torch.Tensor`): `[N, k]` teacher log-probs.
        rest_log_prob (`torch.Tensor`): `[N]` log of the teacher mass outside the ids.
        temperature (`float`): Temperature the log-probs were computed at.
        vocab_rows (`int`): The cache's vocabulary size.
        ids_bound (`int`): One more than the largest id (0 for no position), checked on the CPU.
    """

    token_ids: torch.Tensor
    log_probs: torch.Tensor
    rest_log_prob: torch.Tensor
    temperature: float
    vocab_rows: int
    ids_bound: int

    def pin_memory(self) -> CachedBatchTargets:
        """A copy in page-locked memory (called by the DataLoader's pin-memory thread), so device copies are async."""
        return CachedBatchTargets(
            self.token_ids.pin_memory(),
            self.log_probs.pin_memory(),
            self.rest_log_prob.pin_memory(),
            self.temperature,
            self.vocab_rows,
            self.ids_bound,
        )

    def to_teacher(self, device: torch.device | str) -> TopKTeacher:
        """The targets as a [`TopKTeacher`] on `device` (non-blocking copies; the id range is already known)."""
        return TopKTeacher(
            self.token_ids.to(device, non_blocking=True),
            self.log_probs.to(device, non_blocking=True),
            self.rest_log_prob.to(device, non_blocking=True),
            self.temperature,
            vocab_rows=self.vocab_rows,
            ids_bound=self.ids_bound,
        )


def fetch_cached_targets(
    cache: TeacherCache,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pre_shifted: bool = False,
) -> CachedBatchTargets:
    """Look up and decode the cached targets of a collated batch's rows.

    Args:
        cache ([`TeacherCache`]): The open cache.
        input_ids (`torch.Tensor`): The batch's `input_ids`, `[B, L]` (best on the CPU: no device read-back).
        labels (`torch.Tensor`): The batch's `labels`, `[B, L]` (position `i` is scored when `labels[i + 1]` is not
            `-100`).
        attention_mask (`torch.Tensor`, *optional*): Padding mask, `[B, L]`.
        pre_shifted (`bool`, *optional*, defaults to `False`): Whether the batch has pre-shifted `shift_labels`
            (context parallelism), which a cache keyed by unshifted rows cannot serve.

    Returns:
        [`CachedBatchTargets`] for the scored positions in the order the loss selects them (row-major).

    Raises:
        TeacherCacheError: When a row is not in the cache (the cache does not cover this dataset).
        ValueError: With `pre_shifted=True`.
    """
    if pre_shifted:
        raise ValueError(
            "A teacher cache is keyed by unshifted rows; pre-shifted labels (context parallelism) are not supported "
            "with `teacher_cache`."
        )
    if attention_mask is not None and attention_mask.device != input_ids.device:
        attention_mask = attention_mask.to(input_ids.device)
    keys = batch_row_keys(input_ids, labels, attention_mask)
    ids, log_probs, rest = [], [], []
    for row, key in enumerate(keys):
        try:
            record = cache.lookup(key)
        except RowNotCachedError:
            raise TeacherCacheError(
                f"Batch row {row} is not in the teacher cache at {cache.path}: the cache does not cover this training "
                "set (another dataset, split, chat template or preprocessing). Rebuild it with `hf-distill "
                "cache-teacher` on the same dataset and settings."
            ) from None
        ids.append(record.ids)
        log_probs.append(record.log_probs)
        rest.append(record.rest_log_prob)
    token_ids = torch.cat(ids)
    return CachedBatchTargets(
        token_ids,
        torch.cat(log_probs),
        torch.cat(rest),
        cache.temperature,
        cache.vocab_size,
        int(token_ids.max()) + 1 if token_ids.numel() else 0,
    )


class CacheTargetsCollator:
    """Wraps a collator: each collated batch also carries its cached teacher targets (see the module docstring).

    Args:
        collator (`Callable`): The trainer's collator; its batches must have `input_ids` and `labels`.
        cache ([`TeacherCache`]): The open cache.
    """

    def __init__(self, collator: Callable[[list[Any]], dict[str, Any]], cache: TeacherCache):
        self.collator = collator
        self.cache = cache

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        batch = self.collator(features)
        if "input_ids" in batch and "labels" in batch and "shift_labels" not in batch:
            batch[CACHED_TARGETS_KEY] = fetch_cached_targets(
                self.cache, batch["input_ids"], batch["labels"], batch.get("attention_mask")
            )
        return batch

    def __getattr__(self, name: str) -> Any:  # the wrapped collator's attributes (e.g. `tokenizer`, `pad_token_id`)
        if name in ("collator", "cache"):
            raise AttributeError(name)
        return getattr(self.collator, name)


def eval_datasets(eval_dataset: Any) -> list[Any]:
    """The evaluation sets of a trainer (`Trainer` takes one dataset or a dict of them)."""
    if eval_dataset is None:
        return []
    return list(eval_dataset.values()) if isinstance(eval_dataset, dict) else [eval_dataset]


def check_rows_cached(
    cache: TeacherCache, dataset: Any, collator: Callable[[list[Any]], dict[str, Any]], what: str, batch_size: int = 64
) -> None:
    """Check that every row of `dataset`, as `collator` batches it, is in `cache`.

    Args:
        cache ([`TeacherCache`]): The open cache.
        dataset: A prepared (tokenised) dataset: `len()` and integer indexing.
        collator (`Callable`): The trainer's own collator (not wrapped).
        what (`str`): How the error names the dataset.
        batch_size (`int`, *optional*, defaults to `64`): Rows collated at once.

    Raises:
        TeacherCacheError: Naming how many rows are missing and how to write a cache that covers them.
    """
    missing = total = 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        keys = batch_row_keys(batch["input_ids"], batch["labels"], batch.get("attention_mask"))
        missing += sum(key not in cache for key in keys)
        total += len(keys)
    if missing:
        raise TeacherCacheError(
            f"{missing} of the {total} rows of the {what} are not in the teacher cache at {cache.path}, and "
            "evaluating needs the teacher's targets for them. Write the cache with that set: `write_teacher_cache` "
            "includes the trainer's `eval_dataset` (`include_eval=True`, the default), and so does `hf-distill "
            "cache-teacher` run with the same evaluation flags. Or evaluate without a teacher cache "
            "(`eval_strategy='no'`)."
        )


def cache_collator(
    collator: Callable[[list[Any]], dict[str, Any]], cache: TeacherCache, eval_dataset: Any, args: Any
) -> CacheTargetsCollator:
    """The trainer's collator wrapped in a [`CacheTargetsCollator`], after checking that the evaluation rows are in the
    cache when the run evaluates (`args.eval_strategy` is not `"no"`): a missing row fails now, not at the first
    evaluation hours later. (Training rows are checked as their batches are made.)

    Raises:
        TeacherCacheError: If an evaluation row is not in the cache.
    """
    if str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "no":
        datasets = eval_datasets(eval_dataset)
        for number, dataset in enumerate(datasets):
            what = "eval dataset" if len(datasets) == 1 else f"eval dataset {number + 1} of {len(datasets)}"
            check_rows_cached(cache, dataset, collator, what)
    return CacheTargetsCollator(collator, cache)

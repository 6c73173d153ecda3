"""Run a teacher once over tokenised rows and write its top-k log-probs to a `TeacherCache`.

The teacher forward is the one training uses ([`forward_hidden_states`] then [`LMHead`]), so the cached log-probs are
those the live teacher would give (exactly so with `logprob_bits=32`, up to float rounding from batch padding).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..losses.lm_head import LMHead
from ..model_forward import forward_hidden_states
from .cache import TeacherCache
from .cache_keys import row_key, scored_mask_from_labels, valid_positions
from .cache_writer import TeacherCacheWriter

logger = logging.get_logger(__name__)

STOP_AFTER_SHARDS_ENV = "HF_DISTILL_TEACHER_CACHE_STOP_AFTER_SHARDS"
"""Testing hook: when set to `N`, the builder exits the process (`os._exit(75)`, like a kill) after writing `N`
shards in this run, leaving an incomplete cache to resume."""
STOP_EXIT_CODE = 75
NON_MODEL_KEYS = ("labels", "shift_labels", "seq_lengths")
"""Batch entries not passed to the teacher (as in the trainer)."""


def pad_rows(rows: Sequence[dict[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Default collate: right-pad `input_ids` (with `pad_token_id`), `labels` (with -100) and build `attention_mask`.

    Args:
        rows (`Sequence[dict]`): Rows with `input_ids` and `labels` of the same length.
        pad_token_id (`int`, *optional*, defaults to `0`): Padding id (never attended to).

    Returns:
        `dict[str, torch.Tensor]`: `input_ids`, `attention_mask`, `labels`, each `[B, max_len]`.
    """
    length = max((len(row["input_ids"]) for row in rows), default=0)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        ids = torch.as_tensor(row["input_ids"], dtype=torch.long).reshape(-1)
        lab = torch.as_tensor(row["labels"], dtype=torch.long).reshape(-1)
        if ids.shape != lab.shape:
            raise ValueError(f"Row {b}: input_ids ({ids.numel()}) and labels ({lab.numel()}) differ in length.")
        input_ids[b, : ids.numel()] = ids
        labels[b, : ids.numel()] = lab
        attention_mask[b, : ids.numel()] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def top_k_log_probs(
    logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of `log_softmax(logits / temperature)` and the exact log-mass of the other tokens.

    Args:
        logits (`torch.Tensor`): `[n, V]` logits (already cut to the distilled vocabulary).
        k (`int`): Tokens to keep.
        temperature (`float`, *optional*, defaults to `1.0`): Softmax temperature.

    Returns:
        `tuple`: ids `[n, k]` (int64), log-probs `[n, k]` (float32, descending) and rest log-prob `[n]`
        (`logsumexp` of the non-top-k log-probs; `-inf` when `k = V`).
    """
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    top = log_probs.topk(k, dim=-1, sorted=True)
    if k < log_probs.shape[-1]:
        rest = log_probs.scatter(-1, top.indices, float("-inf")).logsumexp(dim=-1)
    else:
        rest = torch.full(log_probs.shape[:-1], float("-inf"), device=log_probs.device)
    return top.indices, top.values, rest


def write_teacher_cache(
    teacher: nn.Module,
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    key: dict[str, Any],
    k: int,
    temperature: float = 1.0,
    logprob_bits: int = 8,
    batch_size: int = 8,
    rows_per_shard: int = 1024,
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    vocab_size: int | None = None,
    device: str | torch.device | None = None,
    show_progress: bool = True,
    overwrite: bool = False,
    position_chunk_size: int = 512,
) -> TeacherCache:
    """Run `teacher` over `rows` and store its top-k log-probs at every scored position (resumable, atomic).

    If `path` already holds a complete cache with the same key, it is returned without any teacher forward; an
    incomplete one resumes at its first missing shard. Shard `s` holds input rows `[s * rows_per_shard, (s + 1) *
    rows_per_shard)`; batches never cross a shard, so a resumed build writes the same bytes as an uninterrupted one.

    Args:
        teacher (`nn.Module`): A causal LM (the teacher). Run in eval mode under `torch.no_grad()`; its training
            mode is restored afterwards.
        rows (`Sequence[dict]`): Tokenised rows with `input_ids` and `labels` (same length, `-100` = not scored,
            aligned like transformers labels: position `i`'s logits predict `labels[i + 1]`). A `datasets.Dataset`
            works. With `collate`, rows are whatever `collate` takes.
        path (`str` or `os.PathLike`): Cache folder (see [`cache_dir_for`]).
        key (`dict`): The cache key (see [`TeacherCacheWriter`]).
        k (`int`): Tokens kept per position (`<= vocab_size`).
        temperature (`float`, *optional*, defaults to `1.0`): Temperature of the stored log-probs.
        logprob_bits (`int`, *optional*, defaults to `8`): 32, 16, 8 or 4 (see `docs/teacher_cache.md`).
        batch_size (`int`, *optional*, defaults to `8`): Rows per teacher forward.
        rows_per_shard (`int`, *optional*, defaults to `1024`): Input rows per shard.
        collate (`Callable`, *optional*): Turns a list of rows into a padded batch with `input_ids`, `labels` and
            (optionally) `attention_mask`; pass the trainer's collator so the rows match what training sees. Defaults
            to [`pad_rows`]. Each row of a collated batch becomes one cache row (padding removed with the attention
            mask).
        vocab_size (`int`, *optional*): Distilled vocabulary size (logits are cut to it). Defaults to the LM head rows.
        device (`str` or `torch.device`, *optional*): Move the teacher there first.
        show_progress (`bool`, *optional*, defaults to `True`): Show a tqdm bar (rows, tokens/s).
        overwrite (`bool`, *optional*, defaults to `False`): Replace a cache with another key in `path`.
        position_chunk_size (`int`, *optional*, defaults to `512`): Positions whose full logits are materialised at
            once (memory: `position_chunk_size * vocab_size * 12` bytes).

    Returns:
        [`TeacherCache`]: The complete cache, opened.

    Raises:
        ValueError: `k > vocab_size` (before any forward), `vocab_size` larger than the LM head, rows without labels.
        TeacherCacheError: `path` holds another key's cache (and `overwrite` is false).
    """
    head = LMHead.from_model(teacher)
    if vocab_size is None:
        vocab_size = head.vocab_rows
    if vocab_size > head.vocab_rows:
        raise ValueError(f"vocab_size={vocab_size} is larger than the teacher's LM head ({head.vocab_rows} rows).")
    num_rows = len(rows)
    writer = TeacherCacheWriter(
        path,
        key,
        vocab_size=vocab_size,
        k=k,
        temperature=temperature,
        logprob_bits=logprob_bits,
        rows_per_shard=rows_per_shard,
        num_input_rows=num_rows,
        overwrite=overwrite,
    )
    if writer.complete:
        logger.info(f"Teacher cache at {path} is complete for this key: reusing it (no teacher forward).")
        return writer.finish()
    if device is not None:
        teacher.to(device)
        head = LMHead.from_model(teacher)
    collate = collate or pad_rows
    num_shards = math.ceil(num_rows / rows_per_shard)
    first_shard = writer.num_shards_done
    stop_after = int(os.environ.get(STOP_AFTER_SHARDS_ENV, "0") or 0)
    was_training = teacher.training
    teacher.eval()
    start_row = min(first_shard * rows_per_shard, num_rows)
    bar = tqdm(total=num_rows, initial=start_row, unit="row", desc="cache-teacher", disable=not show_progress)
    tokens, started = 0, time.perf_counter()
    try:
        for shard in range(first_shard, num_shards):
            shard_end = min((shard + 1) * rows_per_shard, num_rows)
            for begin in range(shard * rows_per_shard, shard_end, batch_size):
                indices = range(begin, min(begin + batch_size, shard_end))
                batch = collate([rows[i] for i in indices])
                for record in _batch_records(teacher, head, batch, vocab_size, k, temperature, position_chunk_size):
                    writer.add(*record)
                    tokens += record[-1]
                bar.update(len(indices))
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):.0f}")
            writer.end_shard()
            if stop_after and writer.num_shards_done - first_shard >= stop_after:
                os._exit(STOP_EXIT_CODE)
    finally:
        bar.close()
        teacher.train(was_training)
    cache = writer.finish()
    logger.info(
        f"Teacher cache written to {path}: {len(cache)} rows, {cache.manifest['scored_positions']} scored positions, "
        f"{cache.bytes_per_logit:.3f} bytes per logit (k={k}, logprob_bits={logprob_bits})."
    )
    return cache


def _batch_records(
    teacher: nn.Module,
    head: LMHead,
    batch: dict[str, Any],
    vocab_size: int,
    k: int,
    temperature: float,
    chunk: int,
) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    if "labels" not in batch or "input_ids" not in batch:
        raise ValueError(
            "The teacher cache needs batches with `input_ids` and `labels` (-100 = not scored); got keys "
            f"{sorted(batch)}."
        )
    input_ids, labels = batch["input_ids"], batch["labels"]
    attention_mask = batch.get("attention_mask")
    model_inputs = {name: value for name, value in batch.items() if name not in NON_MODEL_KEYS}
    records = []
    with torch.no_grad():
        hidden = forward_hidden_states(teacher, model_inputs).hidden
        for b in range(input_ids.shape[0]):
            keep = valid_positions(None if attention_mask is None else attention_mask[b], input_ids.shape[1])
            ids_row = input_ids[b].cpu()[keep]
            mask = scored_mask_from_labels(labels[b].cpu()[keep])
            positions = torch.as_tensor(keep[mask], dtype=torch.long, device=hidden.device)
            row_hidden = hidden[b].index_select(0, positions)
            parts = [
                top_k_log_probs(head.logits(row_hidden[s : s + chunk])[:, :vocab_size], k, temperature)
                for s in range(0, row_hidden.shape[0], chunk)
            ]
            if parts:
                top_ids, top_lp, rest = (torch.cat(p).cpu() for p in zip(*parts))
            else:
                top_ids = torch.zeros((0, k), dtype=torch.long)
                top_lp, rest = torch.zeros((0, k)), torch.zeros(0)
            records.append((row_key(ids_row, mask), top_ids, top_lp, rest, int(len(keep))))
    return records


__all__ = ["STOP_AFTER_SHARDS_ENV", "pad_rows", "top_k_log_probs", "write_teacher_cache"]

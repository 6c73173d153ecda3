"""Run a teacher once over tokenised rows and write its top-k log-probs to a `TeacherCache`.

The teacher forward is the one training uses ([`forward_hidden_states`] then [`LMHead`]), so the cached log-probs are
those the live teacher would give (exactly so with `logprob_bits=32`, up to float rounding from batch padding).
"""

from __future__ import annotations

import hashlib
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


def tail_uniforms(seed: int, row: int, n: int, tail_samples: int) -> torch.Tensor:
    """The uniforms that draw the sampled tail of one row: deterministic in `(seed, row)`.

    A CPU `torch.Generator` is seeded with a hash of `seed` and `row`, so a row's draws do not depend on the batch
    size, the position chunking, the device or on which rows were written before (a resumed write draws the same).

    Args:
        seed (`int`): The cache's tail seed.
        row (`int`): The row's index (the input row for the default collate; the index of the collated row among all
            collated rows otherwise).
        n (`int`): Scored positions of the row.
        tail_samples (`int`): Draws per position.

    Returns:
        `torch.Tensor`: float64 `[n, tail_samples]` in `[0, 1)`, on the CPU.
    """
    digest = hashlib.blake2b(f"hf_distill.tail.v1:{int(seed)}:{int(row)}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.rand((n, tail_samples), generator=generator, dtype=torch.float64)


def top_k_with_sampled_tail(
    logits: torch.Tensor, k: int, tail_samples: int, uniforms: torch.Tensor | None, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's exact top `k - tail_samples` tokens plus `tail_samples` draws from its tail: an unbiased target.

    With `p = softmax(logits / temperature)`, `H` its top `k - tail_samples` ids and `R = sum_{v not in H} p_v` the
    tail mass, each of the `tail_samples` draws picks `v` outside `H` with probability `p_v / R` (inverse CDF of the
    uniforms, with replacement) and carries the probability `R / tail_samples`; repeated draws are merged (their
    probabilities added), and the slots they free are filled with the smallest ids not used yet, at probability 0
    (log-prob `-inf`). The returned distribution `p_hat` sums to 1 (the rest is `-inf`) and `E[p_hat] = p` exactly.

    Args:
        logits (`torch.Tensor`): `[n, V]` logits (already cut to the distilled vocabulary).
        k (`int`): Ids kept per position, `<= V`.
        tail_samples (`int`): Sampled ids per position, `0 <= tail_samples < k` (`0`: the exact top k and its rest,
            as [`top_k_log_probs`]).
        uniforms (`torch.Tensor`): `[n, tail_samples]` uniforms in `[0, 1)` (see [`tail_uniforms`]), any device.
        temperature (`float`, *optional*, defaults to `1.0`): Softmax temperature.

    Returns:
        `tuple`: ids `[n, k]` (int64, distinct per position), log-probs `[n, k]` (float32, descending) and the rest
        log-prob `[n]` (`-inf`: all the mass is assigned).
    """
    head = k - tail_samples
    if tail_samples == 0:
        return top_k_log_probs(logits, k, temperature)
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    n, vocab = log_probs.shape
    device = log_probs.device
    top = log_probs.topk(head, dim=-1, sorted=True)
    tail = log_probs.scatter(-1, top.indices, float("-inf"))
    rest = tail.logsumexp(dim=-1)  # [n]; -inf where the tail has no mass
    shift = rest.masked_fill(torch.isneginf(rest), 0.0)[:, None]
    cdf = tail.sub_(shift).exp_().cumsum(dim=-1, dtype=torch.float64)  # float64 sums: no drift over a large V
    total = cdf[:, -1:]
    # x < total, so the first column with cdf > x has positive probability: never a head id
    x = torch.minimum(uniforms.to(device=device, dtype=torch.float64) * total, torch.nextafter(total, -total))
    draws = torch.searchsorted(cdf, x, right=True)
    draws = torch.where((total > 0) & (draws < vocab), draws, vocab).sort(dim=-1).values  # `vocab`: no draw
    slots = torch.arange(tail_samples, device=device)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    first &= draws < vocab
    counts = torch.searchsorted(draws, draws, right=True) - slots  # at a first occurrence: how many draws
    tail_lp = counts.double().log() + rest.double()[:, None] - math.log(tail_samples)
    # Ids for the slots of repeated draws: the smallest ids in [0, k) not used (k ids hold at most k - free used ones)
    used = torch.cat([top.indices, torch.where(first, draws, vocab)], dim=-1).sort(dim=-1).values
    candidates = torch.arange(k, device=device).repeat(n, 1)
    found = used.gather(-1, torch.searchsorted(used, candidates).clamp_(max=k - 1)) == candidates
    free = torch.where(found, candidates + k, candidates).sort(dim=-1).values
    fill = free.gather(-1, ((~first).long().cumsum(dim=-1) - 1).clamp_(min=0))
    ids = torch.cat([top.indices, torch.where(first, draws, fill)], dim=-1)
    values = torch.cat([top.values, torch.where(first, tail_lp, float("-inf")).float()], dim=-1)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, order), values, torch.full((n,), float("-inf"), device=device)


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
    tail_samples: int = 0,
    seed: int = 0,
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
            once (memory: `position_chunk_size * vocab_size * 12` bytes; 28 with a sampled tail).
        tail_samples (`int`, *optional*, defaults to `0`): Of the `k` ids per position, how many are drawn (with
            replacement) from the teacher's distribution outside its top `k - tail_samples`, each carrying
            `rest / tail_samples` (see [`top_k_with_sampled_tail`] and `docs/teacher_cache.md`). The stored target is
            then an unbiased estimate of the teacher's distribution (rest `-inf`), for `divergence="forward_kl"`
            only. `0` (default) stores the exact top k and its rest. `0 <= tail_samples < k`.
        seed (`int`, *optional*, defaults to `0`): Seed of the tail draws; each row's draws come from a generator
            seeded with `seed` and the row's index ([`tail_uniforms`]), so a resumed write gives the same bytes.
            Part of the key when `tail_samples > 0`.

    Returns:
        [`TeacherCache`]: The complete cache, opened.

    Raises:
        ValueError: `k > vocab_size` or `tail_samples` outside `[0, k)` (before any forward), `vocab_size` larger than
            the LM head, rows without labels.
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
        tail_samples=tail_samples,
        seed=seed,
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
                tail = (tail_samples, seed, begin)
                records = _batch_records(teacher, head, batch, vocab_size, k, temperature, position_chunk_size, tail)
                for record in records:
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
        f"{cache.bytes_per_logit:.3f} bytes per logit (k={k}, logprob_bits={logprob_bits}"
        + (f", tail_samples={tail_samples})." if tail_samples else ").")
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
    tail: tuple[int, int, int] = (0, 0, 0),
) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """One record per batch row; `tail` is `(tail_samples, seed, index of the batch's first row)`."""
    tail_samples, seed, first_row = tail
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
            uniforms = tail_uniforms(seed, first_row + b, row_hidden.shape[0], tail_samples) if tail_samples else None
            parts = [
                top_k_with_sampled_tail(
                    head.logits(row_hidden[s : s + chunk])[:, :vocab_size],
                    k,
                    tail_samples,
                    uniforms[s : s + chunk] if uniforms is not None else None,
                    temperature,
                )
                for s in range(0, row_hidden.shape[0], chunk)
            ]
            if parts:
                top_ids, top_lp, rest = (torch.cat(p).cpu() for p in zip(*parts))
            else:
                top_ids = torch.zeros((0, k), dtype=torch.long)
                top_lp, rest = torch.zeros((0, k)), torch.zeros(0)
            records.append((row_key(ids_row, mask), top_ids, top_lp, rest, int(len(keep))))
    return records


__all__ = [
    "STOP_AFTER_SHARDS_ENV",
    "pad_rows",
    "tail_uniforms",
    "top_k_log_probs",
    "top_k_with_sampled_tail",
    "write_teacher_cache",
]

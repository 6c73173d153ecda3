"""Identity of a teacher cache and of its rows: row keys, cache keys and their hashes, model/tokenizer fingerprints.

Also the errors of the teacher cache ([`TeacherCacheError`], [`RowNotCachedError`]). The files are described in
`hf_distill.teachers.cache_files`; see `docs/teacher_cache.md`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 3
"""Version of the on-disk cache format (2: gap-coded token ids, log-probs in id order; 3: a CRC-32 per row, so a
reader maps shards and reads single rows). Readers refuse other versions;
it is part of every cache key, so [`cache_dir_for`] gives a new format its own folder."""

SETTING_KEYS = ("vocab_size", "k", "temperature", "logprob_bits", "format_version")
"""Settings the writer adds to (and checks against) the caller's key, so they always change the key hash."""

TAIL_SETTING_KEYS = ("tail_samples", "tail_seed")
"""Settings added to the key only when `tail_samples > 0` (a sampled tail), so that keys without one are unchanged."""


class TeacherCacheError(RuntimeError):
    """A teacher cache cannot be used or written: missing, incomplete, corrupt, or made with another key."""


class RowNotCachedError(KeyError, TeacherCacheError):
    """A row key is not in the cache (a `KeyError`, and a [`TeacherCacheError`])."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _as_int_array(values: Any) -> np.ndarray:
    if torch.is_tensor(values):
        values = values.detach().cpu().numpy()
    return np.asarray(values).reshape(-1)


def scored_mask_from_labels(labels: Any) -> np.ndarray:
    """Which positions of a row are scored: `mask[i] = labels[i + 1] != -100` (the last position never is).

    Args:
        labels (`Sequence[int]` or `torch.Tensor`): The row's labels, aligned with `input_ids` like transformers
            labels (position `i`'s logits predict `labels[i + 1]`).

    Returns:
        `np.ndarray`: Boolean mask of the same length as `labels`.
    """
    labels = _as_int_array(labels)
    mask = np.zeros(labels.shape[0], dtype=bool)
    if labels.shape[0] > 1:
        mask[:-1] = labels[1:] != -100
    return mask


def row_key(input_ids: Any, scored_mask: Any) -> str:
    """Stable identity of a row: blake2b-128 hex of its length, its int32 token ids and its packed scored mask.

    Args:
        input_ids (`Sequence[int]` or `torch.Tensor`): The row's token ids, unpadded.
        scored_mask (`Sequence[bool]` or `torch.Tensor`): Same length; true where the position's logits are scored
            (see [`scored_mask_from_labels`]).

    Returns:
        `str`: 32 hex characters.
    """
    ids = _as_int_array(input_ids).astype(np.int64)
    mask = _as_int_array(scored_mask).astype(bool)
    if ids.shape != mask.shape:
        raise ValueError(f"input_ids ({ids.shape[0]}) and scored_mask ({mask.shape[0]}) differ in length.")
    if ids.size and (ids.min() < -(2**31) or ids.max() >= 2**31):
        raise ValueError("Token ids must fit in int32.")
    digest = hashlib.blake2b(digest_size=16)
    digest.update(b"hf_distill.row.v1\0")
    digest.update(np.int64(ids.shape[0]).astype("<i8").tobytes())
    digest.update(ids.astype("<i4").tobytes())
    digest.update(np.packbits(mask, bitorder="little").tobytes())
    return digest.hexdigest()


def valid_positions(attention_mask_row: Any, length: int) -> np.ndarray:
    """Indices of the real (non-padding) tokens of a batch row.

    Args:
        attention_mask_row (`torch.Tensor` or `Sequence[int]`, *optional*): The row's attention mask; `None` means
            every position is a real token.
        length (`int`): Row length (used when there is no mask).

    Returns:
        `np.ndarray`: Indices where `attention_mask != 0`, or `arange(length)`.
    """
    if attention_mask_row is None:
        return np.arange(length)
    return np.flatnonzero(_as_int_array(attention_mask_row) != 0)


def batch_row_keys(input_ids: Any, labels: Any, attention_mask: Any = None) -> list[str]:
    """Row keys of a collated batch, as the trainer sees it (padding removed with the attention mask).

    Args:
        input_ids (`torch.Tensor`): `[B, L]` token ids.
        labels (`torch.Tensor`): `[B, L]` labels (`-100` = not scored), aligned like transformers labels.
        attention_mask (`torch.Tensor`, *optional*): `[B, L]`; without it every position is a real token.

    Returns:
        `list[str]`: One [`row_key`] per batch row.
    """
    ids = input_ids.detach().cpu().numpy() if torch.is_tensor(input_ids) else np.asarray(input_ids)
    lab = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    keys = []
    for b in range(ids.shape[0]):
        keep = valid_positions(None if attention_mask is None else attention_mask[b], ids.shape[1])
        keys.append(row_key(ids[b, keep], scored_mask_from_labels(lab[b, keep])))
    return keys


def _normalize_key(key: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(key, dict):
        raise TypeError(f"The cache key must be a dict, got {type(key).__name__}.")
    try:
        return json.loads(json.dumps(key, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise TypeError(f"The cache key must be JSON-serialisable: {error}") from error


def key_hash(key: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of `key` (sorted keys, compact separators).

    Args:
        key (`dict`): JSON-serialisable key.

    Returns:
        `str`: 64 hex characters.
    """
    canonical = json.dumps(_normalize_key(key), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def cache_key(
    key: dict[str, Any],
    *,
    vocab_size: int,
    k: int,
    temperature: float,
    logprob_bits: int,
    tail_samples: int = 0,
    seed: int = 0,
) -> dict:
    """The full key a cache is stored under: the caller's `key` plus the settings and the format version.

    Args:
        key (`dict`): The caller's key (teacher, tokenizer and dataset fingerprints, max length, packing, ...).
        vocab_size (`int`): Number of token ids scored.
        k (`int`): Token ids kept per position.
        temperature (`float`): Temperature of the stored log-probs.
        logprob_bits (`int`): Log-prob width.
        tail_samples (`int`, *optional*, defaults to `0`): Of the `k` ids, how many are sampled from the teacher's
            tail (see `docs/teacher_cache.md`); `0` keeps the exact top k.
        seed (`int`, *optional*, defaults to `0`): Seed of the tail sampling (only used when `tail_samples > 0`).

    Returns:
        `dict`: A normalised copy of `key` with `vocab_size`, `k`, `temperature`, `logprob_bits` and
        `format_version` ([`FORMAT_VERSION`]), plus `tail_samples` and `tail_seed` when `tail_samples > 0` (a key
        without a sampled tail is exactly as before).

    Raises:
        ValueError: If `key` already holds one of those settings with another value.
    """
    full = _normalize_key(key)
    settings: dict[str, Any] = {"vocab_size": int(vocab_size), "k": int(k), "temperature": float(temperature)}
    settings["logprob_bits"] = int(logprob_bits)
    settings["format_version"] = FORMAT_VERSION
    if tail_samples:
        settings["tail_samples"] = int(tail_samples)
        settings["tail_seed"] = int(seed)
    else:
        for name in TAIL_SETTING_KEYS:
            if name in full:
                raise ValueError(f"The cache key says {name}={full[name]!r} but the writer samples no tail.")
    for name, value in settings.items():
        if name in full and full[name] != value:
            raise ValueError(f"The cache key says {name}={full[name]!r} but the writer was given {name}={value!r}.")
        full[name] = value
    return full


def cache_dir_for(root: str | os.PathLike, key: dict[str, Any]) -> Path:
    """Recommended folder for a key: `root/<first 16 hex digits of key_hash(key)>`, so different keys never share one.

    Args:
        root (`str` or `os.PathLike`): Folder holding all caches.
        key (`dict`): The key (ideally the full [`cache_key`], so k, temperature and bits are part of it).

    Returns:
        `pathlib.Path`
    """
    return Path(root) / key_hash(key)[:16]


def key_differences(cached: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two keys, one line per differing field (nested dicts as dotted names).

    Args:
        cached (`dict`): The key stored in the cache.
        expected (`dict`): The key asked for.
        prefix (`str`, *optional*): Prefix of the field names (for nested dicts).

    Returns:
        `list[str]`: One line per differing field, empty when the keys are equal.
    """
    lines = []
    for name in sorted(set(cached) | set(expected)):
        field = f"{prefix}{name}"
        if name not in cached:
            lines.append(f"{field}: missing in the cache, {expected[name]!r} expected")
        elif name not in expected:
            lines.append(f"{field}: {cached[name]!r} in the cache, missing in the expected key")
        elif isinstance(cached[name], dict) and isinstance(expected[name], dict):
            lines += key_differences(cached[name], expected[name], prefix=f"{field}.")
        elif cached[name] != expected[name]:
            lines.append(f"{field}: {cached[name]!r} in the cache, {expected[name]!r} expected")
    return lines


def fingerprint_model(model: torch.nn.Module, full_hash_max_bytes: int = 256 * 2**20) -> str:
    """Fingerprint of a model's config and weights: changes when the weights change.

    The config (minus `transformers_version` and `_name_or_path`), every parameter's and buffer's name, shape and
    dtype go into a sha256. If the weights take at most `full_hash_max_bytes`, all their bytes are hashed too (exact).
    Above that, a sample of up to 4096 evenly strided values per tensor plus each tensor's float64 sum and sum of
    absolute values are hashed: cheap (one reduction per tensor, on the model's device) and changed by any realistic
    fine-tune, but not a cryptographic guarantee. For a hub model, prefer putting its name and revision in the key.

    Args:
        model (`torch.nn.Module`): The teacher.
        full_hash_max_bytes (`int`, *optional*, defaults to 256 MiB): Hash every weight byte up to this size.

    Returns:
        `str`: 32 hex characters.
    """
    digest = hashlib.sha256(b"hf_distill.model.v1\0")
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        as_dict = {k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
        digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    tensors = sorted(
        [*model.named_parameters(), *model.named_buffers()],
        key=lambda item: item[0],
    )
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    full = total <= full_hash_max_bytes
    digest.update(f"full={full}".encode())
    with torch.no_grad():
        for name, tensor in tensors:
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\0".encode())
            if tensor.device.type == "meta" or tensor.numel() == 0:
                continue
            flat = tensor.detach().reshape(-1)
            if full:
                digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
                continue
            stride = max(1, flat.numel() // 4096)
            digest.update(flat[::stride][:4096].cpu().contiguous().view(torch.uint8).numpy().tobytes())
            if flat.is_floating_point():
                sums = torch.stack([flat.double().sum(), flat.double().abs().sum()]).cpu().numpy()
                digest.update(sums.tobytes())
    return digest.hexdigest()[:32]


def fingerprint_tokenizer(tokenizer: Any) -> str:
    """Fingerprint of a tokenizer: vocabulary, special tokens, chat template and (fast tokenizers) the full backend.

    Args:
        tokenizer: A transformers tokenizer (or processor with a `.tokenizer`).

    Returns:
        `str`: 32 hex characters.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    digest = hashlib.sha256(b"hf_distill.tokenizer.v1\0")
    digest.update(type(tokenizer).__name__.encode())
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest.update(json.dumps(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))).encode())
    specials = {
        "map": getattr(tokenizer, "special_tokens_map", {}),
        "ids": {
            name: getattr(tokenizer, name, None)
            for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
        },
    }
    digest.update(json.dumps(specials, sort_keys=True, default=str).encode())
    digest.update(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        digest.update(backend.to_str().encode())
    return digest.hexdigest()[:32]


__all__ = [
    "FORMAT_VERSION",
    "RowNotCachedError",
    "SETTING_KEYS",
    "TAIL_SETTING_KEYS",
    "TeacherCacheError",
    "batch_row_keys",
    "cache_dir_for",
    "cache_key",
    "fingerprint_model",
    "fingerprint_tokenizer",
    "key_differences",
    "key_hash",
    "row_key",
    "scored_mask_from_labels",
]

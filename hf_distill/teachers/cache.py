"""On-disk teacher cache: the teacher's top-k log-probs per scored position, written once and read during training.

A cache is a folder:

- `manifest.json`: format version, the key (and its hash), the settings (vocab size, k, temperature, log-prob bits,
  rows per shard), totals (rows, tokens, scored positions, payload bytes, bytes per logit), `complete` (true only
  once every shard and the index are written) and, per shard, its file name, row count, size and sha256.
- `shard-00000.safetensors`, ...: each holds the records of `rows_per_shard` consecutive input rows, in input order
  (`payload` uint8, `offsets` int64 `[r+1]`, `positions` int64 `[r]`, `row_keys` uint8 `[r, 16]`). No timestamps, so
  the same inputs give the same bytes.
- `index.safetensors`: every row key in order (`row_keys` uint8 `[N, 16]`), read at open to map a row key to its
  shard.

Every file is written to a temporary name, fsynced and renamed; the manifest is rewritten (atomically) after every
shard, so an interrupted write resumes at the first missing shard. See `docs/teacher_cache.md`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as load_safetensors

from .cache_format import LOGPROB_BITS, bytes_per_logit, decode_record, encode_record, id_bits

FORMAT_NAME = "hf_distill.teacher_cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.safetensors"
SETTING_KEYS = ("vocab_size", "k", "temperature", "logprob_bits")
"""Settings the writer adds to (and checks against) the caller's key, so they always change the key hash."""
RERUN_HINT = "Rerun `hf-distill cache-teacher` with the same settings: it keeps the valid shards and resumes."
_OUR_FILE = re.compile(r"^(manifest\.json|index\.safetensors|shard-\d{5,}\.safetensors|\..*\.tmp)$")


class TeacherCacheError(RuntimeError):
    """A teacher cache cannot be used or written: missing, incomplete, corrupt, or made with another key."""


class RowNotCachedError(KeyError, TeacherCacheError):
    """A row key is not in the cache (a `KeyError`, and a [`TeacherCacheError`])."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------------------------- keys


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


def cache_key(key: dict[str, Any], *, vocab_size: int, k: int, temperature: float, logprob_bits: int) -> dict:
    """The full key a cache is stored under: the caller's `key` plus `vocab_size`, `k`, `temperature`, `logprob_bits`.

    Args:
        key (`dict`): The caller's key (teacher, tokenizer and dataset fingerprints, max length, packing, ...).
        vocab_size (`int`): Number of token ids scored.
        k (`int`): Token ids kept per position.
        temperature (`float`): Temperature of the stored log-probs.
        logprob_bits (`int`): Log-prob width.

    Returns:
        `dict`: A normalised copy of `key` with the four settings.

    Raises:
        ValueError: If `key` already holds one of those settings with another value.
    """
    full = _normalize_key(key)
    settings = {"vocab_size": int(vocab_size), "k": int(k), "temperature": float(temperature)}
    settings["logprob_bits"] = int(logprob_bits)
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


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


# ----------------------------------------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as error:
        raise TeacherCacheError(
            f"The teacher cache manifest {path / MANIFEST} is not valid JSON ({error}). Delete the folder and rerun "
            "`hf-distill cache-teacher`."
        ) from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise TeacherCacheError(f"{path / MANIFEST} is not a teacher cache manifest (format {FORMAT_NAME!r}).")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TeacherCacheError(
            f"The teacher cache at {path} has format version {manifest.get('format_version')}; this hf_distill "
            f"reads version {FORMAT_VERSION}. Rebuild it with `hf-distill cache-teacher`."
        )
    return manifest


_SAFETENSORS_DTYPES = {np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8"}


def _save_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """Serialise to the safetensors format deterministically (sorted header keys, 8-byte aligned data).

    `safetensors.numpy.save` orders its JSON header differently from one process to the next, so the same tensors
    would not always give the same bytes; shards must (resume is checked byte for byte).
    """
    names = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in names:
        array = np.ascontiguousarray(tensors[name])
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks)


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _key_bytes(key: str) -> bytes:
    try:
        raw = bytes.fromhex(key)
    except (ValueError, TypeError):
        raw = b""
    if len(raw) != 16:
        raise ValueError(f"Not a row key (32 hex characters): {key!r}.")
    return raw


# ----------------------------------------------------------------------------------------------------------- writer


class TeacherCacheWriter:
    """Writes a teacher cache shard by shard, atomically and resumably.

    On construction the folder is checked: a complete cache with the same key is reused (`complete` is true, nothing
    needs writing); an incomplete one with the same key is resumed (shards whose size and sha256 match the manifest are
    kept, `num_shards_done` says how many); a cache with another key raises [`TeacherCacheError`] listing the
    differing fields and is left untouched, unless `overwrite=True`.

    Typical use: `for shard in range(writer.num_shards_done, num_shards): writer.add(...) per row; writer.end_shard()`,
    then `writer.finish()`.

    Args:
        path (`str` or `os.PathLike`): Cache folder (created if needed). See [`cache_dir_for`].
        key (`dict`): JSON-serialisable key; `vocab_size`, `k`, `temperature` and `logprob_bits` are added to it (see
            [`cache_key`]).
        vocab_size (`int`): Number of token ids scored.
        k (`int`): Token ids kept per position, `1 <= k <= vocab_size`.
        temperature (`float`, *optional*, defaults to `1.0`): Temperature of the stored log-probs.
        logprob_bits (`int`, *optional*, defaults to `8`): 32 (exact float32), 16 (float16), 8 or 4 (quantised).
        rows_per_shard (`int`, *optional*, defaults to `1024`): Input rows per shard.
        num_input_rows (`int`, *optional*): Number of input rows, recorded and checked on resume.
        overwrite (`bool`, *optional*, defaults to `False`): Delete a cache with another key (or unreadable manifest)
            in `path` instead of raising.

    Raises:
        ValueError: Invalid settings (`k > vocab_size`, unknown `logprob_bits`, non-positive temperature).
        TeacherCacheError: `path` holds another key's cache, or files that are not a teacher cache.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        key: dict[str, Any],
        *,
        vocab_size: int,
        k: int,
        temperature: float = 1.0,
        logprob_bits: int = 8,
        rows_per_shard: int = 1024,
        num_input_rows: int | None = None,
        overwrite: bool = False,
    ) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}.")
        if not 1 <= k <= vocab_size:
            raise ValueError(f"k must be between 1 and the vocabulary size ({vocab_size}), got k={k}.")
        if logprob_bits not in LOGPROB_BITS:
            raise ValueError(f"logprob_bits must be one of {LOGPROB_BITS}, got {logprob_bits}.")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}.")
        self.path = Path(path)
        self.key = cache_key(key, vocab_size=vocab_size, k=k, temperature=temperature, logprob_bits=logprob_bits)
        self.key_hash = key_hash(self.key)
        self.vocab_size, self.k, self.temperature, self.logprob_bits = vocab_size, k, float(temperature), logprob_bits
        self.rows_per_shard = rows_per_shard
        self.num_input_rows = num_input_rows
        self.complete = False
        self._pending: list[tuple[bytes, int, np.ndarray, int]] = []
        self._row_keys: list[np.ndarray] = []
        self._shards: list[dict[str, Any]] = []
        self._index: dict[str, Any] | None = None
        self._open_folder(overwrite)

    # -- setup

    def _settings(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "key": self.key,
            "key_hash": self.key_hash,
            "vocab_size": self.vocab_size,
            "k": self.k,
            "temperature": self.temperature,
            "logprob_bits": self.logprob_bits,
            "id_bits": id_bits(self.vocab_size),
            "rows_per_shard": self.rows_per_shard,
            "num_input_rows": self.num_input_rows,
        }

    def _remove_our_files(self) -> None:
        for entry in self.path.iterdir():
            if entry.is_file() and _OUR_FILE.match(entry.name):
                entry.unlink()

    def _open_folder(self, overwrite: bool) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / MANIFEST).exists():
            others = [e.name for e in self.path.iterdir() if not _OUR_FILE.match(e.name)]
            if others and not overwrite:
                raise TeacherCacheError(
                    f"{self.path} is not empty and holds no teacher cache ({', '.join(sorted(others)[:5])}). Choose "
                    "an empty folder (see `cache_dir_for`)."
                )
            self._remove_our_files()
            self._write_manifest()
            return
        try:
            manifest = _read_manifest(self.path)
        except TeacherCacheError:
            if not overwrite:
                raise
            self._remove_our_files()
            self._write_manifest()
            return
        if manifest.get("key_hash") != self.key_hash or manifest.get("key") != self.key:
            if not overwrite:
                differences = key_differences(manifest.get("key", {}), self.key)
                raise TeacherCacheError(
                    f"{self.path} already holds a teacher cache made with another key; nothing was changed. "
                    "Differences:\n  " + "\n  ".join(differences or ["(key hash differs)"]) + "\nUse another folder "
                    "(`cache_dir_for(root, key)` gives one per key) or pass overwrite=True to replace it."
                )
            self._remove_our_files()
            self._write_manifest()
            return
        ours, theirs = self._settings(), {name: manifest.get(name) for name in self._settings()}
        if ours != theirs:
            differing = [f"{n}: {theirs[n]!r} in the cache, {ours[n]!r} now" for n in ours if ours[n] != theirs[n]]
            if not overwrite:
                raise TeacherCacheError(
                    f"{self.path} holds a teacher cache with the same key but other settings; nothing was changed:\n  "
                    + "\n  ".join(differing)
                    + "\nPass overwrite=True to replace it."
                )
            self._remove_our_files()
            self._write_manifest()
            return
        if manifest.get("complete") and self._files_present(manifest):
            self._shards = list(manifest["shards"])
            self._index = manifest.get("index")
            self.complete = True
            return
        self._resume(manifest)

    def _files_present(self, manifest: dict[str, Any]) -> bool:
        """Whether every shard and the index of a complete manifest exist with their recorded sizes (cheap check)."""
        entries = [*manifest.get("shards", []), manifest.get("index") or {"file": INDEX_FILE, "bytes": -1}]
        for entry in entries:
            file = self.path / entry["file"]
            if not file.is_file() or file.stat().st_size != entry["bytes"]:
                return False
        return True

    def _resume(self, manifest: dict[str, Any]) -> None:
        for entry in manifest.get("shards", []):
            file = self.path / entry["file"]
            if entry["file"] != _shard_name(len(self._shards)) or not file.is_file():
                break
            data = file.read_bytes()
            if len(data) != entry["bytes"] or _sha256_hex(data) != entry["sha256"]:
                break
            self._row_keys.append(load_safetensors(data)["row_keys"])
            self._shards.append(entry)
        for entry in self.path.iterdir():
            if entry.name.endswith(".tmp") and _OUR_FILE.match(entry.name):
                entry.unlink()
        self._write_manifest()

    # -- writing

    @property
    def num_shards_done(self) -> int:
        """Shards already on disk (kept from an earlier run or written by this writer)."""
        return len(self._shards)

    def add(
        self,
        row_key: str,
        token_ids: np.ndarray | torch.Tensor,
        log_probs: np.ndarray | torch.Tensor,
        rest_log_prob: np.ndarray | torch.Tensor,
        num_tokens: int = 0,
    ) -> None:
        """Append the record of one row to the current shard.

        Args:
            row_key (`str`): The row's [`row_key`].
            token_ids (`np.ndarray` or `torch.Tensor`): `[n, k]` ids, sorted by log-prob descending.
            log_probs (`np.ndarray` or `torch.Tensor`): `[n, k]` float log-probs at the cache temperature.
            rest_log_prob (`np.ndarray` or `torch.Tensor`): `[n]` log of the mass outside the k ids.
            num_tokens (`int`, *optional*, defaults to `0`): Length of the row (for the manifest's token count).
        """
        if self.complete:
            raise TeacherCacheError(f"The teacher cache at {self.path} is already complete.")

        def as_numpy(value: Any) -> np.ndarray:
            return value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)

        ids, lps, rest = as_numpy(token_ids), as_numpy(log_probs), as_numpy(rest_log_prob)
        if ids.ndim != 2 or ids.shape[1] != self.k:
            raise ValueError(f"token_ids must have shape [n, {self.k}], got {ids.shape}.")
        payload = encode_record(ids, lps, rest, self.vocab_size, self.logprob_bits)
        self._pending.append((_key_bytes(row_key), ids.shape[0], payload, int(num_tokens)))

    def end_shard(self) -> None:
        """Write the rows added since the last shard as the next shard, then update the manifest."""
        if self.complete:
            raise TeacherCacheError(f"The teacher cache at {self.path} is already complete.")
        rows = self._pending
        row_keys = np.frombuffer(b"".join(r[0] for r in rows), dtype=np.uint8).reshape(len(rows), 16)
        positions = np.array([r[1] for r in rows], dtype=np.int64)
        sizes = np.array([r[2].size for r in rows], dtype=np.int64)
        offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(sizes, dtype=np.int64)])
        payload = np.concatenate([r[2] for r in rows]) if rows else np.zeros(0, dtype=np.uint8)
        data = _save_safetensors(
            {"payload": payload, "offsets": offsets, "positions": positions, "row_keys": row_keys.copy()},
            metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)},
        )
        name = _shard_name(len(self._shards))
        _atomic_write(self.path / name, data)
        self._shards.append(
            {
                "file": name,
                "rows": len(rows),
                "positions": int(positions.sum()),
                "tokens": int(sum(r[3] for r in rows)),
                "payload_bytes": int(payload.size),
                "bytes": len(data),
                "sha256": _sha256_hex(data),
            }
        )
        self._row_keys.append(row_keys)
        self._pending = []
        self._write_manifest()

    def finish(self) -> TeacherCache:
        """Write the index, mark the cache complete and open it.

        Returns:
            [`TeacherCache`]
        """
        if not self.complete:
            if self._pending:
                self.end_shard()
            all_keys = np.concatenate(self._row_keys) if self._row_keys else np.zeros((0, 16), dtype=np.uint8)
            data = _save_safetensors({"row_keys": np.ascontiguousarray(all_keys)}, metadata={"format": FORMAT_NAME})
            _atomic_write(self.path / INDEX_FILE, data)
            self._index = {"file": INDEX_FILE, "bytes": len(data), "sha256": _sha256_hex(data)}
            self.complete = True
            self._write_manifest()
        return TeacherCache.open(self.path, expected_key=self.key)

    def _write_manifest(self) -> None:
        manifest = self._settings()
        positions = sum(s["positions"] for s in self._shards)
        payload = sum(s["payload_bytes"] for s in self._shards)
        manifest.update(
            num_shards=len(self._shards),
            num_rows=sum(s["rows"] for s in self._shards),
            total_tokens=sum(s["tokens"] for s in self._shards),
            scored_positions=positions,
            payload_bytes=payload,
            file_bytes=sum(s["bytes"] for s in self._shards),
            bytes_per_logit=round(bytes_per_logit(payload, positions, self.k), 6),
            complete=self.complete,
            shards=self._shards,
            index=self._index,
        )
        _atomic_write(self.path / MANIFEST, _manifest_bytes(manifest))

    @property
    def bytes_per_logit(self) -> float:
        """Payload bytes per stored logit so far."""
        positions = sum(s["positions"] for s in self._shards)
        return bytes_per_logit(sum(s["payload_bytes"] for s in self._shards), positions, self.k)


# ----------------------------------------------------------------------------------------------------------- reader


@dataclass
class CachedRow:
    """The cached teacher distribution of one row, over its `n` scored positions (in row order).

    Attributes:
        ids (`torch.LongTensor`): `[n, k]` token ids, sorted by log-prob descending.
        log_probs (`torch.FloatTensor`): `[n, k]` `log_softmax(logits / T)` over the full vocabulary (float32).
        rest_log_prob (`torch.FloatTensor`): `[n]` log of the probability outside the k ids (`-inf` when k = V).
    """

    ids: torch.Tensor
    log_probs: torch.Tensor
    rest_log_prob: torch.Tensor

    @property
    def token_ids(self) -> torch.Tensor:
        """Alias of `ids`."""
        return self.ids


class TeacherCache:
    """Read-only access to a complete teacher cache. Create with [`TeacherCache.open`].

    Shard sizes are checked at open (a truncated shard fails there). A shard's sha256 is checked every time the shard
    is read from disk, i.e. on its first access and again if it was evicted from the small in-memory LRU, before any of
    its values is returned; `verify()` (or `open(..., verify=True)`) checks all of them at once.

    Attributes:
        path (`pathlib.Path`): The cache folder.
        manifest (`dict`): The parsed manifest.
        key (`dict`): The full key the cache was written with.
        vocab_size (`int`), k (`int`), temperature (`float`), logprob_bits (`int`): The settings.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], row_keys: np.ndarray, max_loaded_shards: int = 2):
        self.path = path
        self.manifest = manifest
        self.key = manifest["key"]
        self.vocab_size = int(manifest["vocab_size"])
        self.k = int(manifest["k"])
        self.temperature = float(manifest["temperature"])
        self.logprob_bits = int(manifest["logprob_bits"])
        self._shards = manifest["shards"]
        self._starts = np.cumsum([0] + [s["rows"] for s in self._shards]).tolist()
        self._keys = [bytes(r).hex() for r in row_keys]
        self._index: dict[str, int] = {}
        for i, key in enumerate(self._keys):
            self._index.setdefault(key, i)
        self._loaded: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._max_loaded = max(1, max_loaded_shards)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        expected_key: dict[str, Any] | None = None,
        *,
        verify: bool = False,
        max_loaded_shards: int = 2,
    ) -> TeacherCache:
        """Open a complete cache, checking its key, completeness, index and shard sizes.

        Args:
            path (`str` or `os.PathLike`): The cache folder.
            expected_key (`dict`, *optional*): Key the caller expects. Compared field by field with the cache's key;
                the settings the writer adds (`vocab_size`, `k`, `temperature`, `logprob_bits`) are only compared
                when `expected_key` has them.
            verify (`bool`, *optional*, defaults to `False`): Hash every shard now instead of on first access.
            max_loaded_shards (`int`, *optional*, defaults to `2`): Decoded-on-demand shards kept in memory.

        Returns:
            [`TeacherCache`]

        Raises:
            TeacherCacheError: Missing or incomplete cache, key mismatch, missing/truncated/corrupt shard or index.
        """
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise TeacherCacheError(
                f"No teacher cache at {path}: {MANIFEST} is missing. Build it with `hf-distill cache-teacher` (or "
                "`write_teacher_cache`)."
            )
        manifest = _read_manifest(path)
        if not manifest.get("complete"):
            raise TeacherCacheError(
                f"The teacher cache at {path} is incomplete ({manifest.get('num_shards', 0)} shard(s) written): its "
                f"writer was interrupted. {RERUN_HINT}"
            )
        if expected_key is not None:
            expected = _normalize_key(expected_key)
            cached = dict(manifest["key"])
            for name in SETTING_KEYS:
                if name not in expected:
                    cached.pop(name, None)
            differences = key_differences(cached, expected)
            if differences:
                raise TeacherCacheError(
                    f"The teacher cache at {path} was made with another key:\n  "
                    + "\n  ".join(differences)
                    + "\nBuild a cache for this configuration with `hf-distill cache-teacher` (`cache_dir_for` "
                    "gives each key its own folder)."
                )
        for entry in manifest["shards"]:
            file = path / entry["file"]
            if not file.is_file():
                raise TeacherCacheError(f"Teacher cache shard {file} is missing. Delete nothing else; {RERUN_HINT}")
            size = file.stat().st_size
            if size != entry["bytes"]:
                raise TeacherCacheError(
                    f"Teacher cache shard {file} is truncated or corrupt ({size} bytes, {entry['bytes']} expected). "
                    f"Delete {file.name} and rerun `hf-distill cache-teacher` with the same settings (it resumes)."
                )
        index = manifest.get("index") or {}
        index_file = path / index.get("file", INDEX_FILE)
        data = index_file.read_bytes() if index_file.is_file() else b""
        if not data or len(data) != index.get("bytes") or _sha256_hex(data) != index.get("sha256"):
            raise TeacherCacheError(
                f"The teacher cache index {index_file} is missing or corrupt. Delete it, set `complete` to false in "
                f"{MANIFEST} (or delete the folder), and {RERUN_HINT[0].lower() + RERUN_HINT[1:]}"
            )
        row_keys = load_safetensors(data)["row_keys"]
        if row_keys.shape[0] != sum(s["rows"] for s in manifest["shards"]):
            raise TeacherCacheError(f"The teacher cache index {index_file} does not match {MANIFEST}.")
        cache = cls(path, manifest, row_keys, max_loaded_shards=max_loaded_shards)
        if verify:
            cache.verify()
        return cache

    # -- access

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, row_key: object) -> bool:
        return row_key in self._index

    def row_keys(self) -> Iterator[str]:
        """Row keys in input order."""
        return iter(self._keys)

    @property
    def bytes_per_logit(self) -> float:
        """Stored payload bytes per kept logit, from the manifest."""
        return float(self.manifest["bytes_per_logit"])

    def verify(self) -> None:
        """Hash every shard now.

        Raises:
            TeacherCacheError: A shard is missing, truncated or corrupt.
        """
        for shard in range(len(self._shards)):
            self._read_shard(shard)

    def _read_shard(self, shard: int) -> dict[str, np.ndarray]:
        entry = self._shards[shard]
        file = self.path / entry["file"]
        try:
            data = file.read_bytes()
        except OSError as error:
            raise TeacherCacheError(f"Cannot read teacher cache shard {file}: {error}. {RERUN_HINT}") from error
        if len(data) != entry["bytes"] or _sha256_hex(data) != entry["sha256"]:
            raise TeacherCacheError(
                f"Teacher cache shard {file} is corrupt or truncated (sha256/size differ from {MANIFEST}). Delete "
                f"{file.name} and rerun `hf-distill cache-teacher` with the same settings: it rewrites that shard."
            )
        try:
            return load_safetensors(data)
        except Exception as error:  # matching sha256 but unreadable: written by a broken writer
            raise TeacherCacheError(f"Teacher cache shard {file} cannot be parsed: {error}") from error

    def _shard(self, shard: int) -> dict[str, np.ndarray]:
        if shard in self._loaded:
            self._loaded.move_to_end(shard)
            return self._loaded[shard]
        tensors = self._read_shard(shard)
        self._loaded[shard] = tensors
        while len(self._loaded) > self._max_loaded:
            self._loaded.popitem(last=False)
        return tensors

    def lookup(self, row_key: str) -> CachedRow:
        """The cached teacher distribution of a row, decoded now.

        Args:
            row_key (`str`): The row's [`row_key`] (see also [`batch_row_keys`]).

        Returns:
            [`CachedRow`]

        Raises:
            RowNotCachedError: The row is not in the cache (a `KeyError`).
            TeacherCacheError: Its shard is corrupt.
        """
        index = self._index.get(row_key)
        if index is None:
            raise RowNotCachedError(
                f"row not in the cache: the cache does not cover this dataset; row key {row_key} is not among the "
                f"{len(self)} rows of {self.path}. Rebuild the cache for this dataset and preprocessing (max length, "
                "packing, masks) with `hf-distill cache-teacher`."
            )
        shard = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[shard]
        tensors = self._shard(shard)
        if bytes(tensors["row_keys"][local]).hex() != row_key:
            raise TeacherCacheError(f"Teacher cache shard {self._shards[shard]['file']} does not match the index.")
        start, end = int(tensors["offsets"][local]), int(tensors["offsets"][local + 1])
        record = decode_record(
            tensors["payload"][start:end], int(tensors["positions"][local]), self.k, self.vocab_size,
            self.logprob_bits,
        )  # fmt: skip
        return CachedRow(
            ids=torch.from_numpy(record.token_ids),
            log_probs=torch.from_numpy(record.log_probs),
            rest_log_prob=torch.from_numpy(record.rest_log_prob),
        )

    def __repr__(self) -> str:
        return (
            f"TeacherCache({str(self.path)!r}, rows={len(self)}, vocab_size={self.vocab_size}, k={self.k}, "
            f"temperature={self.temperature}, logprob_bits={self.logprob_bits}, "
            f"bytes_per_logit={self.bytes_per_logit:.3f})"
        )


__all__ = [
    "CachedRow",
    "RowNotCachedError",
    "TeacherCache",
    "TeacherCacheError",
    "TeacherCacheWriter",
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

"""Writing a teacher cache: [`TeacherCacheWriter`], shard by shard, atomically and resumably.

The files it writes are described in `hf_distill.teachers.cache_files`; see `docs/teacher_cache.md`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as load_safetensors

from .cache import TeacherCache
from .cache_files import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST,
    _atomic_write,
    _key_bytes,
    _manifest_bytes,
    _read_manifest,
    _save_safetensors,
    _sha256_hex,
    _shard_name,
    row_checksum,
)
from .cache_format import LOGPROB_BITS, bytes_per_logit, encode_record, id_bits
from .cache_keys import TeacherCacheError, cache_key, key_differences, key_hash


def check_tail_samples(tail_samples: int, k: int) -> None:
    """Check `0 <= tail_samples < k` (at least the teacher's top-1 is kept exactly).

    Args:
        tail_samples (`int`): Sampled tail ids per position.
        k (`int`): Ids stored per position.

    Raises:
        ValueError: If `tail_samples` is not an integer in `[0, k)`.
    """
    if isinstance(tail_samples, bool) or not isinstance(tail_samples, (int, np.integer)) or not 0 <= tail_samples < k:
        raise ValueError(
            f"tail_samples must be an integer with 0 <= tail_samples < k (k={k}: the first k - tail_samples ids are "
            f"the teacher's exact top ids, at least one), got {tail_samples!r}."
        )


_OUR_FILE = re.compile(r"^(manifest\.json|index\.safetensors|shard-\d{5,}\.safetensors|\..*\.tmp)$")


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
        tail_samples (`int`, *optional*, defaults to `0`): Of the `k` ids per position, how many are sampled from
            the teacher's tail rather than its exact top ids (`0 <= tail_samples < k`; recorded in the key and the
            manifest when positive). The writer only records it: the caller samples (see [`write_teacher_cache`]).
        seed (`int`, *optional*, defaults to `0`): Seed of the tail sampling, recorded with `tail_samples`.

    Raises:
        ValueError: Invalid settings (`k > vocab_size`, unknown `logprob_bits`, non-positive temperature,
            `tail_samples` outside `[0, k)`).
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
        tail_samples: int = 0,
        seed: int = 0,
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
        check_tail_samples(tail_samples, k)
        self.path = Path(path)
        self.tail_samples, self.seed = int(tail_samples), int(seed)
        self.key = cache_key(
            key,
            vocab_size=vocab_size,
            k=k,
            temperature=temperature,
            logprob_bits=logprob_bits,
            tail_samples=tail_samples,
            seed=seed,
        )
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
        tail = {"tail_samples": self.tail_samples, "tail_seed": self.seed} if self.tail_samples else {}
        return {
            **tail,
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
            rest_log_prob (`np.ndarray` or `torch.Tensor`): `[n]` log of the mass outside the k ids (`-inf` with a
                sampled tail).
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
        row_crc32 = np.array([row_checksum(r[0], r[1], r[2]) for r in rows], dtype=np.uint32)
        arrays = {"payload": payload, "offsets": offsets, "positions": positions, "row_keys": row_keys.copy()}
        data = _save_safetensors(
            {**arrays, "row_crc32": row_crc32},
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


__all__ = ["TeacherCacheWriter", "check_tail_samples"]

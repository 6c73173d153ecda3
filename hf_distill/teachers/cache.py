"""Reading a teacher cache: [`TeacherCache`] (read-only, checked access) and [`CachedRow`] (one row's record).

The cache is written by [`TeacherCacheWriter`] (`hf_distill.teachers.cache_writer`); its row and cache keys are in
`hf_distill.teachers.cache_keys`, its files in `hf_distill.teachers.cache_files`. See `docs/teacher_cache.md`.
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as load_safetensors

from .cache_files import INDEX_FILE, MANIFEST, MappedShard, _read_manifest, _sha256_hex, file_sha256
from .cache_format import decode_record
from .cache_keys import RowNotCachedError, TeacherCacheError, _normalize_key, key_differences

RERUN_HINT = "Rerun `hf-distill cache-teacher` with the same settings: it keeps the valid shards and resumes."


@dataclass
class CachedRow:
    """The cached teacher distribution of one row, over its `n` scored positions (in row order).

    Attributes:
        ids (`torch.LongTensor`): `[n, k]` token ids, sorted by log-prob descending.
        log_probs (`torch.FloatTensor`): `[n, k]` `log_softmax(logits / T)` over the full vocabulary (float32).
        rest_log_prob (`torch.FloatTensor`): `[n]` log of the probability outside the k ids (`-inf` when k = V, and
            with a sampled tail).
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

    Shard sizes are checked at open (a truncated shard fails there). Shards are mapped into memory and read one row at
    a time: a lookup reads that row's bytes only, and checks them against the row's CRC-32 before any value is
    returned (random access over a large cache costs the rows it reads, not whole shards). `verify()` (or
    `open(..., verify=True)`) checks the sha256 of every whole shard as well.

    Attributes:
        path (`pathlib.Path`): The cache folder.
        manifest (`dict`): The parsed manifest.
        key (`dict`): The full key the cache was written with.
        vocab_size (`int`), k (`int`), temperature (`float`), logprob_bits (`int`): The settings.
        tail_samples (`int`): Of the `k` ids per position, how many were sampled from the teacher's tail (`0`: the
            exact top k). When positive, the stored distribution is an unbiased estimate of the teacher's: the rest is
            `-inf` and only `divergence="forward_kl"` may train from it (see `docs/teacher_cache.md`).
        tail_seed (`int`): The seed of the tail sampling (`0` without one).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], row_keys: np.ndarray, max_loaded_shards: int = 256):
        self.path = path
        self.manifest = manifest
        self.key = manifest["key"]
        self.vocab_size = int(manifest["vocab_size"])
        self.k = int(manifest["k"])
        self.temperature = float(manifest["temperature"])
        self.logprob_bits = int(manifest["logprob_bits"])
        self.tail_samples = int(manifest.get("tail_samples", 0))
        self.tail_seed = int(manifest.get("tail_seed", 0))
        self._shards = manifest["shards"]
        self._starts = np.cumsum([0] + [s["rows"] for s in self._shards]).tolist()
        # Row keys as 16-byte strings, sorted once: a lookup is a binary search (no Python object per row, so a
        # cache of millions of rows opens fast and forked DataLoader workers share these arrays)
        self._row_keys = np.ascontiguousarray(row_keys, dtype=np.uint8).reshape(-1, 16)
        keys = self._row_keys.view("S16").reshape(-1)
        self._order = np.argsort(keys, kind="stable")  # equal keys (a row twice): the first one is found
        self._sorted_keys = keys[self._order]
        self._mapped: OrderedDict[int, MappedShard] = OrderedDict()
        self._max_mapped = max(1, max_loaded_shards)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        expected_key: dict[str, Any] | None = None,
        *,
        verify: bool = False,
        max_loaded_shards: int = 256,
    ) -> TeacherCache:
        """Open a complete cache, checking its key, completeness, index and shard sizes.

        Args:
            path (`str` or `os.PathLike`): The cache folder.
            expected_key (`dict`, *optional*): Key fields the caller expects. Each field it names is compared with
                the cache's key (a field the cache lacks is a difference); fields it does not name are not compared.
            verify (`bool`, *optional*, defaults to `False`): Hash every shard now instead of on first access.
            max_loaded_shards (`int`, *optional*, defaults to `256`): Shards kept mapped (an LRU; a mapped shard holds
                its small per-row arrays in memory, its payload stays on disk until a row is read).

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
            # The fields the caller names (a training run checks what it must match, not e.g. the teacher's)
            cached = {name: value for name, value in manifest["key"].items() if name in expected}
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

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into spawned DataLoader workers: without the mapped shards (a memmap would pickle its whole file);
        # the worker maps the shards it reads
        return {**self.__dict__, "_mapped": OrderedDict()}

    def __len__(self) -> int:
        return self._row_keys.shape[0]

    def __contains__(self, row_key: object) -> bool:
        return self._find(row_key) is not None

    def _find(self, row_key: object) -> int | None:
        """The input index of `row_key` (its first row), or `None`."""
        try:
            raw = bytes.fromhex(row_key) if isinstance(row_key, str) else b""
        except ValueError:
            return None
        if len(raw) != 16:
            return None
        key = np.frombuffer(raw, dtype="S16")
        at = int(np.searchsorted(self._sorted_keys, key[0]))
        if at < len(self._sorted_keys) and self._row_keys[self._order[at]].tobytes() == raw:
            return int(self._order[at])
        return None

    def row_keys(self) -> Iterator[str]:
        """Row keys in input order."""
        return (row.tobytes().hex() for row in self._row_keys)

    @property
    def bytes_per_logit(self) -> float:
        """Stored payload bytes per kept logit, from the manifest."""
        return float(self.manifest["bytes_per_logit"])

    def verify(self) -> None:
        """Hash every whole shard now (sha256, read in blocks) and compare it with the manifest.

        Raises:
            TeacherCacheError: A shard is missing, truncated or corrupt.
        """
        for entry in self._shards:
            file = self.path / entry["file"]
            try:
                digest = file_sha256(file)
            except OSError as error:
                raise TeacherCacheError(f"Cannot read teacher cache shard {file}: {error}. {RERUN_HINT}") from error
            if digest != entry["sha256"]:
                raise TeacherCacheError(
                    f"Teacher cache shard {file} is corrupt or truncated (sha256/size differ from {MANIFEST}). Delete "
                    f"{file.name} and rerun `hf-distill cache-teacher` with the same settings: it rewrites that shard."
                )

    def _shard(self, shard: int) -> MappedShard:
        if shard in self._mapped:
            self._mapped.move_to_end(shard)
            return self._mapped[shard]
        mapped = MappedShard(self.path / self._shards[shard]["file"])
        if len(mapped) != self._shards[shard]["rows"]:
            raise TeacherCacheError(f"Teacher cache shard {mapped.file} does not match {MANIFEST} (row count).")
        self._mapped[shard] = mapped
        while len(self._mapped) > self._max_mapped:
            self._mapped.popitem(last=False)
        return mapped

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
        index = self._find(row_key)
        if index is None:
            raise RowNotCachedError(
                f"row not in the cache: the cache does not cover this dataset; row key {row_key} is not among the "
                f"{len(self)} rows of {self.path}. Rebuild the cache for this dataset and preprocessing (max length, "
                "packing, masks) with `hf-distill cache-teacher`."
            )
        shard = bisect.bisect_right(self._starts, index) - 1
        mapped = self._shard(shard)
        key, positions, payload = mapped.row(index - self._starts[shard])  # checked against its CRC-32
        if key.hex() != row_key:
            raise TeacherCacheError(f"Teacher cache shard {mapped.file} does not match the index.")
        try:
            record = decode_record(payload, positions, self.k, self.vocab_size, self.logprob_bits)
        except ValueError as error:  # a matching checksum but undecodable: written by a broken writer
            raise TeacherCacheError(f"Teacher cache shard {mapped.file} cannot be decoded: {error}") from error
        return CachedRow(
            ids=torch.from_numpy(record.token_ids),
            log_probs=torch.from_numpy(record.log_probs),
            rest_log_prob=torch.from_numpy(record.rest_log_prob),
        )

    def __repr__(self) -> str:
        tail = f"tail_samples={self.tail_samples}, " if self.tail_samples else ""
        return (
            f"TeacherCache({str(self.path)!r}, rows={len(self)}, vocab_size={self.vocab_size}, k={self.k}, "
            f"temperature={self.temperature}, logprob_bits={self.logprob_bits}, {tail}"
            f"bytes_per_logit={self.bytes_per_logit:.3f})"
        )


__all__ = ["CachedRow", "TeacherCache"]

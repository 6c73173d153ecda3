"""Files of the on-disk teacher cache, shared by the writer and the reader: names, manifest, safetensors, hashing.

A cache is a folder:

- `manifest.json`: format version, the key (and its hash), the settings (vocab size, k, temperature, log-prob bits,
  rows per shard), totals (rows, tokens, scored positions, payload bytes, bytes per logit), `complete` (true only
  once every shard and the index are written) and, per shard, its file name, row count, size and sha256.
- `shard-00000.safetensors`, ...: each holds the records of `rows_per_shard` consecutive input rows, in input order
  (`payload` uint8, `offsets` int64 `[r+1]`, `positions` int64 `[r]`, `row_keys` uint8 `[r, 16]`, `row_crc32` uint32
  `[r]`: [`row_checksum`] of each row). No timestamps, so the same inputs give the same bytes. The reader maps a
  shard into memory ([`MappedShard`]) and reads one row's bytes at a time, checked against its CRC-32.
- `index.safetensors`: every row key in order (`row_keys` uint8 `[N, 16]`), read at open to map a row key to its
  shard.

Every file is written to a temporary name, fsynced and renamed; the manifest is rewritten (atomically) after every
shard, so an interrupted write resumes at the first missing shard. See `docs/teacher_cache.md`.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..fs import fsync_dir
from .cache_keys import FORMAT_VERSION, TeacherCacheError

FORMAT_NAME = "hf_distill.teacher_cache"
MANIFEST = "manifest.json"
INDEX_FILE = "index.safetensors"


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
            f"reads version {FORMAT_VERSION} only. Rebuild it with `hf-distill cache-teacher` (the format version is "
            "part of the cache key, so the new cache gets its own folder); this one can then be deleted."
        )
    return manifest


_SAFETENSORS_DTYPES = {np.dtype(np.int64): "I64", np.dtype(np.uint32): "U32", np.dtype(np.uint8): "U8"}
_NUMPY_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
SHARD_ARRAYS = ("offsets", "payload", "positions", "row_crc32", "row_keys")
"""The arrays of a shard (see the module docstring)."""


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


def row_checksum(row_key: bytes, positions: int, payload: Any) -> int:
    """CRC-32 of one shard row: its 16-byte key, its position count (int64, little-endian) and its payload bytes.

    Args:
        row_key (`bytes`): The row's 16-byte key.
        positions (`int`): Its number of scored positions.
        payload: Its encoded record (any contiguous buffer of bytes).

    Returns:
        `int`: The unsigned 32-bit checksum.
    """
    return zlib.crc32(payload, zlib.crc32(positions.to_bytes(8, "little", signed=True), zlib.crc32(row_key)))


def file_sha256(file: Path, block: int = 16 * 2**20) -> str:
    """sha256 hex of a file, read in blocks (a shard is never held in memory whole)."""
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


class MappedShard:
    """A shard file mapped into memory: its small per-row arrays are copied at open, each row's payload is read only
    when that row is looked up (random access over a large cache reads the rows it needs, not whole shards).

    Args:
        file (`pathlib.Path`): The shard file (its size was checked against the manifest).

    Raises:
        TeacherCacheError: If the file is not a shard of this format (header, arrays, shapes or offsets).
    """

    def __init__(self, file: Path):
        self.file = file
        try:
            self._map = np.memmap(file, dtype=np.uint8, mode="r")
            header_size = int.from_bytes(self._map[:8].tobytes(), "little")
            header = json.loads(self._map[8 : 8 + header_size].tobytes())
            base, arrays = 8 + header_size, {}
            for name in SHARD_ARRAYS:
                spec = header[name]
                dtype = _NUMPY_DTYPES[spec["dtype"]]
                begin, end = (base + int(offset) for offset in spec["data_offsets"])
                count = int(np.prod(spec["shape"], dtype=np.int64))
                if not base <= begin <= end <= self._map.size or end - begin != count * dtype.itemsize:
                    raise ValueError(f"array {name!r} lies outside the file or does not match its shape")
                arrays[name] = (begin, end, dtype, [int(d) for d in spec["shape"]])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise TeacherCacheError(
                f"Teacher cache shard {file} cannot be parsed ({error}). Delete {file.name} and rerun `hf-distill "
                "cache-teacher` with the same settings: it rewrites that shard."
            ) from error
        small = {}
        for name in ("offsets", "positions", "row_crc32", "row_keys"):
            begin, end, dtype, shape = arrays[name]
            small[name] = np.frombuffer(self._map[begin:end].tobytes(), dtype=dtype.newbyteorder("<")).reshape(shape)
        self.offsets, self.positions = small["offsets"], small["positions"]
        self.row_crc32, self.row_keys = small["row_crc32"], small["row_keys"]
        self._payload_begin, self._payload_end = arrays["payload"][:2]
        rows = self.row_keys.shape[0] if self.row_keys.ndim == 2 else -1
        shapes_fit = (
            self.row_keys.shape == (rows, 16)
            and self.offsets.shape == (rows + 1,)
            and self.positions.shape == (rows,)
            and self.row_crc32.shape == (rows,)
        )
        payload_size = self._payload_end - self._payload_begin
        offsets = self.offsets
        if not shapes_fit or offsets[0] != 0 or offsets[-1] != payload_size or np.any(np.diff(offsets) < 0):
            raise TeacherCacheError(
                f"Teacher cache shard {file} is corrupt or truncated: its row arrays do not fit together. Delete "
                f"{file.name} and "
                "rerun `hf-distill cache-teacher` with the same settings: it rewrites that shard."
            )

    def __len__(self) -> int:
        return self.row_keys.shape[0]

    def row(self, local: int) -> tuple[bytes, int, np.ndarray]:
        """Row `local` as (its 16-byte key, its position count, its payload bytes), after checking its CRC-32.

        Raises:
            TeacherCacheError: If the row's bytes do not match its checksum.
        """
        key, positions = self.row_keys[local].tobytes(), int(self.positions[local])
        start, end = int(self.offsets[local]), int(self.offsets[local + 1])
        payload = np.asarray(self._map[self._payload_begin + start : self._payload_begin + end])
        if row_checksum(key, positions, payload) != int(self.row_crc32[local]):
            raise TeacherCacheError(
                f"Teacher cache shard {self.file} is corrupt or truncated: row {local} does not match its checksum. "
                f"Delete {self.file.name} and rerun `hf-distill cache-teacher` with the same settings: it rewrites "
                "that shard."
            )
        return key, positions, payload

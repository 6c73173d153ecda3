"""Files of the on-disk teacher cache, shared by the writer and the reader: names, manifest, safetensors, hashing.

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

import hashlib
import json
import os
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

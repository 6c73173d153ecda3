"""Encoding of one teacher-cache record: the top-k token ids and log-probs of a row's scored positions.

Pure numpy, no I/O. A record covers the `n` scored positions of one row and holds, per position, the teacher's `k`
most likely token ids (distinct), their log-probs and the log of the probability mass outside them
(`rest_log_prob`). It is stored as one flat `uint8` payload, little-endian, in this order:

| part | size (bytes) | notes |
|---|---|---|
| `rest_log_prob` | `4 n` | float32, exact (`-inf` when `k = V`) |
| log-probs, `logprob_bits=32` | `4 n k` | float32, exact, in ascending-id order |
| log-probs, `logprob_bits=16` | `2 n k` | float16, in ascending-id order |
| log-probs, `logprob_bits=8`/`4` | `6n + ceil(nkb / 8)` | top-1 float32, float16 step, `k` `b`-bit codes (id order) |
| gap-code parameters | `ceil(k w / 8)` | one `r_j` per sorted slot `j < k`, `w = max(1, bitlen(id_bits - 1))` bits |
| token ids | variable (the rest) | gap-coded: `n k` unary prefixes, then the `n k` suffixes, zero-padded |

The payload size depends on the ids; the record's byte length is stored by the shard (its `offsets`). A record with
`n = 0` is empty.

**Token ids.** Per position the ids are sorted ascending and gap-coded, with one code parameter per sorted slot
chosen per record (see `cache_id_coding.py` for the code).

**Order.** Log-probs are stored in ascending-id order, so no permutation is stored: decoding sorts each position by
the decoded log-prob, descending, and equal decoded values (equal codes with 8/4 bits, equal float16/float32 values
otherwise) come in ascending id order. The decoded ids are therefore those encoded, sorted by log-prob descending as
given to [`encode_record`], except that ties (including values that quantisation made equal) are in ascending id
order.

**Quantised log-probs** (`b` = 8 or 4): the top-1 log-prob `m` of a position is kept exactly; each of the `k` values
`x <= m` (the top-1 included, with code 0) is stored as the code `q = round((m - x) / step)` with
`step = (m - x_min) / (2^b - 1)` rounded *up* to a float16, and decoded as `m - q * step`. The error is at most
`step / 2` (plus float32 rounding), i.e. half of the position's log-prob span divided by `2^b - 1`. If a position
has `-inf` log-probs among its top k (only possible when the teacher's logits contain `-inf`), the step is stored
negative, the largest code means `-inf` and the finite values use `2^b - 1` levels (`step = span / (2^b - 2)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cache_id_coding import (
    _bit_length,
    _choose_params,
    _decode_ids,
    _encode_ids,
    _gaps,
    _max_bits_per_id,
    _packed_bytes,
    _param_bits,
    id_bits,
    pack_bits,
    unpack_bits,
)

LOGPROB_BITS = (4, 8, 16, 32)
"""Supported widths of a stored log-prob."""


def _logprob_nbytes(n: int, k: int, logprob_bits: int) -> int:
    if logprob_bits in (32, 16):
        return n * k * logprob_bits // 8
    return 6 * n + _packed_bytes(n * k, logprob_bits)


def _fixed_bits_per_position(k: int, logprob_bits: int) -> int:
    """Bits per position of everything but the ids, for long rows (no byte padding)."""
    return 32 + (k * logprob_bits if logprob_bits in (32, 16) else 48 + k * logprob_bits)


def expected_bytes_per_logit(vocab_size: int, k: int, logprob_bits: int, token_ids: np.ndarray | None = None) -> float:
    """Payload bytes per kept logit (`record bytes / (n * k)`) for long rows, without byte padding.

    The ids take a data-dependent size. Without `token_ids` this is an upper bound over all id sets (reached
    roughly when the ids are evenly spread over the vocabulary; real top-k ids crowd the low ids and take less, see
    `docs/teacher_cache.md`). With `token_ids`, it is the exact size of a record holding those ids (the per-record
    parameters included).

    Args:
        vocab_size (`int`): Teacher vocabulary size.
        k (`int`): Token ids kept per position.
        logprob_bits (`int`): One of [`LOGPROB_BITS`].
        token_ids (`np.ndarray`, *optional*): Ids `[n, k]` (distinct per position, any order) to size exactly.

    Returns:
        `float`
    """
    _check_bits(logprob_bits)
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be between 1 and vocab_size ({vocab_size}), got {k}.")
    if token_ids is None:
        return (_fixed_bits_per_position(k, logprob_bits) + k * _max_bits_per_id(vocab_size, k)) / (8 * k)
    ids = np.sort(np.asarray(token_ids, dtype=np.int64), axis=1)
    if ids.ndim != 2 or ids.shape[1] != k or not ids.shape[0]:
        raise ValueError(f"token_ids must have shape [n, {k}] with n >= 1, got {ids.shape}.")
    _, id_code_bits = _choose_params(_bit_length(_gaps(ids)), vocab_size)
    n = ids.shape[0]
    total = n * _fixed_bits_per_position(k, logprob_bits) + k * _param_bits(vocab_size) + id_code_bits
    return total / (8 * n * k)


def quantization_error_bound(log_probs: np.ndarray, logprob_bits: int) -> np.ndarray:
    """Documented worst-case absolute decode error per value for `log_probs` `[n, k]` (sorted descending).

    `32`: 0. `16`: half a float16 ulp (`2**-11 |x|`, at least `2**-25`; values below float16's range become `-inf`).
    `8`/`4`: half the position's step, `(top-1 − smallest finite) / (2**b − 1) / 2` (`2**b − 2` levels when the
    position has `-inf` values), plus float32/float16 rounding of the step.

    Args:
        log_probs (`np.ndarray`): Float log-probs `[n, k]`, sorted descending per row.
        logprob_bits (`int`): One of [`LOGPROB_BITS`].

    Returns:
        `np.ndarray`: `float64` bounds of shape `[n, k]`.
    """
    _check_bits(logprob_bits)
    x = np.asarray(log_probs, dtype=np.float64)
    if logprob_bits == 32:
        return np.zeros_like(x)
    if logprob_bits == 16:
        return np.maximum(np.abs(x) * 2.0**-11, 2.0**-25) * (1 + 1e-6)
    finite = np.where(np.isfinite(x), x, np.inf)
    low = finite.min(axis=1, keepdims=True) if x.shape[1] else np.zeros((x.shape[0], 1))
    levels = np.where(np.isinf(x).any(axis=1, keepdims=True), 2**logprob_bits - 2, 2**logprob_bits - 1)
    span = x[:, :1] - low if x.shape[1] else np.zeros((x.shape[0], 1))
    step = span / levels
    return np.broadcast_to(step * (0.5 + 2.0**-10) + np.abs(x[:, :1]) * 2.0**-22 + 1e-30, x.shape).copy()


def _check_bits(logprob_bits: int) -> None:
    if logprob_bits not in LOGPROB_BITS:
        raise ValueError(f"logprob_bits must be one of {LOGPROB_BITS}, got {logprob_bits}.")


@dataclass
class Record:
    """A decoded record: the top-k teacher distribution at each scored position of one row.

    Attributes:
        token_ids (`np.ndarray`): `int64` `[n, k]`, ids sorted by log-prob descending (ties in ascending id order).
        log_probs (`np.ndarray`): `float32` `[n, k]`, `log_softmax(logits / T)` over the full vocabulary.
        rest_log_prob (`np.ndarray`): `float32` `[n]`, log of the probability mass outside the k ids.
    """

    token_ids: np.ndarray
    log_probs: np.ndarray
    rest_log_prob: np.ndarray


def _step_up_f16(step: np.ndarray) -> np.ndarray:
    """float16 of `step`, rounded up so that `step16 >= step` (codes never overflow)."""
    step16 = step.astype(np.float16)
    low = step16.astype(np.float64) < step
    step16[low] = np.nextafter(step16[low], np.float16(np.inf))
    return step16


def _quantize(log_probs: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-1 (float32), signed float16 step and the `[n, k]` codes of `log_probs` sorted descending (code 0 first)."""
    n, k = log_probs.shape
    top = log_probs[:, 0].astype(np.float32)
    rest = log_probs[:, 1:].astype(np.float64)
    neg_inf = np.isneginf(rest)
    has_inf = neg_inf.any(axis=1)
    max_code = 2**bits - 1
    levels = np.where(has_inf, max_code - 1, max_code).astype(np.float64)
    finite_low = np.where(neg_inf, np.inf, rest).min(axis=1) if k > 1 else top.astype(np.float64)
    finite_low = np.where(np.isfinite(finite_low), finite_low, top)
    span = np.maximum(top.astype(np.float64) - finite_low, 0.0)
    step16 = _step_up_f16(span / levels)
    if np.isinf(step16).any():
        raise ValueError("A log-prob span exceeds the float16 range; use logprob_bits=16 or 32.")
    step = step16.astype(np.float64)[:, None]
    safe = np.where(step > 0, step, 1.0)
    codes = np.rint((top.astype(np.float64)[:, None] - np.where(neg_inf, 0.0, rest)) / safe)
    codes = np.where(step > 0, codes, 0.0)
    codes = np.clip(codes, 0, levels[:, None]).astype(np.int64)
    codes[neg_inf] = max_code
    stored_step = np.where(has_inf, -step16, step16).astype(np.float16)
    return top, stored_step, np.concatenate([np.zeros((n, 1), dtype=np.int64), codes], axis=1)


def _dequantize(top: np.ndarray, stored_step: np.ndarray, codes: np.ndarray, bits: int) -> np.ndarray:
    """Values `[n, k]` of codes `[n, k]` (any order): `top - code * step`, exactly `top` for code 0."""
    has_inf = np.signbit(stored_step)
    step = np.abs(stored_step.astype(np.float32))
    values = (top[:, None] - codes.astype(np.float32) * step[:, None]).astype(np.float32)
    values[has_inf[:, None] & (codes == 2**bits - 1)] = -np.inf
    return values


def encode_record(
    token_ids: np.ndarray, log_probs: np.ndarray, rest_log_prob: np.ndarray, vocab_size: int, logprob_bits: int
) -> np.ndarray:
    """Encode one record into a flat `uint8` payload (layout in the module docstring).

    Args:
        token_ids (`np.ndarray`): Integer ids `[n, k]` in `[0, vocab_size)`, distinct within a position.
        log_probs (`np.ndarray`): Float log-probs `[n, k]`, sorted descending per position.
        rest_log_prob (`np.ndarray`): Float `[n]`.
        vocab_size (`int`): Teacher vocabulary size.
        logprob_bits (`int`): One of [`LOGPROB_BITS`].

    Returns:
        `np.ndarray`: `uint8` payload (its size depends on the ids; empty when `n = 0`).

    Raises:
        ValueError: On shape mismatch, ids out of range or repeated within a position, unsorted or NaN log-probs.
    """
    _check_bits(logprob_bits)
    token_ids = np.asarray(token_ids)
    log_probs = np.asarray(log_probs, dtype=np.float32)
    rest_log_prob = np.asarray(rest_log_prob, dtype=np.float32).reshape(-1)
    if token_ids.ndim != 2 or token_ids.shape != log_probs.shape or rest_log_prob.shape[0] != token_ids.shape[0]:
        raise ValueError(
            f"Expected token_ids and log_probs of shape [n, k] and rest_log_prob [n], got {token_ids.shape}, "
            f"{log_probs.shape}, {rest_log_prob.shape}."
        )
    n, k = token_ids.shape
    if k < 1:
        raise ValueError("k must be >= 1.")
    if n and (token_ids.min() < 0 or token_ids.max() >= vocab_size):
        raise ValueError(f"Token ids must lie in [0, {vocab_size}).")
    if np.isnan(log_probs).any() or np.isnan(rest_log_prob).any():
        raise ValueError("NaN in the teacher log-probs: the teacher's logits are not finite.")
    if k > 1 and (log_probs[:, 1:] > log_probs[:, :-1]).any():
        raise ValueError("log_probs must be sorted in descending order along each position.")
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    by_id = np.argsort(token_ids, axis=1)  # distinct ids (checked below): any sort gives the same order
    sorted_ids = np.take_along_axis(token_ids.astype(np.int64), by_id, axis=1)
    if k > 1 and (sorted_ids[:, 1:] == sorted_ids[:, :-1]).any():
        raise ValueError("Token ids must be distinct within a position.")
    parts = [rest_log_prob.astype("<f4").view(np.uint8)]
    if logprob_bits in (32, 16):
        stored = np.take_along_axis(log_probs, by_id, axis=1).astype("<f4" if logprob_bits == 32 else "<f2")
        parts.append(stored.reshape(-1).view(np.uint8))
    else:
        top, step, codes = _quantize(log_probs, logprob_bits)
        parts += [top.astype("<f4").view(np.uint8), step.astype("<f2").view(np.uint8)]
        parts.append(pack_bits(np.take_along_axis(codes, by_id, axis=1), logprob_bits))
    parts.append(_encode_ids(sorted_ids, vocab_size))
    return np.concatenate(parts)


def decode_record(payload: np.ndarray, n: int, k: int, vocab_size: int, logprob_bits: int) -> Record:
    """Decode a payload written by [`encode_record`].

    Each position's ids come sorted by decoded log-prob, descending; equal decoded values (equal codes with 8/4
    bits) in ascending id order.

    Args:
        payload (`np.ndarray`): `uint8` bytes of one record.
        n (`int`): Number of positions in the record.
        k (`int`): Token ids per position.
        vocab_size (`int`): Teacher vocabulary size.
        logprob_bits (`int`): One of [`LOGPROB_BITS`].

    Returns:
        [`Record`]

    Raises:
        ValueError: If the payload does not decode with `n`, `k`, `vocab_size` and `logprob_bits` (wrong size,
            corrupt id stream).
    """
    _check_bits(logprob_bits)
    payload = np.asarray(payload, dtype=np.uint8).reshape(-1)
    if n == 0:
        if payload.size:
            raise ValueError(f"Record payload has {payload.size} bytes, expected 0 for a record without positions.")
        empty = np.zeros((0, k))
        return Record(empty.astype(np.int64), empty.astype(np.float32), np.zeros(0, dtype=np.float32))
    fixed = 4 * n + _logprob_nbytes(n, k, logprob_bits)
    if payload.size <= fixed:
        raise ValueError(f"Record payload has {payload.size} bytes, expected more than {fixed}.")
    buffer = payload.tobytes()
    offset = 0

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal offset
        array = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
        offset += array.nbytes
        return array.astype(dtype[1:], copy=True)

    rest = take("<f4", n).astype(np.float32)
    if logprob_bits in (32, 16):
        log_probs = take("<f4" if logprob_bits == 32 else "<f2", n * k).astype(np.float32).reshape(n, k)
        order = np.argsort(-log_probs, axis=1, kind="stable")
    else:
        top = take("<f4", n)
        step = take("<f2", n)
        codes_size = _packed_bytes(n * k, logprob_bits)
        codes = unpack_bits(payload[offset : offset + codes_size], logprob_bits, n * k).reshape(n, k)
        offset += codes_size
        log_probs = _dequantize(top, step, codes, logprob_bits)
        order = np.argsort(codes.astype(np.uint16), axis=1, kind="stable")  # values are non-increasing in the code
    ids = _decode_ids(payload[offset:], n, k, vocab_size)
    return Record(
        token_ids=np.take_along_axis(ids, order, axis=1),
        log_probs=np.take_along_axis(log_probs, order, axis=1).astype(np.float32, copy=False),
        rest_log_prob=rest,
    )


def bytes_per_logit(payload_bytes: int, positions: int, k: int) -> float:
    """`payload_bytes / (positions * k)`, 0 when nothing is stored.

    Args:
        payload_bytes (`int`): Total record payload bytes.
        positions (`int`): Total scored positions.
        k (`int`): Token ids per position.

    Returns:
        `float`
    """
    logits = positions * k
    return payload_bytes / logits if logits else 0.0


__all__ = [
    "LOGPROB_BITS",
    "Record",
    "bytes_per_logit",
    "decode_record",
    "encode_record",
    "expected_bytes_per_logit",
    "id_bits",
    "pack_bits",
    "quantization_error_bound",
    "unpack_bits",
]

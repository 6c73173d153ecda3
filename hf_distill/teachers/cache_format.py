"""Encoding of one teacher-cache record: the top-k token ids and log-probs of a row's scored positions.

Pure numpy, no I/O. A record covers the `n` scored positions of one row and holds, per position, the teacher's `k`
most likely token ids, their log-probs (sorted descending) and the log of the probability mass outside them
(`rest_log_prob`). It is stored as one flat `uint8` payload, little-endian, in this order:

| part | size (bytes) | notes |
|---|---|---|
| `rest_log_prob` | `4 n` | float32, exact (`-inf` when `k = V`) |
| log-probs, `logprob_bits=32` | `4 n k` | float32, exact |
| log-probs, `logprob_bits=16` | `2 n k` | float16 |
| log-probs, `logprob_bits=8`/`4` | `6 n + ceil(n (k-1) b / 8)` | top-1 float32, float16 step, `k-1` `b`-bit codes |
| token ids | `ceil(n k id_bits / 8)` | bit-packed, `id_bits = ceil(log2(V))` bits each |

Quantised log-probs (`b` = 8 or 4): the top-1 log-prob `m` of a position is kept exactly; the other `k-1` values
`x <= m` are stored as codes `q = round((m - x) / step)` with `step = (m - x_min) / (2^b - 1)` rounded *up* to a
float16, and decoded as `m - q * step`. The error is at most `step / 2` (plus float32 rounding), i.e. half of the
position's log-prob span divided by `2^b - 1`. If a position has `-inf` log-probs among its top k (only possible when
the teacher's logits contain `-inf`), the step is stored negative, the largest code means `-inf` and the finite values
use `2^b - 1` levels (`step = span / (2^b - 2)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOGPROB_BITS = (4, 8, 16, 32)
"""Supported widths of a stored log-prob."""


def id_bits(vocab_size: int) -> int:
    """Bits per stored token id: `ceil(log2(vocab_size))` (at least 1).

    Args:
        vocab_size (`int`): Number of token ids the teacher scores (ids are `0 .. vocab_size - 1`).

    Returns:
        `int`
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}.")
    return max(1, (vocab_size - 1).bit_length())


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers into a little-endian bit stream of `bits` bits each.

    Args:
        values (`np.ndarray`): Integers in `[0, 2**bits)`, any shape (flattened).
        bits (`int`): Bits per value, 1 to 63.

    Returns:
        `np.ndarray`: `uint8` array of `ceil(values.size * bits / 8)` bytes.
    """
    flat = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
    if flat.size and int(flat.max()) >> bits:
        raise ValueError(f"A value does not fit in {bits} bits (max {int(flat.max())}).")
    shifts = np.arange(bits, dtype=np.uint64)
    bit_matrix = ((flat[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bit_matrix.reshape(-1), bitorder="little")


def unpack_bits(buffer: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of [`pack_bits`]: read `count` values of `bits` bits each.

    Args:
        buffer (`np.ndarray`): `uint8` bit stream.
        bits (`int`): Bits per value.
        count (`int`): Number of values to read.

    Returns:
        `np.ndarray`: `int64` array of shape `[count]`.
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    bit_matrix = np.unpackbits(np.asarray(buffer, dtype=np.uint8), count=count * bits, bitorder="little")
    weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
    return bit_matrix.reshape(count, bits).astype(np.int64) @ weights


def _packed_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def record_nbytes(n: int, k: int, vocab_size: int, logprob_bits: int) -> int:
    """Exact payload size in bytes of a record with `n` positions.

    Args:
        n (`int`): Scored positions in the row.
        k (`int`): Token ids kept per position.
        vocab_size (`int`): Teacher vocabulary size (sets the id width).
        logprob_bits (`int`): One of [`LOGPROB_BITS`].

    Returns:
        `int`
    """
    _check_bits(logprob_bits)
    size = 4 * n + _packed_bytes(n * k, id_bits(vocab_size))
    if logprob_bits in (32, 16):
        size += n * k * logprob_bits // 8
    else:
        size += 6 * n + _packed_bytes(n * (k - 1), logprob_bits)
    return size


def expected_bytes_per_logit(vocab_size: int, k: int, logprob_bits: int) -> float:
    """Payload bytes per kept logit (`record bytes / (n * k)`) for long rows, without byte padding.

    Args:
        vocab_size (`int`): Teacher vocabulary size.
        k (`int`): Token ids kept per position.
        logprob_bits (`int`): One of [`LOGPROB_BITS`].

    Returns:
        `float`
    """
    _check_bits(logprob_bits)
    bits = 32 + k * id_bits(vocab_size)
    bits += k * logprob_bits if logprob_bits in (32, 16) else 48 + (k - 1) * logprob_bits
    return bits / (8 * k)


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
        token_ids (`np.ndarray`): `int64` `[n, k]`, ids sorted by log-prob descending.
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
    return top, stored_step, codes


def _dequantize(top: np.ndarray, stored_step: np.ndarray, codes: np.ndarray, bits: int) -> np.ndarray:
    has_inf = np.signbit(stored_step)
    step = np.abs(stored_step.astype(np.float32))
    values = top[:, None] - codes.astype(np.float32) * step[:, None]
    values[has_inf[:, None] & (codes == 2**bits - 1)] = -np.inf
    return np.concatenate([top[:, None], values.astype(np.float32)], axis=1)


def encode_record(
    token_ids: np.ndarray, log_probs: np.ndarray, rest_log_prob: np.ndarray, vocab_size: int, logprob_bits: int
) -> np.ndarray:
    """Encode one record into a flat `uint8` payload (layout in the module docstring).

    Args:
        token_ids (`np.ndarray`): Integer ids `[n, k]` in `[0, vocab_size)`.
        log_probs (`np.ndarray`): Float log-probs `[n, k]`, sorted descending per position.
        rest_log_prob (`np.ndarray`): Float `[n]`.
        vocab_size (`int`): Teacher vocabulary size.
        logprob_bits (`int`): One of [`LOGPROB_BITS`].

    Returns:
        `np.ndarray`: `uint8` payload of [`record_nbytes`] bytes.

    Raises:
        ValueError: On shape mismatch, ids out of range, unsorted or NaN log-probs.
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
    parts = [rest_log_prob.astype("<f4").view(np.uint8)]
    if logprob_bits == 32:
        parts.append(log_probs.astype("<f4").reshape(-1).view(np.uint8))
    elif logprob_bits == 16:
        parts.append(log_probs.astype("<f2").reshape(-1).view(np.uint8))
    else:
        top, step, codes = _quantize(log_probs, logprob_bits)
        parts += [top.astype("<f4").view(np.uint8), step.astype("<f2").view(np.uint8)]
        parts.append(pack_bits(codes, logprob_bits))
    parts.append(pack_bits(token_ids.astype(np.int64), id_bits(vocab_size)))
    payload = np.concatenate(parts)
    assert payload.size == record_nbytes(n, k, vocab_size, logprob_bits)
    return payload


def decode_record(payload: np.ndarray, n: int, k: int, vocab_size: int, logprob_bits: int) -> Record:
    """Decode a payload written by [`encode_record`].

    Args:
        payload (`np.ndarray`): `uint8` bytes of one record.
        n (`int`): Number of positions in the record.
        k (`int`): Token ids per position.
        vocab_size (`int`): Teacher vocabulary size.
        logprob_bits (`int`): One of [`LOGPROB_BITS`].

    Returns:
        [`Record`]

    Raises:
        ValueError: If the payload size does not match `n`, `k`, `vocab_size` and `logprob_bits`.
    """
    payload = np.asarray(payload, dtype=np.uint8)
    expected = record_nbytes(n, k, vocab_size, logprob_bits)
    if payload.size != expected:
        raise ValueError(f"Record payload has {payload.size} bytes, expected {expected}.")
    buffer = payload.tobytes()
    offset = 0

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal offset
        array = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
        offset += array.nbytes
        return array.astype(dtype[1:], copy=True)

    rest = take("<f4", n).astype(np.float32)
    if logprob_bits == 32:
        log_probs = take("<f4", n * k).reshape(n, k)
    elif logprob_bits == 16:
        log_probs = take("<f2", n * k).astype(np.float32).reshape(n, k)
    else:
        top = take("<f4", n)
        step = take("<f2", n)
        codes_size = _packed_bytes(n * (k - 1), logprob_bits)
        codes = unpack_bits(payload[offset : offset + codes_size], logprob_bits, n * (k - 1))
        offset += codes_size
        log_probs = _dequantize(top, step, codes.reshape(n, k - 1), logprob_bits)
    ids = unpack_bits(payload[offset:], id_bits(vocab_size), n * k).reshape(n, k)
    return Record(token_ids=ids, log_probs=log_probs.astype(np.float32, copy=False), rest_log_prob=rest)


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
    "record_nbytes",
    "unpack_bits",
]

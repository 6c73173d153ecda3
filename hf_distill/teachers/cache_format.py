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

**Token ids.** Per position the ids are sorted ascending, `s_0 < s_1 < ... < s_{k-1}`, and coded as the gaps
`v_0 = s_0`, `v_j = s_j - s_{j-1} - 1 >= 0`. Slot `j` of every position uses the same parameter `r_j` (chosen per
record to minimise the size: top-k ids crowd the low, frequent ids, so the first gaps are small and the later ones
large). With `c = bit_length(v)`: if `c <= r`, the prefix is `z = 0` and the suffix is `v` in `r` bits; otherwise
`z = c - r` and the suffix is `v` without its leading one bit (`c - 1` bits). The prefix is written in unary (`z`
zero bits, then a one bit): `z + 1 + r` bits when `c <= r`, `2c - r` bits otherwise. All prefixes come first (so
their ends are found at once), then all suffixes, least significant bit first; the bit stream is little-endian
within each byte. `id_bits = ceil(log2(V))` only bounds the parameters (`r_j < id_bits`).

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

LOGPROB_BITS = (4, 8, 16, 32)
"""Supported widths of a stored log-prob."""


def id_bits(vocab_size: int) -> int:
    """Bits of the largest token id: `ceil(log2(vocab_size))` (at least 1); gap-code parameters are below it.

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
    if bits == 8:
        return flat.astype(np.uint8)
    if bits == 4:
        nibbles = np.zeros(flat.size + flat.size % 2, dtype=np.uint8)
        nibbles[: flat.size] = flat
        return nibbles[0::2] | (nibbles[1::2] << 4)
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
    buffer = np.asarray(buffer, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return buffer[:count].astype(np.int64)
    if bits == 4:
        pairs = buffer[: (count + 1) // 2]
        return np.stack([pairs & 15, pairs >> 4], axis=1).reshape(-1)[:count].astype(np.int64)
    bit_matrix = np.unpackbits(np.asarray(buffer, dtype=np.uint8), count=count * bits, bitorder="little")
    weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
    return bit_matrix.reshape(count, bits).astype(np.int64) @ weights


def _packed_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


# ------------------------------------------------------------------------------------------------- gap-coded ids


def _param_bits(vocab_size: int) -> int:
    """Width of one stored gap-code parameter `r` (`0 <= r < id_bits`)."""
    return max(1, (id_bits(vocab_size) - 1).bit_length())


def _bit_length(values: np.ndarray) -> np.ndarray:
    """`int64` bit length of non-negative integers below `2**53` (0 for 0): the float64 exponent."""
    return np.maximum((values.astype(np.float64).view(np.int64) >> 52) - 1022, 0)


def _code_cost_table(vocab_size: int) -> np.ndarray:
    """`[r, c]`: bits of a gap of bit length `c` coded with parameter `r` (`r < id_bits`, `c <= id_bits`)."""
    width = id_bits(vocab_size)
    r = np.arange(width)[:, None]
    c = np.arange(width + 1)[None, :]
    return np.where(c <= r, r + 1, 2 * c - r)


def _gaps(sorted_ids: np.ndarray) -> np.ndarray:
    return np.diff(sorted_ids, axis=1, prepend=-1) - 1


def _choose_params(lengths: np.ndarray, vocab_size: int) -> tuple[np.ndarray, int]:
    """Per-slot parameters minimising the id bits of gaps with bit lengths `lengths` `[n, k]`, and those bits."""
    n, k = lengths.shape
    classes = id_bits(vocab_size) + 1
    slots = np.broadcast_to(np.arange(k) * classes, (n, k))
    histogram = np.bincount((slots + lengths).reshape(-1), minlength=k * classes).reshape(k, classes)
    costs = histogram @ _code_cost_table(vocab_size).T  # [k, r]
    params = costs.argmin(axis=1)
    return params, int(costs[np.arange(k), params].sum())


def _or_fields(positions: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """`size` bytes with `values` written at bit `positions` (ascending; fields disjoint, at most 32 bits)."""
    shifted = np.left_shift(values, positions & 31)  # within the 32-bit word `positions >> 5` and the next one
    words = positions >> 5
    first = np.flatnonzero(np.concatenate([[True], words[1:] != words[:-1]]))  # one run per word: OR = sum
    out = np.zeros(2 * (int(words[-1]) + 2), dtype=np.int64)
    out[: out.size // 2][words[first]] = np.add.reduceat(shifted & 0xFFFFFFFF, first)
    out[out.size // 2 :][words[first] + 1] = np.add.reduceat(shifted >> 32, first)
    low, high = np.split(out, 2)
    return (low | high).astype("<u4").view(np.uint8)[:size]


def _encode_ids(sorted_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Gap-code ids `[n, k]` (ascending, distinct per row): the parameters, then the prefix and suffix bit streams."""
    gaps = _gaps(sorted_ids)
    lengths = _bit_length(gaps)
    params, _ = _choose_params(lengths, vocab_size)
    prefix = np.maximum(lengths - params, 0)  # z: unary, z zero bits then a one bit
    coded = prefix > 0
    widths = np.where(coded, lengths - 1, params).reshape(-1)
    suffixes = (gaps - np.where(coded, np.left_shift(1, np.maximum(lengths - 1, 0)), 0)).reshape(-1)
    ones = np.cumsum(prefix.reshape(-1) + 1) - 1  # bit position of each prefix's one bit
    starts = ones[-1] + 1 + np.cumsum(widths) - widths  # bit position of each suffix
    size = _packed_bytes(int(starts[-1] + widths[-1]), 1)
    stream = _or_fields(np.concatenate([ones, starts]), np.concatenate([np.ones_like(ones), suffixes]), size)
    return np.concatenate([pack_bits(params, _param_bits(vocab_size)), stream])


_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)


def _decode_ids(buffer: np.ndarray, n: int, k: int, vocab_size: int) -> np.ndarray:
    """Inverse of [`_encode_ids`]: `int64` ids `[n, k]`, ascending per row."""
    header = _packed_bytes(k, _param_bits(vocab_size))
    params = unpack_bits(buffer[:header], _param_bits(vocab_size), k)
    stream = buffer[header:]
    # The prefixes end at the (n k)-th one bit: unpack only the bytes up to it.
    last = int(np.searchsorted(np.cumsum(_POPCOUNT[stream]), n * k))
    if last >= stream.size or (params >= id_bits(vocab_size)).any():
        raise ValueError("Record payload is corrupt or truncated: the token ids do not decode.")
    ones = np.flatnonzero(np.unpackbits(stream[: last + 1], bitorder="little"))[: n * k]
    prefix = (np.diff(ones, prepend=-1) - 1).reshape(n, k)
    if (prefix > id_bits(vocab_size) - params).any():
        raise ValueError("Record payload is corrupt: a token id gap exceeds the vocabulary.")
    coded = prefix > 0
    widths = np.where(coded, prefix + params - 1, params).reshape(-1)
    starts = ones[-1] + 1 + np.cumsum(widths) - widths
    used = int(starts[-1] + widths[-1])
    if _packed_bytes(used, 1) != stream.size or int(stream[-1]) >> (used - 8 * (stream.size - 1)):
        raise ValueError(
            f"Record payload has {header + stream.size} id bytes, expected {header + _packed_bytes(used, 1)}."
        )
    windows = np.lib.stride_tricks.sliding_window_view(np.concatenate([stream, np.zeros(8, np.uint8)]), 8)
    words = np.ascontiguousarray(windows[starts >> 3]).view("<i8").reshape(-1)  # 8 bytes from each suffix's byte
    suffixes = np.right_shift(words, starts & 7) & (np.left_shift(1, widths) - 1)
    gaps = suffixes.reshape(n, k) + np.where(coded, np.left_shift(1, widths.reshape(n, k)), 0)
    ids = np.cumsum(gaps + 1, axis=1) - 1
    if ids[:, -1].max() >= vocab_size:
        raise ValueError(f"Record payload is corrupt: a token id is >= vocab_size ({vocab_size}).")
    return ids


# ------------------------------------------------------------------------------------------------- sizes


def _logprob_nbytes(n: int, k: int, logprob_bits: int) -> int:
    if logprob_bits in (32, 16):
        return n * k * logprob_bits // 8
    return 6 * n + _packed_bytes(n * k, logprob_bits)


def _fixed_bits_per_position(k: int, logprob_bits: int) -> int:
    """Bits per position of everything but the ids, for long rows (no byte padding)."""
    return 32 + (k * logprob_bits if logprob_bits in (32, 16) else 48 + k * logprob_bits)


def _max_bits_per_id(vocab_size: int, k: int) -> float:
    """Upper bound on the gap-code bits per id over all sets of `k` ids (parameters excluded).

    For one parameter `r`, the code length is a non-decreasing step function `f` of the gap; its concave envelope
    `F` (through `(0, r + 1)` and the first gap of each bit length) gives `sum f(v_j) <= k F(mean) <= k F((V-k)/k)`
    since the `k` gaps of a position sum to at most `V - k`. The encoder's per-slot parameters only do better.
    """
    table = _code_cost_table(vocab_size)
    width = id_bits(vocab_size)
    mean = (vocab_size - k) / k
    best = np.inf
    for r in range(width):
        xs = np.array([0.0] + [2.0 ** (c - 1) for c in range(r + 1, width + 1)])
        ys = np.array([r + 1.0] + [float(table[r, c]) for c in range(r + 1, width + 1)])
        if mean >= xs[-1]:
            bound = ys[-1]
        else:
            low, high = xs <= mean, xs > mean  # the best chord over `mean`
            x0, y0 = xs[low][:, None], ys[low][:, None]
            x1, y1 = xs[high][None, :], ys[high][None, :]
            bound = float((y0 + (y1 - y0) * (mean - x0) / (x1 - x0)).max())
        best = min(best, bound)
    return float(best)


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

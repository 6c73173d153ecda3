"""Bit packing and the gap code of the teacher cache's token ids (pure numpy; see [`cache_format`]).

**Token ids.** Per position the ids are sorted ascending, `s_0 < s_1 < ... < s_{k-1}`, and coded as the gaps
`v_0 = s_0`, `v_j = s_j - s_{j-1} - 1 >= 0`. Slot `j` of every position uses the same parameter `r_j` (chosen per
record to minimise the size: top-k ids crowd the low, frequent ids, so the first gaps are small and the later ones
large). With `c = bit_length(v)`: if `c <= r`, the prefix is `z = 0` and the suffix is `v` in `r` bits; otherwise
`z = c - r` and the suffix is `v` without its leading one bit (`c - 1` bits). The prefix is written in unary (`z`
zero bits, then a one bit): `z + 1 + r` bits when `c <= r`, `2c - r` bits otherwise. All prefixes come first (so
their ends are found at once), then all suffixes, least significant bit first; the bit stream is little-endian
within each byte. `id_bits = ceil(log2(V))` only bounds the parameters (`r_j < id_bits`).
"""

from __future__ import annotations

import numpy as np


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

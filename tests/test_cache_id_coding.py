"""Gap coding of the teacher cache's token ids: round trips, ties, sizes, corrupt payloads and the format version."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_distill.teachers.cache import TeacherCache
from hf_distill.teachers.cache_format import (
    decode_record,
    encode_record,
    expected_bytes_per_logit,
    quantization_error_bound,
)
from hf_distill.teachers.cache_keys import FORMAT_VERSION, TeacherCacheError, cache_dir_for, cache_key, row_key
from hf_distill.teachers.cache_writer import TeacherCacheWriter

VOCABS = [2, 3, 255, 256, 1024, 32000, 151936, 262144]


def _random_ids(rng: np.random.Generator, n: int, vocab: int, k: int) -> np.ndarray:
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)])
    ids[0] = np.sort(ids[0])[::-1]  # descending ids
    if k >= 2 and n >= 2:
        ids[1, :2] = [vocab - 1, 0]  # both ends of the vocabulary
        ids[1, 2:] = rng.choice(np.arange(1, vocab - 1), k - 2, replace=False)
    return ids


def _zipf_ids(rng: np.random.Generator, n: int, vocab: int, k: int, exponent: float = 1.0) -> np.ndarray:
    """Top-k of Zipf-distributed logits (Gumbel noise): ids drawn without replacement, frequent (low) ids first."""
    logits = -exponent * np.log(np.arange(1, vocab + 1, dtype=np.float32))
    rows = []
    for _ in range(0, n, 16):
        noisy = logits + rng.gumbel(size=(16, vocab)).astype(np.float32)
        rows.append(np.argsort(-noisy, axis=1)[:, :k])
    return np.concatenate(rows)[:n]


def _check(record, ids, log_probs, rest, bits):
    n, k = ids.shape
    assert record.token_ids.shape == (n, k) and record.token_ids.dtype == np.int64
    np.testing.assert_array_equal(record.rest_log_prob, rest)
    # Sorted by decoded log-prob descending, equal values in ascending id order.
    order = np.lexsort((record.token_ids, -record.log_probs.astype(np.float64)), axis=-1)
    np.testing.assert_array_equal(order, np.broadcast_to(np.arange(k), (n, k)))
    # The same ids, each with its own log-prob.
    by_id_in, by_id_out = np.argsort(ids, 1), np.argsort(record.token_ids, 1)
    np.testing.assert_array_equal(np.take_along_axis(record.token_ids, by_id_out, 1), np.sort(ids, 1))
    values_in = np.take_along_axis(log_probs, by_id_in, 1)
    values_out = np.take_along_axis(record.log_probs, by_id_out, 1)
    if bits == 32:
        np.testing.assert_array_equal(values_out, values_in)
    else:
        bound = np.take_along_axis(quantization_error_bound(log_probs, bits), by_id_in, 1)
        assert (np.abs(values_out.astype(np.float64) - values_in) <= bound).all()
    np.testing.assert_array_equal(record.log_probs[:, 0], log_probs[:, 0].astype(np.float16 if bits == 16 else None))


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_round_trip_with_ties(vocab, bits):
    rng = np.random.default_rng(vocab * 10 + bits)
    for k in sorted({1, 2, 16, 64, vocab if vocab <= 1024 else 1} & set(range(1, vocab + 1))):
        n = 6
        ids = _random_ids(rng, n, vocab, k)
        # Rounded log-probs: many exact ties, including with the top-1.
        log_probs = -np.sort(np.round(rng.exponential(2.0, size=(n, k)), 0), axis=1).astype(np.float32)
        log_probs[2] = -1.5  # one position where every value ties
        rest = rng.normal(size=n).astype(np.float32)
        record = decode_record(encode_record(ids, log_probs, rest, vocab, bits), n, k, vocab, bits)
        _check(record, ids, log_probs, rest, bits)
        if k == vocab:  # every id present
            np.testing.assert_array_equal(np.sort(record.token_ids, 1), np.broadcast_to(np.arange(vocab), (n, k)))


@pytest.mark.parametrize("vocab", [256, 151936])
def test_distinct_values_decode_in_the_teacher_order(vocab):
    rng = np.random.default_rng(0)
    n, k = 50, min(vocab, 64)
    ids = _random_ids(rng, n, vocab, k)
    log_probs = -np.cumsum(rng.uniform(0.01, 1.0, size=(n, k)), axis=1).astype(np.float32)
    record = decode_record(encode_record(ids, log_probs, np.zeros(n), vocab, 32), n, k, vocab, 32)
    np.testing.assert_array_equal(record.token_ids, ids)
    np.testing.assert_array_equal(record.log_probs, log_probs)


def test_minus_inf_and_empty_records():
    ids = np.array([[3, 1, 0, 2], [0, 1, 2, 3]])
    log_probs = np.array([[-0.1, -2.0, -np.inf, -np.inf], [-1.0, -1.0, -1.0, -1.0]], dtype=np.float32)
    for bits in (32, 16, 8, 4):
        record = decode_record(encode_record(ids, log_probs, np.full(2, -np.inf), 4, bits), 2, 4, 4, bits)
        np.testing.assert_array_equal(record.token_ids, [[3, 1, 0, 2], [0, 1, 2, 3]])
        np.testing.assert_array_equal(np.isneginf(record.log_probs), np.isneginf(log_probs))
        empty = encode_record(np.zeros((0, 4), dtype=np.int64), np.zeros((0, 4)), np.zeros(0), 4, bits)
        assert empty.size == 0
        assert decode_record(empty, 0, 4, 4, bits).token_ids.shape == (0, 4)


@pytest.mark.parametrize(("vocab", "k"), [(32000, 16), (32000, 64), (151936, 16), (151936, 64)])
def test_zipf_ids_meet_the_size_target(vocab, k):
    rng = np.random.default_rng(k)
    n = 64
    ids = _zipf_ids(rng, n, vocab, k)
    log_probs = -np.sort(rng.exponential(2.0, size=(n, k)), axis=1).astype(np.float32)
    payload = encode_record(ids, log_probs, np.zeros(n), vocab, 8)
    measured = payload.size / (n * k)
    assert measured == pytest.approx(expected_bytes_per_logit(vocab, k, 8, ids), abs=3 / (n * k))
    assert measured < expected_bytes_per_logit(vocab, k, 8)  # the bound over all id sets
    if k == 64:
        assert measured <= 2.5
        assert measured - (32 + 48 + 8 * k) / (8 * k) <= 1.2  # the ids' share: at most 1.2 bytes per id
    _check(decode_record(payload, n, k, vocab, 8), ids, log_probs, np.zeros(n, dtype=np.float32), 8)


@pytest.mark.parametrize("vocab", [3, 1024, 32000, 151936])
@pytest.mark.parametrize("k", [1, 2, 16, 64])
def test_upper_bound_holds_for_spread_ids(vocab, k):
    if k > vocab:
        pytest.skip("k > vocab")
    rng = np.random.default_rng(vocab + k)
    n = 32
    even = np.linspace(0, vocab - 1, k).round().astype(np.int64)
    cases = {
        "even": np.broadcast_to(even, (n, k)),
        "uniform": np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]),
        "top": np.broadcast_to(np.arange(vocab - k, vocab), (n, k)),
    }
    params = k * 5 / 8 / (n * k)  # the per-record parameters, excluded from the long-row bound
    for ids in cases.values():
        assert expected_bytes_per_logit(vocab, k, 8, ids) <= expected_bytes_per_logit(vocab, k, 8) + params


def test_corrupt_payloads_are_refused():
    rng = np.random.default_rng(0)
    n, k, vocab = 8, 16, 32000
    ids = _random_ids(rng, n, vocab, k)
    log_probs = -np.sort(rng.exponential(2.0, size=(n, k)), axis=1).astype(np.float32)
    payload = encode_record(ids, log_probs, np.zeros(n), vocab, 8)
    for bad in (payload[:-1], np.concatenate([payload, [0]]), payload[: 4 * n + 6 * n + n * k]):
        with pytest.raises(ValueError, match="payload"):
            decode_record(bad, n, k, vocab, 8)
    with pytest.raises(ValueError):
        decode_record(payload, n - 1, k, vocab, 8)
    with pytest.raises(ValueError, match="0 for a record without positions"):
        decode_record(payload, 0, k, vocab, 8)


def test_old_format_version_is_refused_and_gets_another_folder(tmp_path):
    key = {"teacher": "t"}
    full = cache_key(key, vocab_size=10, k=3, temperature=1.0, logprob_bits=8)
    assert full["format_version"] == FORMAT_VERSION == 3
    for old in (1, 2):
        assert cache_dir_for(tmp_path, full) != cache_dir_for(tmp_path, {**full, "format_version": old})
    assert cache_dir_for(tmp_path, full) != cache_dir_for(
        tmp_path, {k: v for k, v in full.items() if k != "format_version"}
    )

    folder = tmp_path / "cache"
    writer = TeacherCacheWriter(folder, key, vocab_size=10, k=3, rows_per_shard=4)
    writer.add(row_key([1, 2, 3], [True, True, False]), np.array([[4, 9, 0], [1, 2, 3]]),
               np.log(np.array([[0.5, 0.2, 0.1], [0.3, 0.3, 0.1]])), np.log(np.array([0.2, 0.3])), 3)  # fmt: skip
    cache = writer.finish()
    np.testing.assert_array_equal(cache.lookup(row_key([1, 2, 3], [True, True, False])).ids, [[4, 9, 0], [1, 2, 3]])

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 2
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TeacherCacheError, match="format version 2; this hf_distill reads version 3 only"):
        TeacherCache.open(folder)
    with pytest.raises(TeacherCacheError, match="format version 2"):
        TeacherCacheWriter(folder, key, vocab_size=10, k=3, rows_per_shard=4)

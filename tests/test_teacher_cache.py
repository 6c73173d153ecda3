"""The on-disk teacher cache: record encoding, exactness against the live teacher, key reuse, resume and errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import lm_dataset, make_model, make_tokenizer

from hf_distill.losses.lm_head import LMHead
from hf_distill.model_forward import forward_hidden_states
from hf_distill.teachers.cache import TeacherCache
from hf_distill.teachers.cache_builder import STOP_AFTER_SHARDS_ENV, pad_rows, write_teacher_cache
from hf_distill.teachers.cache_format import (
    decode_record,
    encode_record,
    expected_bytes_per_logit,
    id_bits,
    pack_bits,
    quantization_error_bound,
    unpack_bits,
)
from hf_distill.teachers.cache_keys import (
    FORMAT_VERSION,
    RowNotCachedError,
    TeacherCacheError,
    batch_row_keys,
    cache_dir_for,
    cache_key,
    fingerprint_model,
    fingerprint_tokenizer,
    row_key,
    scored_mask_from_labels,
)
from hf_distill.teachers.cache_writer import TeacherCacheWriter

TESTS = Path(__file__).resolve().parent
VOCAB = 60


# ----------------------------------------------------------------------------------------------------------- format


def _sorted_top_k(rng: np.random.Generator, n: int, vocab: int, k: int, scale: float = 3.0):
    z = rng.normal(size=(n, vocab)) * scale
    lp = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(lp, ids, 1).astype(np.float32)
    rest = np.log1p(-np.exp(top.astype(np.float64)).sum(1)).astype(np.float32)
    return ids, top, rest


def _assert_same_ids(ids, log_probs, expected_ids):
    """Decoded ids are the expected ids sorted by decoded log-prob descending, equal values in ascending id order.

    Quantisation can make values equal, so the order may differ from `expected_ids` (the teacher's) among ties only.
    """
    ids, log_probs, expected_ids = (np.asarray(a) for a in (ids, log_probs, expected_ids))
    order = np.lexsort((ids, -log_probs.astype(np.float64)), axis=-1)
    np.testing.assert_array_equal(order, np.broadcast_to(np.arange(ids.shape[-1]), ids.shape))
    by_id = np.argsort(ids, -1)
    np.testing.assert_array_equal(np.take_along_axis(ids, by_id, -1), np.sort(expected_ids, -1))
    rank_in_sorted = np.argsort(np.argsort(expected_ids, -1), -1)
    teacher_order_values = np.take_along_axis(np.take_along_axis(log_probs, by_id, -1), rank_in_sorted, -1)
    assert (teacher_order_values[:, 1:] <= teacher_order_values[:, :-1]).all()


@pytest.mark.parametrize("vocab", [50, 256, 32000, 151936])
@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_record_round_trip(vocab, bits):
    rng = np.random.default_rng(vocab + bits)
    n, k = 9, min(vocab, 37)
    ids, top, rest = _sorted_top_k(rng, n, vocab, k)
    if vocab - 1 not in ids[0]:
        ids[0, -1] = vocab - 1  # the largest id (ids stay distinct within a position)
    payload = encode_record(ids, top, rest, vocab, bits)
    assert payload.dtype == np.uint8
    unpadded = expected_bytes_per_logit(vocab, k, bits, ids) * n * k  # log-prob codes, parameters, ids: padded
    assert 0 <= payload.size - unpadded < 3
    record = decode_record(payload, n, k, vocab, bits)
    _assert_same_ids(record.token_ids, record.log_probs, ids)
    np.testing.assert_array_equal(record.rest_log_prob, rest)  # always float32, exact
    error = np.abs(record.log_probs.astype(np.float64) - top)
    if bits == 32:
        np.testing.assert_array_equal(record.log_probs, top)
    else:
        assert (error <= quantization_error_bound(top, bits)).all(), error.max()
        np.testing.assert_array_equal(
            record.log_probs[:, 0], top[:, 0].astype(np.float16 if bits == 16 else np.float32)
        )
    if bits == 8:  # concrete numbers behind the documented bound: span / 255 / 2
        span = top[:, 0] - top[:, -1]
        assert (error.max(1) <= span / 255 / 2 * 1.001 + 1e-6).all()
    if bits == 4:
        span = top[:, 0] - top[:, -1]
        assert (error.max(1) <= span / 15 / 2 * 1.001 + 1e-6).all()


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_quantised_log_probs_keep_minus_inf_and_constant_rows(bits):
    top = np.array(
        [[-0.1, -2.0, -np.inf, -np.inf], [-1.386, -1.386, -1.386, -1.386], [0.0, -np.inf, -np.inf, -np.inf]]
    )
    top = top.astype(np.float32)
    ids = np.array([[3, 1, 0, 2], [0, 1, 2, 3], [2, 0, 1, 3]])
    record = decode_record(encode_record(ids, top, np.full(3, -np.inf), 4, bits), 3, 4, 4, bits)
    np.testing.assert_array_equal(np.isneginf(record.log_probs), np.isneginf(top))
    finite = np.isfinite(top)
    assert (np.abs(record.log_probs[finite] - top[finite]) <= quantization_error_bound(top, bits)[finite]).all()
    assert np.isneginf(record.rest_log_prob).all()


def test_bit_packing_round_trip_and_widths():
    rng = np.random.default_rng(0)
    assert [id_bits(v) for v in (1, 2, 50, 256, 257, 32000, 151936)] == [1, 1, 6, 8, 9, 15, 18]
    for bits in (1, 3, 6, 15, 18, 31):
        values = rng.integers(0, 2**bits, size=1001)
        packed = pack_bits(values, bits)
        assert packed.size == (1001 * bits + 7) // 8
        np.testing.assert_array_equal(unpack_bits(packed, bits, 1001), values)
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(np.array([8]), 3)


def test_bytes_per_logit_target():
    # <= 2.5 bytes per kept logit with 8-bit log-probs (the default) on real top-k ids, which crowd the low ids; the
    # upper bound over all id sets (ids spread evenly) is higher. More cases in test_cache_id_coding.py.
    assert expected_bytes_per_logit(32000, 100, 4) <= 2.5
    assert expected_bytes_per_logit(151936, 64, 8) < 2.9
    rng = np.random.default_rng(1)
    ids, top, rest = _sorted_top_k(rng, 64, 32000, 100)
    measured = encode_record(ids, top, rest, 32000, 4).size / (64 * 100)
    assert measured <= expected_bytes_per_logit(32000, 100, 4) + 2 / (64 * 100)
    assert measured == pytest.approx(expected_bytes_per_logit(32000, 100, 4, ids), abs=3 / (64 * 100))


def test_encode_rejects_bad_input():
    ids = np.array([[1, 0]])
    with pytest.raises(ValueError, match="descending"):
        encode_record(ids, np.array([[-2.0, -1.0]]), np.zeros(1), 4, 8)
    with pytest.raises(ValueError, match="NaN"):
        encode_record(ids, np.array([[np.nan, -1.0]]), np.zeros(1), 4, 8)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        encode_record(np.array([[2, 0]]), np.array([[-1.0, -2.0]]), np.zeros(1), 2, 8)
    with pytest.raises(ValueError, match="logprob_bits"):
        encode_record(ids, np.array([[-1.0, -2.0]]), np.zeros(1), 4, 12)
    with pytest.raises(ValueError, match="distinct"):
        encode_record(np.array([[1, 1]]), np.array([[-1.0, -2.0]]), np.zeros(1), 4, 8)


# ----------------------------------------------------------------------------------------------------------- keys


def test_row_key_depends_on_ids_and_mask():
    ids, labels = [5, 6, 7, 8], [-100, -100, 7, 8]
    mask = scored_mask_from_labels(labels)
    assert mask.tolist() == [False, True, True, False]
    key = row_key(ids, mask)
    assert len(key) == 32 and key == row_key(torch.tensor(ids), torch.tensor(mask))
    assert key != row_key([5, 6, 7, 9], mask)
    assert key != row_key(ids, scored_mask_from_labels([-100, 6, 7, 8]))
    assert row_key([5, 6], [False, False]) != row_key([5, 6, 0], [False, False, False])
    batch = pad_rows([{"input_ids": ids, "labels": labels}, {"input_ids": [1, 2], "labels": [1, 2]}])
    keys = batch_row_keys(batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert keys == [key, row_key([1, 2], [True, False])]


def test_key_helpers():
    key = {"teacher": "a", "dataset": "d"}
    full = cache_key(key, vocab_size=10, k=4, temperature=1, logprob_bits=8)
    settings = {"vocab_size": 10, "k": 4, "temperature": 1.0, "logprob_bits": 8, "format_version": FORMAT_VERSION}
    assert full == {"teacher": "a", "dataset": "d", **settings}
    assert cache_dir_for("/r", full) != cache_dir_for("/r", {**full, "k": 5})
    with pytest.raises(ValueError, match="k=3"):
        cache_key({"k": 3}, vocab_size=10, k=4, temperature=1.0, logprob_bits=8)
    model = make_model(VOCAB, seed=0)
    fp = fingerprint_model(model)
    assert fp == fingerprint_model(make_model(VOCAB, seed=0))
    assert fp != fingerprint_model(make_model(VOCAB, seed=1))
    assert fingerprint_model(model, full_hash_max_bytes=0) != fingerprint_model(make_model(VOCAB, seed=1), 0)
    with torch.no_grad():
        model.lm_head.weight[3, 4] += 1e-3
    assert fingerprint_model(model) != fp
    tok = make_tokenizer()
    assert fingerprint_tokenizer(tok) == fingerprint_tokenizer(make_tokenizer())
    assert fingerprint_tokenizer(tok) != fingerprint_tokenizer(make_tokenizer(extra_words=("zebra",)))
    tok2 = make_tokenizer()
    tok2.chat_template = "{{ messages }}"
    assert fingerprint_tokenizer(tok2) != fingerprint_tokenizer(tok)


# ----------------------------------------------------------------------------------------------------------- cache


def _rows(n: int = 11, seed: int = 0, vocab: int = VOCAB) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(2, 14, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(0, length, (1,), generator=g))
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    rows.append({"input_ids": [4, 5, 6], "labels": [-100, -100, -100]})  # nothing scored
    return rows


class ForwardCounter:
    def __init__(self, model):
        self.count = 0
        model.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.count += 1


def _reference(model, row, temperature=1.0):
    """Full-vocabulary log-probs at the scored positions, straight from the model (one row, no padding)."""
    mask = torch.from_numpy(scored_mask_from_labels(row["labels"]))
    inputs = {"input_ids": torch.tensor([row["input_ids"]])}
    with torch.no_grad():
        hidden = forward_hidden_states(model, inputs).hidden[0][mask]
        logits = LMHead.from_model(model).logits(hidden)
        model_logits = model(**inputs).logits[0][mask].float()
    return torch.log_softmax(logits / temperature, -1), torch.log_softmax(model_logits / temperature, -1), mask


def _lookup(cache, row):
    return cache.lookup(row_key(row["input_ids"], scored_mask_from_labels(row["labels"])))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_float32_full_vocab_cache_equals_live_teacher(tmp_path, temperature):
    model, rows = make_model(VOCAB, seed=0), _rows()
    cache = write_teacher_cache(
        model, rows, tmp_path, key={"t": 1}, k=VOCAB, temperature=temperature, logprob_bits=32, batch_size=1,
        rows_per_shard=4, show_progress=False,
    )  # fmt: skip
    assert len(cache) == len(rows) and cache.manifest["num_shards"] == 3 and cache.manifest["complete"]
    for row in rows:
        full, from_model, mask = _reference(model, row, temperature)
        cached = _lookup(cache, row)
        n = int(mask.sum())
        assert cached.ids.shape == (n, VOCAB) and cached.ids.dtype == torch.long
        assert cached.log_probs.dtype == torch.float32
        expected = full.topk(VOCAB, -1)
        torch.testing.assert_close(cached.log_probs, expected.values, rtol=0, atol=0)
        torch.testing.assert_close(cached.ids, expected.indices, rtol=0, atol=0)
        # Dense reconstruction equals the live teacher's distribution (the model's own logits: float rounding only).
        dense = torch.full((n, VOCAB), float("nan")).scatter(-1, cached.ids, cached.log_probs)
        torch.testing.assert_close(dense, from_model, rtol=0, atol=1e-5)
        assert torch.isneginf(cached.rest_log_prob).all()


def test_top_k_rest_mass_is_exact(tmp_path):
    model, rows = make_model(VOCAB, seed=0), _rows()
    k = 5
    cache = write_teacher_cache(
        model, rows, tmp_path, key={"t": 1}, k=k, logprob_bits=32, batch_size=4, rows_per_shard=5,
        show_progress=False,
    )  # fmt: skip
    assert cache.manifest["bytes_per_logit"] == pytest.approx(
        cache.manifest["payload_bytes"] / (cache.manifest["scored_positions"] * k)
    )
    for row in rows:
        full, _, mask = _reference(model, row)
        cached = _lookup(cache, row)
        full64 = full.double().log_softmax(-1)
        expected = full.topk(k, -1)
        torch.testing.assert_close(cached.ids, expected.indices, rtol=0, atol=0)  # batch padding: rounding only
        torch.testing.assert_close(cached.log_probs, expected.values, rtol=0, atol=2e-6)
        rest64 = torch.log1p(-full64.gather(-1, cached.ids).exp().sum(-1))
        torch.testing.assert_close(cached.rest_log_prob.double(), rest64, rtol=0, atol=1e-5)
        assert (cached.log_probs[:, :-1] >= cached.log_probs[:, 1:]).all()


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_quantised_cache_within_bounds(tmp_path, bits):
    model, rows = make_model(VOCAB, seed=0), _rows()
    cache = write_teacher_cache(
        model, rows, tmp_path, key={"t": 1}, k=20, logprob_bits=bits, rows_per_shard=6, show_progress=False
    )
    for row in rows:
        full, _, _ = _reference(model, row)
        cached = _lookup(cache, row)
        expected = full.topk(20, -1)
        _assert_same_ids(cached.ids, cached.log_probs, expected.indices)  # ties from quantisation: by id
        bound = quantization_error_bound(expected.values.numpy(), bits) + 2e-6
        assert ((cached.log_probs - expected.values).abs().numpy() <= bound).all()
        teacher_values = full.log_softmax(-1).gather(-1, cached.ids)  # each id keeps its own log-prob
        assert ((cached.log_probs - teacher_values).abs().numpy() <= bound).all()


def test_same_key_reuses_without_forward_and_other_keys_get_other_folders(tmp_path):
    model, rows = make_model(VOCAB, seed=0), _rows()
    counter = ForwardCounter(model)
    key = {"teacher": fingerprint_model(model), "dataset": "rows-v1", "k": 8}
    folder = cache_dir_for(tmp_path, key)
    first = write_teacher_cache(model, rows, folder, key=key, k=8, rows_per_shard=5, show_progress=False)
    assert counter.count == 3  # 12 rows: one batch (of at most 8) per shard of 5, 5, 2 rows
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    counter.count = 0
    again = write_teacher_cache(model, rows, folder, key=key, k=8, rows_per_shard=5, show_progress=False)
    assert counter.count == 0
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    row = rows[0]
    torch.testing.assert_close(_lookup(again, row).log_probs, _lookup(first, row).log_probs)

    other_k = {**key, "k": 4}
    other_data = {**key, "dataset": "rows-v2"}
    assert (
        len({cache_dir_for(tmp_path, key), cache_dir_for(tmp_path, other_k), cache_dir_for(tmp_path, other_data)}) == 3
    )

    # Another key into the same folder: refused, nothing touched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with pytest.raises(TeacherCacheError, match=r"another key(.|\n)*dataset: 'rows-v1' in the cache, 'rows-v2'"):
        write_teacher_cache(model, rows, folder, key=other_data, k=8, rows_per_shard=5, show_progress=False)
    with pytest.raises(ValueError, match="k=8"):  # the key says k=8 but k=4 is asked for
        write_teacher_cache(model, rows, folder, key=key, k=4, show_progress=False)
    with pytest.raises(TeacherCacheError, match=r"k: 8 in the cache, 4 expected"):
        write_teacher_cache(model, rows, folder, key={**key, "k": 4}, k=4, rows_per_shard=5, show_progress=False)
    assert counter.count == 0
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes

    # overwrite=True replaces it.
    replaced = write_teacher_cache(
        model, rows, folder, key=other_data, k=8, rows_per_shard=5, show_progress=False, overwrite=True
    )
    assert replaced.key["dataset"] == "rows-v2" and counter.count > 0


def test_k_larger_than_vocab_fails_before_any_forward(tmp_path):
    model = make_model(VOCAB)
    counter = ForwardCounter(model)
    with pytest.raises(ValueError, match="k must be between 1 and the vocabulary size"):
        write_teacher_cache(model, _rows(), tmp_path / "c", key={}, k=VOCAB + 1, show_progress=False)
    with pytest.raises(ValueError, match="k must be between"):
        TeacherCacheWriter(tmp_path / "d", {}, vocab_size=10, k=11)
    assert counter.count == 0


def test_custom_collate_and_vocab_cut(tmp_path):
    model, rows = make_model(VOCAB, seed=0), _rows()
    seen = []

    def collate(batch):
        seen.append(len(batch))
        return pad_rows(batch, pad_token_id=0)

    cache = write_teacher_cache(
        model, rows, tmp_path, key={}, k=3, vocab_size=50, batch_size=3, rows_per_shard=100, collate=collate,
        logprob_bits=32, show_progress=False,
    )  # fmt: skip
    assert seen == [3, 3, 3, 3] and cache.vocab_size == 50
    full, _, _ = _reference(model, rows[2])
    expected = full[:, :50].log_softmax(-1).topk(3, -1)
    cached = _lookup(cache, rows[2])
    torch.testing.assert_close(cached.ids, expected.indices, rtol=0, atol=0)
    torch.testing.assert_close(cached.log_probs, expected.values, rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------------------------------------- resume

BUILD_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from tiny import make_model
from hf_distill.teachers.cache_builder import write_teacher_cache

g = torch.Generator().manual_seed(0)
rows = []
for _ in range(10):
    ids = torch.randint(3, 60, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
    rows.append({{"input_ids": ids, "labels": [-100] + ids[1:]}})
model = make_model(60, seed=0)
calls = []
model.register_forward_hook(lambda *a: calls.append(1))
write_teacher_cache(model, rows, sys.argv[1], key={{"run": "resume"}}, k=7, logprob_bits=8, batch_size=2,
                    rows_per_shard=4, show_progress=False{extra})
print("FORWARDS", len(calls))
"""


def _build(script: Path, folder: Path, stop_after: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop(STOP_AFTER_SHARDS_ENV, None)
    if stop_after:
        env[STOP_AFTER_SHARDS_ENV] = str(stop_after)
    return subprocess.run(
        [sys.executable, str(script), str(folder)], env=env, capture_output=True, text=True, timeout=300
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_interrupted_build_resumes_to_identical_bytes(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent(BUILD_SCRIPT.format(tests=str(TESTS), extra="")))
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    result = _build(script, clean)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FORWARDS 5" in result.stdout  # shards of 4, 4, 2 rows in batches of 2

    killed = _build(script, resumed, stop_after=1)
    assert killed.returncode == 75, killed.stderr[-3000:]
    assert (resumed / "shard-00000.safetensors").exists() and not (resumed / "shard-00001.safetensors").exists()
    with pytest.raises(TeacherCacheError, match="incomplete(.|\n)*cache-teacher"):
        TeacherCache.open(resumed)
    # Debris of a crash in the middle of shard 1: a half-written temporary file and a stray shard.
    (resumed / ".shard-00001.safetensors.tmp").write_bytes(b"half a shard")
    (resumed / "shard-00001.safetensors").write_bytes(b"garbage")

    result = _build(script, resumed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FORWARDS 3" in result.stdout  # shard 0 kept
    assert _files(resumed) == _files(clean)

    # A corrupt shard is caught on access; deleting it and rerunning rebuilds it (and only what follows it).
    data = bytearray((resumed / "shard-00001.safetensors").read_bytes())
    data[-5] ^= 0x10
    (resumed / "shard-00001.safetensors").write_bytes(bytes(data))
    cache = TeacherCache.open(resumed)
    with pytest.raises(TeacherCacheError, match="shard-00001.safetensors is corrupt(.|\n)*Delete"):
        cache.verify()
    (resumed / "shard-00001.safetensors").unlink()
    result = _build(script, resumed)
    assert result.returncode == 0 and "FORWARDS 3" in result.stdout
    assert _files(resumed) == _files(clean)


# ----------------------------------------------------------------------------------------------------------- errors


@pytest.fixture
def built(tmp_path):
    model, rows = make_model(VOCAB, seed=0), _rows()
    key = {"teacher": "tiny", "dataset": "rows"}
    folder = tmp_path / "cache"
    write_teacher_cache(model, rows, folder, key=key, k=6, rows_per_shard=4, show_progress=False)
    return folder, rows, key


def _shard_of_row(cache: TeacherCache, index: int) -> str:
    return cache.manifest["shards"][index // cache.manifest["rows_per_shard"]]["file"]


def test_bit_flip_is_caught_before_any_value(built):
    folder, rows, _ = built
    cache = TeacherCache.open(folder)
    name = _shard_of_row(cache, 5)
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2 + 3] ^= 0x01
    (folder / name).write_bytes(bytes(data))
    cache = TeacherCache.open(folder)  # same size: checked when read
    _lookup(cache, rows[0])  # other shards still read
    with pytest.raises(TeacherCacheError, match=rf"{name} is corrupt or truncated(.|\n)*Delete {name}(.|\n)*rerun"):
        _lookup(cache, rows[5])
    with pytest.raises(TeacherCacheError, match=name):
        TeacherCache.open(folder, verify=True)


def test_a_flip_in_one_row_refuses_that_row_only(built):
    folder, rows, _ = built
    cache = TeacherCache.open(folder)
    name = _shard_of_row(cache, 5)  # rows 4-7
    payload_begin = cache._shard(1)._payload_begin
    offsets = cache._shard(1).offsets
    data = bytearray((folder / name).read_bytes())
    data[payload_begin + int(offsets[1]) + 2] ^= 0x01  # a byte of row 5's record
    (folder / name).write_bytes(bytes(data))
    cache = TeacherCache.open(folder)
    for index in (4, 6, 7):
        _lookup(cache, rows[index])
    with pytest.raises(TeacherCacheError, match=rf"{name} is corrupt or truncated: row 1 does not match its checksum"):
        _lookup(cache, rows[5])


def test_truncated_or_missing_shard_fails_at_open(built):
    folder, _, _ = built
    shard = folder / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(TeacherCacheError, match=r"shard-00001.safetensors is truncated(.|\n)*Delete shard-00001"):
        TeacherCache.open(folder)
    shard.unlink()
    with pytest.raises(TeacherCacheError, match="shard-00001.safetensors is missing"):
        TeacherCache.open(folder)


def test_missing_and_incomplete_manifest(built, tmp_path):
    folder, _, _ = built
    with pytest.raises(TeacherCacheError, match="manifest.json is missing"):
        TeacherCache.open(tmp_path / "nowhere")
    manifest = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(manifest.replace('"complete": true', '"complete": false'))
    with pytest.raises(TeacherCacheError, match=r"incomplete(.|\n)*Rerun `hf-distill cache-teacher`"):
        TeacherCache.open(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(TeacherCacheError, match="not valid JSON"):
        TeacherCache.open(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(TeacherCacheError, match="manifest.json is missing"):
        TeacherCache.open(folder)


def test_key_mismatch_lists_fields(built):
    folder, _, key = built
    assert TeacherCache.open(folder, expected_key=key).k == 6  # settings the writer added are not required
    assert TeacherCache.open(folder, expected_key={**key, "k": 6, "logprob_bits": 8}).k == 6
    with pytest.raises(TeacherCacheError, match=r"another key(.|\n)*dataset: 'rows' in the cache, 'other' expected"):
        TeacherCache.open(folder, expected_key={**key, "dataset": "other"})
    with pytest.raises(TeacherCacheError, match=r"k: 6 in the cache, 8 expected(.|\n)*max_length: missing"):
        TeacherCache.open(folder, expected_key={**key, "k": 8, "max_length": 512})


def test_missing_row_is_a_clear_key_error(built):
    folder, rows, _ = built
    cache = TeacherCache.open(folder)
    assert row_key(rows[1]["input_ids"], scored_mask_from_labels(rows[1]["labels"])) in cache
    with pytest.raises(KeyError, match="row not in the cache: the cache does not cover this dataset"):
        cache.lookup(row_key([1, 2, 3], [True, True, False]))
    with pytest.raises(RowNotCachedError):
        cache.lookup(row_key([1, 2, 3], [True, True, False]))
    for not_a_key in ("", "zz" * 16, "ab" * 15, None, 7):
        assert not_a_key not in cache
        with pytest.raises(RowNotCachedError):
            cache.lookup(not_a_key)


def test_an_open_cache_pickles_without_its_mapped_shards(built):
    # A spawned DataLoader worker gets the cache pickled: the shards it had mapped are not copied into the pickle
    import pickle

    folder, rows, _ = built
    cache = TeacherCache.open(folder)
    expected = [_lookup(cache, row) for row in rows]  # maps every shard
    shard_bytes = sum(entry["bytes"] for entry in cache.manifest["shards"])
    data = pickle.dumps(cache)
    assert len(data) < shard_bytes
    copy = pickle.loads(data)
    for row, record in zip(rows, expected, strict=True):
        assert torch.equal(_lookup(copy, row).ids, record.ids)


def test_index_finds_every_row_the_first_of_equal_ones_and_edge_keys(tmp_path):
    """The index is a binary search over sorted 16-byte keys: keys with zero bytes at either end, and a row written
    twice (the first record is the one returned)."""
    keys = ["00" * 16, "00" * 15 + "01", "01" + "00" * 15, "ff" * 16, "7f" + "00" * 14 + "80"]
    writer = TeacherCacheWriter(tmp_path / "c", {"t": 1}, vocab_size=10, k=2, rows_per_shard=3)
    for value, key in enumerate([*keys, keys[2]]):  # keys[2] twice: values 2, then 5
        writer.add(key, np.array([[value, 9]]), np.log(np.array([[0.5, 0.25]])), np.log(np.array([0.25])), 2)
    cache = writer.finish()
    assert list(cache.row_keys()) == [*keys, keys[2]] and len(cache) == 6
    for value, key in enumerate(keys):
        assert key in cache
        assert int(cache.lookup(key).ids[0, 0]) == value


def test_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TeacherCacheError, match="not empty and holds no teacher cache"):
        TeacherCacheWriter(tmp_path, {}, vocab_size=10, k=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cache_built_on_gpu_matches_cpu(tmp_path):
    rows = _rows()
    on_cpu = write_teacher_cache(
        make_model(VOCAB, seed=0), rows, tmp_path / "cpu", key={}, k=8, logprob_bits=32, show_progress=False
    )
    on_gpu = write_teacher_cache(
        make_model(VOCAB, seed=0), rows, tmp_path / "gpu", key={}, k=8, logprob_bits=32, device="cuda",
        show_progress=False,
    )  # fmt: skip
    for key in on_cpu.row_keys():
        a, b = on_cpu.lookup(key), on_gpu.lookup(key)
        torch.testing.assert_close(b.log_probs, a.log_probs, rtol=0, atol=1e-4)
        torch.testing.assert_close(b.rest_log_prob, a.rest_log_prob, rtol=0, atol=1e-4)


def test_lookups_read_single_rows_and_check_each(tmp_path, monkeypatch):
    """A lookup maps its shard and reads that row's bytes (no whole-shard read or hash, however the shards are
    visited); each row is checked against its CRC-32, so a row changed on disk is refused."""
    import hf_distill.teachers.cache as reader
    import hf_distill.teachers.cache_files as files

    tokenizer = make_tokenizer()
    teacher = make_model(len(tokenizer), seed=0)
    rows = [{"input_ids": ids, "labels": ids} for ids in tokenizer(list(lm_dataset(6)["text"]))["input_ids"]]
    cache = write_teacher_cache(
        teacher, rows, tmp_path / "c", key={"t": 1}, k=4, rows_per_shard=2, show_progress=False
    )
    assert len(cache.manifest["shards"]) == 3
    expected = {key: cache.lookup(key) for key in cache.row_keys()}
    opened = reader.TeacherCache.open(tmp_path / "c", max_loaded_shards=1)
    keys = list(opened.row_keys())

    def whole_read(*_):
        raise AssertionError("a whole shard was read or hashed during lookups")

    monkeypatch.setattr(Path, "read_bytes", whole_read)
    monkeypatch.setattr(reader, "file_sha256", whole_read)
    monkeypatch.setattr(files, "file_sha256", whole_read)
    for _ in range(3):  # every lookup maps its shard again (max_loaded_shards=1)
        for key in keys:
            row = opened.lookup(key)
            assert torch.equal(row.ids, expected[key].ids) and torch.equal(row.log_probs, expected[key].log_probs)
    monkeypatch.undo()
    shard = tmp_path / "c" / opened.manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the file: the last row key of shard 0 (row 1)
    shard.write_bytes(bytes(data))
    opened.lookup(keys[0])  # row 0 is intact
    with pytest.raises(reader.TeacherCacheError, match="shard-00000.safetensors is corrupt or truncated: row 1"):
        opened.lookup(keys[1])
    with pytest.raises(reader.TeacherCacheError, match="shard-00000.safetensors is corrupt or truncated"):
        opened.verify()

"""A teacher cache with a sampled tail (`tail_samples > 0`): top `k - n` exact ids plus `n` draws from the tail.

Unbiasedness of the stored target, the exact head, merged duplicates and `-inf` fill, edge cases, the cache key,
byte-identical resume, the sparse loss on `-inf` targets, training from such a cache and the CLI flag.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cache_training import VOCAB as TRAIN_VOCAB
from test_cache_training import make_trainer, train_losses
from test_teacher_cache import BUILD_SCRIPT, _build, _files
from tiny import make_model

from hf_distill.losses.sparse import sparse_divergence_and_grad
from hf_distill.teachers.cache import TeacherCache
from hf_distill.teachers.cache_builder import (
    tail_uniforms,
    top_k_log_probs,
    top_k_with_sampled_tail,
    write_teacher_cache,
)
from hf_distill.teachers.cache_format import decode_record, encode_record
from hf_distill.teachers.cache_keys import cache_dir_for, cache_key, key_hash
from hf_distill.teachers.cache_writer import TeacherCacheWriter

TESTS = Path(__file__).resolve().parent
VOCAB = 40


def _decoded_dense(ids: torch.Tensor, log_probs: torch.Tensor, rest: torch.Tensor, vocab: int, bits: int = 32):
    """Encode and decode a record, then scatter its probabilities into `[n, vocab]` (what training sees)."""
    n, k = ids.shape
    payload = encode_record(ids.numpy(), log_probs.numpy(), rest.numpy(), vocab, bits)
    record = decode_record(payload, n, k, vocab, bits)
    dense = torch.zeros(n, vocab, dtype=torch.float64)
    dense.scatter_(-1, torch.from_numpy(record.token_ids), torch.from_numpy(record.log_probs).double().exp())
    return dense, record


# ------------------------------------------------------------------------------------------------------- sampling


def test_sampled_tail_is_unbiased():
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB) * 1.5
    k, n_tail, repeats, seeds = 8, 5, 10, 300
    p = torch.softmax(logits.double(), -1)
    total = torch.zeros(3, VOCAB, dtype=torch.float64)
    for seed in range(seeds):
        rows = logits.repeat(repeats, 1)  # `repeats` independent draws per seed (one generator per seed)
        ids, log_probs, rest = top_k_with_sampled_tail(rows, k, n_tail, tail_uniforms(seed, 0, rows.shape[0], n_tail))
        dense, _ = _decoded_dense(ids, log_probs, rest, VOCAB)
        assert torch.allclose(dense.sum(-1), torch.ones(rows.shape[0], dtype=torch.float64), atol=1e-5)
        total += dense.view(repeats, 3, VOCAB).sum(0)
    samples = seeds * repeats
    mean = total / samples
    # Tail: p_hat_v = R c_v / n with c_v ~ Binomial(n, p_v / R): standard deviation R sqrt(q (1 - q) / n) per draw
    head = p.topk(k - n_tail, -1).indices
    tail_mass = 1 - p.gather(-1, head).sum(-1, keepdim=True)
    q = p / tail_mass
    sd = tail_mass * (q * (1 - q) / n_tail).clamp(min=0).sqrt() / math.sqrt(samples)
    sd.scatter_(-1, head, 0.0)
    assert ((mean - p).abs() <= 6 * sd + 1e-5).all(), ((mean - p).abs() / (sd + 1e-12)).max()
    # And it is not trivially so: a single draw is far from p
    assert (dense[:3] - p).abs().max() > 0.01


def test_head_is_exact_and_tail_carries_the_rest():
    torch.manual_seed(1)
    logits = torch.randn(16, VOCAB) * 2
    k, n_tail = 10, 4
    ids, log_probs, rest = top_k_with_sampled_tail(logits, k, n_tail, tail_uniforms(3, 7, 16, n_tail))
    top_ids, top_lp, top_rest = top_k_log_probs(logits, k - n_tail)
    assert torch.isneginf(rest).all()
    assert (log_probs[:, 1:] <= log_probs[:, :-1]).all()  # sorted descending, as the writer needs
    for row in range(16):
        where = {int(i): j for j, i in enumerate(ids[row])}
        assert len(where) == k  # distinct
        for i, value in zip(top_ids[row].tolist(), top_lp[row]):
            assert log_probs[row, where[i]] == value  # bit-exact head
        tail = [j for j, i in enumerate(ids[row].tolist()) if i not in set(top_ids[row].tolist())]
        tail_p = log_probs[row, tail].double().exp()
        # Every sampled slot carries a multiple of R / n; together exactly R
        units = tail_p / (top_rest[row].double().exp() / n_tail)
        assert torch.allclose(units, units.round(), atol=1e-4) and int(units.round().sum()) == n_tail
    # Same uniforms, same result; another seed or row, other draws
    again = top_k_with_sampled_tail(logits, k, n_tail, tail_uniforms(3, 7, 16, n_tail))
    assert torch.equal(again[0], ids) and torch.equal(again[1], log_probs)
    assert not torch.equal(top_k_with_sampled_tail(logits, k, n_tail, tail_uniforms(4, 7, 16, n_tail))[0], ids)
    assert not torch.equal(tail_uniforms(3, 8, 16, n_tail), tail_uniforms(3, 7, 16, n_tail))
    # Zero tail samples: exactly the top k
    for got, expected in zip(top_k_with_sampled_tail(logits, k, 0, None), top_k_log_probs(logits, k)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_duplicate_draws_are_merged_and_free_slots_filled_with_minus_inf(bits):
    logits = torch.full((2, 20), -30.0)
    logits[:, [3, 7, 12, 15]] = torch.tensor([6.0, 5.0, 4.0, 3.0])  # the head (k - n = 4)
    logits[0, 10] = 2.0  # row 0: one tail token holds (almost) all the tail mass -> every draw is 10
    logits[1, 0] = logits[1, 19] = 2.0  # row 1: two of them
    k, n_tail = 8, 4
    ids, log_probs, rest = top_k_with_sampled_tail(logits, k, n_tail, tail_uniforms(0, 0, 2, n_tail))
    p = torch.softmax(logits.double(), -1)
    tail_mass = 1 - p[0, [3, 7, 12, 15]].sum()
    row = dict(zip(ids[0].tolist(), log_probs[0].tolist()))
    assert set(row) == {3, 7, 12, 15, 10, 0, 1, 2}  # 4 merged draws of 10; free slots: smallest unused ids
    assert row[10] == pytest.approx(float(tail_mass.log()), abs=1e-5)
    assert all(math.isinf(row[i]) and row[i] < 0 for i in (0, 1, 2))
    row = dict(zip(ids[1].tolist(), log_probs[1].tolist()))
    assert len(row) == k and {3, 7, 12, 15} <= set(row)
    drawn = {i for i in row if i not in (3, 7, 12, 15) and math.isfinite(row[i])}
    assert drawn and drawn <= {0, 19}
    tail_mass = 1 - p[1, [3, 7, 12, 15]].sum()
    assert sum(math.exp(row[i]) for i in drawn) == pytest.approx(float(tail_mass), rel=1e-5)
    # The format stores and returns -inf; probabilities still sum to 1 (up to quantisation)
    dense, record = _decoded_dense(ids, log_probs, rest, 20, bits)
    assert np.isneginf(record.rest_log_prob).all()
    assert np.isneginf(record.log_probs[0, -3:]).all() and np.isfinite(record.log_probs[0, :-3]).all()
    assert torch.allclose(dense.sum(-1), torch.ones(2, dtype=torch.float64), atol=0.05 if bits == 4 else 2e-2)
    assert not np.isnan(record.log_probs).any()


def test_edge_cases_k_equals_vocab_and_empty_tail():
    torch.manual_seed(2)
    vocab = 12
    logits = torch.randn(5, vocab)
    # k = V: the ids are a permutation of the vocabulary; the undrawn tail ids have probability 0
    ids, log_probs, _ = top_k_with_sampled_tail(logits, vocab, 5, tail_uniforms(0, 0, 5, 5))
    assert (ids.sort(-1).values == torch.arange(vocab)).all()
    assert torch.allclose(log_probs.double().exp().sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-6)
    # tail_samples = k - 1: only the top-1 is exact
    ids, log_probs, _ = top_k_with_sampled_tail(logits, 6, 5, tail_uniforms(0, 0, 5, 5))
    assert (ids == logits.argmax(-1, keepdim=True)).any(-1).all()
    assert torch.allclose(log_probs.double().exp().sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-6)
    # A tail without mass (-inf logits outside the head): no draw, every tail slot -inf, no nan
    peaked = torch.full((3, vocab), -math.inf)
    peaked[:, :3] = torch.tensor([1.0, 0.5, 0.0])
    ids, log_probs, rest = top_k_with_sampled_tail(peaked, 6, 3, tail_uniforms(0, 0, 3, 3))
    assert not torch.isnan(log_probs).any() and torch.isneginf(log_probs[:, 3:]).all()
    assert torch.allclose(log_probs[:, :3], peaked.log_softmax(-1)[:, :3])
    assert (ids.sort(-1).values == torch.arange(6)).all()  # the fill takes the smallest unused ids
    encode_record(ids.numpy(), log_probs.numpy(), rest.numpy(), vocab, 8)  # storable


def test_bad_tail_samples_fail_before_any_forward(tmp_path):
    model = make_model(VOCAB, seed=0)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    rows = [{"input_ids": [4, 5, 6], "labels": [4, 5, 6]}]
    for bad in (-1, 6, 7, 2.5):
        with pytest.raises(ValueError, match="tail_samples"):
            write_teacher_cache(model, rows, tmp_path / "c", key={}, k=6, tail_samples=bad, show_progress=False)
    assert not calls


# ------------------------------------------------------------------------------------------------------------ keys


def test_key_includes_tail_settings_only_when_sampling():
    base = {"teacher": "t", "dataset": "d"}
    settings = dict(vocab_size=100, k=16, temperature=1.0, logprob_bits=8)
    today = cache_key(base, **settings)
    assert "tail_samples" not in today and "tail_seed" not in today
    assert cache_key(base, **settings, tail_samples=0, seed=5) == today  # the seed only matters with a tail
    tail = cache_key(base, **settings, tail_samples=8)
    assert tail["tail_samples"] == 8 and tail["tail_seed"] == 0
    hashes = {
        key_hash(today),
        key_hash(tail),
        key_hash(cache_key(base, **settings, tail_samples=4)),
        key_hash(cache_key(base, **settings, tail_samples=8, seed=1)),
    }
    assert len(hashes) == 4
    assert cache_key(tail, **settings, tail_samples=8) == tail  # a full key is accepted back
    with pytest.raises(ValueError, match="tail_samples"):
        cache_key(tail, **settings)
    with pytest.raises(ValueError, match="tail_seed"):
        cache_key(tail, **settings, tail_samples=8, seed=2)


def _rows(n: int = 10, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return rows


def test_cache_records_tail_settings_and_default_is_unchanged(tmp_path):
    model, rows = make_model(VOCAB, seed=0), _rows()
    common = dict(key={"run": "tail"}, k=8, logprob_bits=32, batch_size=3, rows_per_shard=4, show_progress=False)
    default = write_teacher_cache(model, rows, tmp_path / "default", **common)
    zero = write_teacher_cache(model, rows, tmp_path / "zero", **common, tail_samples=0, seed=9)
    assert _files(tmp_path / "default") == _files(tmp_path / "zero")  # tail_samples=0: today's bytes
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert "tail_samples" not in manifest and "tail_samples" not in manifest["key"]
    assert default.tail_samples == zero.tail_samples == 0

    tail = write_teacher_cache(model, rows, tmp_path / "tail", **common, tail_samples=3, seed=1)
    assert tail.tail_samples == 3 and tail.tail_seed == 1 and tail.key["tail_samples"] == 3
    assert tail.manifest["tail_samples"] == 3 and "tail_samples=3" in repr(tail)
    other_seed = write_teacher_cache(model, rows, tmp_path / "seed2", **common, tail_samples=3, seed=2)
    shards = [name for name in _files(tmp_path / "tail") if name.startswith("shard")]
    assert any(_files(tmp_path / "tail")[s] != _files(tmp_path / "seed2")[s] for s in shards)
    assert cache_dir_for(tmp_path, tail.key) != cache_dir_for(tmp_path, other_seed.key)
    assert cache_dir_for(tmp_path, tail.key) != cache_dir_for(tmp_path, default.key)
    # The head of every record is the default cache's top 5; the rest is -inf
    for key in default.row_keys():
        exact, sampled = default.lookup(key), tail.lookup(key)
        assert torch.isneginf(sampled.rest_log_prob).all()
        for position in range(exact.ids.shape[0]):
            assert set(exact.ids[position, :5].tolist()) <= set(sampled.ids[position].tolist())
    # Another setting never reuses a cache: the folder of seed 1 refuses seed 2
    with pytest.raises(Exception, match="tail_seed"):
        TeacherCacheWriter(tmp_path / "tail", {"run": "tail"}, vocab_size=VOCAB, k=8, tail_samples=3, seed=2)
    # The same setting reuses it without a forward
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    again = write_teacher_cache(model, rows, tmp_path / "tail", **common, tail_samples=3, seed=1)
    assert not calls and again.path == tail.path


@pytest.mark.slow
def test_interrupted_tail_sampled_build_resumes_to_identical_bytes(tmp_path):
    script = tmp_path / "build.py"
    # the resume script of test_teacher_cache.py, with a sampled tail
    script.write_text(textwrap.dedent(BUILD_SCRIPT.format(tests=str(TESTS), extra=", tail_samples=3, seed=11")))
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    result = _build(script, clean)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FORWARDS 5" in result.stdout
    killed = _build(script, resumed, stop_after=1)
    assert killed.returncode == 75, killed.stderr[-3000:]
    result = _build(script, resumed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FORWARDS 3" in result.stdout  # shard 0 kept: shards 1 and 2 drew from their own rows' generators
    assert _files(resumed) == _files(clean)
    assert TeacherCache.open(clean).tail_samples == 3


# ------------------------------------------------------------------------------------------------------------ loss


@pytest.mark.parametrize("mode", ["bucket", "renormalize"])
def test_sparse_forward_kl_on_minus_inf_targets_has_no_nan(mode):
    torch.manual_seed(3)
    n, vocab, k = 6, 30, 8
    u = torch.randn(n, vocab, dtype=torch.float64)
    teacher = torch.randn(n, vocab, dtype=torch.float64) * 2
    ids, log_probs, rest = top_k_with_sampled_tail(teacher, k, 5, tail_uniforms(0, 0, n, 5))
    assert torch.isneginf(log_probs).any()  # some merged draws left -inf slots
    s = torch.log_softmax(u, -1)
    values, grad = sparse_divergence_and_grad(mode, "forward_kl", s, s.exp(), ids, log_probs.double(), rest.double())
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()
    p_hat = torch.zeros(n, vocab, dtype=torch.float64).scatter_(-1, ids, log_probs.double().exp())
    if mode == "bucket":
        # Forward KL against p_hat over the full vocabulary (0 log 0 = 0): gradient p_s - p_hat, unbiased for p_s - p
        expected = torch.where(p_hat > 0, p_hat * (p_hat.log() - s), torch.zeros_like(s)).sum(-1)
        assert torch.allclose(values, expected, atol=1e-5)
        assert torch.allclose(grad, s.exp() - p_hat, atol=1e-5)
    else:  # the student renormalised over the k ids (the teacher side is p_hat either way)
        s_ids = torch.log_softmax(s.gather(-1, ids), -1)
        q = log_probs.double().exp()
        expected = torch.where(q > 0, q * (log_probs.double() - s_ids), torch.zeros_like(q)).sum(-1)
        assert torch.allclose(values, expected, atol=1e-4)


# -------------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tail_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tail_caches")
    writer = make_trainer(tmp / "writer", divergence="forward_kl")
    return writer.write_teacher_cache(tmp / "root", k=16, logprob_bits=8, tail_samples=8, seed=0, show_progress=False)


@pytest.mark.parametrize("mode", ["bucket", "renormalize"])
def test_training_from_a_tail_sampled_cache_lowers_the_loss(tmp_path, tail_cache, mode):
    assert tail_cache.tail_samples == 8 and tail_cache.vocab_size == TRAIN_VOCAB
    trainer = make_trainer(
        tmp_path / "a",
        teacher=False,
        teacher_cache=str(tail_cache.path),
        divergence="forward_kl",
        sparse_targets=mode,
        optim="adamw_torch",
        learning_rate=1e-2,
        max_steps=20,
    )
    assert trainer.teacher_cache.tail_samples == 8
    losses = train_losses(trainer)
    assert len(losses) == 20 and all(math.isfinite(loss) for loss in losses)
    # (the loss against p_hat includes its entropy, a constant: the relative drop is smaller than with exact targets)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("divergence", ["reverse_kl", "generalized_jsd", "total_variation"])
def test_other_divergences_are_refused_at_construction(tmp_path, tail_cache, divergence):
    with pytest.raises(ValueError, match="forward_kl"):
        make_trainer(tmp_path / "a", teacher=False, teacher_cache=str(tail_cache.path), divergence=divergence)


def test_trainer_rejects_bad_tail_samples(tmp_path):
    writer = make_trainer(tmp_path / "writer")
    for bad in (16, -1):
        with pytest.raises(ValueError, match="tail_samples"):
            writer.write_teacher_cache(tmp_path / "root", k=16, tail_samples=bad, show_progress=False)
    assert not (tmp_path / "root").exists()


# ------------------------------------------------------------------------------------------------------------- CLI


def test_cli_cache_tail_samples(tmp_path, capsys):
    from test_cli_cache_teacher import FLAGS, _cache_path
    from tiny import lm_dataset, make_tokenizer

    from hf_distill.cli.main import main

    tokenizer = make_tokenizer()
    for model, name in (
        (make_model(len(tokenizer), seed=1), "student"),
        (make_model(len(tokenizer), 48, seed=2), "t"),
    ):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    with open(tmp_path / "train.jsonl", "w") as f:
        for text in lm_dataset(8)["text"]:
            f.write(json.dumps({"text": text}) + "\n")
    common = [
        "--model_name_or_path", str(tmp_path / "student"), "--teacher_model_name_or_path", str(tmp_path / "t"),
        "--dataset_name", str(tmp_path / "train.jsonl"), *FLAGS, "--output_dir", str(tmp_path / "o"),
    ]  # fmt: skip
    write = ["cache-teacher", *common, "--cache_dir", str(tmp_path / "caches"), "--cache_top_k", "8"]
    assert main([*write, "--cache_tail_samples", "4", "--cache_seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "4 of the k ids sampled from the tail" in out
    path = _cache_path(out)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["tail_samples"] == 4 and manifest["tail_seed"] == 3
    assert main(write) == 0  # without the flag: another folder, no tail
    assert _cache_path(capsys.readouterr().out) != path
    for flags, message in (
        (["--cache_tail_samples", "8"], "--cache_tail_samples"),
        (["--cache_tail_samples", "-1"], "--cache_tail_samples"),
        (["--cache_tail_samples", "2", "--divergence", "reverse_kl"], "forward_kl"),
    ):
        assert main([*write, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    train = ["distill", *common, "--teacher_cache", path, "--max_steps", "2", "--logging_steps", "1"]
    assert main([*train, "--divergence", "reverse_kl"]) == 2
    assert re.search("forward_kl", capsys.readouterr().err)
    assert main(train) == 0

"""Training from a teacher cache: `DistillationTrainer.write_teacher_cache` + `DistillationConfig(teacher_cache=...)`.

Round trip against the live teacher, the loss gap of sparse (top-k) targets, key reuse, no teacher loaded, the errors
of mismatched / broken / incomplete caches, and the `renormalize` sparse-target mode.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from test_trainer import config, peaky_teacher
from tiny import lm_dataset, make_model, make_tokenizer

from hf_distill import DistillationTrainer
from hf_distill.teachers.cache import TeacherCache
from hf_distill.teachers.cache_keys import TeacherCacheError, batch_row_keys

# The tiny word-level vocabulary has 59 tokens; unused extra words take it to 128 so that k = 16 and k = 64 are both
# real top-k cuts (k < V).
TOKENIZER = make_tokenizer(extra_words=tuple(f"w{i}" for i in range(69)))
VOCAB = len(TOKENIZER)
ROWS = 12
# The settings the brief asks for: plain SGD, constant lr, no clipping, so that the runs can be compared exactly
TRAIN = dict(
    learning_rate=0.5,
    lr_scheduler_type="constant",
    optim="sgd",
    max_grad_norm=0.0,
    alpha=0.3,
    temperature=2.0,
    max_steps=3,
    per_device_train_batch_size=4,
    bf16=False,
    seed=0,
)


def make_trainer(tmp_path: Path, *, teacher: bool = True, dataset=None, tokenizer=None, **overrides):
    """A trainer on the shared toy set-up: the live peaky teacher, or (`teacher=False`) the cache in `overrides`."""
    args = config(tmp_path, **{**TRAIN, **overrides})
    return DistillationTrainer(
        model=make_model(VOCAB, seed=1),
        teacher_model=peaky_teacher(VOCAB) if teacher else None,
        args=args,
        train_dataset=dataset if dataset is not None else lm_dataset(ROWS),
        processing_class=tokenizer or TOKENIZER,
    )


def count_forwards(module: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_losses(trainer: DistillationTrainer) -> list[float]:
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Caches written once by a trainer with the live teacher: the exact one (k = V, 32 bits) and the sparse ones."""
    tmp = tmp_path_factory.mktemp("caches")
    writer = make_trainer(tmp / "writer")
    built = {"root": tmp / "root"}
    built["exact"] = writer.write_teacher_cache(built["root"], k=VOCAB, logprob_bits=32, show_progress=False)
    for k in (16, 64):
        for bits in (8, 32):
            built[k, bits] = writer.write_teacher_cache(built["root"], k=k, logprob_bits=bits, show_progress=False)
    return built


# ------------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_exact_cache_trains_like_the_live_teacher(tmp_path, caches, sampling):
    cache = caches["exact"]
    assert cache.k == cache.vocab_size == VOCAB and cache.logprob_bits == 32 and len(cache) == ROWS
    live = make_trainer(tmp_path / "live", train_sampling_strategy=sampling)
    if sampling == "random":  # the training order is not the order the cache was written in
        order = next(iter(live.get_train_dataloader()))["input_ids"]
        written = live.data_collator([live.train_dataset[i] for i in range(4)])["input_ids"]
        assert order.shape != written.shape or not torch.equal(order, written)
    live_losses = train_losses(live)
    cached = make_trainer(
        tmp_path / "cached", teacher=False, teacher_cache=str(cache.path), train_sampling_strategy=sampling
    )
    assert cached.teacher_model is None and cached.teacher_cache is not None
    cached_losses = train_losses(cached)
    assert len(live_losses) == len(cached_losses) == 3
    assert cached_losses == pytest.approx(live_losses, rel=1e-5)
    live_weights, cached_weights = live.model.state_dict(), cached.model.state_dict()
    assert live_weights.keys() == cached_weights.keys()
    for name, weight in live_weights.items():
        torch.testing.assert_close(cached_weights[name], weight, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(live_weights["lm_head.weight"], make_model(VOCAB, seed=1).lm_head.weight)  # it trained


def test_cache_lookup_runs_in_the_dataloader_workers(tmp_path, caches, monkeypatch):
    """The collator fetches the targets from the CPU batch, in the worker processes: the main process never computes a
    row key, and the losses and weights are those of the in-process lookup."""
    import hf_distill.teachers.cached_batches as cached_batches

    cache = caches[16, 8]
    in_process = make_trainer(tmp_path / "a", teacher=False, teacher_cache=str(cache.path))
    batch = next(iter(in_process.get_train_dataloader()))
    targets = batch[cached_batches.CACHED_TARGETS_KEY]
    assert isinstance(targets, cached_batches.CachedBatchTargets) and targets.token_ids.device.type == "cpu"
    assert targets.token_ids.shape == (int((batch["labels"][:, 1:] != -100).sum()), 16)
    assert targets.ids_bound == int(targets.token_ids.max()) + 1
    expected = train_losses(in_process)

    calls = []
    real_keys = cached_batches.batch_row_keys
    monkeypatch.setattr(cached_batches, "batch_row_keys", lambda *a: calls.append(1) or real_keys(*a))
    monkeypatch.setattr(
        "hf_distill.trainer.fetch_cached_targets", lambda *a, **k: pytest.fail("looked up in the training step")
    )
    workers = make_trainer(tmp_path / "b", teacher=False, teacher_cache=str(cache.path), dataloader_num_workers=2)
    assert train_losses(workers) == pytest.approx(expected, rel=1e-6)
    assert calls == []  # every lookup ran in a worker process
    for name, weight in in_process.model.state_dict().items():
        torch.testing.assert_close(workers.model.state_dict()[name], weight, rtol=0, atol=0, msg=name)


def test_eval_rows_are_cached_with_the_training_rows_and_evaluate_like_the_live_teacher(tmp_path):
    """`write_teacher_cache` caches the trainer's `eval_dataset` too (its rows after the training rows, its
    fingerprint in the key): a run from the cache evaluates exactly like the live teacher (k = V, 32 bits)."""
    eval_set = lm_dataset(6, seed=1)

    def trainer_for(name, **overrides):
        args = config(tmp_path / name, **{**TRAIN, "eval_strategy": "steps", "eval_steps": 2, **overrides})
        return DistillationTrainer(
            model=make_model(VOCAB, seed=1),
            teacher_model=None if "teacher_cache" in overrides else peaky_teacher(VOCAB),
            args=args,
            train_dataset=lm_dataset(ROWS),
            eval_dataset=eval_set,
            processing_class=TOKENIZER,
        )

    live = trainer_for("live")
    cache = live.write_teacher_cache(tmp_path / "root", k=VOCAB, logprob_bits=32, show_progress=False)
    assert len(cache) == ROWS + len(eval_set) and cache.key["eval_num_rows"] == [len(eval_set)]
    without = live.write_teacher_cache(tmp_path / "root", k=VOCAB, logprob_bits=32, show_progress=False,
                                       include_eval=False)  # fmt: skip
    assert without.path != cache.path and len(without) == ROWS and "eval_num_rows" not in without.key
    cached = trainer_for("cached", teacher_cache=str(cache.path))
    assert cached.teacher_model is None
    assert cached.evaluate()["eval_loss"] == pytest.approx(live.evaluate()["eval_loss"], rel=1e-5)
    train_losses(cached)  # evaluates at step 2 on the way
    assert any("eval_loss" in log for log in cached.state.log_history)

    # A cache without the eval rows is refused when the trainer is built, not at the first evaluation
    before = snapshot(without.path)
    with pytest.raises(TeacherCacheError, match=r"6 of the 6 rows of the eval dataset are not in the teacher cache"):
        trainer_for("refused", teacher_cache=str(without.path))
    assert snapshot(without.path) == before
    trainer_for("no-eval", teacher_cache=str(without.path), eval_strategy="no")  # no evaluation: no check


# --------------------------------------------------------------------------------------------- sparse-target loss gap


def bucket_reference(trainer: DistillationTrainer, batch: dict, k: int) -> tuple[float, float]:
    """Full-logit reference of the `bucket` loss with top-k teacher targets (the teacher's top k plus one bucket for
    the rest, on both sides), and the teacher's mean probability mass outside its top k."""
    args = trainer.args
    inputs = {name: value for name, value in batch.items() if name != "labels"} | {"use_cache": False}
    with torch.no_grad():
        student = trainer.model(**inputs).logits[:, :-1].float()
        teacher = peaky_teacher(VOCAB)(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    t = args.temperature
    log_ps, log_pt = (torch.log_softmax(x[mask] / t, -1) for x in (student, teacher))
    top = log_pt.topk(k, -1)
    lp_top, ls_top = top.values, log_ps.gather(-1, top.indices)
    if k < VOCAB:
        rest_t, rest_s = (log_p.scatter(-1, top.indices, -math.inf).logsumexp(-1) for log_p in (log_pt, log_ps))
        lp_top, ls_top = torch.cat([lp_top, rest_t[:, None]], -1), torch.cat([ls_top, rest_s[:, None]], -1)
    divergence = (lp_top.exp() * (lp_top - ls_top)).sum()
    ce = torch.nn.functional.cross_entropy(student[mask], labels[mask], reduction="sum")
    loss = (args.alpha * ce + (1 - args.alpha) * t * t * divergence) / mask.sum()
    tail = 1 - lp_top[:, :k].exp().sum(-1).mean()
    return loss.item(), tail.item()


def test_sparse_cache_loss_gap_shrinks_with_k(tmp_path, caches, capsys):
    live = make_trainer(tmp_path / "live")
    batch = live.data_collator([live.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        reference = live.compute_loss(live.model, dict(batch)).item()
    exact, _ = bucket_reference(live, batch, VOCAB)
    assert reference == pytest.approx(exact, rel=1e-5)
    losses, gaps, tails = {}, {}, {}
    for k in (16, 64):
        bucket, tails[k] = bucket_reference(live, batch, k)
        for bits in (32, 8):
            trainer = make_trainer(tmp_path / f"k{k}-{bits}", teacher=False, teacher_cache=str(caches[k, bits].path))
            with torch.no_grad():
                losses[k, bits] = trainer.compute_loss(trainer.model, dict(batch)).item()
            gaps[k, bits] = abs(losses[k, bits] - reference) / reference
            # The cached loss is the top-k + rest-bucket loss: exactly with 32-bit log-probs, closely with 8 bits
            assert losses[k, bits] == pytest.approx(bucket, rel=1e-5 if bits == 32 else 1e-3)
    with capsys.disabled():
        print(f"\nlive first-step loss {reference:.4f} (V={VOCAB}, alpha=0.3, T=2.0, sparse_targets='bucket')")
        for (k, bits), gap in sorted(gaps.items()):
            print(
                f"  k={k:3d} logprob_bits={bits:2d}: loss {losses[k, bits]:.4f}, relative difference {gap:.2e} "
                f"(teacher mass outside the top k: {tails[k]:.3f})"
            )
    for bits in (8, 32):
        assert gaps[64, bits] < gaps[16, bits] / 2
        assert gaps[16, bits] < 0.15 and gaps[64, bits] < 0.05
        assert losses[16, bits] < losses[64, bits] < reference  # the bucket hides part of the divergence
    assert abs(gaps[16, 8] - gaps[16, 32]) < 1e-3 and abs(gaps[64, 8] - gaps[64, 32]) < 1e-3


# ----------------------------------------------------------------------------------------------------------- reuse


def test_same_inputs_reuse_the_cache_without_a_teacher_forward(tmp_path):
    root = tmp_path / "root"
    trainer = make_trainer(tmp_path / "a")
    forwards = count_forwards(trainer.teacher_model)
    first = trainer.write_teacher_cache(root, k=16, show_progress=False)
    assert forwards[0] == math.ceil(ROWS / 4)  # one forward per batch of `per_device_train_batch_size` rows
    files = snapshot(first.path)
    assert trainer.write_teacher_cache(root, k=16, show_progress=False).path == first.path
    # A trainer built afresh from the same inputs finds the same folder, too
    again = make_trainer(tmp_path / "b")
    again_forwards = count_forwards(again.teacher_model)
    assert again.write_teacher_cache(root, k=16, show_progress=False).path == first.path
    assert forwards[0] == math.ceil(ROWS / 4) and again_forwards[0] == 0
    assert snapshot(first.path) == files
    # Another k or another dataset: another folder (and a forward)
    other_k = trainer.write_teacher_cache(root, k=8, show_progress=False).path
    other_rows = make_trainer(tmp_path / "c", dataset=lm_dataset(ROWS - 1))
    other_data = other_rows.write_teacher_cache(root, k=16, show_progress=False).path
    assert len({first.path, other_k, other_data}) == 3
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in (first.path, other_k, other_data))
    assert snapshot(first.path) == files


# --------------------------------------------------------------------------------------------------- no teacher


def test_cache_trainer_loads_no_teacher(tmp_path, caches):
    path = str(caches[16, 8].path)
    # A teacher named in the config is not loaded (the path does not even exist): it only names the teacher
    trainer = make_trainer(
        tmp_path / "a", teacher=False, teacher_cache=path, teacher_model_name_or_path=str(tmp_path / "no-teacher")
    )
    assert trainer.teacher_model is None
    assert isinstance(trainer.teacher_cache, TeacherCache) and trainer.teacher_cache.path == caches[16, 8].path
    assert trainer.distill_vocab_size == VOCAB
    with pytest.raises(ValueError, match="either a `teacher_model` or a `teacher_cache`, not both"):
        make_trainer(tmp_path / "b", teacher=True, teacher_cache=path)
    with pytest.raises(ValueError, match="no teacher model to write one with"):
        trainer.write_teacher_cache(tmp_path / "root", k=4, show_progress=False)


# ----------------------------------------------------------------------------------------------------------- errors


def test_mismatched_caches_are_refused_and_left_alone(tmp_path, caches):
    cache = caches[16, 8]
    path = str(cache.path)
    before = snapshot(cache.path)
    added = make_tokenizer(extra_words=tuple(f"w{i}" for i in range(69)))
    added.add_tokens(["zebra"])
    template = make_tokenizer(extra_words=tuple(f"w{i}" for i in range(69)))
    template.chat_template = template.chat_template.replace("<|end|>", "<|end|>\n")
    for name, (tokenizer, overrides, fragment) in {
        "added token": (added, {}, r"another key(.|\n)*tokenizer: '"),
        "chat template": (template, {}, r"another key(.|\n)*tokenizer: '"),
        "max_length": (None, {"max_length": 32}, r"another key(.|\n)*max_length: 64 in the cache, 32 expected"),
        "temperature": (None, {"temperature": 1.0}, r"another key(.|\n)*temperature: 2\.0 in the cache, 1\.0"),
    }.items():
        with pytest.raises(TeacherCacheError, match=fragment):
            make_trainer(tmp_path / name, teacher=False, tokenizer=tokenizer, teacher_cache=path, **overrides)
    with pytest.raises(TeacherCacheError, match="does not exist"):
        make_trainer(tmp_path / "missing", teacher=False, teacher_cache=str(tmp_path / "no-such-cache"))
    assert not (tmp_path / "no-such-cache").exists()
    assert snapshot(cache.path) == before


def test_truncated_cache_fails_at_open(tmp_path, caches):
    folder = Path(shutil.copytree(caches[16, 8].path, tmp_path / "copy"))
    shard = folder / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    before = snapshot(folder)
    with pytest.raises(TeacherCacheError, match=r"shard-00000.safetensors is truncated or corrupt(.|\n)*Delete"):
        make_trainer(tmp_path / "a", teacher=False, teacher_cache=str(folder))
    assert snapshot(folder) == before
    manifest = folder / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    before = snapshot(folder)
    with pytest.raises(TeacherCacheError, match="incomplete"):
        make_trainer(tmp_path / "b", teacher=False, teacher_cache=str(folder))
    assert snapshot(folder) == before


def test_cache_that_does_not_cover_the_dataset_fails_at_the_first_batch_with_a_new_row(tmp_path, caches):
    cache = caches[16, 8]
    before = snapshot(cache.path)
    extra = lm_dataset(ROWS + 1)  # the cache's 12 rows and one it never saw
    assert extra["text"][:ROWS] == lm_dataset(ROWS)["text"]
    trainer = make_trainer(tmp_path / "a", teacher=False, teacher_cache=str(cache.path), dataset=extra)
    # The collator looks the rows up: the batch holding the new row fails as it is made, the others train
    inner = trainer.data_collator.collator
    seen_new_row = False
    for batch in trainer.get_train_dataloader().base_dataloader.batch_sampler:
        features = [trainer.train_dataset[i] for i in batch]
        plain = inner(features)
        keys = batch_row_keys(plain["input_ids"], plain["labels"], plain.get("attention_mask"))
        if all(key in trainer.teacher_cache for key in keys):
            with torch.no_grad():
                assert torch.isfinite(trainer.compute_loss(trainer.model, trainer.data_collator(features)))
                assert torch.isfinite(trainer.compute_loss(trainer.model, plain))  # a batch that bypassed it
        else:
            seen_new_row = True
            with pytest.raises(TeacherCacheError, match="does not cover"):
                trainer.data_collator(features)
            with pytest.raises(TeacherCacheError, match="does not cover"):
                trainer.compute_loss(trainer.model, plain)
    assert seen_new_row
    with pytest.raises(TeacherCacheError, match=r"is not in the teacher cache(.|\n)*does not cover this training set"):
        make_trainer(tmp_path / "b", teacher=False, teacher_cache=str(cache.path), dataset=extra, max_steps=4).train()
    assert snapshot(cache.path) == before


def test_k_larger_than_the_vocabulary_fails_before_any_forward(tmp_path):
    trainer = make_trainer(tmp_path / "a")
    forwards = count_forwards(trainer.teacher_model)
    with pytest.raises(ValueError, match=rf"k={VOCAB + 1} is larger than the distilled vocabulary \({VOCAB} tokens"):
        trainer.write_teacher_cache(tmp_path / "root", k=VOCAB + 1, show_progress=False)
    assert forwards[0] == 0 and not (tmp_path / "root").exists()


def test_packing_is_refused_with_a_cache(tmp_path, caches):
    with pytest.raises(ValueError, match=r"`packing=False`"):
        make_trainer(tmp_path / "a", teacher=False, teacher_cache=str(caches[16, 8].path), packing=True)
    packed = make_trainer(tmp_path / "b", packing=True)
    forwards = count_forwards(packed.teacher_model)
    with pytest.raises(ValueError, match=r"`packing=False`"):
        packed.write_teacher_cache(tmp_path / "root", k=16, show_progress=False)
    assert forwards[0] == 0 and not (tmp_path / "root").exists()


# ---------------------------------------------------------------------------------------------------- renormalize


def test_renormalized_sparse_targets_train(tmp_path, caches):
    trainer = make_trainer(
        tmp_path / "a",
        teacher=False,
        teacher_cache=str(caches[16, 8].path),
        sparse_targets="renormalize",
        optim="adamw_torch",
        learning_rate=1e-2,
        max_steps=20,
    )
    losses = train_losses(trainer)
    assert len(losses) == 20 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses

"""On-policy (`lmbda`) and sequence-level (`seq_kd`) distillation in DistillationTrainer: where the trained tokens come
from, prompt-only datasets, and the settings that must not be silently ignored."""

from __future__ import annotations

import math

import pytest
from datasets import Dataset
from test_generation import always_emits
from tiny import make_model, make_tokenizer

from hf_distill import DistillationConfig, DistillationTrainer

PAIRS = {"prompt": ["the cat sat", "a dog ran to", "the bird saw", "one red"] * 3,
         "completion": [" on the mat", " the park", " a big tree", " bird"] * 3}  # fmt: skip


def _config(tmp_path, **overrides) -> DistillationConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, report_to="none",
        save_strategy="no", bf16=False, use_cpu=True, max_length=64, dataloader_pin_memory=False, seed=0,
        logging_steps=1, learning_rate=1e-3, max_new_tokens=5,
    )  # fmt: skip
    values.update(overrides)
    return DistillationConfig(**values)


def _run(tmp_path, dataset, student=None, teacher=None, **overrides):
    """Train, and return the trainer with the batches its loss saw."""
    tokenizer = make_tokenizer()
    trainer = DistillationTrainer(
        model=student if student is not None else make_model(len(tokenizer), seed=1),
        teacher_model=teacher if teacher is not None else make_model(len(tokenizer), seed=2),
        args=_config(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    seen = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        seen.append({k: v.clone() for k, v in inputs.items() if k in ("input_ids", "labels")})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    trainer.train()
    return trainer, seen


def _trained_tokens(batch) -> set[int]:
    labels = batch["labels"]
    return set(labels[labels != -100].tolist())


def _two_voices():
    tokenizer = make_tokenizer()
    cat, dog = tokenizer.convert_tokens_to_ids(["cat", "dog"])
    return cat, dog, always_emits(len(tokenizer), cat, seed=1), always_emits(len(tokenizer), dog, seed=2)


def test_lmbda_one_trains_on_the_students_generations(tmp_path):
    cat, dog, student, teacher = _two_voices()
    trainer, seen = _run(tmp_path, Dataset.from_dict(PAIRS), student, teacher, lmbda=1.0)
    assert len(seen) == 3 and trainer._generator.counts == {"dataset": 0, "student": 3, "teacher": 0}
    eos = make_tokenizer().eos_token_id
    for batch in seen:  # the student always says "cat": every trained token is its generation (or an EOS)
        assert _trained_tokens(batch) <= {cat, eos} and cat in _trained_tokens(batch)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all(math.isfinite(log["loss"]) for log in logs) and all(log["on_policy"] == 1.0 for log in logs)


def test_seq_kd_trains_on_the_teachers_generations(tmp_path):
    cat, dog, student, teacher = _two_voices()
    trainer, seen = _run(tmp_path, Dataset.from_dict(PAIRS), student, teacher, seq_kd=True)
    assert trainer.args.lmbda == 0.0 and trainer._generator.counts["teacher"] == 3
    for batch in seen:
        assert dog in _trained_tokens(batch) and cat not in _trained_tokens(batch)


def test_without_generation_the_dataset_completions_are_trained(tmp_path):
    cat, dog, student, teacher = _two_voices()
    trainer, seen = _run(tmp_path, Dataset.from_dict(PAIRS), student, teacher)
    assert trainer._generator is None and trainer.args.lmbda == 0.0
    tokenizer = make_tokenizer()
    dataset_tokens = set(tokenizer(" ".join(PAIRS["completion"]))["input_ids"])
    for batch in seen:
        assert _trained_tokens(batch) - {tokenizer.eos_token_id} <= dataset_tokens


def test_lmbda_mixes_sources_per_micro_batch(tmp_path):
    trainer, _ = _run(tmp_path, Dataset.from_dict(PAIRS), lmbda=0.5, max_steps=8, gradient_accumulation_steps=2)
    counts = trainer._generator.counts
    total = counts["student"] + counts["dataset"]
    assert counts["teacher"] == 0 and 0 < counts["student"] < total
    again, _ = _run(
        tmp_path / "again", Dataset.from_dict(PAIRS), lmbda=0.5, max_steps=8, gradient_accumulation_steps=2
    )
    assert again._generator.counts == counts  # seeded: the same decisions


@pytest.mark.parametrize("conversational", [False, True])
def test_prompt_only_datasets_train_on_policy(tmp_path, conversational):
    prompts = PAIRS["prompt"]
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    cat, dog, student, teacher = _two_voices()
    trainer, seen = _run(tmp_path, Dataset.from_dict({"prompt": prompts}), student, teacher)
    assert trainer.args.lmbda == 1.0 and trainer._generator.counts["student"] == 3
    assert all(cat in _trained_tokens(batch) for batch in seen)
    with pytest.raises(ValueError, match="prompts and no completions"):
        _run(tmp_path / "mixed", Dataset.from_dict({"prompt": prompts}), lmbda=0.5)


def test_completions_are_cut_at_max_new_tokens(tmp_path):
    cat, dog, student, teacher = _two_voices()
    _, seen = _run(
        tmp_path, Dataset.from_dict(PAIRS), student, teacher, lmbda=1.0, max_new_tokens=None, max_completion_length=2
    )
    for batch in seen:
        assert int((batch["labels"] != -100).sum(-1).max()) <= 2


def test_beta_selects_the_generalized_jsd_and_conflicts_are_refused(tmp_path):
    out = str(tmp_path)
    assert DistillationConfig(out).divergence == "forward_kl" and DistillationConfig(out).beta is None
    ported = DistillationConfig(out, beta=0.3)  # a TRL GKD / DistillationTrainer script: beta means the JSD
    assert (ported.divergence, ported.beta) == ("generalized_jsd", 0.3)
    assert DistillationConfig(out, divergence="generalized_jsd").beta == 0.5
    with pytest.raises(ValueError, match="does not use it"):
        DistillationConfig(out, divergence="reverse_kl", beta=0.3)
    fields = {k: v for k, v in ported.to_dict().items() if k in DistillationConfig.__dataclass_fields__}
    fields = {k: v for k, v in fields.items() if DistillationConfig.__dataclass_fields__[k].init}
    assert DistillationConfig(**fields).beta == 0.3  # a saved config loads again


def test_generation_settings_are_validated(tmp_path):
    out = str(tmp_path)
    for bad, match in [
        ({"lmbda": 1.5}, "lmbda"),
        ({"max_new_tokens": 8, "max_completion_length": 9}, "two names"),
        ({"top_p": 0.0}, "top_p"),
        ({"generation_kwargs": "{not json"}, "generation_kwargs"),
        ({"teacher_cache": "somewhere", "lmbda": 0.5}, "live teacher"),
        ({"sparse_targets": "drop"}, "sparse_targets"),
    ]:
        with pytest.raises(ValueError, match=match):
            DistillationConfig(out, **bad)
    assert DistillationConfig(out, max_completion_length=7).max_new_tokens == 7

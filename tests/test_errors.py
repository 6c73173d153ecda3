"""Bad input gets a clear error that names the fix, before any training starts."""

from __future__ import annotations

import pytest
from datasets import Dataset
from test_trainer import config
from tiny import lm_dataset, make_model, make_tokenizer

from hf_distill import DistillationConfig, DistillationTrainer, resolve_distill_vocab_size


def _trainer(tmp_path, **kwargs):
    tokenizer = kwargs.pop("processing_class", make_tokenizer())
    values = dict(
        model=make_model(len(tokenizer), seed=1),
        teacher_model=make_model(len(tokenizer), seed=2),
        args=config(tmp_path),
        train_dataset=lm_dataset(),
        processing_class=tokenizer,
    )
    values.update(kwargs)
    return DistillationTrainer(**values)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", 0.0, r"`temperature` must be > 0"),
        ("temperature", -1.0, r"`temperature` must be > 0"),
        ("beta", 1.5, r"`beta` must be in \[0, 1\]"),
        ("beta", -0.1, r"`beta` must be in \[0, 1\]"),
        ("alpha", 2.0, r"`alpha` must be in \[0, 1\]"),
        ("skew_alpha", 1.0, r"`skew_alpha` must be in \[0, 1\)"),
        ("divergence", "kl", r"Choose one of: forward_kl, reverse_kl"),
        ("loss_chunk_size", 0, r"`loss_chunk_size` must be a positive integer"),
        ("distill_vocab_size", -3, r"`distill_vocab_size` must be a positive integer"),
        ("teacher_model_init_kwargs", "{not json", r"JSON object"),
    ],
)
def test_bad_config_values(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir=str(tmp_path), report_to="none", **{field: value})


def test_teacher_init_kwargs_from_command_line_json(tmp_path):
    args = DistillationConfig(
        output_dir=str(tmp_path), report_to="none", teacher_model_init_kwargs='{"dtype": "float32"}'
    )
    assert args.teacher_model_init_kwargs == {"dtype": "float32"}


def test_teacher_path_that_does_not_exist(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*save_pretrained"):
        _trainer(tmp_path, teacher_model=str(tmp_path / "no-such-teacher"))


def test_teacher_hub_name_while_offline(tmp_path):
    with pytest.raises(ValueError, match="(?s)Could not load the teacher model 'someone/unknown-teacher'.*offline"):
        _trainer(tmp_path, teacher_model="someone/unknown-teacher")


def test_missing_teacher(tmp_path):
    with pytest.raises(ValueError, match="needs a teacher"):
        _trainer(tmp_path, teacher_model=None)


def test_init_kwargs_with_loaded_teacher(tmp_path):
    with pytest.raises(ValueError, match="already a loaded model"):
        _trainer(tmp_path, args=config(tmp_path, teacher_model_init_kwargs={"dtype": "float32"}))


def test_mismatched_tokenizers_name_the_cross_tokenizer_route(tmp_path):
    tokenizer = make_tokenizer()
    other = make_tokenizer(extra_words=("zebra",))  # same length + 1, different ids from the shuffled order below
    other_vocab = other.get_vocab()
    assert other_vocab != tokenizer.get_vocab()
    teacher_dir = tmp_path / "teacher"
    make_model(len(other), seed=2).save_pretrained(teacher_dir)
    other.save_pretrained(teacher_dir)
    with pytest.raises(ValueError, match="tokenizer differs.*GOLDTrainer"):
        _trainer(tmp_path, teacher_model=str(teacher_dir))


def test_teacher_with_smaller_vocabulary_is_refused(tmp_path):
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match="do not share this tokenizer.*cross-tokenizer"):
        _trainer(tmp_path, teacher_model=make_model(len(tokenizer) - 5, seed=2))


def test_explicit_vocab_size_larger_than_heads(tmp_path):
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match="larger than the LM heads allow"):
        _trainer(tmp_path, args=config(tmp_path, distill_vocab_size=len(tokenizer) + 100))


def test_resolve_vocab_without_tokenizer():
    assert resolve_distill_vocab_size(100, 100) == 100
    with pytest.raises(ValueError, match="set `distill_vocab_size`"):
        resolve_distill_vocab_size(100, 128)
    assert resolve_distill_vocab_size(100, 128, requested=90) == 90


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"foo": ["a b"], "bar": ["c"]}, r"columns \['bar', 'foo'\].*'text' column"),
    ],
)
def test_dataset_without_needed_columns(tmp_path, columns, message):
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, train_dataset=Dataset.from_dict(columns))


def test_eval_dataset_without_needed_columns(tmp_path):
    with pytest.raises(ValueError, match="The eval dataset has columns"):
        _trainer(tmp_path, eval_dataset=Dataset.from_dict({"foo": ["x"]}))


def test_custom_text_field_is_accepted(tmp_path):
    trainer = _trainer(
        tmp_path,
        args=config(tmp_path, dataset_text_field="body"),
        train_dataset=Dataset.from_dict({"body": lm_dataset()["text"]}),
    )
    assert "input_ids" in trainer.train_dataset.column_names

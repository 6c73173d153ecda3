"""The teacher as a user gives it: vocabulary checks, self-distillation, loading options, devices, model card."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from test_trainer import config, first_batch, naive_loss, peaky_teacher
from tiny import lm_dataset, make_model, make_tokenizer
from trl import SFTTrainer

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.teachers.vocab import VocabularyWarning


def _distil(tmp_path, teacher, tokenizer, args=None, **kwargs) -> DistillationTrainer:
    """A fresh tiny student distilled from `teacher` on a language-modeling dataset."""
    return DistillationTrainer(
        model=make_model(len(tokenizer), seed=1),
        teacher_model=teacher,
        args=args if args is not None else config(tmp_path),
        train_dataset=lm_dataset(),
        processing_class=tokenizer,
        **kwargs,
    )


def _vocab_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, VocabularyWarning)]


def test_student_tokenizer_with_added_tokens_compares_shared_rows(tmp_path):
    teacher_tokenizer = make_tokenizer()
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>", "<|call|>"]})
    student = make_model(len(teacher_tokenizer), seed=1)
    student.resize_token_embeddings(len(tokenizer))
    teacher_dir = tmp_path / "teacher"
    peaky_teacher(len(teacher_tokenizer)).save_pretrained(teacher_dir)
    teacher_tokenizer.save_pretrained(teacher_dir)
    with pytest.warns(VocabularyWarning, match=r"adds 2 token\(s\).*'<\|tool\|>'.*alpha > 0") as record:
        trainer = DistillationTrainer(
            model=student,
            teacher_model=str(teacher_dir),
            args=config(tmp_path),
            train_dataset=lm_dataset(),
            processing_class=tokenizer,
        )
    assert len(_vocab_warnings(record)) == 1
    assert trainer.distill_vocab_size == len(teacher_tokenizer)
    batch = first_batch(trainer)
    trainer.model.train()
    torch.testing.assert_close(
        trainer.compute_loss(trainer.model, dict(batch)), naive_loss(trainer, batch), rtol=1e-4, atol=1e-6
    )


def test_added_tokens_with_explicit_vocab_size_do_not_warn(tmp_path):
    teacher_tokenizer = make_tokenizer()
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    student = make_model(len(tokenizer), seed=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = DistillationTrainer(
            model=student,
            teacher_model=peaky_teacher(len(teacher_tokenizer)),
            args=config(tmp_path, distill_vocab_size=len(teacher_tokenizer)),
            train_dataset=lm_dataset(),
            processing_class=tokenizer,
            teacher_processing_class=teacher_tokenizer,
        )
    assert _vocab_warnings(record) == []
    assert trainer.distill_vocab_size == len(teacher_tokenizer)


def test_reordered_vocabulary_is_refused_even_when_sizes_match(tmp_path):
    tokenizer = make_tokenizer()
    vocab = tokenizer.get_vocab()
    # same tokens, two ids swapped: the same size, a different tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    swapped = dict(vocab)
    swapped["cat"], swapped["dog"] = vocab["dog"], vocab["cat"]
    backend = Tokenizer(models.WordLevel(vocab=swapped, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    with pytest.raises(ValueError, match="tokenizer differs.*'cat'.*GOLDTrainer"):
        DistillationTrainer(
            model=make_model(len(tokenizer), seed=1),
            teacher_model=peaky_teacher(len(tokenizer)),
            args=config(tmp_path),
            train_dataset=lm_dataset(),
            processing_class=tokenizer,
            teacher_processing_class=other,
        )


def test_loaded_teacher_with_hub_name_is_checked_or_warned(tmp_path):
    tokenizer = make_tokenizer()
    teacher = peaky_teacher(len(tokenizer))
    teacher.config._name_or_path = "someone/not-on-this-machine"  # a Hub id, not a local folder
    with pytest.warns(VocabularyWarning, match="Could not check that the teacher uses the student's tokenizer"):
        _distil(tmp_path, teacher, tokenizer)


def test_teacher_folder_without_tokenizer_and_larger_head_warns(tmp_path):
    tokenizer = make_tokenizer()
    teacher_dir = tmp_path / "teacher"
    peaky_teacher(len(tokenizer), rows=len(tokenizer) + 40).save_pretrained(teacher_dir)  # no tokenizer saved
    with pytest.warns(VocabularyWarning, match=rf"only the first {len(tokenizer)} columns are compared"):
        trainer = _distil(tmp_path, str(teacher_dir), tokenizer)
    assert trainer.distill_vocab_size == len(tokenizer)


def test_special_token_ids_that_disagree_are_named(tmp_path):
    tokenizer = make_tokenizer()
    teacher = peaky_teacher(len(tokenizer))
    teacher.config.eos_token_id = 7
    with pytest.warns(VocabularyWarning, match="eos_token_id is 7 but the student's tokenizer has 2"):
        _distil(tmp_path, teacher, tokenizer)


def test_same_object_as_student_and_teacher_is_copied_and_trains(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="teacher is the student itself"):
        trainer = DistillationTrainer(
            model=model,
            teacher_model=model,
            args=config(tmp_path, max_steps=3, alpha=0.5),
            train_dataset=lm_dataset(),
            processing_class=tokenizer,
        )
    assert trainer.teacher_model is not trainer.model
    assert sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) > 0
    trainer.train()
    changed = any(not torch.equal(before[k], v.cpu()) for k, v in trainer.model.state_dict().items())
    assert changed, "the student did not train"
    for k, v in trainer.teacher_model.state_dict().items():
        torch.testing.assert_close(v.cpu(), before[k], rtol=0, atol=0)


def _save_teacher(tmp_path, tokenizer):
    teacher_dir = tmp_path / "teacher"
    peaky_teacher(len(tokenizer)).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    return str(teacher_dir)


def test_teacher_by_path_follows_loaded_student_dtype_and_attention(tmp_path):
    tokenizer = make_tokenizer()
    teacher_dir = _save_teacher(tmp_path, tokenizer)
    student = make_model(len(tokenizer), seed=1, dtype=torch.bfloat16)
    student.config._attn_implementation = "eager"
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher_dir, args=config(tmp_path), train_dataset=lm_dataset(),
        processing_class=tokenizer,
    )  # fmt: skip
    assert trainer.teacher_model.dtype == torch.bfloat16
    assert trainer.teacher_model.config._attn_implementation == "eager"


def test_teacher_by_path_follows_student_init_kwargs_and_teacher_kwargs_win(tmp_path):
    tokenizer = make_tokenizer()
    teacher_dir = _save_teacher(tmp_path, tokenizer)
    student_dir = tmp_path / "student"
    make_model(len(tokenizer), seed=1).save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    args = config(tmp_path, model_init_kwargs={"dtype": "bfloat16", "attn_implementation": "eager"})
    trainer = DistillationTrainer(
        model=str(student_dir), teacher_model=teacher_dir, args=args, train_dataset=lm_dataset(),
        processing_class=tokenizer,
    )  # fmt: skip
    assert trainer.model.dtype == torch.bfloat16
    assert trainer.teacher_model.dtype == torch.bfloat16
    assert trainer.teacher_model.config._attn_implementation == "eager"
    args = config(
        tmp_path,
        model_init_kwargs={"dtype": "bfloat16", "attn_implementation": "eager"},
        teacher_model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
    )
    trainer = DistillationTrainer(
        model=str(student_dir), teacher_model=teacher_dir, args=args, train_dataset=lm_dataset(),
        processing_class=tokenizer,
    )  # fmt: skip
    assert trainer.teacher_model.dtype == torch.float32
    assert trainer.teacher_model.config._attn_implementation == "sdpa"


def test_inherited_revision_is_named_when_the_teacher_fails_to_load(tmp_path):
    tokenizer = make_tokenizer()
    student_dir = tmp_path / "student"
    make_model(len(tokenizer), seed=1).save_pretrained(student_dir)
    args = config(tmp_path, model_init_kwargs={"revision": "v1.0"})
    with pytest.raises(ValueError, match="revision='v1.0'.*taken from the student's options"):
        DistillationTrainer(
            model=str(student_dir),
            teacher_model="someone/teacher",  # not reachable: the Hub is offline in the tests
            args=args,
            train_dataset=lm_dataset(),
            processing_class=tokenizer,
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu", "is not a device torch knows"),
        ("cuda:0", "asks for a cuda device, but none is available"),
        ("cuda", "asks for a cuda device, but none is available"),
    ],
)
def test_teacher_device_that_does_not_exist_is_refused_in_the_config(tmp_path, device, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir=str(tmp_path), teacher_device=device, bf16=False)


def test_relative_teacher_folder_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match=r"No local folder 'nope_dir' exists either"):
        _distil(tmp_path, "nope_dir", tokenizer)


def test_compute_loss_func_is_refused(tmp_path):
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match="`compute_loss_func` is not supported"):
        DistillationTrainer(
            model=make_model(len(tokenizer), seed=1),
            teacher_model=peaky_teacher(len(tokenizer)),
            args=config(tmp_path),
            train_dataset=lm_dataset(),
            processing_class=tokenizer,
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss,
        )


def test_init_exposes_every_sft_trainer_argument():
    ours = inspect.signature(DistillationTrainer.__init__).parameters
    parent = inspect.signature(SFTTrainer.__init__).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ours.values())
    for name, parameter in parent.items():
        assert name in ours, f"SFTTrainer argument {name!r} is not a named DistillationTrainer argument"
        assert ours[name].default == parameter.default, name


def test_model_card_names_teacher_and_settings(tmp_path):
    tokenizer = make_tokenizer()
    teacher_dir = _save_teacher(tmp_path, tokenizer)
    trainer = DistillationTrainer(
        model=make_model(len(tokenizer), seed=1),
        teacher_model=teacher_dir,
        args=config(
            tmp_path, divergence="reverse_kl", temperature=2.0, alpha=0.25, save_strategy="steps", save_steps=1
        ),
        train_dataset=lm_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()  # SFTTrainer writes the card with each checkpoint
    card = (tmp_path / "out" / "README.md").read_text()
    assert "None" not in card
    assert teacher_dir in card
    assert "`reverse_kl`" in card and "| temperature | 2.0" in card and "| 0.25 |" in card
    assert "a model built from its config" in card


def test_chat_template_path_that_adds_tokens_compares_shared_rows_and_refuses_unknown_inputs(tmp_path):
    """SFTTrainer's `chat_template_path` clones a template that adds special tokens and resizes the student: the
    shared rows are compared, and a batch holding the added tokens (which the teacher cannot embed) is refused."""
    from tiny import conversational_dataset

    tokenizer = make_tokenizer()
    teacher_dir = _save_teacher(tmp_path, tokenizer)
    source = make_tokenizer()
    source.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    source.eos_token = "<|im_end|>"
    source.chat_template = (
        "{% for message in messages %}"
        "{{ '<|im_start|> ' + message['role'] + ' ' + message['content'] + ' <|im_end|> ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|> assistant ' }}{% endif %}"
    )
    source_dir = tmp_path / "template"
    source.save_pretrained(source_dir)
    with pytest.warns(VocabularyWarning, match="Distillation compares the first"):
        trainer = DistillationTrainer(
            model=make_model(len(tokenizer), seed=1),
            teacher_model=teacher_dir,
            args=config(tmp_path, chat_template_path=str(source_dir), alpha=0.5, max_steps=2),
            train_dataset=conversational_dataset(),
            processing_class=tokenizer,
        )
    assert trainer.model.get_output_embeddings().weight.shape[0] == 64  # resized to a multiple of 64
    assert trainer.distill_vocab_size == len(make_tokenizer())
    batch = first_batch(trainer)
    assert (batch["input_ids"] >= trainer.distill_vocab_size).any(), "the added tokens are in the data"
    # the teacher has no embedding for '<|im_start|>': a clear error, not an IndexError from deep inside torch
    with pytest.raises(ValueError, match=r"tokens the teacher does not know .*'<\|im_start\|>'.*chat_template_path"):
        trainer.train()

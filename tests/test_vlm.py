"""Vision-language distillation on tiny local VLMs (Qwen2-VL, Gemma-3): images reach both models, the loss matches a
full-logit reference, training lowers it, and mixing a VLM with a text-only model is refused."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_vlm import (
    VLM_FAMILIES,
    make_text_model,
    make_vlm_pair,
    naive_vlm_distill_loss,
    vision_tower,
    vlm_dataset,
)
from trl import SFTConfig, SFTTrainer

from hf_distill import DistillationConfig, DistillationTrainer

COMMON = dict(
    per_device_train_batch_size=4,
    max_steps=1,
    learning_rate=1e-2,
    use_cpu=True,
    bf16=False,
    report_to="none",
    logging_steps=1,
    save_strategy="no",
    gradient_checkpointing=False,
    max_length=None,  # never cut image placeholder tokens
    dataloader_pin_memory=False,
    seed=0,
)


def distill_config(tmp_path, **overrides) -> DistillationConfig:
    values = dict(COMMON, output_dir=str(tmp_path / "out"), divergence="forward_kl", alpha=0.0)
    values.update(overrides)
    return DistillationConfig(**values)


def first_batch(trainer) -> dict:
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.to(trainer.model.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def other_images(batch: dict) -> dict:
    """The same batch with other images: the pixel rows reversed (Gemma-3: the images swap places between examples;
    Qwen2-VL: the patches do), same shapes, same text."""
    return batch | {"pixel_values": batch["pixel_values"].flip(0)}


def vision_grad_norm(model) -> float:
    grads = [p.grad for p in vision_tower(model).parameters() if p.grad is not None]
    return float(sum(g.abs().sum() for g in grads)) if grads else 0.0


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_fixtures_train_with_sft_trainer(tmp_path, family):
    """The fixtures themselves: plain SFTTrainer trains each model on the image data, and the images matter."""
    teacher, student, processor = make_vlm_pair(family)
    for model in (teacher, student):
        args = SFTConfig(**dict(COMMON, max_steps=2), output_dir=str(tmp_path / "sft"))
        trainer = SFTTrainer(model=model, args=args, train_dataset=vlm_dataset(8), processing_class=processor)
        batch = first_batch(trainer)
        assert {"pixel_values", "input_ids", "labels"} <= batch.keys()
        inputs = {k: v for k, v in batch.items() if k != "labels"} | {"use_cache": False}
        out = model(**inputs, labels=batch["labels"])
        out.loss.backward()
        assert vision_grad_norm(model) > 0
        with torch.no_grad():
            changed = model(**other_images(inputs)).logits
        assert not torch.allclose(out.logits, changed, atol=1e-4), "the model ignores pixel_values"
        model.zero_grad()

        before = {n: p.detach().clone() for n, p in vision_tower(model).named_parameters()}
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
        assert any(not torch.equal(p, before[n]) for n, p in vision_tower(model).named_parameters())

    # The reference: zero against itself, and it sees the images
    trainer = SFTTrainer(
        model=student,
        args=SFTConfig(**COMMON, output_dir=str(tmp_path / "ref")),
        train_dataset=vlm_dataset(8),
        processing_class=processor,
    )
    batch = first_batch(trainer)
    student.eval()
    assert naive_vlm_distill_loss(student, copy.deepcopy(student), batch).item() == pytest.approx(0.0, abs=1e-10)
    loss = naive_vlm_distill_loss(student, teacher, batch)
    assert loss.item() > 0 and math.isfinite(loss.item())
    assert abs(naive_vlm_distill_loss(student, teacher, other_images(batch)).item() - loss.item()) > 1e-5


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_distillation_matches_full_logit_reference(tmp_path, family):
    teacher, student, processor = make_vlm_pair(family)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=distill_config(tmp_path),
        train_dataset=vlm_dataset(8),
        processing_class=processor,
    )
    batch = first_batch(trainer)
    assert "pixel_values" in batch

    loss = trainer.compute_loss(trainer.model, batch)
    ref = naive_vlm_distill_loss(trainer.model, trainer.teacher_model, batch, vocab_size=trainer.distill_vocab_size)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)

    # The gradient reaches the student's vision tower, never the teacher
    trainer.model.zero_grad()
    loss.backward()
    assert vision_grad_norm(trainer.model) > 0, "no gradient reached the student's vision tower"
    assert all(p.grad is None for p in trainer.teacher_model.parameters())

    # Other images, other loss: and still the reference's, so the images reach both models
    swapped = other_images(batch)
    with torch.no_grad():
        loss_swapped = trainer.compute_loss(trainer.model, swapped)
        ref_swapped = naive_vlm_distill_loss(
            trainer.model, trainer.teacher_model, swapped, vocab_size=trainer.distill_vocab_size
        )
    assert abs(loss_swapped.item() - loss.item()) > 1e-4, "the distillation loss ignores the images"
    torch.testing.assert_close(loss_swapped.double(), ref_swapped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_distillation_trains(tmp_path, family):
    teacher, student, processor = make_vlm_pair(family)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        # the whole dataset in every step: the loss of the same examples, step after step
        args=distill_config(tmp_path, per_device_train_batch_size=8, max_steps=6, learning_rate=3e-2),
        train_dataset=vlm_dataset(8),
        processing_class=processor,
    )
    trainer.train()
    losses = [h["distill_loss"] for h in trainer.state.log_history if "distill_loss" in h]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_teacher_with_text_student_is_refused(tmp_path, family):
    teacher, _, processor = make_vlm_pair(family)
    student = make_text_model(processor)
    with pytest.raises(ValueError, match="vision|image"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=distill_config(tmp_path),
            train_dataset=vlm_dataset(8, text_only=True),  # SFTTrainer alone would accept this
            processing_class=processor.tokenizer,
        )


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_text_teacher_with_vlm_student_is_refused(tmp_path, family):
    _, student, processor = make_vlm_pair(family)
    teacher = make_text_model(processor, hidden_size=64, num_layers=2, seed=7)
    with pytest.raises(ValueError, match="vision|image"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=distill_config(tmp_path),
            train_dataset=vlm_dataset(8),  # SFTTrainer alone would accept this
            processing_class=processor,
        )


def test_vlm_teacher_with_text_student_by_path_is_refused_before_loading_it(tmp_path, monkeypatch):
    import trl

    teacher, _, processor = make_vlm_pair("qwen2_vl")
    student_dir = tmp_path / "student"
    make_text_model(processor).save_pretrained(student_dir)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the student was loaded before the modalities were checked")

    monkeypatch.setattr(trl.SFTTrainer, "__init__", must_not_run)
    with pytest.raises(ValueError, match="teacher is a vision-language model.*student is text-only"):
        DistillationTrainer(
            model=str(student_dir),
            teacher_model=teacher,
            args=distill_config(tmp_path),
            train_dataset=vlm_dataset(8, text_only=True),
            processing_class=processor.tokenizer,
        )


def test_vlm_teacher_loaded_from_a_local_path(tmp_path):
    teacher, student, processor = make_vlm_pair("qwen2_vl")
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    processor.tokenizer.save_pretrained(teacher_dir)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=str(teacher_dir),
        args=distill_config(tmp_path),
        train_dataset=vlm_dataset(8),
        processing_class=processor,
    )
    assert type(trainer.teacher_model).__name__ == type(teacher).__name__
    batch = first_batch(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    reference = naive_vlm_distill_loss(
        trainer.model, trainer.teacher_model, batch, vocab_size=trainer.distill_vocab_size
    )
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-5)

"""DistillationTrainer end to end on tiny local models: exactness against full logits, formats, GA, PEFT, training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny import conversational_dataset, lm_dataset, make_model, make_tokenizer, prompt_completion_dataset

from hf_distill import DistillationConfig, DistillationTrainer


def config(tmp_path, **overrides) -> DistillationConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=1e-2,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        gradient_checkpointing=False,
        max_length=64,
        dataloader_pin_memory=False,
        seed=0,
    )
    values.update(overrides)
    return DistillationConfig(**values)


def peaky_teacher(vocab_size: int, seed: int = 7, scale: float = 8.0, rows: int | None = None):
    """A random teacher with sharp next-token distributions (random teachers are otherwise near-uniform)."""
    teacher = make_model(rows or vocab_size, hidden_size=48, num_layers=2, seed=seed)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(scale)
    return teacher


def naive_loss(trainer: DistillationTrainer, batch: dict, divergence: str = "forward_kl") -> torch.Tensor:
    """Full-logit reference: both models' [B, L, V] logits, shifted, masked by labels, averaged over tokens."""
    args = trainer.args
    # use_cache=False as in training: with a cache, transformers does not detect packed (padding-free) sequences
    inputs = {k: v for k, v in batch.items() if k != "labels"} | {"use_cache": False}
    s_logits = trainer.model(**inputs).logits[:, :-1].float()
    with torch.no_grad():
        t_logits = trainer.teacher_model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    v = trainer.distill_vocab_size
    t = args.temperature
    log_ps = torch.log_softmax(s_logits[..., :v] / t, -1)[mask]
    log_pt = torch.log_softmax(t_logits[..., :v] / t, -1)[mask]
    ps, pt = log_ps.exp(), log_pt.exp()
    if divergence == "forward_kl":
        d = (pt * (log_pt - log_ps)).sum(-1)
    elif divergence == "reverse_kl":
        d = (ps * (log_ps - log_pt)).sum(-1)
    else:
        raise NotImplementedError(divergence)
    ce = F.cross_entropy(s_logits[mask], labels[mask], reduction="sum")
    return (args.alpha * ce + (1 - args.alpha) * t * t * d.sum()) / mask.sum()


def first_batch(trainer: DistillationTrainer) -> dict:
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.to(trainer.model.device) if torch.is_tensor(v) else v for k, v in batch.items()}


@pytest.mark.parametrize(
    "dataset_fn, overrides",
    [
        (lm_dataset, {}),
        (prompt_completion_dataset, {}),
        (conversational_dataset, {"assistant_only_loss": True}),
        (lm_dataset, {"packing": True, "max_length": 24}),
        (lm_dataset, {"packing": True, "max_length": 24, "padding_free": True}),
    ],
    ids=["language_modeling", "prompt_completion", "conversational_assistant_only", "packing", "padding_free"],
)
@pytest.mark.parametrize("divergence, temperature, alpha", [("forward_kl", 1.0, 0.0), ("reverse_kl", 2.0, 0.3)])
def test_compute_loss_matches_full_logit_reference(tmp_path, dataset_fn, overrides, divergence, temperature, alpha):
    tokenizer = make_tokenizer()
    student = make_model(len(tokenizer), seed=1)
    teacher = peaky_teacher(len(tokenizer))
    args = config(tmp_path, divergence=divergence, temperature=temperature, alpha=alpha, **overrides)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset_fn(), processing_class=tokenizer
    )
    batch = first_batch(trainer)
    labels = batch["labels"]
    assert (labels[:, 1:] != -100).any()
    if dataset_fn is not lm_dataset:  # prompt / user tokens are masked out of the loss
        assert (labels == -100).sum() > (batch.get("attention_mask", torch.ones_like(labels)) == 0).sum()
    trainer.model.train()
    ours = trainer.compute_loss(trainer.model, dict(batch))
    ours_grad = torch.autograd.grad(ours, trainer.model.model.layers[0].mlp.up_proj.weight)[0]
    reference = naive_loss(trainer, batch, divergence)
    ref_grad = torch.autograd.grad(reference, trainer.model.model.layers[0].mlp.up_proj.weight)[0]
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-3, atol=1e-7)


def test_teacher_equal_to_student_gives_zero_distillation_loss(tmp_path):
    tokenizer = make_tokenizer()
    student = make_model(len(tokenizer), seed=3)
    teacher = copy.deepcopy(student)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, divergence="generalized_jsd"),
        train_dataset=lm_dataset(),
        processing_class=tokenizer,
    )
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, first_batch(trainer))
    assert abs(loss.item()) < 1e-6
    trainer._flush_metrics()  # the metrics are read back when the trainer logs
    assert trainer._metrics["train"]["teacher_agreement"][-1] == pytest.approx(1.0)


def _train_once(tmp_path, batch_size: int, accumulation: int, name: str):
    tokenizer = make_tokenizer()
    student = make_model(len(tokenizer), seed=1)
    teacher = peaky_teacher(len(tokenizer))
    args = config(
        tmp_path / name,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        optim="sgd",
        lr_scheduler_type="constant",
        learning_rate=0.5,
        max_grad_norm=0.0,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=lm_dataset(8), processing_class=tokenizer
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return losses, {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}


def test_gradient_accumulation_is_exact(tmp_path):
    # Sequences of different lengths: averaging per micro-batch (instead of over the whole batch's tokens) would differ
    losses_full, weights_full = _train_once(tmp_path, batch_size=4, accumulation=1, name="full")
    losses_accum, weights_accum = _train_once(tmp_path, batch_size=1, accumulation=4, name="accum")
    assert losses_full == pytest.approx(losses_accum, rel=1e-4)
    for key in weights_full:
        torch.testing.assert_close(weights_full[key], weights_accum[key], rtol=1e-4, atol=1e-5)
    assert any(
        not torch.equal(w, make_model(len(make_tokenizer()), seed=1).state_dict()[k]) for k, w in weights_full.items()
    )


def _fixed_batch_loss(trainer: DistillationTrainer, batch: dict) -> float:
    trainer.model.eval()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(batch)).item()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd", "total_variation", "skew_kl"])
def test_short_run_lowers_distillation_loss(tmp_path, divergence):
    tokenizer = make_tokenizer()
    student = make_model(len(tokenizer), seed=1)
    teacher = peaky_teacher(len(tokenizer))
    args = config(tmp_path, divergence=divergence, max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3)
    dataset = lm_dataset(8)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    batch = first_batch(trainer)
    before = _fixed_batch_loss(trainer, batch)
    trainer.train()
    after = _fixed_batch_loss(trainer, batch)
    assert after < 0.7 * before, (before, after)


def test_peft_student_trains_only_adapters(tmp_path):
    from peft import LoraConfig

    tokenizer = make_tokenizer()
    student = make_model(len(tokenizer), seed=1)
    teacher = peaky_teacher(len(tokenizer))
    base = {k: v.clone() for k, v in student.state_dict().items()}
    args = config(tmp_path, max_steps=25, per_device_train_batch_size=8, learning_rate=2e-2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=lm_dataset(8),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0),
    )
    batch = first_batch(trainer)
    before = _fixed_batch_loss(trainer, batch)
    trainer.train()
    after = _fixed_batch_loss(trainer, batch)
    assert after < 0.9 * before, (before, after)
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    merged = trainer.model.merge_and_unload() if hasattr(trainer.model, "merge_and_unload") else trainer.model
    assert torch.equal(merged.lm_head.weight.cpu(), base["lm_head.weight"])


def test_peft_adapter_on_lm_head_is_refused(tmp_path):
    from peft import LoraConfig

    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match="lm_head"):
        DistillationTrainer(
            model=make_model(len(tokenizer), seed=1),
            teacher_model=peaky_teacher(len(tokenizer)),
            args=config(tmp_path),
            train_dataset=lm_dataset(),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "lm_head"]),
        )


def test_gradient_checkpointing_gives_same_loss_and_trains(tmp_path):
    tokenizer = make_tokenizer()
    losses = {}
    for checkpointing in (False, True):
        args = config(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing, max_steps=3)
        trainer = DistillationTrainer(
            model=make_model(len(tokenizer), seed=1),
            teacher_model=peaky_teacher(len(tokenizer)),
            args=args,
            train_dataset=lm_dataset(),
            processing_class=tokenizer,
        )
        trainer.train()
        losses[checkpointing] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    tokenizer = make_tokenizer()
    args = config(tmp_path, bf16=True, max_steps=3, use_cpu=True)
    trainer = DistillationTrainer(
        model=make_model(len(tokenizer), seed=1),
        teacher_model=peaky_teacher(len(tokenizer)),
        args=args,
        train_dataset=lm_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_evaluate_reports_distillation_metrics(tmp_path):
    tokenizer = make_tokenizer()
    trainer = DistillationTrainer(
        model=make_model(len(tokenizer), seed=1),
        teacher_model=peaky_teacher(len(tokenizer)),
        args=config(tmp_path, eval_strategy="no", per_device_eval_batch_size=4),
        train_dataset=lm_dataset(),
        eval_dataset=prompt_completion_dataset(8, seed=3),
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_distill_loss", "eval_ce_loss", "eval_teacher_agreement"):
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_distill_loss"], rel=1e-4)  # alpha = 0, T = 1


def test_padded_vocabularies_compare_only_real_tokens(tmp_path):
    tokenizer = make_tokenizer()
    n = len(tokenizer)
    student = make_model(n + 3, seed=1)
    teacher = peaky_teacher(n, rows=n + 11)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path),
        train_dataset=lm_dataset(),
        processing_class=tokenizer,
    )
    assert trainer.distill_vocab_size == n
    batch = first_batch(trainer)
    trainer.model.train()
    ours = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(ours, naive_loss(trainer, batch), rtol=1e-4, atol=1e-6)


def test_teacher_loaded_from_local_path_with_init_kwargs(tmp_path):
    tokenizer = make_tokenizer()
    teacher_dir = tmp_path / "teacher"
    peaky_teacher(len(tokenizer)).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    args = config(
        tmp_path, teacher_model_name_or_path=str(teacher_dir), teacher_model_init_kwargs={"dtype": "bfloat16"}
    )
    trainer = DistillationTrainer(
        model=make_model(len(tokenizer), seed=1), args=args, train_dataset=lm_dataset(), processing_class=tokenizer
    )
    assert trainer.teacher_model.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    assert not trainer.teacher_model.training
    trainer.train()


def test_teacher_on_its_own_device(tmp_path):
    tokenizer = make_tokenizer()
    args = config(tmp_path, teacher_device="cpu", max_steps=2)
    trainer = DistillationTrainer(
        model=make_model(len(tokenizer), seed=1),
        teacher_model=peaky_teacher(len(tokenizer)),
        args=args,
        train_dataset=lm_dataset(),
        processing_class=tokenizer,
    )
    assert trainer.teacher_model.device.type == "cpu"
    trainer.train()


def test_metrics_wait_on_the_device_until_the_trainer_logs(tmp_path, monkeypatch):
    """A step reads no metric back from the device: the totals are read when the trainer logs (or every
    `MAX_PENDING` micro-batches), and then give the same values."""
    import hf_distill.metrics as metrics

    tokenizer = make_tokenizer()
    trainer = DistillationTrainer(
        model=make_model(len(tokenizer), seed=3),
        teacher_model=peaky_teacher(len(tokenizer)),
        args=config(tmp_path),
        train_dataset=lm_dataset(),
        processing_class=tokenizer,
    )
    trainer.model.train()
    batch = first_batch(trainer)
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda *_: pytest.fail("metrics read back in the step"))
    trainer.compute_loss(trainer.model, dict(batch))
    monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)
    assert "distill_loss" not in trainer._metrics["train"] and len(trainer._pending_metrics) == 1
    trainer._flush_metrics()
    first = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    assert trainer._pending_metrics == [] and first["teacher_agreement"] >= 0.0 and first["num_tokens"] > 0
    monkeypatch.setattr(metrics, "MAX_PENDING", 3)
    for _ in range(3):  # the third micro-batch reads the three back
        trainer.compute_loss(trainer.model, dict(batch))
    assert trainer._pending_metrics == [] and len(trainer._metrics["train"]["distill_loss"]) == 4
    assert trainer._metrics["train"]["distill_loss"][-1] == pytest.approx(first["distill_loss"], rel=1e-6)
    assert trainer._metrics["train"]["num_tokens"] == [4 * first["num_tokens"]]

"""BitNetCallback inside Trainer, SFTTrainer and DistillationTrainer: conversion before the optimizer, the lambda
schedule per step, resume, and parity with the parent trainer when quantization is off."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tiny import lm_dataset, make_model, make_tokenizer
from transformers import Trainer, TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer

from hf_distill import BitLinear, BitNetCallback, DistillationConfig, DistillationTrainer
from hf_distill.bitnet import bitlinear_layers

COMMON = dict(
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    report_to="none",
    logging_steps=1,
    save_strategy="no",
    bf16=False,
    dataloader_pin_memory=False,
    seed=0,
)


class LambdaRecorder(TrainerCallback):
    """Reads the lambdas a BitLinear layer uses during each step."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        layer = next(m for m in model.modules() if isinstance(m, BitLinear))
        self.seen.append((state.global_step, layer.weight_lambda, layer.activation_lambda))


def token_dataset(tokenizer, n=16):
    rows = [tokenizer(t)["input_ids"] for t in lm_dataset(n)["text"]]
    width = max(map(len, rows))
    ids = [r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows]
    labels = [r + [-100] * (width - len(r)) for r in rows]
    return Dataset.from_dict(
        {"input_ids": ids, "labels": labels, "attention_mask": [[1] * len(r) + [0] * (width - len(r)) for r in rows]}
    )


def plain_trainer(tmp_path, callbacks, max_steps=4, model=None, **overrides):
    tok = make_tokenizer()
    args = TrainingArguments(**(dict(output_dir=str(tmp_path / "plain"), max_steps=max_steps) | COMMON | overrides))
    model = model or make_model(len(tok))
    return Trainer(model=model, args=args, train_dataset=token_dataset(tok), callbacks=callbacks)


def test_plain_trainer_converts_before_the_optimizer_and_follows_the_schedule(tmp_path):
    recorder = LambdaRecorder()
    callback = BitNetCallback(schedule="linear", warmup_steps=2, sub_norm=True)
    trainer = plain_trainer(tmp_path, [callback, recorder])
    assert len(bitlinear_layers(trainer.model)) == 14 and trainer.optimizer is None
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for n, p in trainer.model.named_parameters() if "_sub_norm" in n)
    assert recorder.seen == [(1, 0.0, 0.0), (2, 0.5, 0.5), (3, 1.0, 1.0), (4, 1.0, 1.0)]


def test_separate_activation_schedule(tmp_path):
    recorder = LambdaRecorder()
    callback = BitNetCallback(schedule="constant", activation_schedule=lambda step: 0.5)
    plain_trainer(tmp_path, [callback, recorder], max_steps=2).train()
    assert recorder.seen == [(1, 1.0, 0.5), (2, 1.0, 0.5)]


def test_lambda_zero_training_equals_the_parent_trainer(tmp_path):
    """Quantization off: the callback must not change anything else the trainer does."""
    tok = make_tokenizer()
    data = lm_dataset(16)
    weights = []
    for callbacks in ([], [BitNetCallback(schedule="constant", constant_lambda=0.0)]):
        args = SFTConfig(output_dir=str(tmp_path / f"sft{len(callbacks)}"), max_steps=3, max_length=64, **COMMON)
        trainer = SFTTrainer(
            model=make_model(len(tok)), args=args, train_dataset=data, processing_class=tok, callbacks=callbacks
        )
        trainer.train()
        weights.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_distillation_trainer_with_bitnet_lowers_the_loss(tmp_path):
    tok = make_tokenizer()
    teacher = make_model(len(tok), hidden_size=48, seed=7)
    args = DistillationConfig(
        output_dir=str(tmp_path / "kd"), max_steps=30, max_length=64, **(COMMON | {"learning_rate": 3e-3})
    )
    recorder = LambdaRecorder()
    trainer = DistillationTrainer(
        model=make_model(len(tok)),
        teacher_model=teacher,
        args=args,
        train_dataset=lm_dataset(32),
        processing_class=tok,
        callbacks=[BitNetCallback(schedule="linear", warmup_steps=10), recorder],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert recorder.seen[-1][1:] == (1.0, 1.0)
    assert all(isinstance(m, BitLinear) for n, m in trainer.model.named_modules() if n.endswith("up_proj"))
    trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "ternary BitNet b1.58 (14 linear layers; lm_head kept in full precision)" in card
    assert "lambda warm-up linear over 10 steps" in card and "- bitnet" in card


class StopAt(TrainerCallback):
    """Stops training after a given step (an interruption that keeps the run's schedule)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_continues_the_warm_up_and_reaches_the_same_weights(tmp_path):
    def run(output, stop_at=None, resume=None):
        recorder = LambdaRecorder()
        callbacks = [BitNetCallback(schedule="linear", warmup_steps=4), recorder]
        trainer = plain_trainer(
            tmp_path,
            callbacks + ([StopAt(stop_at)] if stop_at else []),
            max_steps=6,
            output_dir=str(output),
            save_strategy="steps",
            save_steps=3,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, recorder.seen

    full, seen_full = run(tmp_path / "full")
    run(tmp_path / "part", stop_at=3)
    resumed, seen_resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-3"))
    assert seen_resumed == seen_full[3:] == [(4, 0.75, 0.75), (5, 1.0, 1.0), (6, 1.0, 1.0)]
    for (name, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_errors(tmp_path):
    tok = make_tokenizer()
    model = make_model(len(tok))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), max_steps=1, **COMMON)
    with pytest.raises(ValueError, match="before the optimizer is built"):
        Trainer(
            model=model,
            args=args,
            train_dataset=token_dataset(tok),
            callbacks=[BitNetCallback()],
            optimizers=(optimizer, None),
        )
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(make_model(len(tok)), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="PEFT model"):
        Trainer(model=peft_model, args=args, train_dataset=token_dataset(tok), callbacks=[BitNetCallback()])
    with pytest.raises(ValueError, match="activation_bits"):
        BitNetCallback(activation_bits=1)
    trainer = plain_trainer(tmp_path, [], max_steps=1)
    trainer.add_callback(BitNetCallback())
    with pytest.raises(RuntimeError, match="pass it in `callbacks=`"):
        trainer.train()

"""The drop-in against its parent: the same inputs and options through `SFTTrainer` and `DistillationTrainer`.

With `alpha=1` the distillation loss is SFT's cross-entropy, so wherever SFTTrainer defines a behaviour (autocast,
label smoothing, DFT, the MoE load-balancing loss, logged metrics, config conversion) the two must agree.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from datasets import Dataset
from test_trainer import config, first_batch, peaky_teacher
from tiny import lm_dataset, make_model, make_tokenizer
from trl import SFTConfig, SFTTrainer

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.model_forward import backbone


def _pair(tmp_path, student, teacher, tokenizer, dataset=None, **overrides):
    """The same student through SFTTrainer and DistillationTrainer with the same options."""
    dataset = dataset if dataset is not None else lm_dataset()
    ours = DistillationTrainer(
        model=copy.deepcopy(student),
        teacher_model=teacher,
        args=config(tmp_path / "ours", **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    shared = {f.name: getattr(ours.args, f.name) for f in dataclasses.fields(SFTConfig) if f.init}
    sft_args = SFTConfig(**{**shared, "output_dir": str(tmp_path / "sft")})
    sft = SFTTrainer(model=copy.deepcopy(student), args=sft_args, train_dataset=dataset, processing_class=tokenizer)
    return ours, sft


def _loss(trainer, batch, train: bool = True):
    trainer.model.train(train)
    n = (batch["labels"][:, 1:] != -100).sum()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n)
    getattr(trainer, "_flush_metrics", lambda: None)()  # ours reads its metrics back when it logs
    return loss


# 1. Mixed precision -------------------------------------------------------------------------------------------------


def _autocast_probe(model, seen: list):
    def hook(module, args, output):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    return backbone(model).register_forward_hook(hook)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_autocast_reaches_student_and_teacher(tmp_path, precision):
    tokenizer = make_tokenizer()
    student = make_model(len(tokenizer), seed=1)
    teacher = peaky_teacher(len(tokenizer))
    ours, sft = _pair(
        tmp_path, student, teacher, tokenizer, use_cpu=True, alpha=1.0, max_steps=1, learning_rate=0.0,
        **{precision: True},
    )  # fmt: skip
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16

    seen_student, seen_teacher, seen_sft = [], [], []
    handles = [
        _autocast_probe(ours.model, seen_student),
        _autocast_probe(ours.teacher_model, seen_teacher),
        _autocast_probe(sft.model, seen_sft),
    ]
    try:
        ours.train()
        sft.train()
    finally:
        for handle in handles:
            handle.remove()
    # accelerate autocasts bf16 on the CPU, not fp16 (it does both on GPUs): whatever the parent does, we do
    assert len(seen_sft) == 1 and seen_sft[0][0] == (precision == "bf16")
    if precision == "bf16":
        assert seen_sft[0][1] == dtype
    assert seen_student == seen_sft
    assert seen_teacher == seen_sft
    # alpha = 1: our loss is SFT's cross-entropy, computed under the same autocast
    ours_loss = ours.state.log_history[0]["loss"]
    assert ours_loss == pytest.approx(sft.state.log_history[0]["loss"], rel=2e-3)
    fp32 = DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=teacher,
        args=config(tmp_path / "fp32", alpha=1.0, max_steps=1, learning_rate=0.0, use_cpu=True),
        train_dataset=lm_dataset(), processing_class=tokenizer,
    )  # fmt: skip
    fp32.train()
    # where the parent autocasts, the numerics change; where it does not (fp16 on CPU), they stay fp32's
    assert (fp32.state.log_history[0]["loss"] != ours_loss) == (precision == "bf16")


def test_teacher_on_its_own_device_runs_under_autocast(tmp_path):
    tokenizer = make_tokenizer()
    trainer = DistillationTrainer(
        model=make_model(len(tokenizer), seed=1),
        teacher_model=peaky_teacher(len(tokenizer)),
        args=config(tmp_path, use_cpu=True, bf16=True, teacher_device="cpu"),
        train_dataset=lm_dataset(),
        processing_class=tokenizer,
    )
    seen = []
    handle = _autocast_probe(trainer.teacher_model, seen)
    try:
        _loss(trainer, first_batch(trainer))
    finally:
        handle.remove()
    assert seen == [(True, torch.bfloat16)]


# 2. SFTConfig as args -----------------------------------------------------------------------------------------------


def test_sft_config_is_converted_with_every_field(tmp_path):
    tokenizer = make_tokenizer()
    sft_args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        eos_token="</s>",
        pad_token="<pad>",
        max_length=48,
        learning_rate=3e-4,
        report_to="none",
        bf16=False,
        hub_token="secret",
        save_strategy="no",
        max_steps=1,
    )
    trainer = DistillationTrainer(
        model=make_model(len(tokenizer), seed=1),
        teacher_model=peaky_teacher(len(tokenizer)),
        args=sft_args,
        train_dataset=lm_dataset(),
        processing_class=tokenizer,
    )
    assert isinstance(trainer.args, DistillationConfig)
    for name in ("eos_token", "pad_token", "hub_token", "max_length", "learning_rate", "output_dir"):
        assert getattr(trainer.args, name) == getattr(sft_args, name), name
    assert trainer.args.to_dict() | {"divergence": None} == {
        **sft_args.to_dict(),
        **{k: v for k, v in trainer.args.to_dict().items() if k not in sft_args.to_dict()},
        "divergence": None,
    }
    trainer.train()


# 3. Cross-entropy options -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{"label_smoothing_factor": 0.1}, {"loss_type": "dft"}, {"label_smoothing_factor": 0.2, "loss_type": "dft"}],
)
def test_ce_options_match_sft_trainer(tmp_path, overrides):
    tokenizer = make_tokenizer()
    student = make_model(len(tokenizer), seed=1)
    ours, sft = _pair(tmp_path, student, peaky_teacher(len(tokenizer)), tokenizer, alpha=1.0, **overrides)
    batch = first_batch(ours)
    ours_loss, sft_loss = _loss(ours, batch), _loss(sft, batch)
    torch.testing.assert_close(ours_loss, sft_loss, rtol=1e-5, atol=1e-6)
    ours_grad = torch.autograd.grad(ours_loss, ours.model.model.layers[0].mlp.up_proj.weight)[0]
    sft_grad = torch.autograd.grad(sft_loss, sft.model.model.layers[0].mlp.up_proj.weight)[0]
    torch.testing.assert_close(ours_grad, sft_grad, rtol=1e-4, atol=1e-7)
    # and the option changes the loss (it is not silently ignored)
    plain, _ = _pair(tmp_path / "plain", student, peaky_teacher(len(tokenizer)), tokenizer, alpha=1.0)
    assert abs(_loss(plain, batch).item() - ours_loss.item()) > 1e-4


@pytest.mark.parametrize("overrides", [{"label_smoothing_factor": 0.1}, {"loss_type": "dft"}])
def test_ce_options_without_ce_term_are_refused(tmp_path, overrides):
    with pytest.raises(ValueError, match="`alpha=0.0` turns off"):
        DistillationConfig(output_dir=str(tmp_path), bf16=False, alpha=0.0, **overrides)


def test_ce_options_mix_with_distillation(tmp_path):
    """alpha = 0.5 with label smoothing: half SFT's smoothed CE, half the distillation term."""
    tokenizer = make_tokenizer()
    student = make_model(len(tokenizer), seed=1)
    teacher = peaky_teacher(len(tokenizer))
    ours, sft = _pair(tmp_path, student, teacher, tokenizer, alpha=0.5, label_smoothing_factor=0.1)
    pure, _ = _pair(tmp_path / "pure", student, teacher, tokenizer, alpha=0.0)
    batch = first_batch(ours)
    expected = 0.5 * _loss(sft, batch) + 0.5 * _loss(pure, batch)
    torch.testing.assert_close(_loss(ours, batch), expected, rtol=1e-5, atol=1e-6)


# 11. Logged metrics under gradient accumulation ---------------------------------------------------------------------


def _uneven_dataset():
    # very different lengths, so the micro-batches of one step hold different token counts
    texts = lm_dataset(16, seed=5)["text"]
    return Dataset.from_dict({"text": [t if i % 2 else " ".join([t] * 4) for i, t in enumerate(texts)]})


@pytest.mark.parametrize("alpha, metric", [(0.0, "distill_loss"), (1.0, "ce_loss")])
def test_logged_metrics_are_per_token_under_gradient_accumulation(tmp_path, alpha, metric):
    tokenizer = make_tokenizer()
    trainer = DistillationTrainer(
        model=make_model(len(tokenizer), seed=1),
        teacher_model=peaky_teacher(len(tokenizer)),
        args=config(
            tmp_path,
            alpha=alpha,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=4,
            max_steps=3,
            learning_rate=1e-3,
            max_length=64,
        ),  # fmt: skip
        train_dataset=_uneven_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3
    for log in logs:
        assert log[metric] == pytest.approx(log["loss"], rel=1e-4)
        assert 0.0 < log["entropy"] < torch.log(torch.tensor(float(len(tokenizer)))).item() + 1e-4
        assert 0.0 <= log["mean_token_accuracy"] <= 1.0


def test_entropy_metric_matches_sft_trainer(tmp_path):
    tokenizer = make_tokenizer()
    student, teacher = make_model(len(tokenizer), seed=1), peaky_teacher(len(tokenizer))
    ours, sft = _pair(tmp_path, student, teacher, tokenizer, alpha=1.0)
    batch = first_batch(ours)
    _loss(ours, batch), _loss(sft, batch)
    for name in ("entropy", "mean_token_accuracy"):
        assert ours._metrics["train"][name][-1] == pytest.approx(sft._metrics["train"][name][-1], rel=1e-5), name


# 4. MoE students ----------------------------------------------------------------------------------------------------


def _moe_student(family: str, vocab_size: int, coef: float = 0.3):
    from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        output_router_logits=True, router_aux_loss_coef=coef,
    )  # fmt: skip
    if family == "qwen3_moe":
        cfg = Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    elif family == "mixtral":
        cfg = MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    else:
        cfg = GptOssConfig(
            **common, num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )  # fmt: skip
    torch.manual_seed(4)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_moe_student_adds_the_router_aux_loss_like_sft_trainer(tmp_path, family, accumulation):
    tokenizer = make_tokenizer()
    student = _moe_student(family, len(tokenizer))
    ours, sft = _pair(
        tmp_path, student, peaky_teacher(len(tokenizer)), tokenizer, alpha=1.0,
        gradient_accumulation_steps=accumulation,
    )  # fmt: skip
    assert ours.aux_loss_enabled and sft.aux_loss_enabled
    batch = first_batch(ours)
    for trainer in (ours, sft):
        trainer.current_gradient_accumulation_steps = accumulation
    ours_loss, sft_loss = _loss(ours, batch), _loss(sft, batch)
    torch.testing.assert_close(ours_loss, sft_loss, rtol=1e-5, atol=1e-6)
    assert ours._metrics["train"]["aux_loss"][-1] == pytest.approx(sft._metrics["train"]["aux_loss"][-1], rel=1e-6)
    router = next(
        n for n, _ in ours.model.named_parameters()
        if "layers.0." in n and ("router" in n or n.endswith("mlp.gate.weight")) and n.endswith("weight")
    )  # fmt: skip
    ours_grad = torch.autograd.grad(ours_loss, dict(ours.model.named_parameters())[router])[0]
    sft_grad = torch.autograd.grad(sft_loss, dict(sft.model.named_parameters())[router])[0]
    torch.testing.assert_close(ours_grad, sft_grad, rtol=1e-4, atol=1e-7)
    # the aux term is really there: without it the loss is smaller by coef * aux / steps
    ce_only = ours_loss - 0.3 * ours._metrics["train"]["aux_loss"][-1] / accumulation
    assert ce_only.item() == pytest.approx(ours._metrics["train"]["ce_loss"][-1] / accumulation, rel=1e-4)


def test_moe_aux_loss_off_when_coef_is_zero(tmp_path):
    tokenizer = make_tokenizer()
    ours, _ = _pair(
        tmp_path, _moe_student("mixtral", len(tokenizer)), peaky_teacher(len(tokenizer)), tokenizer,
        router_aux_loss_coef=0.0,
    )  # fmt: skip
    _loss(ours, first_batch(ours))
    assert not ours.aux_loss_enabled and "aux_loss" not in ours._metrics["train"]


# 5. PEFT prompt learning --------------------------------------------------------------------------------------------


def _prompt_learning_config(kind: str):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    if kind == "prompt_tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    if kind == "prefix_tuning":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16)


def _naive_prompt_learning_loss(trainer, batch):
    """Forward KL over the labelled real tokens, from the PEFT model's full logits and the teacher's."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = trainer.model(**inputs, use_cache=False).logits.float()
    logits = logits[:, -batch["input_ids"].shape[1] :]  # prompt/P-tuning prepend the virtual tokens
    with torch.no_grad():
        t_logits = trainer.teacher_model(**inputs, use_cache=False).logits.float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    log_ps = torch.log_softmax(logits[:, :-1], -1)[mask]
    log_pt = torch.log_softmax(t_logits[:, :-1], -1)[mask]
    return (log_pt.exp() * (log_pt - log_ps)).sum() / mask.sum()


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_peft_prompt_learning_student_matches_full_logit_reference_and_trains(tmp_path, kind):
    tokenizer = make_tokenizer()
    trainer = DistillationTrainer(
        model=make_model(len(tokenizer), seed=1),
        teacher_model=peaky_teacher(len(tokenizer)),
        args=config(tmp_path, max_steps=3, learning_rate=5e-2),
        train_dataset=lm_dataset(),
        processing_class=tokenizer,
        peft_config=_prompt_learning_config(kind),
    )
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("prompt_encoder" in n for n in trainable)
    batch = first_batch(trainer)
    trainer.model.train()
    ours = trainer.compute_loss(trainer.model, dict(batch))
    reference = _naive_prompt_learning_loss(trainer, batch)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
    params = list(trainable.values())
    for g_ours, g_ref in zip(torch.autograd.grad(ours, params), torch.autograd.grad(reference, params)):
        assert g_ours.abs().sum() > 0
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-3, atol=1e-7)
    before = [p.detach().clone() for p in params]
    trainer.train()
    assert any(not torch.equal(b, p) for b, p in zip(before, params)), "the prompt encoder never changed"

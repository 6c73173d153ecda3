"""GPU-only checks (fp16/bf16 mixed precision, the chunked loss on CUDA). Skipped on machines without CUDA."""

from __future__ import annotations

import pytest
import torch
from test_trainer import config, peaky_teacher
from tiny import lm_dataset, make_model, make_tokenizer

from hf_distill import DistillationTrainer
from hf_distill.losses import HiddenStateTeacher, LMHead, chunked_distillation_loss, token_divergence

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_chunked_loss_on_cuda_matches_cpu():
    torch.manual_seed(0)
    hidden, weight = torch.randn(300, 64), torch.randn(1000, 64) * 0.1
    teacher_hidden, teacher_weight = torch.randn(300, 96), torch.randn(1000, 96) * 0.1
    results = []
    for device in ("cpu", "cuda"):
        h = hidden.to(device).requires_grad_()
        out = chunked_distillation_loss(
            h,
            LMHead(weight.to(device)),
            HiddenStateTeacher(teacher_hidden.to(device), LMHead(teacher_weight.to(device))),
            divergence="generalized_jsd",
            temperature=2.0,
            chunk_size=64,
        )
        (grad,) = torch.autograd.grad(out.loss, h)
        results.append((out.loss.cpu(), grad.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-3, atol=1e-6)
    reference = token_divergence(hidden @ weight.T, teacher_hidden @ teacher_weight.T, "generalized_jsd", 2.0)
    torch.testing.assert_close(results[0][0], 4.0 * reference.mean(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda(tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("bf16 not supported on this GPU")
    tokenizer = make_tokenizer()
    args = config(tmp_path, max_steps=20, per_device_train_batch_size=8, learning_rate=3e-3, **{precision: True})
    trainer = DistillationTrainer(
        model=make_model(len(tokenizer), seed=1),
        teacher_model=peaky_teacher(len(tokenizer)),
        args=args,
        train_dataset=lm_dataset(8),
        processing_class=tokenizer,
    )
    assert trainer.model.device.type == "cuda" and trainer.teacher_model.device.type == "cuda"
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]

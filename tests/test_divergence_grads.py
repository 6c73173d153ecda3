"""The hand-written gradients used by the chunked loss equal autograd on the plain definitions."""

from __future__ import annotations

import pytest
import torch

from hf_distill.losses import DIVERGENCE_NAMES, get_divergence
from hf_distill.losses.divergences import divergence_and_grad


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@pytest.mark.parametrize("mix", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_hand_written_gradient_matches_autograd(name, mix, temperature):
    if name.startswith("skew") and mix >= 0.9:
        mix = 0.5
    torch.manual_seed(0)
    student_logits = (3 * torch.randn(6, 40, dtype=torch.float64)).requires_grad_()
    teacher_logits = 3 * torch.randn(6, 40, dtype=torch.float64)
    u = student_logits / temperature
    s = torch.log_softmax(u, -1)
    t = torch.log_softmax(teacher_logits / temperature, -1)
    expected = get_divergence(name, beta=mix, skew_alpha=mix)(s, t)
    (expected_grad,) = torch.autograd.grad(expected.sum(), student_logits)

    values, g = divergence_and_grad(name, s.detach(), t, s.detach().exp(), beta=mix, skew_alpha=mix)
    p = s.detach().exp()
    grad = (g - p * g.sum(-1, keepdim=True)) / temperature
    torch.testing.assert_close(values, expected.detach())
    torch.testing.assert_close(grad, expected_grad)


def test_unknown_name():
    x = torch.log_softmax(torch.randn(2, 5), -1)
    with pytest.raises(ValueError, match="Unknown divergence"):
        divergence_and_grad("kl", x, x, x.exp())

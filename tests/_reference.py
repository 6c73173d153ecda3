"""Naive reference implementations used by the loss tests.

Everything here is written from the definitions in the most literal way: explicit softmax probabilities, explicit sums
over the vocabulary of `p * log(p / q)`, explicit mixture distributions, full `[tokens x vocab]` logits. Nothing here
calls `hf_distill` or `torch.nn.functional`, so the tests compare the library against an independent implementation.
All computation is done in float64 whatever the input dtype (autograd still flows back to the inputs).
"""

from __future__ import annotations

import torch


def naive_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """p_v = exp(z_v / T) / sum_w exp(z_w / T), in float64."""
    e = torch.exp(logits.double() / temperature)
    return e / e.sum(-1, keepdim=True)


def naive_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v * log(p_v / q_v), with 0 * log(0 / q) = 0 (also for q = 0), +inf where p_v > q_v = 0."""
    # where p_v = 0 the term is 0 whatever q_v; writing log(1 / 1) there keeps autograd free of 0 * inf
    live = p > 0
    p_in_log = torch.where(live, p, torch.ones_like(p))
    q_in_log = torch.where(live, q, torch.ones_like(q))
    return torch.where(live, p * torch.log(p_in_log / q_in_log), torch.zeros_like(p)).sum(-1)


def naive_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_v p_v log p_v of softmax(logits) at T = 1, with 0 log 0 = 0, in float64."""
    p = naive_softmax(logits, 1.0)
    live = p > 0
    return -torch.where(live, p * torch.log(torch.where(live, p, torch.ones_like(p))), torch.zeros_like(p)).sum(-1)


def naive_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> torch.Tensor:
    """Per-token divergence from the definitions (float64, not multiplied by T^2)."""
    p_s = naive_softmax(student_logits, temperature)
    p_t = naive_softmax(teacher_logits, temperature)
    if divergence == "forward_kl":
        return naive_kl(p_t, p_s)
    if divergence == "reverse_kl":
        return naive_kl(p_s, p_t)
    if divergence == "generalized_jsd":
        # TRL convention: the end points are the plain KLs (the mixture formula itself would give 0 there).
        if beta == 0.0:
            return naive_kl(p_t, p_s)
        if beta == 1.0:
            return naive_kl(p_s, p_t)
        m = beta * p_t + (1.0 - beta) * p_s
        return beta * naive_kl(p_t, m) + (1.0 - beta) * naive_kl(p_s, m)
    if divergence == "total_variation":
        return 0.5 * (p_t - p_s).abs().sum(-1)
    if divergence == "skew_kl":
        m = skew_alpha * p_t + (1.0 - skew_alpha) * p_s
        return naive_kl(p_t, m)
    if divergence == "skew_reverse_kl":
        m = skew_alpha * p_s + (1.0 - skew_alpha) * p_t
        return naive_kl(p_s, m)
    raise KeyError(divergence)


def naive_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Full logits `softcap * tanh(scale * (h @ W^T + b) / softcap)`, in float64."""
    raw = hidden.double() @ weight.double().t()
    if bias is not None:
        raw = raw + bias.double()
    raw = raw * logit_scale
    if softcap is not None:
        raw = softcap * torch.tanh(raw / softcap)
    return raw


def naive_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum over tokens with label != -100 of -log softmax(logits)[label], at T = 1 over all columns."""
    p = naive_softmax(logits, 1.0)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(labels.shape[0]):
        label = int(labels[i])
        if label != -100:
            total = total - torch.log(p[i, label])
    return total


def naive_cross_entropy_variant_sum(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, ce_loss_type: str = "nll"
) -> torch.Tensor:
    """Sum over tokens with label != -100 of the CE variant, at T = 1 over all V columns.

    `"nll"`: `(1 - eps) * (-log p_label) + eps * (1 / V) * sum_v (-log p_v)` (plain NLL at eps = 0).
    `"dft"`: `(-log p_label) * p_label`, with `p_label` a constant (detached) and the term 0 where `p_label` is 0.
    """
    p = naive_softmax(logits, 1.0)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(labels.shape[0]):
        label = int(labels[i])
        if label == -100:
            continue
        nll = -torch.log(p[i, label])
        if ce_loss_type == "dft":
            weight = p[i, label].detach()
            if weight > 0:
                total = total + nll * weight
        else:
            uniform = -torch.log(p[i]).sum() / p.shape[-1]
            total = total + (1.0 - label_smoothing) * nll + (label_smoothing * uniform if label_smoothing else 0.0)
    return total


def naive_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    divergence: str,
    temperature: float,
    alpha: float,
    beta: float,
    skew_alpha: float,
    vocab_size: int,
    normaliser: float | None = None,
    label_smoothing: float = 0.0,
    ce_loss_type: str = "nll",
) -> dict:
    """Reference for `chunked_distillation_loss` from full logits.

    With `labels`, only the rows whose label is not -100 are scored (divergence, CE, agreement, accuracy, entropy);
    without, every row. `normaliser` defaults to the number of scored rows (at least 1).

    Returns a dict with `loss`, `distill_sum`, `ce_sum` (plain NLL), `ce_loss_sum` (the CE variant in the loss),
    `agree_count`, `correct_count`, `entropy_sum` and `num_tokens`.
    """
    teacher_logits = teacher_logits.detach()
    if labels is not None:
        scored = [i for i in range(labels.shape[0]) if int(labels[i]) != -100]
        rows = torch.tensor(scored, dtype=torch.long)
        student_logits, teacher_logits, labels = student_logits[rows], teacher_logits[rows], labels[rows]
    num_tokens = student_logits.shape[0]
    if normaliser is None:
        normaliser = float(max(num_tokens, 1))
    per_token = naive_divergence(
        student_logits[:, :vocab_size],
        teacher_logits[:, :vocab_size],
        divergence,
        temperature=temperature,
        beta=beta,
        skew_alpha=skew_alpha,
    )
    distill_sum = per_token.sum()
    ce_sum = naive_cross_entropy_sum(student_logits, labels) if labels is not None else None
    ce_loss_sum = None
    if labels is not None:
        ce_loss_sum = naive_cross_entropy_variant_sum(student_logits, labels, label_smoothing, ce_loss_type)
    loss = torch.zeros((), dtype=torch.float64)
    if alpha != 1.0:
        loss = loss + (1.0 - alpha) * temperature**2 * distill_sum
    if alpha != 0.0:
        loss = loss + alpha * ce_loss_sum
    loss = loss / normaliser

    student_top1 = student_logits[:, :vocab_size].detach().argmax(-1)
    teacher_top1 = teacher_logits[:, :vocab_size].argmax(-1)
    agree_count = int((student_top1 == teacher_top1).sum())
    correct_count = None
    if labels is not None:
        full_top1 = student_logits.detach().argmax(-1)
        correct_count = sum(int(full_top1[i]) == int(labels[i]) for i in range(labels.shape[0]))
    return {
        "loss": loss,
        "distill_sum": distill_sum,
        "ce_sum": ce_sum,
        "ce_loss_sum": ce_loss_sum,
        "agree_count": agree_count,
        "correct_count": correct_count,
        "entropy_sum": naive_entropy(student_logits.detach()).sum(),
        "num_tokens": num_tokens,
    }

"""Token-chunked distillation loss from last hidden states and LM heads.

Neither model's full `[tokens x vocab]` logits ever exist: the student's and the teacher's logits are built for
`chunk_size` tokens at a time, the loss and its gradient with respect to that tile are computed right away, and the
tile is dropped. The gradient with respect to the student's hidden states and LM head (weight and bias) is
written out by hand (see `divergence_and_grad`) and accumulated during the forward pass, so the backward pass is a
scaling of stored tensors: each tile is projected once (TRL's chunked kernel projects it twice more in backward).

The hard-label cross-entropy, the distillation term, the teacher-student top-1 agreement and the student's token
accuracy are all read off the same tile, so mixing in the CE term costs no extra projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .divergences import divergence_and_grad
from .lm_head import LMHead

DEFAULT_TILE_BYTES = 64 * 2**20
"""Target size of one float32 `[chunk, vocab]` logits tile when `chunk_size` is left to choose itself."""


class TeacherLogits(Protocol):
    """Where the teacher's logits for a range of (already selected) tokens come from."""

    @property
    def vocab_rows(self) -> int:
        """Number of vocabulary columns the teacher's logits have."""
        ...

    def logits(self, start: int, end: int) -> torch.Tensor:
        """Teacher logits (float32, final: scaled and soft-capped) for tokens `start:end`, shape `[end-start, V_t]`."""
        ...


@dataclass
class HiddenStateTeacher:
    """Teacher logits projected on demand from the teacher's last hidden states and its LM head.

    Args:
        hidden (`torch.Tensor`): Teacher hidden states of the selected tokens, shape `[N, H_t]`.
        head ([`LMHead`]): The teacher's LM head.
        device (`torch.device`, *optional*): Device the logits are returned on (the student's), when the teacher
            lives elsewhere.
    """

    hidden: torch.Tensor
    head: LMHead
    device: torch.device | None = None

    @property
    def vocab_rows(self) -> int:
        return self.head.vocab_rows

    def logits(self, start: int, end: int) -> torch.Tensor:
        with torch.no_grad():
            out = self.head.logits(self.hidden[start:end])
        return out if self.device is None else out.to(self.device, non_blocking=True)


@dataclass
class DenseTeacher:
    """Teacher logits that already exist in memory (tests, or small vocabularies), shape `[N, V_t]`."""

    logits_tensor: torch.Tensor

    @property
    def vocab_rows(self) -> int:
        return self.logits_tensor.shape[-1]

    def logits(self, start: int, end: int) -> torch.Tensor:
        return self.logits_tensor[start:end].detach().float()


@dataclass
class DistillationLossOutput:
    """Result of [`chunked_distillation_loss`].

    Attributes:
        loss (`torch.Tensor`): Scalar training loss `(alpha * CE_sum + (1 - alpha) * T^2 * D_sum) / normaliser`,
            differentiable with respect to the student hidden states and LM head.
        distill_sum (`torch.Tensor`): Sum over tokens of the divergence at temperature `T`, before `T^2` and weights.
        ce_sum (`torch.Tensor` or `None`): Sum over tokens of the student's cross-entropy on the labels (at `T = 1`),
            `None` without labels.
        agree_count (`torch.Tensor`): Number of tokens where the student's and teacher's top-1 tokens agree.
        correct_count (`torch.Tensor` or `None`): Number of tokens where the student's top-1 token is the label.
        num_tokens (`int`): Number of tokens scored.
    """

    loss: torch.Tensor
    distill_sum: torch.Tensor
    ce_sum: torch.Tensor | None
    agree_count: torch.Tensor
    correct_count: torch.Tensor | None
    num_tokens: int


@dataclass
class _Job:
    head: LMHead
    teacher: TeacherLogits
    labels: torch.Tensor | None
    divergence: str
    temperature: float
    alpha: float
    beta: float
    skew_alpha: float
    vocab_size: int
    normaliser: float
    chunk_size: int
    stats: dict = field(default_factory=dict)

    def run(self, hidden: torch.Tensor, needs_grad: tuple[bool, bool, bool]):
        head, device = self.head, hidden.device
        n_tokens, v, t = hidden.shape[0], self.vocab_size, self.temperature
        kd_scale = (1.0 - self.alpha) * t / self.normaliser  # d(T^2 * D)/dz = T * dD/du, with u = z / T
        ce_scale = self.alpha / self.normaliser
        want_grad = any(needs_grad)
        grad_hidden = torch.zeros(hidden.shape, device=device, dtype=torch.float32) if needs_grad[0] else None
        grad_weight = torch.zeros(head.weight.shape, device=device, dtype=torch.float32) if needs_grad[1] else None
        grad_bias = torch.zeros(head.bias.shape, device=device, dtype=torch.float32) if needs_grad[2] else None
        zero = torch.zeros((), device=device, dtype=torch.float64)
        distill_sum, ce_sum, agree, correct = (zero.clone() for _ in range(4))

        for start in range(0, n_tokens, self.chunk_size):
            end = min(start + self.chunk_size, n_tokens)
            h = hidden[start:end].detach()
            raw = head.project(h)
            student = head.transform(raw)
            teacher = self.teacher.logits(start, end)
            s_log_probs = torch.log_softmax(student[:, :v] / t if t != 1.0 else student[:, :v], dim=-1)
            t_log_probs = torch.log_softmax(teacher[:, :v] / t if t != 1.0 else teacher[:, :v], dim=-1)
            s_probs = s_log_probs.exp()
            values, grad = divergence_and_grad(
                self.divergence, s_log_probs, t_log_probs, s_probs, self.beta, self.skew_alpha
            )
            distill_sum += values.sum().double()
            student_top1 = student[:, :v].argmax(-1)
            agree += (student_top1 == teacher[:, :v].argmax(-1)).sum()
            del t_log_probs, teacher
            if want_grad:  # dD/du = G - p * sum(G), u = z / T
                grad.sub_(s_probs * grad.sum(-1, keepdim=True)).mul_(kd_scale)
                if v < student.shape[-1]:
                    grad = torch.cat([grad, grad.new_zeros(grad.shape[0], student.shape[-1] - v)], dim=-1)
            if self.labels is not None:
                labels = self.labels[start:end]
                valid = labels != -100
                safe = labels.clamp(min=0).unsqueeze(-1)
                if t == 1.0 and v == student.shape[-1]:
                    ce_log_probs, ce_probs = s_log_probs, s_probs
                else:
                    ce_log_probs = torch.log_softmax(student, dim=-1)
                    ce_probs = ce_log_probs.exp() if want_grad and ce_scale else None
                token_nll = -ce_log_probs.gather(-1, safe).squeeze(-1)
                ce_sum += torch.where(valid, token_nll, torch.zeros_like(token_nll)).sum().double()
                top1 = student_top1 if v == student.shape[-1] else student.argmax(-1)
                correct += ((top1 == labels) & valid).sum()
                if want_grad and ce_scale:  # dCE/dz = softmax(z) - onehot(label), on valid rows
                    ce_grad = ce_probs * valid.unsqueeze(-1)
                    ce_grad.scatter_add_(-1, safe, -valid.to(ce_grad.dtype).unsqueeze(-1))
                    grad.add_(ce_grad, alpha=ce_scale)
                    del ce_grad
                del ce_log_probs, ce_probs
            del s_log_probs, s_probs
            if want_grad:
                if head.softcap is not None:  # z = c * tanh(scale * raw / c): dz/draw = scale * (1 - (z / c)^2)
                    grad.mul_(1.0 - (student / head.softcap).square_())
                if head.logit_scale != 1.0:
                    grad.mul_(head.logit_scale)
                g = grad.to(head.weight.dtype)
                if grad_hidden is not None:
                    grad_hidden[start:end] = (g @ head.weight).float()
                if grad_weight is not None:
                    grad_weight.addmm_(g.t().float(), h.float())
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
            del student, raw, grad

        loss = (
            (1.0 - self.alpha) * t * t * distill_sum + self.alpha * (ce_sum if self.labels is not None else 0.0)
        ) / self.normaliser
        self.stats = {
            "distill_sum": distill_sum.float(),
            "ce_sum": ce_sum.float() if self.labels is not None else None,
            "agree_count": agree,
            "correct_count": correct if self.labels is not None else None,
        }
        return loss.to(torch.float32), (grad_hidden, grad_weight, grad_bias)


class _ChunkedDistillationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, job: _Job):
        loss, grads = job.run(hidden, tuple(ctx.needs_input_grad[:3]))
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        scale = grad_output.float()
        out = []
        for grad, dtype in zip(ctx.grads, ctx.dtypes):
            out.append(None if grad is None else (grad * scale).to(dtype))
        ctx.grads = None
        return (*out, None)


def auto_chunk_size(num_tokens: int, vocab_rows: int, tile_bytes: int = DEFAULT_TILE_BYTES) -> int:
    """Tokens per chunk so that one float32 `[chunk, vocab]` tile is about `tile_bytes`."""
    return max(1, min(num_tokens, max(16, tile_bytes // (4 * max(vocab_rows, 1)))))


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher: TeacherLogits,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    vocab_size: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> DistillationLossOutput:
    """Distillation loss over selected tokens, computed a chunk of tokens at a time.

    `loss = (alpha * sum_tokens CE + (1 - alpha) * temperature**2 * sum_tokens D_T(student || teacher)) / n`, where
    `D_T` is the chosen divergence between the distributions at temperature `T` over the first `vocab_size` columns,
    CE is the student's cross-entropy on `labels` at `T = 1` over all its rows, and `n` is `num_items_in_batch` (the
    token count of the whole accumulated batch, for exact gradient accumulation) or the number of tokens here.

    Args:
        student_hidden (`torch.Tensor`): Student last hidden states of the tokens to score, shape `[N, H_s]`.
        student_head ([`LMHead`]): The student's LM head.
        teacher ([`TeacherLogits`]): Source of the teacher's logits for the same `N` tokens, e.g.
            [`HiddenStateTeacher`].
        labels (`torch.Tensor`, *optional*): Next-token labels, shape `[N]` (`-100` ignored). Needed when `alpha > 0`;
            also gives the CE and accuracy statistics.
        divergence (`str`, *optional*, defaults to `"forward_kl"`): One of `DIVERGENCE_NAMES`.
        temperature (`float`, *optional*, defaults to `1.0`): Distillation temperature `T > 0`.
        alpha (`float`, *optional*, defaults to `0.0`): Weight of the hard-label CE, in `[0, 1]`.
        beta (`float`, *optional*, defaults to `0.5`): Generalized JSD mixture weight.
        skew_alpha (`float`, *optional*, defaults to `0.1`): Skew (reverse) KL mixture weight.
        vocab_size (`int`, *optional*): Number of leading vocabulary columns compared; defaults to the smaller of the
            two heads' row counts when they differ only by padding.
        num_items_in_batch (`int`, `float` or `torch.Tensor`, *optional*): Loss normaliser (see above).
        chunk_size (`int`, *optional*): Tokens per chunk; by default sized so a float32 logits tile is ~64 MiB.

    Returns:
        [`DistillationLossOutput`]
    """
    if student_hidden.dim() != 2:
        raise ValueError(f"`student_hidden` must be [tokens, hidden], got shape {tuple(student_hidden.shape)}.")
    if alpha > 0.0 and labels is None:
        raise ValueError("`alpha > 0` mixes in the hard-label cross-entropy, which needs `labels`.")
    shared_rows = min(student_head.vocab_rows, teacher.vocab_rows)
    if vocab_size is None:
        vocab_size = shared_rows
    if vocab_size > shared_rows:
        raise ValueError(
            f"`vocab_size`={vocab_size} exceeds the LM heads (student {student_head.vocab_rows} rows, teacher "
            f"{teacher.vocab_rows} rows); use at most {shared_rows}."
        )
    n_tokens = student_hidden.shape[0]
    if num_items_in_batch is None:
        normaliser = float(max(n_tokens, 1))
    else:
        normaliser = float(num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
        normaliser = max(normaliser, 1.0)
    job = _Job(
        head=student_head,
        teacher=teacher,
        labels=labels,
        divergence=divergence,
        temperature=float(temperature),
        alpha=float(alpha),
        beta=float(beta),
        skew_alpha=float(skew_alpha),
        vocab_size=int(vocab_size),
        normaliser=normaliser,
        chunk_size=int(chunk_size) if chunk_size else auto_chunk_size(n_tokens, student_head.vocab_rows),
    )
    loss = _ChunkedDistillationFunction.apply(student_hidden, student_head.weight, student_head.bias, job)
    return DistillationLossOutput(loss=loss, num_tokens=n_tokens, **job.stats)

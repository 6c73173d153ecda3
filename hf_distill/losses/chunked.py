"""Token-chunked distillation loss from last hidden states and LM heads.

Neither model's full `[tokens x vocab]` logits ever exist: the student's and the teacher's logits are built for
`chunk_size` tokens at a time, the loss and its gradient with respect to that tile are computed right away, and the
tile is dropped. The gradient with respect to the student's hidden states and LM head (weight and bias) is
written out by hand (see `divergence_and_grad`) and accumulated during the forward pass, so the backward pass is a
scaling of stored tensors: each tile is projected once (TRL's chunked kernel projects it twice more in backward).

The hard-label cross-entropy (plain, label-smoothed or DFT), the distillation term, the teacher-student top-1
agreement, the student's token accuracy and its entropy are all read off the same tile, so mixing in the CE term or
logging the statistics costs no extra projection.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from .divergences import divergence_and_grad
from .lm_head import LMHead
from .loss_output import DistillationLossOutput
from .sparse import TopKTeacher, check_top_k_teacher, sparse_divergence_and_grad
from .teacher_logits import TeacherLogits, select_teacher_rows

DEFAULT_TILE_BYTES = 16 * 2**20
"""Target size of one float32 `[chunk, vocab]` logits tile when `chunk_size` is left to choose itself. A chunk holds
about 3 (top-k targets) to 6 (live teacher, generalized JSD) such tiles at its peak."""

MIN_AUTO_CHUNK = 64
"""Fewest tokens of an automatically sized chunk (unless the batch has fewer): smaller chunks are slower (CPU: 25-40 %
slower at 32 tokens than at 64-256; GPU: more kernel launches), so large vocabularies get tiles above the target."""

IGNORE_INDEX = -100
"""Label of a token that is not scored (the transformers convention)."""

CE_LOSS_TYPES = ("nll", "dft")
"""Values accepted by the `ce_loss_type` argument of [`chunked_distillation_loss`]."""


@dataclass
class _Job:
    head: LMHead
    teacher: TeacherLogits | TopKTeacher
    labels: torch.Tensor | None  # every label is scored (no -100): ignored rows are dropped before
    divergence: str
    temperature: float
    alpha: float
    beta: float
    skew_alpha: float
    vocab_size: int
    normaliser: float
    chunk_size: int
    label_smoothing: float = 0.0
    ce_loss_type: str = "nll"
    sparse_targets: str | None = None  # the mode with a `TopKTeacher`, None with dense logits
    stats: dict = field(default_factory=dict)

    def run(
        self, hidden: torch.Tensor, needs_grad: tuple[bool, bool, bool]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
        """The loss and the gradients of `loss` with respect to (hidden, head weight, head bias), where needed."""
        head, device = self.head, hidden.device
        n_tokens, v, t = hidden.shape[0], self.vocab_size, self.temperature
        alpha, eps, dft = self.alpha, self.label_smoothing, self.ce_loss_type == "dft"
        has_labels = self.labels is not None
        use_ce = has_labels and alpha != 0.0
        kd_scale = (1.0 - alpha) * t / self.normaliser  # d(T^2 * D)/dz = T * dD/du, with u = z / T
        ce_scale = alpha / self.normaliser
        want_grad = any(needs_grad)
        grad_hidden = torch.zeros(hidden.shape, device=device, dtype=torch.float32) if needs_grad[0] else None
        grad_weight = torch.zeros(head.weight.shape, device=device, dtype=torch.float32) if needs_grad[1] else None
        grad_bias = torch.zeros(head.bias.shape, device=device, dtype=torch.float32) if needs_grad[2] else None
        zero = torch.zeros((), device=device, dtype=torch.float64)
        distill_sum, ce_sum, ce_loss_sum, entropy_sum, agree, correct = (zero.clone() for _ in range(6))

        for start in range(0, n_tokens, self.chunk_size):
            end = min(start + self.chunk_size, n_tokens)
            h = hidden[start:end].detach()
            raw = head.project(h)
            student = head.transform(raw)
            rows = student.shape[-1]
            full = v == rows
            compared = student if full else student[:, :v]
            s_log_probs = torch.log_softmax(compared / t if t != 1.0 else compared, dim=-1)
            student_top1 = s_log_probs.argmax(-1)  # the argmax of `compared` (log_softmax keeps the order)
            # The logits tile is needed later only for CE or entropy over more columns than compared, or soft-capping
            if full and head.softcap is None:
                raw = student = compared = None
            s_probs = s_log_probs.exp()
            if self.sparse_targets is None:
                teacher = self.teacher.logits(start, end)[:, :v]
                t_log_probs = torch.log_softmax(teacher / t if t != 1.0 else teacher, dim=-1)
                del teacher
                teacher_top1 = t_log_probs.argmax(-1)
                values, grad = divergence_and_grad(
                    self.divergence, s_log_probs, t_log_probs, s_probs, self.beta, self.skew_alpha
                )
                del t_log_probs
                if want_grad and kd_scale:  # dD/du = G - p * sum(G), u = z / T
                    grad.addcmul_(s_probs, grad.sum(-1, keepdim=True), value=-1.0)
            else:  # top-k targets: values and dD/du from the [n, k] teacher tile (see `sparse_divergence_and_grad`)
                ids, t_log_probs, t_rest = self.teacher.rows(start, end, device)
                values, grad = sparse_divergence_and_grad(
                    self.sparse_targets,
                    self.divergence,
                    s_log_probs,
                    s_probs,
                    ids,
                    t_log_probs,
                    t_rest,
                    self.beta,
                    self.skew_alpha,
                    need_grad=want_grad and bool(kd_scale),
                )
                teacher_top1 = ids.gather(-1, t_log_probs.argmax(-1, keepdim=True)).squeeze(-1)
                del ids, t_log_probs, t_rest
            distill_sum += values.sum().double()
            agree += (student_top1 == teacher_top1).sum()
            del values, teacher_top1
            if want_grad:
                if kd_scale:
                    grad.mul_(kd_scale)
                    if not full:
                        grad = torch.cat([grad, grad.new_zeros(grad.shape[0], rows - v)], dim=-1)
                else:  # alpha = 1: the divergence is only logged (and its gradient, maybe not finite, unused)
                    grad = s_log_probs.new_zeros(s_log_probs.shape[0], rows)
            # The student's full next-token distribution at T = 1 (CE, entropy): the tile's when it is the same one
            if t == 1.0 and full:
                log_probs, probs = s_log_probs, s_probs
                del s_log_probs, s_probs
            else:  # T = 1 from the logits, or from T * log p_T (the logits up to a shift per row) once they are freed
                source = student if student is not None else s_log_probs.mul_(t)
                del s_log_probs, s_probs  # before the T = 1 tiles are made
                if has_labels:
                    log_probs = torch.log_softmax(source, dim=-1)
                    probs = log_probs.exp()
                else:
                    log_probs, probs = None, torch.softmax(source, dim=-1)
                del source
            if has_labels:
                labels = self.labels[start:end]
                index = labels.unsqueeze(-1)
                token_nll = -log_probs.gather(-1, index).squeeze(-1)
                ce_sum += token_nll.sum().double()
                top1 = student_top1 if full else student.argmax(-1)
                correct += (top1 == labels).sum()
                if use_ce and dft:  # DFT: nll * p_label, p_label a constant; 0 where p_label is 0
                    p_label = token_nll.neg().exp()
                    ce_loss_sum += (token_nll * p_label).masked_fill_(p_label == 0, 0.0).sum().double()
                elif use_ce and eps:  # (1 - eps) nll + eps mean_v(-log p_v), like transformers' LabelSmoother
                    uniform_nll = log_probs.sum(-1).double().neg_().div_(rows)
                    ce_loss_sum += ((1.0 - eps) * token_nll.double() + eps * uniform_nll).sum()
                if want_grad and use_ce:
                    # nll: p - onehot; smoothed: p - (1 - eps) onehot - eps / V; DFT: p_label (p - onehot)
                    if dft:
                        grad.addcmul_(probs, p_label.unsqueeze(-1), value=ce_scale)
                        label_grad = (p_label * -ce_scale).unsqueeze(-1)
                    else:
                        grad.add_(probs, alpha=ce_scale)
                        if eps:
                            grad.sub_(eps * ce_scale / rows)
                        label_grad = grad.new_full(index.shape, -(1.0 - eps) * ce_scale)
                    grad.scatter_add_(-1, index, label_grad.to(grad.dtype))
                del token_nll
            # -sum p log p, 0 where p is 0; in place on the log-probs, which nothing reads after this
            if log_probs is None:
                entropy_sum += torch.special.entr(probs).sum().double()
            else:
                entropy_sum -= log_probs.mul_(probs).masked_fill_(probs == 0, 0.0).sum().double()
            del log_probs, probs
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
                del g, grad
            del student, raw

        if use_ce and not dft and not eps:
            ce_loss_sum = ce_sum
        # each term only when its weight is non-zero: 0 * inf would make the loss nan
        loss = zero.clone()
        if alpha != 1.0:
            loss += (1.0 - alpha) * t * t * distill_sum
        if use_ce:
            loss += alpha * ce_loss_sum
        loss /= self.normaliser
        self.stats = {
            "distill_sum": distill_sum.float(),
            "ce_sum": ce_sum.float() if has_labels else None,
            "agree_count": agree,
            "correct_count": correct if has_labels else None,
            "entropy_sum": entropy_sum.float(),
        }
        return loss.to(torch.float32), (grad_hidden, grad_weight, grad_bias)


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _ChunkedDistillationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, job: _Job):
        loss, grads = job.run(hidden, tuple(ctx.needs_input_grad[:3]))
        # Saved through autograd (intermediate tensors and None are allowed), not as a ctx attribute: autograd frees
        # them after a backward without `retain_graph` and keeps them for another backward with it.
        ctx.save_for_backward(*grads)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        scale = grad_output.float()
        grads = ctx.saved_tensors
        out = [None if grad is None else (grad * scale).to(dtype) for grad, dtype in zip(grads, ctx.dtypes)]
        return (*out, None)


def auto_chunk_size(num_tokens: int, vocab_rows: int, tile_bytes: int = DEFAULT_TILE_BYTES) -> int:
    """Tokens per chunk so that one float32 `[chunk, vocab]` tile is about `tile_bytes`, but at least
    `MIN_AUTO_CHUNK` tokens and at most `num_tokens`."""
    return max(1, min(num_tokens, max(MIN_AUTO_CHUNK, tile_bytes // (4 * max(vocab_rows, 1)))))


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher: TeacherLogits | TopKTeacher,
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
    label_smoothing: float = 0.0,
    ce_loss_type: str = "nll",
    sparse_targets: str = "bucket",
    labels_all_scored: bool = False,
) -> DistillationLossOutput:
    """Distillation loss over selected tokens, computed a chunk of tokens at a time.

    `loss = (alpha * sum_tokens CE + (1 - alpha) * temperature**2 * sum_tokens D_T(student || teacher)) / n`, where
    `D_T` is the chosen divergence between the distributions at temperature `T` over the first `vocab_size` columns,
    CE is the student's cross-entropy on `labels` at `T = 1` over all its rows, and `n` is `num_items_in_batch` (the
    token count of the whole accumulated batch, for exact gradient accumulation) or the number of tokens scored here.

    When `labels` are given, the rows whose label is `-100` are not scored at all: no divergence, CE, agreement,
    accuracy or entropy, a zero gradient, and they do not count in `num_tokens` or the default `n` (a single check
    when there is none). Without labels every row is scored.

    The CE term per token is, for `ce_loss_type="nll"`, `(1 - label_smoothing) * nll + label_smoothing *
    mean_v(-log p_v)` with the mean over all the student's LM-head rows (exactly transformers' `LabelSmoother`; the
    plain NLL at `label_smoothing=0`), and for `ce_loss_type="dft"` (Dynamic Fine-Tuning, arXiv 2508.05629, TRL's
    `SFTTrainer(loss_type="dft")`) `nll * p_label`, with `p_label = exp(-nll)` held constant (detached). The output's
    `ce_sum` is the plain NLL sum whichever variant the loss uses.

    Zero probabilities (`-inf` logits in either model) follow `0 * log 0 = 0`: see [`divergence_and_grad`]. A
    divergence that is infinite by definition (e.g. forward KL with a student logit of `-inf` where the teacher has
    mass) makes the loss `+inf`.

    A [`TopKTeacher`] (the teacher's top-k log-probs, e.g. from a cache) replaces the teacher's logits: the divergence
    is then taken over `k + 1` buckets (the k ids and the rest, `sparse_targets="bucket"`) or over the k ids
    renormalised (`"renormalize"`), see [`sparse_divergence_and_grad`]; `temperature` must be the one the log-probs
    were computed at. The agreement statistic uses the id with the largest teacher log-prob; everything else (CE,
    accuracy, entropy) only involves the student and is unchanged. With `k = vocab_size` both modes give the dense
    loss.

    Args:
        student_hidden (`torch.Tensor`): Student last hidden states of the tokens to score, shape `[N, H_s]`.
        student_head ([`LMHead`]): The student's LM head.
        teacher ([`TeacherLogits`] or [`TopKTeacher`]): Source of the teacher's logits for the same `N` tokens, e.g.
            [`HiddenStateTeacher`], or the teacher's top-k targets for them.
        labels (`torch.Tensor`, *optional*): Next-token labels, shape `[N]`; rows labelled `-100` are ignored (see
            above). Needed when `alpha > 0`; also gives the CE and accuracy statistics.
        divergence (`str`, *optional*, defaults to `"forward_kl"`): One of `DIVERGENCE_NAMES`.
        temperature (`float`, *optional*, defaults to `1.0`): Distillation temperature `T > 0`.
        alpha (`float`, *optional*, defaults to `0.0`): Weight of the hard-label CE, in `[0, 1]`.
        beta (`float`, *optional*, defaults to `0.5`): Generalized JSD mixture weight.
        skew_alpha (`float`, *optional*, defaults to `0.1`): Skew (reverse) KL mixture weight.
        vocab_size (`int`, *optional*): Number of leading vocabulary columns compared; defaults to the smaller of the
            two heads' row counts when they differ only by padding.
        num_items_in_batch (`int`, `float` or `torch.Tensor`, *optional*): Loss normaliser (see above).
        chunk_size (`int`, *optional*): Tokens per chunk; by default sized so a float32 logits tile is ~16 MiB
            (at least 64 tokens).
        label_smoothing (`float`, *optional*, defaults to `0.0`): Label-smoothing factor of the CE term, in
            `[0, 1]` (see above). Only with `ce_loss_type="nll"`.
        ce_loss_type (`str`, *optional*, defaults to `"nll"`): CE variant, `"nll"` or `"dft"` (see above).
        sparse_targets (`str`, *optional*, defaults to `"bucket"`): With a [`TopKTeacher`], how the mass outside the
            top-k is treated: `"bucket"` or `"renormalize"` (see above). Ignored for dense teachers.
        labels_all_scored (`bool`, *optional*, defaults to `False`): The caller guarantees that no label is `-100`
            (e.g. it selected the scored tokens itself), so the loss skips counting them, which reads a value back
            from the accelerator (a host sync).

    Returns:
        [`DistillationLossOutput`]

    Raises:
        ValueError: On a `student_hidden` that is not 2-D, `labels` not of shape `[N]`, `alpha > 0` without labels,
            a `vocab_size` larger than either head, an unknown `ce_loss_type`, a `label_smoothing` outside `[0, 1]`,
            or `label_smoothing > 0` with `ce_loss_type="dft"`; with a [`TopKTeacher`], an unknown `sparse_targets`, a
            `temperature` other than the teacher's, `k > vocab_size` or a (scored) token id `>= vocab_size`.
    """
    if student_hidden.dim() != 2:
        raise ValueError(f"`student_hidden` must be [tokens, hidden], got shape {tuple(student_hidden.shape)}.")
    if alpha > 0.0 and labels is None:
        raise ValueError("`alpha > 0` mixes in the hard-label cross-entropy, which needs `labels`.")
    if ce_loss_type not in CE_LOSS_TYPES:
        raise ValueError(f"`ce_loss_type` must be one of {', '.join(map(repr, CE_LOSS_TYPES))}, got {ce_loss_type!r}.")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1], got {label_smoothing}.")
    if label_smoothing > 0.0 and ce_loss_type == "dft":
        raise ValueError(
            "`label_smoothing` applies to the plain (`ce_loss_type='nll'`) cross-entropy only; TRL ignores it with "
            "`loss_type='dft'`. Pass `label_smoothing=0.0` with `ce_loss_type='dft'`."
        )
    shared_rows = min(student_head.vocab_rows, teacher.vocab_rows)
    if vocab_size is None:
        vocab_size = shared_rows
    if vocab_size > shared_rows:
        raise ValueError(
            f"`vocab_size`={vocab_size} exceeds the LM heads (student {student_head.vocab_rows} rows, teacher "
            f"{teacher.vocab_rows} rows); use at most {shared_rows}."
        )
    n_tokens = student_hidden.shape[0]
    if labels is not None:
        if labels.shape != (n_tokens,):
            raise ValueError(
                f"`labels` must have shape [N] = [{n_tokens}] like `student_hidden`, got {tuple(labels.shape)}."
            )
        scored = None if labels_all_scored else labels != IGNORE_INDEX
        n_scored = n_tokens if scored is None else int(scored.sum())  # a host sync; nothing else when all are scored
        if n_scored < n_tokens:
            index = scored.nonzero().squeeze(-1)
            student_hidden = student_hidden.index_select(0, index.to(student_hidden.device))  # autograd scatters back
            labels = labels.index_select(0, index)
            teacher = select_teacher_rows(teacher, index)
            n_tokens = n_scored
    divisor = None  # a tensor normaliser divides the loss after the function: autograd scales the gradients, no sync
    if num_items_in_batch is None:
        normaliser = float(max(n_tokens, 1))
    elif torch.is_tensor(num_items_in_batch):
        normaliser = 1.0
        divisor = num_items_in_batch.detach().to(student_hidden.device, torch.float32).clamp(min=1.0)
    else:
        normaliser = max(float(num_items_in_batch), 1.0)
    sparse = isinstance(teacher, TopKTeacher)
    if sparse:
        check_top_k_teacher(teacher, temperature, sparse_targets, int(vocab_size))
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
        label_smoothing=float(label_smoothing),
        ce_loss_type=ce_loss_type,
        sparse_targets=sparse_targets if sparse else None,
    )
    if not torch.is_grad_enabled():  # evaluation: `needs_input_grad` ignores the grad mode, so skip the function
        loss, _ = job.run(student_hidden, (False, False, False))
        return DistillationLossOutput(
            loss=loss if divisor is None else loss / divisor, num_tokens=n_tokens, **job.stats
        )
    with contextlib.ExitStack() as stack:
        # The stored gradients are saved tensors of the function, which are needed as soon as backward starts (like
        # the LM head's activations, which TRL's activation offloading exempts the same way): identity hooks on top
        # keep any enclosing saved-tensor hooks (offloading to CPU) off them.
        try:
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_unchanged, _unchanged))
        except RuntimeError:  # saved-tensor hooks are disabled here (e.g. under vmap): nothing to keep off
            pass
        loss = _ChunkedDistillationFunction.apply(student_hidden, student_head.weight, student_head.bias, job)
    if divisor is not None:
        loss = loss / divisor
    return DistillationLossOutput(loss=loss, num_tokens=n_tokens, **job.stats)

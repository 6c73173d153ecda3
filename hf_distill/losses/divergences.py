"""Per-token divergences between a student's and a teacher's next-token distributions.

Every function here takes normalised log-probabilities of shape `[..., V]` (the output of `log_softmax`) and returns
one value per token, shape `[...]`. They hold no state and know nothing about models or trainers, so the chunked loss,
the teacher cache and the tests can all call them on any tile of tokens.

Conventions (the same as TRL's GKD and DistillationTrainer):

- `forward_kl` is KL(teacher || student), the classic Hinton distillation loss (mode-covering).
- `reverse_kl` is KL(student || teacher) (mode-seeking, MiniLLM).
- `generalized_jsd` with `0 < beta < 1` mixes `m = beta * p_teacher + (1 - beta) * p_student` and returns
  `beta * KL(teacher || m) + (1 - beta) * KL(student || m)`. That mixture formula is 0 at both end points, so, like
  TRL, `beta <= 0` is special-cased to the forward KL and `beta >= 1` to the reverse KL.
- `total_variation` is `0.5 * sum |p_teacher - p_student|`.
- `skew_kl` is KL(teacher || skew_alpha * p_teacher + (1 - skew_alpha) * p_student) and `skew_reverse_kl` is
  KL(student || skew_alpha * p_student + (1 - skew_alpha) * p_teacher) (DistiLLM, arXiv 2402.03898).

Zero probabilities (`-inf` logits, e.g. masked or banned tokens, in either model) follow `0 * log 0 = 0` and
`0 * log(0 / q) = 0`: every divergence whose definition is finite gives that finite value and a finite gradient. The
one case that is infinite by definition is KL(a || b) where `a` has mass on a token that `b` rules out: the forward
KL (and `generalized_jsd` at `beta = 0`, `skew_kl` at `skew_alpha = 0`) when the *student* is `-inf` where the teacher
has mass, the reverse KL (and `beta = 1`, `skew_reverse_kl` at `skew_alpha = 0`) when the *teacher* is `-inf` where
the student has mass. These return `+inf`, not a clipped number, so that a masking mismatch shows. The forward KL's
gradient stays finite there (with respect to the scaled logits it is `p_s - p_t`, the limit); the reverse KL's
is not finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

DIVERGENCE_NAMES = ("forward_kl", "reverse_kl", "generalized_jsd", "total_variation", "skew_kl", "skew_reverse_kl")
"""Names accepted by [`token_divergence`] and `DistillationConfig.divergence`."""


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    # sum_v p (log p - log q), with the term 0 where p is 0 whatever q. The difference is zeroed *before* the product
    # (not the product after), so that autograd never multiplies a 0 by the inf or nan of `-inf - (-inf)`. `p == 0`
    # (not `p > 0`) keeps a nan input nan.
    p = log_p.exp()
    gap = torch.where(p == 0, 0.0, log_p - log_q)
    return (p * gap).sum(-1)


def _weighted_gap(q: torch.Tensor, log_q: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    # sum_v q (log q - log r), with 0 where q is 0 (no autograd: the chunked loss's forward). One compare and one
    # masked fill on the tile, no host sync.
    gap = (log_q - log_r).mul_(q)
    return gap.masked_fill_(q == 0, 0.0).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    # log(weight_a * a + (1 - weight_a) * b), stable for weight_a in [0, 1]; -inf where both are -inf
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    mixed = log_a + math.log(weight_a)  # the result is written over this tile: one temporary tile, not two
    return torch.logaddexp(mixed, log_b + math.log1p(-weight_a), out=mixed)


def _log_mix_differentiable(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    # `_log_mix` for autograd: `logaddexp(-inf, -inf)` is -inf, but its backward is `grad / (1 + exp(nan))`, nan even
    # for a zero `grad`. Where both are -inf the mixture is computed from dummy zeros and replaced by -inf.
    if weight_a <= 0.0 or weight_a >= 1.0:
        return _log_mix(log_a, log_b, weight_a)
    x, y = log_a + math.log(weight_a), log_b + math.log1p(-weight_a)
    dead = torch.isneginf(x) & torch.isneginf(y)
    mixed = torch.logaddexp(torch.where(dead, 0.0, x), torch.where(dead, 0.0, y))
    return torch.where(dead, -math.inf, mixed)


def forward_kl(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token.

    Args:
        student_log_probs (`torch.Tensor`): Student log-probabilities, shape `[..., V]`.
        teacher_log_probs (`torch.Tensor`): Teacher log-probabilities, shape `[..., V]`.

    Returns:
        `torch.Tensor`: Divergence per token, shape `[...]`.
    """
    return _kl(teacher_log_probs, student_log_probs)


def reverse_kl(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) per token. Arguments as in [`forward_kl`]."""
    return _kl(student_log_probs, teacher_log_probs)


def generalized_jsd(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence per token (GKD, arXiv 2306.13649, Eq. 1).

    Args:
        student_log_probs (`torch.Tensor`): Student log-probabilities, shape `[..., V]`.
        teacher_log_probs (`torch.Tensor`): Teacher log-probabilities, shape `[..., V]`.
        beta (`float`, *optional*, defaults to `0.5`): Weight of the teacher in the mixture, in `[0, 1]`. `0` gives
            the forward KL and `1` the reverse KL, like TRL.

    Returns:
        `torch.Tensor`: Divergence per token, shape `[...]`.
    """
    if beta <= 0.0:
        return forward_kl(student_log_probs, teacher_log_probs)
    if beta >= 1.0:
        return reverse_kl(student_log_probs, teacher_log_probs)
    log_m = _log_mix_differentiable(teacher_log_probs, student_log_probs, beta)
    return beta * _kl(teacher_log_probs, log_m) + (1.0 - beta) * _kl(student_log_probs, log_m)


def total_variation(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Total variation distance `0.5 * sum |p_t - p_s|` per token. Arguments as in [`forward_kl`]."""
    return 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(-1)


def skew_kl(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, skew_alpha: float = 0.1) -> torch.Tensor:
    """Skew KL, KL(teacher || skew_alpha * p_t + (1 - skew_alpha) * p_s), per token (DistiLLM).

    Args:
        student_log_probs (`torch.Tensor`): Student log-probabilities, shape `[..., V]`.
        teacher_log_probs (`torch.Tensor`): Teacher log-probabilities, shape `[..., V]`.
        skew_alpha (`float`, *optional*, defaults to `0.1`): Share of the teacher in the skewed student, in `[0, 1)`.
            `0` gives the forward KL.

    Returns:
        `torch.Tensor`: Divergence per token, shape `[...]`.
    """
    return _kl(teacher_log_probs, _log_mix_differentiable(teacher_log_probs, student_log_probs, skew_alpha))


def skew_reverse_kl(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, skew_alpha: float = 0.1
) -> torch.Tensor:
    """Skew reverse KL, KL(student || skew_alpha * p_s + (1 - skew_alpha) * p_t), per token (DistiLLM).

    Arguments as in [`skew_kl`]; `skew_alpha = 0` gives the reverse KL.
    """
    return _kl(student_log_probs, _log_mix_differentiable(student_log_probs, teacher_log_probs, skew_alpha))


def get_divergence(name: str, beta: float = 0.5, skew_alpha: float = 0.1) -> Callable[..., torch.Tensor]:
    """Return the per-token divergence `fn(student_log_probs, teacher_log_probs)` called `name`.

    Args:
        name (`str`): One of [`DIVERGENCE_NAMES`].
        beta (`float`, *optional*, defaults to `0.5`): Used by `generalized_jsd`.
        skew_alpha (`float`, *optional*, defaults to `0.1`): Used by `skew_kl` and `skew_reverse_kl`.

    Raises:
        ValueError: If `name` is not a known divergence.
    """
    if name == "forward_kl":
        return forward_kl
    if name == "reverse_kl":
        return reverse_kl
    if name == "generalized_jsd":
        return lambda s, t: generalized_jsd(s, t, beta)
    if name == "total_variation":
        return total_variation
    if name == "skew_kl":
        return lambda s, t: skew_kl(s, t, skew_alpha)
    if name == "skew_reverse_kl":
        return lambda s, t: skew_reverse_kl(s, t, skew_alpha)
    raise ValueError(f"Unknown divergence {name!r}. Choose one of {', '.join(DIVERGENCE_NAMES)}.")


def divergence_and_grad(
    name: str,
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    student_probs: torch.Tensor,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Divergence per token and its partial derivative with respect to the student log-probabilities.

    The partial `G = dD/d(log p_s)` treats each log-probability as a free coordinate; the gradient with respect to the
    student's (temperature-scaled) logits is then `G - p_s * sum(G)`. Written out by hand so the chunked loss needs a
    few fused passes over each `[n, V]` tile instead of a stored autograd graph; the tests pin both against autograd
    on the plain definitions above.

    Zero probabilities (`-inf` log-probabilities in either input) give the finite value and a finite `G` of the
    definition with `0 * log 0 = 0`, wherever that is finite (see the module docstring for the `+inf` cases).

    Args:
        name (`str`): One of [`DIVERGENCE_NAMES`].
        student_log_probs (`torch.Tensor`): `log p_s`, shape `[n, V]`.
        teacher_log_probs (`torch.Tensor`): `log p_t`, shape `[n, V]`.
        student_probs (`torch.Tensor`): `p_s = exp(log p_s)` (passed in because the caller needs it too).
        beta (`float`, *optional*, defaults to `0.5`): Used by `generalized_jsd`.
        skew_alpha (`float`, *optional*, defaults to `0.1`): Used by the skew divergences.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: Values `[n]` and `G` `[n, V]`.
    """
    s, t, p = student_log_probs, teacher_log_probs, student_probs
    # The end points are the plain KLs (the mixture formulas would give 0 or the same KL with dead weight).
    if name == "generalized_jsd" and beta <= 0.0 or name == "skew_kl" and skew_alpha <= 0.0:
        name = "forward_kl"
    elif name == "generalized_jsd" and beta >= 1.0 or name == "skew_reverse_kl" and skew_alpha <= 0.0:
        name = "reverse_kl"
    # Zero probabilities (-inf log-probabilities): every term weighted by a probability that is exactly 0 is set to 0
    # (`0 * log 0 = 0`) with an in-place masked fill on `p == 0` / `q == 0`, which keeps a nan input nan and costs no
    # host sync. Terms weighted by a positive probability are left alone, so a divergence that is infinite by
    # definition stays +inf.
    if name == "forward_kl":
        q = t.exp()
        value = _weighted_gap(q, t, s)  # +inf where the student is -inf under teacher mass; G stays finite
        return value, q.neg_()
    if name == "reverse_kl":
        d = (s - t).masked_fill_(p == 0, 0.0)
        value = (p * d).sum(-1)
        return value, d.add_(1.0).mul_(p)
    if name == "generalized_jsd":
        q = t.exp()
        log_m = _log_mix(t, s, beta)  # a new tile (0 < beta < 1 here), finite wherever p or q is positive
        value = beta * _weighted_gap(q, t, log_m)
        del q
        g = torch.sub(s, log_m, out=log_m).masked_fill_(p == 0, 0.0).mul_(p)  # (s - log m) p, over log m's tile
        value += (1.0 - beta) * g.sum(-1)
        return value, g.mul_(1.0 - beta)
    if name == "total_variation":
        diff = p - t.exp()
        value = 0.5 * diff.abs().sum(-1)
        return value, diff.sign_().mul_(p).mul_(0.5)
    if name == "skew_kl":
        q = t.exp()
        log_m = _log_mix(t, s, skew_alpha)
        value = _weighted_gap(q, t, log_m)
        # G = -(1 - a) q p / m; where q is 0 the exponent is -inf (or nan: both -inf), and G is 0
        ratio = (t + s).sub_(log_m).masked_fill_(q == 0, -math.inf)
        return value, ratio.exp_().mul_(-(1.0 - skew_alpha))
    if name == "skew_reverse_kl":
        log_m = _log_mix(s, t, skew_alpha)  # >= s + log(skew_alpha): finite wherever p is positive
        d = (s - log_m).masked_fill_(p == 0, 0.0)
        value = (p * d).sum(-1)
        ratio = d.exp().mul_(skew_alpha)  # a p / m
        return value, d.add_(1.0).sub_(ratio).mul_(p)
    raise ValueError(f"Unknown divergence {name!r}. Choose one of {', '.join(DIVERGENCE_NAMES)}.")


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> torch.Tensor:
    """Divergence per token between two sets of logits, both divided by `temperature` first.

    The result is *not* multiplied by `temperature**2`; the trainer's loss does that (see
    [`chunked_distillation_loss`]).

    Args:
        student_logits (`torch.Tensor`): Student logits, shape `[..., V]`.
        teacher_logits (`torch.Tensor`): Teacher logits, shape `[..., V]` (same `V`).
        divergence (`str`, *optional*, defaults to `"forward_kl"`): One of [`DIVERGENCE_NAMES`].
        temperature (`float`, *optional*, defaults to `1.0`): Softmax temperature, `> 0`.
        beta (`float`, *optional*, defaults to `0.5`): Used by `generalized_jsd`.
        skew_alpha (`float`, *optional*, defaults to `0.1`): Used by `skew_kl` and `skew_reverse_kl`.

    Returns:
        `torch.Tensor`: Divergence per token, shape `[...]`, in float32 or wider.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"Student logits have {student_logits.shape[-1]} vocabulary columns but teacher logits have "
            f"{teacher_logits.shape[-1]}. Slice both to the shared vocabulary first."
        )
    fn = get_divergence(divergence, beta=beta, skew_alpha=skew_alpha)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return fn(s, t)

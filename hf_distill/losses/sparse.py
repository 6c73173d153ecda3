"""Sparse (top-k) teacher targets for the chunked loss: a teacher kept as its k most likely tokens per position.

A teacher cache stores, per scored token, the teacher's top-k token ids, their log-probabilities at the cache
temperature `T` (`log_softmax(z / T)` over the *full* vocabulary, so the k of them do not sum to 1) and the log of
the mass left over. [`TopKTeacher`] holds those tensors and the chunked loss compares the student with them a tile at
a time, in one of two ways (`SPARSE_TARGET_MODES`):

- `"bucket"`: both distributions over `k + 1` buckets, the k teacher ids and one "rest" bucket with everything else.
  The teacher's buckets are `[log_probs, rest_log_prob]`; the student's are its full-vocabulary log-probabilities at
  the k ids and the log-sum-exp of its log-probabilities outside them. Nothing is renormalised, so with `k = V` (no
  rest) this is the dense loss.
- `"renormalize"`: both distributions restricted to the k ids and renormalised there; the student's logits outside
  the k ids get no gradient from the divergence.

The divergence on the `[n, k + 1]` (or `[n, k]`) tile is [`divergence_and_grad`]'s; its gradient is then taken back to
the student's `[n, V]` temperature-scaled logits by hand (see [`sparse_divergence_and_grad`]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .divergences import divergence_and_grad

SPARSE_TARGET_MODES = ("bucket", "renormalize")
"""Values accepted by the `sparse_targets` argument of [`chunked_distillation_loss`] (see [`TopKTeacher`])."""


def rest_log_prob_from_top_k(log_probs: torch.Tensor) -> torch.Tensor:
    """Log of the mass left outside the top-k, `log(1 - sum_j exp(log_probs_j))`, from the top-k log-probs alone.

    Computed in float64 with the sum clamped to at most 1, so that rounding never gives a `nan`: the result is `-inf`
    where the top-k hold (up to rounding) all the mass. When the true remainder is far below the rounding of the
    stored log-probs (a very peaky teacher stored in low precision), prefer the exact value from the full logits.

    Args:
        log_probs (`torch.Tensor`): Top-k log-probabilities over the full vocabulary, shape `[..., k]`.

    Returns:
        `torch.Tensor`: Shape `[...]`, float64.
    """
    kept = log_probs.double().exp().sum(-1).clamp_(max=1.0)
    return torch.log1p(-kept)


@dataclass
class TopKTeacher:
    """Teacher targets kept as the top-k tokens per scored position.

    Pass it as the `teacher` of [`chunked_distillation_loss`] (with `temperature` equal to `temperature` below) and
    choose how the mass outside the k tokens is treated with its `sparse_targets` argument (see the module
    docstring). Only `[N, k]` teacher tensors exist: they are sliced and moved to the student's device a tile at a
    time.

    Args:
        token_ids (`torch.Tensor`): Top-k token ids, shape `[N, k]`, any integer dtype; distinct within a row and
            smaller than `vocab_rows` (and than the loss's `vocab_size`, which the loss checks).
        log_probs (`torch.Tensor`): `log p_T(id) = log_softmax(z / temperature)[id]` over the teacher's full
            vocabulary, shape `[N, k]`, any float dtype. Their order within a row does not matter.
        rest_log_prob (`torch.Tensor`, *optional*): `log(1 - sum(exp(log_probs)))`, the log of the mass outside the
            top-k, shape `[N]`; `-inf` where nothing is left. Only used by `sparse_targets="bucket"`. `None`: computed
            per tile from `log_probs` with [`rest_log_prob_from_top_k`].
        temperature (`float`, *optional*, defaults to `1.0`): The temperature the log-probs were computed at; the
            loss's `temperature` must be the same.
        vocab_rows (`int`): Number of vocabulary columns of the teacher (its LM head's rows), keyword-only and
            required: the loss compares `min(student rows, vocab_rows)` columns unless given `vocab_size`.
        ids_bound (`int`, *optional*): Keyword-only: one more than the largest id, when already known (e.g. checked
            on the CPU before the ids were copied to an accelerator). The loss then checks the id range against it
            instead of reading the ids back (a host sync). `None`: the loss scans the ids.

    Raises:
        ValueError: On tensors of the wrong rank or mismatched shapes, `k = 0`, `k > vocab_rows`, non-integer ids,
            non-float log-probs, or a temperature that is not positive.
    """

    token_ids: torch.Tensor
    log_probs: torch.Tensor
    rest_log_prob: torch.Tensor | None = None
    temperature: float = 1.0
    vocab_rows: int = field(kw_only=True)
    ids_bound: int | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        ids, log_probs, rest = self.token_ids, self.log_probs, self.rest_log_prob
        if ids.dim() != 2:
            raise ValueError(f"`token_ids` must be [N, k], got shape {tuple(ids.shape)}.")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"`token_ids` must be an integer tensor, got {ids.dtype}.")
        if not log_probs.dtype.is_floating_point:
            raise ValueError(f"`log_probs` must be a float tensor, got {log_probs.dtype}.")
        if log_probs.shape != ids.shape:
            raise ValueError(
                f"`log_probs` must have the shape of `token_ids` {tuple(ids.shape)}, got {tuple(log_probs.shape)}."
            )
        if rest is not None and rest.shape != ids.shape[:1]:
            raise ValueError(f"`rest_log_prob` must have shape [N] = [{ids.shape[0]}], got {tuple(rest.shape)}.")
        if ids.shape[1] == 0:
            raise ValueError("`token_ids` has k = 0 columns: keep at least one token per position.")
        if ids.shape[1] > self.vocab_rows:
            raise ValueError(f"k = {ids.shape[1]} top-k tokens exceed the teacher's `vocab_rows`={self.vocab_rows}.")
        if not self.temperature > 0.0:
            raise ValueError(f"`temperature` must be positive, got {self.temperature}.")
        if self.ids_bound is not None and not (isinstance(self.ids_bound, int) and self.ids_bound >= 0):
            raise ValueError(f"`ids_bound` must be a non-negative int (the largest id + 1), got {self.ids_bound!r}.")

    @property
    def k(self) -> int:
        """Number of tokens kept per position."""
        return self.token_ids.shape[1]

    def rows(
        self, start: int, end: int, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens `start:end` as (int64 ids `[n, k]`, float32 log-probs `[n, k]`, float32 rest `[n]`) on `device`."""
        log_probs = self.log_probs[start:end].detach()
        rest = self.rest_log_prob[start:end].detach() if self.rest_log_prob is not None else None
        if rest is None:
            rest = rest_log_prob_from_top_k(log_probs)
        return (
            self.token_ids[start:end].to(device=device, dtype=torch.long, non_blocking=True),
            log_probs.to(device=device, dtype=torch.float32, non_blocking=True),
            rest.to(device=device, dtype=torch.float32, non_blocking=True),
        )

    def select_rows(self, index: torch.Tensor) -> TopKTeacher:
        """The rows `index` as a teacher of `len(index)` rows (same temperature and vocabulary)."""
        return TopKTeacher(
            self.token_ids.index_select(0, index.to(self.token_ids.device)),
            self.log_probs.index_select(0, index.to(self.log_probs.device)),
            None
            if self.rest_log_prob is None
            else self.rest_log_prob.index_select(0, index.to(self.rest_log_prob.device)),
            self.temperature,
            vocab_rows=self.vocab_rows,
            ids_bound=self.ids_bound,
        )

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopKTeacher:
        """Top-k targets from full teacher logits `[N, V]` (tests, or building a cache), the rest computed exactly.

        The log-probs are `log_softmax(logits / temperature)` in float32 (or wider) and the rest is the log-sum-exp
        of the log-probs outside the top-k (`-inf` for `k = V`). This builds `[N, V]` tensors: call it on slices of
        a large batch.

        Args:
            logits (`torch.Tensor`): Teacher logits, shape `[N, V]`.
            k (`int`): Tokens kept per position, `1 <= k <= V`.
            temperature (`float`, *optional*, defaults to `1.0`): Temperature of the stored log-probs.

        Returns:
            [`TopKTeacher`] with `vocab_rows = V`.
        """
        with torch.no_grad():
            scaled = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)) / temperature
            log_probs = torch.log_softmax(scaled, dim=-1)
            top, ids = log_probs.topk(k, dim=-1)
            rest = torch.logsumexp(log_probs.scatter(-1, ids, -math.inf), dim=-1)
        return cls(ids, top, rest, temperature, vocab_rows=logits.shape[-1])


def sparse_divergence_and_grad(
    mode: str,
    divergence: str,
    student_log_probs: torch.Tensor,
    student_probs: torch.Tensor,
    token_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    teacher_rest: torch.Tensor,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Divergence per token against top-k teacher targets and its gradient with respect to the scaled logits.

    `"bucket"`: with buckets `B_1..B_k` (the ids) and `B_rest` (every other column), the bucket log-probabilities are
    `b_j = log sum_{v in B_j} p_v` for both models; `D` is the divergence between the bucket distributions. With
    `G_j = dD/db_j` from [`divergence_and_grad`], `dD/d(log p_v) = G_j p_v / P_j` for `v in B_j` (`G_j` at an id,
    `G_rest exp(log p_v - b_rest)` elsewhere), and the gradient with respect to the scaled logits `u` is that minus
    `p * sum_j G_j`. When `k` is the whole compared vocabulary the (empty) rest bucket is left out, so the result is
    the dense loss.

    `"renormalize"`: `D` between `softmax(teacher_log_probs)` and the student renormalised over the ids,
    `log_softmax(log p_s[ids])`; the gradient is `G - p' * sum(G)` at the ids (`p'` the renormalised student) and 0
    elsewhere.

    Args:
        mode (`str`): One of `SPARSE_TARGET_MODES`.
        divergence (`str`): One of `DIVERGENCE_NAMES`.
        student_log_probs (`torch.Tensor`): The student's `log_softmax(u)` over the compared vocabulary, `[n, V]`.
        student_probs (`torch.Tensor`): `exp(student_log_probs)`, `[n, V]`.
        token_ids (`torch.Tensor`): Teacher top-k ids, int64 `[n, k]`, distinct within a row, all `< V`.
        teacher_log_probs (`torch.Tensor`): Their log-probs over the teacher's full vocabulary, `[n, k]`.
        teacher_rest (`torch.Tensor`): Log of the teacher's remaining mass, `[n]` (bucket mode only).
        beta (`float`, *optional*, defaults to `0.5`): Used by `generalized_jsd`.
        skew_alpha (`float`, *optional*, defaults to `0.1`): Used by the skew divergences.
        need_grad (`bool`, *optional*, defaults to `True`): Whether to build the gradient.

    Returns:
        `tuple[torch.Tensor, torch.Tensor | None]`: Values `[n]` and `dD/du` `[n, V]` (`None` without `need_grad`).
    """
    s, ids = student_log_probs, token_ids
    teacher_log_probs = teacher_log_probs.to(s.dtype)
    s_ids = s.gather(-1, ids)
    if mode == "renormalize":
        s_norm = torch.log_softmax(s_ids, dim=-1)
        p_norm = s_norm.exp()
        values, g = divergence_and_grad(
            divergence, s_norm, torch.log_softmax(teacher_log_probs, dim=-1), p_norm, beta, skew_alpha
        )
        if not need_grad:
            return values, None
        g.sub_(p_norm * g.sum(-1, keepdim=True))
        return values, torch.zeros_like(s).scatter_(-1, ids, g)
    if mode != "bucket":
        raise ValueError(f"`sparse_targets` must be one of {', '.join(map(repr, SPARSE_TARGET_MODES))}, got {mode!r}.")
    if ids.shape[-1] == s.shape[-1]:  # every column is an id: no rest bucket, exactly the dense divergence
        values, g = divergence_and_grad(divergence, s_ids, teacher_log_probs, s_ids.exp(), beta, skew_alpha)
        if not need_grad:
            return values, None
        grad = torch.zeros_like(s).scatter_(-1, ids, g)
        return values, grad.addcmul_(student_probs, g.sum(-1, keepdim=True), value=-1.0)
    outside = s.scatter(-1, ids, -math.inf)  # log p_v outside the ids, -inf at them
    s_rest = torch.logsumexp(outside, dim=-1, keepdim=True)
    s_buckets = torch.cat([s_ids, s_rest], dim=-1)
    t_buckets = torch.cat([teacher_log_probs, teacher_rest.to(s.dtype).unsqueeze(-1)], dim=-1)
    p_buckets = s_buckets.exp()
    values, g = divergence_and_grad(divergence, s_buckets, t_buckets, p_buckets, beta, skew_alpha)
    if not need_grad:
        return values, None
    # dD/du_v = G_j(v) p_v / P_j(v) - p_v sum_j G_j; the share p_v / P_rest is exp(log p_v - b_rest), 0 at the ids
    # (and in a row where the rest has no mass, shifted by 0 instead of -inf so that -inf - -inf gives no nan)
    share = outside.sub_(s_rest.masked_fill(torch.isneginf(s_rest), 0.0)).exp_()
    grad = share.mul_(g[:, -1:]).scatter_(-1, ids, g[:, :-1])
    return values, grad.addcmul_(student_probs, g.sum(-1, keepdim=True), value=-1.0)


def check_top_k_teacher(teacher: TopKTeacher, temperature: float, sparse_targets: str, vocab_size: int) -> None:
    """Validate a [`TopKTeacher`] against the loss's arguments (one min/max over the ids: a single host sync).

    Raises:
        ValueError: On an unknown `sparse_targets`, a `temperature` other than the teacher's, `k > vocab_size`, or
            a token id outside `[0, vocab_size)`.
    """
    if sparse_targets not in SPARSE_TARGET_MODES:
        raise ValueError(
            f"`sparse_targets` must be one of {', '.join(map(repr, SPARSE_TARGET_MODES))}, got {sparse_targets!r}."
        )
    if not math.isclose(float(temperature), float(teacher.temperature), rel_tol=1e-6):
        raise ValueError(
            f"The top-k teacher log-probs were computed at temperature T={teacher.temperature}, but the loss runs at "
            f"T={temperature}. Top-k log-probs cannot be re-tempered (the rest of the vocabulary is missing): rebuild "
            f"the teacher cache at the training temperature, or train at temperature={teacher.temperature}."
        )
    if teacher.k > vocab_size:
        raise ValueError(
            f"The teacher keeps k = {teacher.k} tokens per position, more than `vocab_size`={vocab_size}."
        )
    if teacher.ids_bound is not None:  # the range was checked where the ids were made: no read-back
        low, high = 0, teacher.ids_bound - 1
    elif teacher.token_ids.numel():
        low, high = torch.stack(torch.aminmax(teacher.token_ids)).tolist()
    else:
        return
    if high >= vocab_size or low < 0:
        bad = high if high >= vocab_size else low
        raise ValueError(
            f"The top-k teacher has token id {bad}, outside the compared vocabulary [0, {vocab_size}) "
            f"(`vocab_size`={vocab_size}). Ids past the student's vocabulary cannot be compared: rebuild the "
            "cache with them excluded, or pass a larger `vocab_size` if both heads have those rows."
        )

"""Edge cases of the losses: -inf logits, a second backward, ignored (-100) rows, entropy, label smoothing and DFT.

Every value and gradient is compared with the naive float64 references of `_reference.py` (built from the full
`[tokens x vocab]` logits), and the CE variants and the entropy also with the transformers / TRL code they mirror.
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from _reference import naive_distillation_loss, naive_divergence, naive_entropy, naive_head, naive_softmax

from hf_distill.losses import (
    DIVERGENCE_NAMES,
    DenseTeacher,
    DistillationLossOutput,
    HiddenStateTeacher,
    LMHead,
    chunked_distillation_loss,
    token_divergence,
)
from hf_distill.losses import chunked as chunked_module

N, H, H_T, V = 23, 10, 9, 31
INF = math.inf
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
# float32 gradients of size up to ~0.3 carry a few 1e-7 of rounding
GRAD_TOL = {"rtol": 1e-5, "atol": 5e-7}
TOL64 = {"rtol": 1e-9, "atol": 1e-11}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------------
# Problem set-up


class Problem:
    """A student (hidden states and LM head, all requiring grad) and a teacher, on the same `n` tokens."""

    def __init__(self, n=N, v_student=V, v_teacher=V, seed=0, ignore_every=3):
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).float()

        self.hidden = randn(n, H).requires_grad_(True)
        self.weight = randn(v_student, H, scale=2.0 / H**0.5).requires_grad_(True)
        self.bias = randn(v_student, scale=0.5).requires_grad_(True)
        self.teacher_hidden = randn(n, H_T)
        self.teacher_weight = randn(v_teacher, H_T, scale=2.5 / H_T**0.5)
        self.teacher_bias = randn(v_teacher, scale=0.5)
        self.labels = torch.randint(0, V, (n,), generator=gen)
        if ignore_every:
            self.labels[::ignore_every] = -100

    def params(self) -> list[torch.Tensor]:
        return [self.hidden, self.weight, self.bias]

    def student_head(self) -> LMHead:
        return LMHead(self.weight, self.bias)

    def teacher_head(self) -> LMHead:
        return LMHead(self.teacher_weight, self.teacher_bias)

    def student_logits(self) -> torch.Tensor:
        return naive_head(self.hidden, self.weight, self.bias)

    def teacher_logits(self) -> torch.Tensor:
        return naive_head(self.teacher_hidden, self.teacher_weight, self.teacher_bias)


def chunked(problem: Problem, teacher=None, **kwargs):
    """The chunked loss and its gradients with respect to (hidden, weight, bias)."""
    teacher = teacher or HiddenStateTeacher(problem.teacher_hidden, problem.teacher_head())
    out = chunked_distillation_loss(problem.hidden, problem.student_head(), teacher, **kwargs)
    return out, torch.autograd.grad(out.loss, problem.params())


def reference(problem: Problem, labels, teacher_logits=None, bias=None, **kwargs):
    """The naive loss and its gradients with respect to (hidden, weight, bias), from full float64 logits."""
    params = [problem.hidden, problem.weight, problem.bias if bias is None else bias]
    student_logits = naive_head(*params)
    teacher_logits = problem.teacher_logits() if teacher_logits is None else teacher_logits.double()
    ref = naive_distillation_loss(student_logits, teacher_logits, labels, **kwargs)
    return ref, torch.autograd.grad(ref["loss"], params)


def assert_matches(out, grads, ref, ref_grads):
    for name in ("loss", "distill_sum", "entropy_sum"):
        torch.testing.assert_close(getattr(out, name).double(), ref[name], **LOSS_TOL, msg=name)
    assert out.num_tokens == ref["num_tokens"]
    assert int(out.agree_count) == ref["agree_count"]
    if ref["ce_sum"] is None:
        assert out.ce_sum is None and out.correct_count is None
    else:
        torch.testing.assert_close(out.ce_sum.double(), ref["ce_sum"], **LOSS_TOL)
        assert int(out.correct_count) == ref["correct_count"]
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad.double(), ref_grad.double(), **GRAD_TOL)


def kw(divergence="forward_kl", temperature=2.0, alpha=0.5, beta=0.3, skew_alpha=0.2, **extra):
    return {
        "divergence": divergence,
        "temperature": temperature,
        "alpha": alpha,
        "beta": beta,
        "skew_alpha": skew_alpha,
        "vocab_size": V,
        **extra,
    }


# (divergence, beta, skew_alpha): the end points of the mixtures are checked too
ALL_SETTINGS = [
    ("forward_kl", 0.3, 0.2),
    ("reverse_kl", 0.3, 0.2),
    ("generalized_jsd", 0.0, 0.2),
    ("generalized_jsd", 0.3, 0.2),
    ("generalized_jsd", 1.0, 0.2),
    ("total_variation", 0.3, 0.2),
    ("skew_kl", 0.3, 0.2),
    ("skew_kl", 0.3, 0.0),
    ("skew_reverse_kl", 0.3, 0.2),
    ("skew_reverse_kl", 0.3, 0.0),
]
ALL_IDS = [f"{d}-beta{b}-skew{s}" for d, b, s in ALL_SETTINGS]


def _is_forward_kl(divergence, beta, skew_alpha):
    """KL(teacher || student) with nothing mixed into the student: infinite where only the student is -inf."""
    return (
        divergence == "forward_kl"
        or (divergence == "generalized_jsd" and beta == 0.0)
        or (divergence == "skew_kl" and skew_alpha == 0.0)
    )


def _is_reverse_kl(divergence, beta, skew_alpha):
    """KL(student || teacher) with nothing mixed into the teacher: infinite where only the teacher is -inf."""
    return (
        divergence == "reverse_kl"
        or (divergence == "generalized_jsd" and beta == 1.0)
        or (divergence == "skew_reverse_kl" and skew_alpha == 0.0)
    )


# ---------------------------------------------------------------------------------------------------------------------
# 1. -inf logits: per-token functions


def _masked_logits(seed, shape=(4, 6, 17)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * 3


def _token_case(student, teacher, setting, temperature, dtype):
    divergence, beta, skew_alpha = setting
    student = student.to(dtype).requires_grad_(True)
    upstream = torch.rand(student.shape[:-1], generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out = token_divergence(
        student, teacher.to(dtype), divergence, temperature=temperature, beta=beta, skew_alpha=skew_alpha
    )
    (grad,) = torch.autograd.grad((out * upstream.to(dtype)).sum(), student)
    ref_student = student.detach().double().requires_grad_(True)
    ref = naive_divergence(ref_student, teacher.double(), divergence, temperature, beta=beta, skew_alpha=skew_alpha)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), ref_student)
    return out, grad, ref, ref_grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("setting", ALL_SETTINGS, ids=ALL_IDS)
def test_token_divergence_student_and_teacher_both_inf(setting, temperature, dtype):
    # both models rule the same tokens out (a shared mask, row-dependent): every divergence is finite
    student, teacher = _masked_logits(0), _masked_logits(1)
    dead = torch.rand(student.shape, generator=torch.Generator().manual_seed(2)) < 0.3
    dead[..., 0] = False  # every row keeps a live token
    student[dead] = -INF
    teacher[dead] = -INF
    out, grad, ref, ref_grad = _token_case(student, teacher, setting, temperature, dtype)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    tol = TOL64 if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(grad.double(), ref_grad, **tol)
    assert (grad[dead] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("setting", ALL_SETTINGS, ids=ALL_IDS)
def test_token_divergence_one_side_inf(setting, dtype):
    # the student rules out tokens where the teacher has mass, and the teacher others where the student has mass
    student, teacher = _masked_logits(3), _masked_logits(4)
    student_dead = torch.zeros(student.shape, dtype=torch.bool)
    teacher_dead = torch.zeros(student.shape, dtype=torch.bool)
    student_dead[..., 1::5] = True
    teacher_dead[..., 3::5] = True
    if _is_forward_kl(*setting):
        student_dead[:] = False  # infinite by definition: see test_token_divergence_forward_kl_student_inf
    if _is_reverse_kl(*setting):
        teacher_dead[:] = False  # infinite by definition (test_teacher_with_masked_vocabulary)
    student[student_dead] = -INF
    teacher[teacher_dead] = -INF
    out, grad, ref, ref_grad = _token_case(student, teacher, setting, 2.0, dtype)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    tol = TOL64 if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(grad.double(), ref_grad, **tol)


@pytest.mark.parametrize("setting", [s for s in ALL_SETTINGS if _is_forward_kl(*s)], ids=str)
def test_token_divergence_forward_kl_student_inf(setting):
    # KL(teacher || student) with the student -inf where the teacher has mass is +inf by definition; the gradient
    # keeps its finite limit (p_s - p_t) / T
    divergence, beta, skew_alpha = setting
    student, teacher = _masked_logits(5, (6, 13)), _masked_logits(6, (6, 13))
    student[1, 4] = -INF
    student = student.requires_grad_(True)
    out = token_divergence(student, teacher, divergence, temperature=2.0, beta=beta, skew_alpha=skew_alpha)
    assert out[1].item() == INF and torch.isfinite(out[[0, 2, 3, 4, 5]]).all()
    (grad,) = torch.autograd.grad(out.sum(), student)
    expected = (naive_softmax(student.detach(), 2.0) - naive_softmax(teacher, 2.0)) / 2.0
    torch.testing.assert_close(grad, expected, **TOL64)


# ---------------------------------------------------------------------------------------------------------------------
# 1. -inf logits: chunked loss


def _student_with_banned_columns(problem: Problem, columns) -> torch.Tensor:
    """Set the student's bias to -inf on `columns` (in place, keeping it a leaf); returns a copy with -200 there."""
    with torch.no_grad():
        finite = problem.bias.detach().clone()
        finite[columns] = -200.0
        problem.bias[columns] = -INF
    return finite


def _labels_avoiding(problem: Problem, columns) -> torch.Tensor:
    labels = problem.labels.clone()
    for c in columns:
        labels[labels == c] = (c + 1) % V
    return labels


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (1.0, 0.5), (2.0, 0.5)])
@pytest.mark.parametrize("setting", ALL_SETTINGS, ids=ALL_IDS)
def test_chunked_student_and_teacher_inf_same_columns(setting, temperature, alpha):
    divergence, beta, skew_alpha = setting
    problem = Problem(seed=10, ignore_every=0)
    columns = [2, 7, 19]
    _student_with_banned_columns(problem, columns)
    teacher_logits = problem.teacher_logits().float()
    teacher_logits[:, columns] = -INF
    labels = _labels_avoiding(problem, columns)
    kwargs = kw(divergence, temperature, alpha, beta, skew_alpha)
    out, grads = chunked(problem, DenseTeacher(teacher_logits), labels=labels, chunk_size=5, **kwargs)
    ref, ref_grads = reference(problem, labels, teacher_logits, **kwargs)
    assert torch.isfinite(out.loss)
    assert_matches(out, grads, ref, ref_grads)
    assert (grads[1][columns] == 0).all() and (grads[2][columns] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("setting", [s for s in ALL_SETTINGS if not _is_forward_kl(*s)], ids=str)
def test_chunked_student_inf_under_teacher_mass(setting, temperature):
    # the student bans tokens the teacher likes: finite for every divergence but the (unmixed) forward KL
    divergence, beta, skew_alpha = setting
    problem = Problem(seed=11, ignore_every=0)
    columns = [0, 5, 6, 30]
    _student_with_banned_columns(problem, columns)
    labels = _labels_avoiding(problem, columns)
    kwargs = kw(divergence, temperature, 0.5, beta, skew_alpha)
    out, grads = chunked(problem, labels=labels, chunk_size=4, **kwargs)
    ref, ref_grads = reference(problem, labels, **kwargs)
    assert torch.isfinite(out.loss)
    assert_matches(out, grads, ref, ref_grads)


@pytest.mark.parametrize("setting", [s for s in ALL_SETTINGS if not _is_reverse_kl(*s)], ids=str)
def test_chunked_teacher_inf_under_student_mass(setting):
    divergence, beta, skew_alpha = setting
    problem = Problem(seed=12, ignore_every=0)
    teacher_logits = problem.teacher_logits().float()
    teacher_logits[:, 3::4] = -INF
    teacher_logits[::2, 1] = -INF  # and row-dependent
    kwargs = kw(divergence, 2.0, 0.5, beta, skew_alpha)
    out, grads = chunked(problem, DenseTeacher(teacher_logits), labels=problem.labels, chunk_size=6, **kwargs)
    ref, ref_grads = reference(problem, problem.labels, teacher_logits, **kwargs)
    assert torch.isfinite(out.loss)
    assert_matches(out, grads, ref, ref_grads)


@pytest.mark.parametrize("setting", [s for s in ALL_SETTINGS if _is_forward_kl(*s)], ids=str)
def test_chunked_forward_kl_student_inf_is_inf_with_finite_gradient(setting):
    # documented choice: the loss is +inf (the definition), the gradient its finite limit, i.e. the gradient of a
    # student whose banned logits are very negative but finite
    divergence, beta, skew_alpha = setting
    problem = Problem(seed=13, ignore_every=0)
    finite_bias = _student_with_banned_columns(problem, [4, 9])
    kwargs = kw(divergence, 2.0, 0.5, beta, skew_alpha)
    labels = _labels_avoiding(problem, [4, 9])
    out, grads = chunked(problem, labels=labels, chunk_size=5, **kwargs)
    assert out.loss.item() == INF and out.distill_sum.item() == INF
    # the reference at bias -200 (p_s ~ e^-100): the same gradient up to ~1e-40
    _, ref_grads = reference(problem, labels, bias=finite_bias.requires_grad_(True), **kwargs)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad.double(), ref_grad.double(), **GRAD_TOL)


# ---------------------------------------------------------------------------------------------------------------------
# 2. A second backward


def _loss(problem: Problem, **kwargs) -> DistillationLossOutput:
    teacher = HiddenStateTeacher(problem.teacher_hidden, problem.teacher_head())
    return chunked_distillation_loss(problem.hidden, problem.student_head(), teacher, chunk_size=5, **kwargs)


def test_second_backward_with_retain_graph_accumulates():
    problem = Problem(seed=20)
    kwargs = kw("generalized_jsd", labels=problem.labels)
    once = torch.autograd.grad(_loss(problem, **kwargs).loss, problem.params())
    out = _loss(problem, **kwargs)
    out.loss.backward(retain_graph=True)
    out.loss.backward()
    for param, grad in zip(problem.params(), once, strict=True):
        torch.testing.assert_close(param.grad, 2 * grad)
    # and the graph was freed by the second (not retained) backward
    with pytest.raises(RuntimeError, match="second time"):
        out.loss.backward()


def test_saved_gradients_are_freed_after_backward(monkeypatch):
    problem = Problem(seed=21, ignore_every=0)
    stored = []
    run = chunked_module._Job.run

    def recording_run(self, hidden, needs_grad):
        loss, grads = run(self, hidden, needs_grad)
        stored.extend(weakref.ref(grad) for grad in grads)
        return loss, grads

    monkeypatch.setattr(chunked_module._Job, "run", recording_run)
    out = _loss(problem, **kw("reverse_kl", labels=problem.labels))
    assert len(stored) == 3  # the gradients of hidden, weight and bias, computed during the forward
    out.loss.backward(retain_graph=True)
    gc.collect()
    assert all(ref() is not None for ref in stored)
    out.loss.backward()
    gc.collect()
    assert all(ref() is None for ref in stored)  # freed, though `out` (and its graph) is still alive


def test_stored_gradients_bypass_enclosing_saved_tensor_hooks():
    # activation offloading (TRL) packs every saved tensor to CPU; the stored gradients, needed as soon as backward
    # starts, are exempted, and the result is unchanged
    problem = Problem(seed=22, ignore_every=0)
    packed = []

    def pack(tensor):
        packed.append(tensor.shape)
        return tensor

    kwargs = kw("skew_kl", labels=problem.labels)
    expected = torch.autograd.grad(_loss(problem, **kwargs).loss, problem.params())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = _loss(problem, **kwargs)
    assert packed == []
    for grad, ref in zip(torch.autograd.grad(out.loss, problem.params()), expected, strict=True):
        torch.testing.assert_close(grad, ref)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Ignored (-100) rows


class _PlainTeacher:
    """A `TeacherLogits` the loss knows nothing about (exercises the generic row selection)."""

    def __init__(self, logits: torch.Tensor):
        self.tensor = logits
        self.calls: list[tuple[int, int]] = []

    @property
    def vocab_rows(self) -> int:
        return self.tensor.shape[-1]

    def logits(self, start: int, end: int) -> torch.Tensor:
        self.calls.append((start, end))
        return self.tensor[start:end]


def _teacher(kind: str, problem: Problem, poison_rows: torch.Tensor):
    """A teacher of the given kind whose rows `poison_rows` are nan (they must never reach the loss)."""
    if kind == "hidden":
        hidden = problem.teacher_hidden.clone()
        hidden[poison_rows] = math.nan
        return HiddenStateTeacher(hidden, problem.teacher_head())
    logits = problem.teacher_logits().float()
    logits[poison_rows] = math.nan
    return DenseTeacher(logits) if kind == "dense" else _PlainTeacher(logits)


@pytest.mark.parametrize("teacher_kind", ["hidden", "dense", "plain"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_ignored_rows_contribute_nothing(divergence, alpha, teacher_kind):
    problem = Problem(seed=30)
    labels = problem.labels
    ignored = labels == -100
    ignored[[4, 5, 6, 17]] = True  # runs of ignored rows too
    labels = torch.where(ignored, -100, labels)
    n_scored = int((~ignored).sum())
    with torch.no_grad():  # nan student states on ignored rows: no nan may leak into the loss or the gradients
        problem.hidden[ignored] = math.nan
    kwargs = kw(divergence, 2.0, alpha)
    out, grads = chunked(problem, _teacher(teacher_kind, problem, ignored), labels=labels, chunk_size=4, **kwargs)
    assert out.num_tokens == n_scored
    assert (grads[0][ignored] == 0).all()
    # the reference scores the same rows only (it never sees the nan ones)
    with torch.no_grad():
        problem.hidden[ignored] = 0.0
    ref, ref_grads = reference(problem, labels, **kwargs)
    assert ref["num_tokens"] == n_scored
    assert_matches(out, grads, ref, ref_grads)


def test_plain_teacher_is_asked_for_contiguous_runs_only():
    problem = Problem(seed=31, ignore_every=0)
    labels = problem.labels.clone()
    labels[[0, 3, 4, 10, 11, 12]] = -100
    teacher = _PlainTeacher(problem.teacher_logits().float())
    chunked(problem, teacher, labels=labels, **kw(chunk_size=6))
    # scored rows 1 2 5 6 7 8 | 9 13 14 15 16 17 | 18 ... 22 (chunks of 6 scored rows), fetched as contiguous runs
    assert teacher.calls == [(1, 3), (5, 9), (9, 10), (13, 18), (18, 23)]


def test_ignored_rows_default_normaliser_and_num_items():
    problem = Problem(seed=32)
    n_scored = int((problem.labels != -100).sum())
    kwargs = kw("skew_reverse_kl")
    default, default_grads = chunked(problem, labels=problem.labels, **kwargs)
    explicit, explicit_grads = chunked(problem, labels=problem.labels, num_items_in_batch=n_scored, **kwargs)
    torch.testing.assert_close(default.loss, explicit.loss)
    for a, b in zip(default_grads, explicit_grads, strict=True):
        torch.testing.assert_close(a, b)
    ref, _ = reference(problem, problem.labels, **kwargs)
    torch.testing.assert_close(default.loss.double(), ref["loss"], **LOSS_TOL)
    assert default.num_tokens == n_scored


def test_every_row_ignored():
    problem = Problem(seed=33)
    labels = torch.full((N,), -100)
    out, grads = chunked(problem, labels=labels, **kw("reverse_kl", alpha=0.5))
    assert out.num_tokens == 0
    assert out.loss.item() == 0.0 and out.distill_sum.item() == 0.0 and out.ce_sum.item() == 0.0
    assert out.entropy_sum.item() == 0.0 and int(out.agree_count) == 0 and int(out.correct_count) == 0
    for grad in grads:
        assert (grad == 0).all()


def test_without_labels_every_row_counts():
    problem = Problem(seed=34)
    out, grads = chunked(problem, **kw("forward_kl", alpha=0.0))
    ref, ref_grads = reference(problem, None, **kw("forward_kl", alpha=0.0))
    assert out.num_tokens == N == ref["num_tokens"]
    assert_matches(out, grads, ref, ref_grads)


def test_labels_must_match_the_rows():
    problem = Problem(seed=35)
    with pytest.raises(ValueError, match="labels"):
        chunked(problem, labels=problem.labels[:-1], **kw())


# ---------------------------------------------------------------------------------------------------------------------
# 4. Entropy


@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no-labels"])
@pytest.mark.parametrize("padded", [False, True], ids=["full-vocab", "padded-vocab"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_entropy_sum_matches_trl(temperature, padded, with_labels):
    from trl.trainer.utils import entropy_from_logits

    # with padding rows, the compared vocabulary is not the whole head: the entropy still is over all its rows
    problem = Problem(v_student=V + 3 if padded else V, v_teacher=V + 5 if padded else V, seed=40)
    labels = problem.labels if with_labels else None
    kwargs = kw("total_variation", temperature, 0.5 if with_labels else 0.0)
    out, grads = chunked(problem, labels=labels, chunk_size=7, **kwargs)
    ref, ref_grads = reference(problem, labels, **kwargs)
    assert_matches(out, grads, ref, ref_grads)
    scored = labels != -100 if with_labels else torch.ones(N, dtype=torch.bool)
    trl_entropy = entropy_from_logits(problem.student_logits().detach()[scored]).sum()
    torch.testing.assert_close(out.entropy_sum.double(), trl_entropy, **LOSS_TOL)


def test_entropy_with_banned_tokens_is_finite():
    problem = Problem(seed=41)
    _student_with_banned_columns(problem, [1, 2, 3])
    out, _ = chunked(problem, labels=_labels_avoiding(problem, [1, 2, 3]), **kw(temperature=1.0))
    expected = naive_entropy(problem.student_logits().detach()[problem.labels != -100]).sum()
    assert torch.isfinite(out.entropy_sum)
    torch.testing.assert_close(out.entropy_sum.double(), expected, **LOSS_TOL)


def test_output_can_be_built_without_entropy():
    zero = torch.zeros(())
    out = DistillationLossOutput(
        loss=zero, distill_sum=zero, ce_sum=None, agree_count=zero, correct_count=None, num_tokens=0
    )
    assert out.entropy_sum is None


# ---------------------------------------------------------------------------------------------------------------------
# 5. Label smoothing and DFT


@pytest.mark.parametrize("padded", [False, True], ids=["full-vocab", "padded-vocab"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("ce", [("nll", 0.1), ("nll", 0.35), ("dft", 0.0)], ids=["ls0.1", "ls0.35", "dft"])
def test_ce_variants_match_reference(ce, alpha, temperature, padded):
    ce_loss_type, label_smoothing = ce
    problem = Problem(v_student=V + 2 if padded else V, seed=50)
    kwargs = kw("reverse_kl", temperature, alpha, label_smoothing=label_smoothing, ce_loss_type=ce_loss_type)
    out, grads = chunked(problem, labels=problem.labels, chunk_size=6, **kwargs)
    ref, ref_grads = reference(problem, problem.labels, **kwargs)
    assert_matches(out, grads, ref, ref_grads)
    # the logged `ce_sum` is the plain NLL, not the variant in the loss
    assert abs(ref["ce_loss_sum"].item() - ref["ce_sum"].item()) > 1e-2


@pytest.mark.parametrize("num_items_in_batch", [None, 40])
@pytest.mark.parametrize("label_smoothing", [0.1, 0.5])
def test_label_smoothing_matches_transformers_label_smoother(label_smoothing, num_items_in_batch):
    from transformers.trainer_pt_utils import LabelSmoother

    problem = Problem(v_student=V + 2, seed=51)  # the uniform part spans every head row, padding included
    out, grads = chunked(
        problem,
        labels=problem.labels,
        num_items_in_batch=num_items_in_batch,
        chunk_size=5,
        **kw(alpha=1.0, label_smoothing=label_smoothing),
    )
    smoother = LabelSmoother(epsilon=label_smoothing)
    expected = smoother({"logits": problem.student_logits()}, problem.labels, num_items_in_batch=num_items_in_batch)
    expected_grads = torch.autograd.grad(expected, problem.params())
    torch.testing.assert_close(out.loss.double(), expected, **LOSS_TOL)
    for grad, ref_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad.double(), ref_grad.double(), **GRAD_TOL)


def test_dft_matches_trl_sft_formula():
    problem = Problem(v_student=V + 2, seed=52)
    out, grads = chunked(problem, labels=problem.labels, chunk_size=5, **kw(alpha=1.0, ce_loss_type="dft"))
    # trl/trainer/sft_trainer.py: per_token_loss = -log_probs * log_probs.exp().detach(), summed / num_tokens
    mask = problem.labels != -100
    log_probs = torch.log_softmax(problem.student_logits(), -1)[mask].gather(-1, problem.labels[mask, None])
    per_token_loss = -log_probs * log_probs.exp().detach()
    expected = per_token_loss.sum() / mask.sum()
    expected_grads = torch.autograd.grad(expected, problem.params())
    torch.testing.assert_close(out.loss.double(), expected, **LOSS_TOL)
    for grad, ref_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad.double(), ref_grad.double(), **GRAD_TOL)
    # and the logged ce_sum is still the plain NLL
    torch.testing.assert_close(out.ce_sum.double(), -log_probs.sum().detach(), **LOSS_TOL)


def test_label_smoothing_zero_is_plain_nll():
    problem = Problem(seed=53)
    plain, plain_grads = chunked(problem, labels=problem.labels, **kw(alpha=0.7))
    smooth, smooth_grads = chunked(problem, labels=problem.labels, **kw(alpha=0.7, label_smoothing=0.0))
    torch.testing.assert_close(plain.loss, smooth.loss)
    for a, b in zip(plain_grads, smooth_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"ce_loss_type": "mse"}, "ce_loss_type"),
        ({"ce_loss_type": "DFT"}, "ce_loss_type"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"label_smoothing": 0.1, "ce_loss_type": "dft"}, "dft"),
    ],
)
def test_ce_options_are_validated(options, match):
    problem = Problem(seed=54)
    with pytest.raises(ValueError, match=match):
        chunked_distillation_loss(
            problem.hidden,
            problem.student_head(),
            HiddenStateTeacher(problem.teacher_hidden, problem.teacher_head()),
            problem.labels,
            alpha=0.5,
            **options,
        )

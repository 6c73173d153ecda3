"""`chunked_distillation_loss` against a naive reference built from the full `[tokens x vocab]` logits."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from _reference import naive_distillation_loss, naive_head

from hf_distill.losses import (
    DIVERGENCE_NAMES,
    DenseTeacher,
    HiddenStateTeacher,
    LMHead,
    TopKTeacher,
    chunked_distillation_loss,
)

N, H, H_T, V = 29, 12, 10, 37
BETA, SKEW_ALPHA = 0.3, 0.2  # not the defaults, so that forwarding them is checked
# The head computes float32 logits whatever the input dtype, so float64 inputs get float32 accuracy too.
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
# make_problem labels every third row -100: those rows are not scored
N_SCORED = N - len(range(0, N, 3))
GRAD_TOL = {"rtol": 1e-5, "atol": 1e-7}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy machine the thread hand-offs of thousands of small
    # ops cost ~10x the arithmetic. Restored afterwards, so other test modules keep their setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Problem:
    hidden: torch.Tensor  # [N, H], requires grad
    weight: torch.Tensor  # [V_s, H], requires grad
    bias: torch.Tensor | None  # [V_s], requires grad
    teacher_hidden: torch.Tensor  # [N, H_t]
    teacher_weight: torch.Tensor  # [V_t, H_t]
    teacher_bias: torch.Tensor | None
    labels: torch.Tensor  # [N], with -100s

    def params(self):
        return [p for p in (self.hidden, self.weight, self.bias) if p is not None]

    def student_head(self, **kwargs) -> LMHead:
        return LMHead(self.weight, self.bias, **kwargs)

    def teacher_head(self, **kwargs) -> LMHead:
        return LMHead(self.teacher_weight, self.teacher_bias, **kwargs)


def make_problem(
    n=N, v_student=V, v_teacher=V, dtype=torch.float32, seed=0, bias=True, teacher_bias=True, label_vocab=V
) -> Problem:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    labels = torch.randint(0, label_vocab, (n,), generator=gen)
    labels[::3] = -100
    return Problem(
        hidden=randn(n, H).requires_grad_(True),
        weight=randn(v_student, H, scale=2.0 / H**0.5).requires_grad_(True),
        bias=randn(v_student, scale=0.5).requires_grad_(True) if bias else None,
        teacher_hidden=randn(n, H_T),
        teacher_weight=randn(v_teacher, H_T, scale=2.5 / H_T**0.5),
        teacher_bias=randn(v_teacher, scale=0.5) if teacher_bias else None,
        labels=labels,
    )


def run_chunked(problem: Problem, teacher=None, student_head=None, **kwargs):
    """Chunked loss and its gradients w.r.t. (hidden, weight[, bias])."""
    head = student_head or problem.student_head()
    teacher = teacher or HiddenStateTeacher(problem.teacher_hidden, problem.teacher_head())
    out = chunked_distillation_loss(problem.hidden, head, teacher, **kwargs)
    grads = torch.autograd.grad(out.loss, problem.params())
    return out, grads


def run_reference(problem: Problem, labels, *, student_transform=None, teacher_transform=None, **kwargs):
    """Naive loss and its gradients w.r.t. (hidden, weight[, bias]), from full logits."""
    student_logits = naive_head(problem.hidden, problem.weight, problem.bias, **(student_transform or {}))
    teacher_logits = naive_head(
        problem.teacher_hidden, problem.teacher_weight, problem.teacher_bias, **(teacher_transform or {})
    )
    ref = naive_distillation_loss(student_logits, teacher_logits, labels, **kwargs)
    grads = torch.autograd.grad(ref["loss"], problem.params())
    return ref, grads


def assert_matches_reference(out, grads, ref, ref_grads, params):
    torch.testing.assert_close(out.loss.double(), ref["loss"], **LOSS_TOL)
    torch.testing.assert_close(out.distill_sum.double(), ref["distill_sum"], **LOSS_TOL)
    torch.testing.assert_close(out.entropy_sum.double(), ref["entropy_sum"], **LOSS_TOL)
    assert out.num_tokens == ref["num_tokens"]
    if ref["ce_sum"] is None:
        assert out.ce_sum is None and out.correct_count is None
    else:
        torch.testing.assert_close(out.ce_sum.double(), ref["ce_sum"], **LOSS_TOL)
        assert int(out.correct_count) == ref["correct_count"]
    assert int(out.agree_count) == ref["agree_count"]
    for grad, ref_grad, param in zip(grads, ref_grads, params, strict=True):
        assert grad.dtype == param.dtype and grad.shape == param.shape
        torch.testing.assert_close(grad.double(), ref_grad.double(), **GRAD_TOL)


def _kw(divergence, temperature=1.0, alpha=0.0):
    return {
        "divergence": divergence,
        "temperature": temperature,
        "alpha": alpha,
        "beta": BETA,
        "skew_alpha": SKEW_ALPHA,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("chunk_size", [1, 7, N, None], ids=["chunk1", "chunk7", "chunkN", "chunkAuto"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_matches_naive_reference(divergence, temperature, alpha, chunk_size, dtype):
    problem = make_problem(dtype=dtype, seed=1)
    kw = _kw(divergence, temperature, alpha)
    out, grads = run_chunked(problem, labels=problem.labels, vocab_size=V, chunk_size=chunk_size, **kw)
    ref, ref_grads = run_reference(problem, problem.labels, vocab_size=V, **kw)
    assert out.num_tokens == N_SCORED
    assert out.loss.shape == ()
    assert_matches_reference(out, grads, ref, ref_grads, problem.params())


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_without_labels(divergence):
    problem = make_problem(seed=2)
    out, grads = run_chunked(problem, chunk_size=5, **_kw(divergence, 2.0))
    ref, ref_grads = run_reference(problem, None, vocab_size=V, **_kw(divergence, 2.0))
    assert_matches_reference(out, grads, ref, ref_grads, problem.params())


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_independent_of_chunk_size(divergence):
    problem = make_problem(seed=3)
    kw = _kw(divergence, 2.0, 0.5)
    base, base_grads = run_chunked(problem, labels=problem.labels, chunk_size=N, **kw)
    for chunk_size in (1, 2, 5, 7, N - 1, N + 5, None):
        out, grads = run_chunked(problem, labels=problem.labels, chunk_size=chunk_size, **kw)
        torch.testing.assert_close(out.loss, base.loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(out.distill_sum, base.distill_sum, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(out.ce_sum, base.ce_sum, rtol=1e-6, atol=1e-7)
        assert int(out.agree_count) == int(base.agree_count)
        assert int(out.correct_count) == int(base.correct_count)
        torch.testing.assert_close(out.entropy_sum, base.entropy_sum, rtol=1e-6, atol=1e-7)
        for g, b in zip(grads, base_grads, strict=True):
            # float32 gradients of size ~0.1: one- and two-row matmuls round differently by a few 1e-8
            torch.testing.assert_close(g, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_padded_vocabulary(divergence, alpha, temperature):
    # the student head has 2 padding rows and the teacher 6: only the first V columns are compared, while the CE
    # (and the accuracy) use all the student's rows
    problem = make_problem(v_student=V + 2, v_teacher=V + 6, seed=4)
    kw = _kw(divergence, temperature, alpha)
    out, grads = run_chunked(problem, labels=problem.labels, vocab_size=V, chunk_size=6, **kw)
    ref, ref_grads = run_reference(problem, problem.labels, vocab_size=V, **kw)
    assert_matches_reference(out, grads, ref, ref_grads, problem.params())

    if alpha == 0.0:
        # the padding rows then play no part at all: same loss as heads cut to V rows, and no gradient on them
        cut = Problem(
            hidden=problem.hidden,
            weight=problem.weight[:V],
            bias=problem.bias[:V],
            teacher_hidden=problem.teacher_hidden,
            teacher_weight=problem.teacher_weight[:V],
            teacher_bias=problem.teacher_bias[:V],
            labels=problem.labels,
        )
        cut_out = chunked_distillation_loss(
            cut.hidden,
            cut.student_head(),
            HiddenStateTeacher(cut.teacher_hidden, cut.teacher_head()),
            labels=cut.labels,
            chunk_size=6,
            **kw,
        )
        torch.testing.assert_close(out.loss, cut_out.loss, rtol=1e-6, atol=1e-7)
        assert (grads[1][V:] == 0).all() and (grads[2][V:] == 0).all()


def test_teacher_padding_only_with_default_vocab_size():
    # vocab_size left out: the student's row count, the teacher's extra padding columns are dropped
    problem = make_problem(v_teacher=V + 4, seed=5)
    kw = _kw("forward_kl", 2.0, 0.5)
    out, grads = run_chunked(problem, labels=problem.labels, chunk_size=4, **kw)
    ref, ref_grads = run_reference(problem, problem.labels, vocab_size=V, **kw)
    assert_matches_reference(out, grads, ref, ref_grads, problem.params())


def test_student_padding_only_with_default_vocab_size():
    # The docstring: `vocab_size` "defaults to the smaller of the two heads' row counts when they differ only by
    # padding". Here the student has 2 padding rows and the teacher none; the loss must either compare the teacher's V
    # columns, or refuse with a clear ValueError, never fail on a shape mismatch inside the divergence.
    problem = make_problem(v_student=V + 2, v_teacher=V, seed=5)
    kw = _kw("forward_kl", 2.0, 0.5)
    teacher = HiddenStateTeacher(problem.teacher_hidden, problem.teacher_head())
    try:
        out = chunked_distillation_loss(
            problem.hidden, problem.student_head(), teacher, labels=problem.labels, chunk_size=4, **kw
        )
    except ValueError as err:
        assert "vocab" in str(err)
        return
    ref, _ = run_reference(problem, problem.labels, vocab_size=V, **kw)
    torch.testing.assert_close(out.loss.double(), ref["loss"], **LOSS_TOL)


def test_vocab_size_larger_than_student_raises():
    problem = make_problem(seed=5)
    teacher = HiddenStateTeacher(problem.teacher_hidden, problem.teacher_head())
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_distillation_loss(problem.hidden, problem.student_head(), teacher, vocab_size=V + 1)


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("divergence", ["forward_kl", "generalized_jsd", "total_variation"])
def test_num_items_in_batch_normalises(divergence, as_tensor):
    problem = make_problem(seed=6)
    kw = _kw(divergence, 2.0, 0.5)
    base, base_grads = run_chunked(problem, labels=problem.labels, chunk_size=7, **kw)
    n = torch.tensor(2 * N_SCORED) if as_tensor else 2 * N_SCORED
    out, grads = run_chunked(problem, labels=problem.labels, chunk_size=7, num_items_in_batch=n, **kw)
    torch.testing.assert_close(out.loss, base.loss / 2, rtol=1e-6, atol=1e-8)
    for g, b in zip(grads, base_grads, strict=True):  # a tensor divides after the sums: float32 rounding apart
        torch.testing.assert_close(g, b / 2, rtol=1e-6, atol=1e-8)
    # the sums are not normalised
    torch.testing.assert_close(out.distill_sum, base.distill_sum)
    torch.testing.assert_close(out.ce_sum, base.ce_sum)
    # and against the reference with that normaliser
    ref, ref_grads = run_reference(problem, problem.labels, vocab_size=V, normaliser=2 * N_SCORED, **kw)
    assert_matches_reference(out, grads, ref, ref_grads, problem.params())


def test_a_tensor_normaliser_is_not_read_back(monkeypatch):
    # On an accelerator, reading `num_items_in_batch` back would be a host sync per step: it divides the loss instead
    problem = make_problem(seed=6)
    kw = _kw("generalized_jsd", 2.0, 0.0)
    base, base_grads = run_chunked(problem, chunk_size=7, num_items_in_batch=2 * N, **kw)

    def read_back(*_):
        raise AssertionError("a tensor was read back on the host")

    n = torch.tensor(2 * N)
    for name in ("item", "tolist", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    out, grads = run_chunked(problem, chunk_size=7, num_items_in_batch=n, **kw)
    monkeypatch.undo()
    torch.testing.assert_close(out.loss, base.loss, rtol=1e-6, atol=1e-8)
    for g, b in zip(grads, base_grads, strict=True):
        torch.testing.assert_close(g, b, rtol=1e-6, atol=1e-8)


def test_labels_all_scored_skips_the_count_and_changes_nothing(monkeypatch):
    # The trainer selects the scored tokens itself and says so: no count of the labels read back from the device
    problem = make_problem(seed=11)
    keep = problem.labels != -100
    hidden, labels = problem.hidden[keep].detach().requires_grad_(), problem.labels[keep]
    kw = {**_kw("forward_kl", 2.0, 0.4), "chunk_size": 5}
    teacher = HiddenStateTeacher(problem.teacher_hidden[keep], problem.teacher_head())
    base = chunked_distillation_loss(hidden, problem.student_head(), teacher, labels, **kw)
    base_grad = torch.autograd.grad(base.loss, hidden)

    def read_back(*_):
        raise AssertionError("a tensor was read back on the host")

    for name in ("item", "tolist", "__float__", "__int__", "__index__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    n = torch.tensor(float(labels.numel()))
    out = chunked_distillation_loss(
        hidden, problem.student_head(), teacher, labels, num_items_in_batch=n, labels_all_scored=True, **kw
    )
    grad = torch.autograd.grad(out.loss, hidden)
    monkeypatch.undo()
    assert out.num_tokens == base.num_tokens == int(keep.sum())
    torch.testing.assert_close(out.loss, base.loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad[0], base_grad[0], rtol=1e-6, atol=1e-8)
    for name in ("distill_sum", "ce_sum", "agree_count", "correct_count", "entropy_sum"):
        torch.testing.assert_close(getattr(out, name), getattr(base, name))


def test_gradient_accumulation_over_two_halves():
    # with num_items_in_batch = the total scored token count, two half-batches add up to the full batch
    problem = make_problem(seed=7)
    kw = _kw("skew_reverse_kl", 2.0, 0.5)
    full, full_grads = run_chunked(problem, labels=problem.labels, chunk_size=5, **kw)
    teacher_head, head = problem.teacher_head(), problem.student_head()
    total, half = 0.0, N // 2
    for sl in (slice(0, half), slice(half, N)):
        part = chunked_distillation_loss(
            problem.hidden[sl],
            head,
            HiddenStateTeacher(problem.teacher_hidden[sl], teacher_head),
            labels=problem.labels[sl],
            num_items_in_batch=N_SCORED,
            chunk_size=5,
            **kw,
        )
        total = total + part.loss
    grads = torch.autograd.grad(total, problem.params())
    torch.testing.assert_close(total, full.loss, rtol=1e-6, atol=1e-7)
    for g, b in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(g, b, rtol=1e-6, atol=1e-8)


def test_upstream_gradient_is_applied():
    problem = make_problem(seed=8)
    kw = _kw("reverse_kl", 2.0, 0.5)
    out, grads = run_chunked(problem, labels=problem.labels, chunk_size=7, **kw)
    out3 = chunked_distillation_loss(
        problem.hidden,
        problem.student_head(),
        HiddenStateTeacher(problem.teacher_hidden, problem.teacher_head()),
        labels=problem.labels,
        chunk_size=7,
        **kw,
    )
    grads3 = torch.autograd.grad(-3.0 * out3.loss, problem.params())
    for g3, g in zip(grads3, grads, strict=True):
        torch.testing.assert_close(g3, -3.0 * g)
    # and .backward() fills .grad the same way
    out4 = chunked_distillation_loss(
        problem.hidden,
        problem.student_head(),
        HiddenStateTeacher(problem.teacher_hidden, problem.teacher_head()),
        labels=problem.labels,
        chunk_size=7,
        **kw,
    )
    out4.loss.backward()
    for p, g in zip(problem.params(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_teacher_equals_student_gives_zero(divergence):
    problem = make_problem(seed=9)
    teacher = HiddenStateTeacher(problem.hidden.detach(), LMHead(problem.weight.detach(), problem.bias.detach()))
    out, grads = run_chunked(problem, teacher=teacher, labels=problem.labels, chunk_size=7, **_kw(divergence, 2.0))
    torch.testing.assert_close(out.loss, torch.zeros(()), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.distill_sum, torch.zeros(()), rtol=0, atol=1e-5)
    assert int(out.agree_count) == N_SCORED
    for g in grads:
        torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_logit_scale_and_softcap(divergence):
    problem = make_problem(seed=10)
    student_transform = {"logit_scale": 1.7, "softcap": 4.0}
    teacher_transform = {"logit_scale": 0.6, "softcap": 3.0}
    kw = _kw(divergence, 2.0, 0.5)
    teacher = HiddenStateTeacher(problem.teacher_hidden, problem.teacher_head(**teacher_transform))
    out, grads = run_chunked(
        problem,
        teacher=teacher,
        student_head=problem.student_head(**student_transform),
        labels=problem.labels,
        chunk_size=7,
        **kw,
    )
    ref, ref_grads = run_reference(
        problem,
        problem.labels,
        student_transform=student_transform,
        teacher_transform=teacher_transform,
        vocab_size=V,
        **kw,
    )
    assert_matches_reference(out, grads, ref, ref_grads, problem.params())
    # the transform does change the result (so the comparison above is not vacuous)
    plain, _ = run_reference(problem, problem.labels, vocab_size=V, **kw)
    assert abs(plain["loss"].item() - out.loss.item()) > 1e-3


@pytest.mark.parametrize("logit_scale,softcap", [(0.25, None), (1.0, 2.0)])
def test_logit_scale_and_softcap_separately(logit_scale, softcap):
    problem = make_problem(seed=11)
    transform = {"logit_scale": logit_scale, "softcap": softcap}
    kw = _kw("forward_kl", 1.0, 0.5)
    out, grads = run_chunked(
        problem,
        teacher=HiddenStateTeacher(problem.teacher_hidden, problem.teacher_head(**transform)),
        student_head=problem.student_head(**transform),
        labels=problem.labels,
        chunk_size=7,
        **kw,
    )
    ref, ref_grads = run_reference(
        problem,
        problem.labels,
        student_transform=transform,
        teacher_transform=transform,
        vocab_size=V,
        **kw,
    )
    assert_matches_reference(out, grads, ref, ref_grads, problem.params())


@pytest.mark.parametrize("divergence", ["forward_kl", "total_variation"])
def test_no_grad_gives_same_loss(divergence):
    problem = make_problem(seed=12)
    kw = _kw(divergence, 2.0, 0.5)
    out, _ = run_chunked(problem, labels=problem.labels, chunk_size=7, **kw)
    teacher = HiddenStateTeacher(problem.teacher_hidden, problem.teacher_head())
    with torch.no_grad():
        quiet = chunked_distillation_loss(
            problem.hidden, problem.student_head(), teacher, labels=problem.labels, chunk_size=7, **kw
        )
    assert not quiet.loss.requires_grad
    torch.testing.assert_close(quiet.loss, out.loss)
    torch.testing.assert_close(quiet.distill_sum, out.distill_sum)
    torch.testing.assert_close(quiet.ce_sum, out.ce_sum)
    assert int(quiet.agree_count) == int(out.agree_count)
    assert int(quiet.correct_count) == int(out.correct_count)

    # inputs that do not require grad at all
    frozen = LMHead(problem.weight.detach(), problem.bias.detach())
    plain = chunked_distillation_loss(
        problem.hidden.detach(), frozen, teacher, labels=problem.labels, chunk_size=7, **kw
    )
    assert not plain.loss.requires_grad
    torch.testing.assert_close(plain.loss, out.loss)


def test_only_some_inputs_require_grad():
    problem = make_problem(seed=13)
    kw = _kw("generalized_jsd", 2.0, 0.5)
    ref, ref_grads = run_reference(problem, problem.labels, vocab_size=V, **kw)
    hidden = problem.hidden.detach()
    head = LMHead(problem.weight, problem.bias.detach())  # only the weight trains
    teacher = HiddenStateTeacher(problem.teacher_hidden, problem.teacher_head())
    out = chunked_distillation_loss(hidden, head, teacher, labels=problem.labels, chunk_size=7, **kw)
    (grad_weight,) = torch.autograd.grad(out.loss, [problem.weight])
    torch.testing.assert_close(out.loss.double(), ref["loss"], **LOSS_TOL)
    torch.testing.assert_close(grad_weight.double(), ref_grads[1].double(), **GRAD_TOL)


@pytest.mark.parametrize("divergence", ["forward_kl", "skew_kl"])
def test_head_without_bias(divergence):
    problem = make_problem(seed=14, bias=False, teacher_bias=False)
    kw = _kw(divergence, 2.0, 0.5)
    out, grads = run_chunked(problem, labels=problem.labels, chunk_size=7, **kw)
    ref, ref_grads = run_reference(problem, problem.labels, vocab_size=V, **kw)
    assert len(grads) == 2
    assert_matches_reference(out, grads, ref, ref_grads, problem.params())


def test_zero_tokens():
    problem = make_problem(n=0, seed=15)
    teacher = HiddenStateTeacher(problem.teacher_hidden, problem.teacher_head())
    out = chunked_distillation_loss(
        problem.hidden, problem.student_head(), teacher, labels=problem.labels, alpha=0.5, temperature=2.0
    )
    assert out.num_tokens == 0
    assert out.loss.item() == 0.0
    assert out.distill_sum.item() == 0.0 and out.ce_sum.item() == 0.0
    assert int(out.agree_count) == 0 and int(out.correct_count) == 0
    out.loss.backward()
    assert problem.hidden.grad is not None and problem.hidden.grad.shape == (0, H)
    assert problem.weight.grad is not None and (problem.weight.grad == 0).all()
    assert problem.bias.grad is not None and (problem.bias.grad == 0).all()


def test_alpha_without_labels_raises():
    problem = make_problem(seed=16)
    teacher = HiddenStateTeacher(problem.teacher_hidden, problem.teacher_head())
    with pytest.raises(ValueError, match="labels"):
        chunked_distillation_loss(problem.hidden, problem.student_head(), teacher, alpha=0.5)


def test_hidden_must_be_2d():
    problem = make_problem(seed=16)
    teacher = HiddenStateTeacher(problem.teacher_hidden, problem.teacher_head())
    with pytest.raises(ValueError, match="student_hidden"):
        chunked_distillation_loss(problem.hidden.detach().unsqueeze(0), problem.student_head(), teacher)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_hidden_state_and_dense_teachers_agree(divergence):
    problem = make_problem(v_teacher=V + 3, seed=17)
    kw = _kw(divergence, 2.0, 0.5)
    head = problem.teacher_head(logit_scale=0.8, softcap=6.0)
    from_hidden, grads_hidden = run_chunked(
        problem, teacher=HiddenStateTeacher(problem.teacher_hidden, head), labels=problem.labels, chunk_size=7, **kw
    )
    dense_logits = head.logits(problem.teacher_hidden)
    assert dense_logits.shape == (N, V + 3)
    from_dense, grads_dense = run_chunked(
        problem, teacher=DenseTeacher(dense_logits), labels=problem.labels, chunk_size=7, **kw
    )
    torch.testing.assert_close(from_dense.loss, from_hidden.loss)
    torch.testing.assert_close(from_dense.distill_sum, from_hidden.distill_sum)
    torch.testing.assert_close(from_dense.ce_sum, from_hidden.ce_sum)
    assert int(from_dense.agree_count) == int(from_hidden.agree_count)
    assert int(from_dense.correct_count) == int(from_hidden.correct_count)
    for a, b in zip(grads_dense, grads_hidden, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "divergence,beta,skew_alpha",
    [
        ("forward_kl", BETA, SKEW_ALPHA),
        ("generalized_jsd", 0.0, SKEW_ALPHA),
        ("generalized_jsd", 0.5, SKEW_ALPHA),
        ("total_variation", BETA, SKEW_ALPHA),
        ("skew_kl", BETA, 0.1),
        ("skew_reverse_kl", BETA, 0.1),
    ],
)
def test_dense_teacher_with_masked_vocabulary(divergence, beta, skew_alpha):
    # A teacher that gives some tokens exactly zero probability (-inf logits, e.g. a masked or top-k teacher).
    # `token_divergence` treats 0 * log(0) as 0; the chunked loss must too, for every divergence that stays finite
    # (all but KL(student || teacher)).
    problem = make_problem(seed=20)
    teacher_logits = naive_head(problem.teacher_hidden, problem.teacher_weight, problem.teacher_bias).float()
    teacher_logits[:, ::5] = float("-inf")
    kw = {"divergence": divergence, "temperature": 2.0, "alpha": 0.5, "beta": beta, "skew_alpha": skew_alpha}
    out, grads = run_chunked(problem, teacher=DenseTeacher(teacher_logits), labels=problem.labels, chunk_size=7, **kw)
    student_logits = naive_head(problem.hidden, problem.weight, problem.bias)
    ref = naive_distillation_loss(student_logits, teacher_logits.double(), problem.labels, vocab_size=V, **kw)
    ref_grads = torch.autograd.grad(ref["loss"], problem.params())
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
    assert_matches_reference(out, grads, ref, ref_grads, problem.params())


def test_counts_match_naive_counts():
    # a student trained towards the teacher, so that agreement and accuracy are neither 0 nor N
    problem = make_problem(seed=18)
    teacher_logits = naive_head(problem.teacher_hidden, problem.teacher_weight, problem.teacher_bias).float()
    student_logits = 0.5 * teacher_logits + 0.5 * naive_head(problem.hidden, problem.weight, problem.bias).float()
    labels = problem.labels.clone()
    valid = labels != -100
    labels[valid & (torch.arange(N) % 2 == 0)] = student_logits.argmax(-1)[valid & (torch.arange(N) % 2 == 0)]
    out = chunked_distillation_loss(
        torch.eye(N).requires_grad_(True),  # identity hidden states: the head weight columns are the logits
        LMHead(student_logits.t().contiguous().detach().requires_grad_(True)),
        DenseTeacher(teacher_logits),
        labels=labels,
        alpha=0.5,
        chunk_size=4,
    )
    agree = int(((student_logits.argmax(-1) == teacher_logits.argmax(-1)) & valid).sum())
    correct = int(((student_logits.argmax(-1) == labels) & valid).sum())
    assert 0 < agree < int(valid.sum()) and 0 < correct < int(valid.sum())
    assert int(out.agree_count) == agree
    assert int(out.correct_count) == correct


def test_correct_count_ignores_masked_labels():
    problem = make_problem(seed=19)
    logits = naive_head(problem.hidden, problem.weight, problem.bias)
    top1 = logits.argmax(-1)
    labels = top1.clone()
    labels[::2] = -100  # the rest are all correct
    teacher = HiddenStateTeacher(problem.teacher_hidden, problem.teacher_head())
    out = chunked_distillation_loss(problem.hidden, problem.student_head(), teacher, labels=labels, chunk_size=7)
    assert int(out.correct_count) == int((labels != -100).sum())


# ------------------------------------------------------------------------------------------------ memory per chunk


def _tensor_allocation_peak():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from _common import TensorAllocationPeak

    return TensorAllocationPeak()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(
    ("teacher_kind", "divergence", "most_tiles"),
    [
        ("dense", "generalized_jsd", 6.2),  # 9.6 tiles before the in-place rewrite of the chunk loop
        ("dense", "forward_kl", 5.2),
        ("bucket", "generalized_jsd", 4.0),  # 5.6 before
        ("renormalize", "forward_kl", 4.0),
    ],
)
def test_a_chunk_holds_a_few_logit_tiles(teacher_kind, divergence, temperature, most_tiles):
    """Peak tensor memory of forward + backward over one chunk, counted by the profiler (CPU): at most `most_tiles`
    float32 `[chunk, V]` tiles besides the stored gradients (an allocation count, not a timing: deterministic)."""
    torch.manual_seed(0)
    n, h, v = 256, 64, 4096
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    teacher_hidden, teacher_weight = torch.randn(n, h), torch.randn(v, h)
    if teacher_kind == "dense":
        teacher = HiddenStateTeacher(teacher_hidden, LMHead(teacher_weight), torch.device("cpu"))
    else:
        logits = teacher_hidden @ teacher_weight.T
        teacher = TopKTeacher.from_logits(logits, 16, temperature)
    sparse = "renormalize" if teacher_kind == "renormalize" else "bucket"
    with _tensor_allocation_peak() as probe:
        out = chunked_distillation_loss(
            hidden, LMHead(weight), teacher, labels, divergence=divergence, temperature=temperature, alpha=0.5,
            chunk_size=n, sparse_targets=sparse,
        )  # fmt: skip
        out.loss.backward()
        del out
    stored = (2 * v * h + 2 * n * h) * 4 / 2**20  # the saved weight and hidden gradients and their scaled copies
    tiles = (probe.peak_mib - stored) / (n * v * 4 / 2**20)
    assert 1.0 < tiles <= most_tiles

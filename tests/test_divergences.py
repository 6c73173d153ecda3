"""Per-token divergences (`token_divergence`) against a naive reference written from the definitions."""

from __future__ import annotations

import math

import pytest
import torch
from _reference import naive_divergence, naive_kl, naive_softmax

from hf_distill.losses import DIVERGENCE_NAMES, get_divergence, token_divergence

TEMPERATURES = (1.0, 0.5, 2.0)
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
SKEW_ALPHAS = (0.0, 0.1, 0.5, 0.9)
# Parameters a divergence does not use are set to odd values, so that accidentally using them would show.
UNUSED_BETA, UNUSED_SKEW = 0.3, 0.7


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy machine the thread hand-offs of thousands of small
    # ops cost ~10x the arithmetic. Restored afterwards, so other test modules keep their setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cases():
    cases = []
    for t in TEMPERATURES:
        for name in ("forward_kl", "reverse_kl", "total_variation"):
            cases.append((name, t, UNUSED_BETA, UNUSED_SKEW))
        for beta in BETAS:
            cases.append(("generalized_jsd", t, beta, UNUSED_SKEW))
        for skew in SKEW_ALPHAS:
            cases.append(("skew_kl", t, UNUSED_BETA, skew))
            cases.append(("skew_reverse_kl", t, UNUSED_BETA, skew))
    return cases


CASES = _cases()
CASE_IDS = [f"{name}-T{t}-beta{beta}-skew{skew}" for name, t, beta, skew in CASES]
# One parameter setting per divergence, for the property tests.
PER_DIVERGENCE = [
    ("forward_kl", UNUSED_BETA, UNUSED_SKEW),
    ("reverse_kl", UNUSED_BETA, UNUSED_SKEW),
    ("generalized_jsd", 0.0, UNUSED_SKEW),
    ("generalized_jsd", 0.1, UNUSED_SKEW),
    ("generalized_jsd", 0.5, UNUSED_SKEW),
    ("generalized_jsd", 1.0, UNUSED_SKEW),
    ("total_variation", UNUSED_BETA, UNUSED_SKEW),
    ("skew_kl", UNUSED_BETA, 0.1),
    ("skew_kl", UNUSED_BETA, 0.5),
    ("skew_reverse_kl", UNUSED_BETA, 0.1),
    ("skew_reverse_kl", UNUSED_BETA, 0.5),
]
PER_DIVERGENCE_IDS = [f"{name}-beta{beta}-skew{skew}" for name, beta, skew in PER_DIVERGENCE]

TOL = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-11},
    # float32 log-probabilities at T = 0.5 reach ~-40, so gradients of size ~5 carry a few 1e-6 of rounding (as much as
    # a naive float32 computation)
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
}


def _logits(shape, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def test_names_are_all_covered():
    assert set(DIVERGENCE_NAMES) == {name for name, *_ in CASES}
    assert len(DIVERGENCE_NAMES) == 6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_naive_reference_values_and_gradients(case, dtype):
    name, temperature, beta, skew_alpha = case
    shape = (3, 5, 17)  # leading batch dims are kept
    student = _logits(shape, 0).to(dtype).requires_grad_(True)
    teacher = _logits(shape, 1).to(dtype)
    upstream = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    out = token_divergence(student, teacher, name, temperature=temperature, beta=beta, skew_alpha=skew_alpha)
    assert out.shape == shape[:-1]
    assert out.dtype == dtype
    (grad,) = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), student)
    assert grad.dtype == dtype

    # reference in float64 from exactly the same input values
    ref_student = student.detach().double().requires_grad_(True)
    ref = naive_divergence(ref_student, teacher.double(), name, temperature, beta=beta, skew_alpha=skew_alpha)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), ref_student)

    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    torch.testing.assert_close(grad.double(), ref_grad, **TOL[dtype])


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_low_precision_inputs_are_computed_in_float32(name):
    student = _logits((4, 11), 3).to(torch.bfloat16).requires_grad_(True)
    teacher = _logits((4, 11), 4).to(torch.bfloat16)
    out = token_divergence(student, teacher, name, temperature=2.0, beta=0.4, skew_alpha=0.2)
    assert out.dtype == torch.float32
    ref = naive_divergence(student.detach().double(), teacher.double(), name, 2.0, beta=0.4, skew_alpha=0.2)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    (grad,) = torch.autograd.grad(out.sum(), student)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("case", PER_DIVERGENCE, ids=PER_DIVERGENCE_IDS)
def test_zero_when_student_equals_teacher(case, temperature, dtype):
    name, beta, skew_alpha = case
    logits = _logits((6, 23), 5).to(dtype)
    student = logits.clone().requires_grad_(True)
    out = token_divergence(student, logits.clone(), name, temperature=temperature, beta=beta, skew_alpha=skew_alpha)
    (grad,) = torch.autograd.grad(out.sum(), student)
    atol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=atol)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=atol)


@pytest.mark.parametrize("scale", [0.1, 3.0, 12.0])
@pytest.mark.parametrize("case", PER_DIVERGENCE, ids=PER_DIVERGENCE_IDS)
def test_non_negative(case, scale):
    name, beta, skew_alpha = case
    student = _logits((64, 19), 6, scale=scale).float()
    # half the teachers are close to the student (where rounding could push a divergence below 0), half unrelated
    teacher = torch.cat([student[:32] + 1e-3 * _logits((32, 19), 7).float(), _logits((32, 19), 8, scale).float()])
    for temperature in TEMPERATURES:
        out = token_divergence(student, teacher, name, temperature=temperature, beta=beta, skew_alpha=skew_alpha)
        assert torch.isfinite(out).all()
        assert (out >= -1e-6).all(), out.min()


@pytest.mark.parametrize("case", PER_DIVERGENCE, ids=PER_DIVERGENCE_IDS)
def test_teacher_with_masked_vocabulary(case):
    # a teacher that puts exactly zero probability on some tokens (-inf logits, e.g. a masked vocabulary)
    name, beta, skew_alpha = case
    student = _logits((6, 17), 21).requires_grad_(True)
    teacher = _logits((6, 17), 22)
    teacher[:, ::4] = float("-inf")
    out = token_divergence(student, teacher, name, temperature=2.0, beta=beta, skew_alpha=skew_alpha)
    if name == "reverse_kl" or (name == "generalized_jsd" and beta == 1.0):
        # the student puts mass where the teacher has none: KL(student || teacher) is infinite
        assert torch.isinf(out).all() and (out > 0).all()
        return
    ref_student = student.detach().clone().requires_grad_(True)
    ref = naive_divergence(ref_student, teacher, name, 2.0, beta=beta, skew_alpha=skew_alpha)
    (grad,) = torch.autograd.grad(out.sum(), student)
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_student)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    torch.testing.assert_close(grad, ref_grad, **TOL[torch.float64])


def _two_class_logits():
    # p_teacher = [0.9, 0.1], p_student = [0.5, 0.5]
    teacher = torch.tensor([[math.log(0.9), math.log(0.1)]], dtype=torch.float64)
    student = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    return student, teacher


def test_direction_of_forward_and_reverse_kl_is_pinned():
    student, teacher = _two_class_logits()
    kl_teacher_student = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(teacher || student) ~ 0.368
    kl_student_teacher = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(student || teacher) ~ 0.511
    forward = token_divergence(student, teacher, "forward_kl")
    reverse = token_divergence(student, teacher, "reverse_kl")
    torch.testing.assert_close(forward, torch.tensor([kl_teacher_student], dtype=torch.float64))
    torch.testing.assert_close(reverse, torch.tensor([kl_student_teacher], dtype=torch.float64))
    assert abs(forward.item() - reverse.item()) > 0.1

    # and on a random asymmetric example
    student, teacher = _logits((8, 13), 9), _logits((8, 13), 10)
    forward = token_divergence(student, teacher, "forward_kl")
    reverse = token_divergence(student, teacher, "reverse_kl")
    assert not torch.allclose(forward, reverse, rtol=1e-3, atol=1e-3)
    # swapping the arguments swaps the direction
    torch.testing.assert_close(token_divergence(teacher, student, "reverse_kl"), forward)


def test_skew_divergences_hand_computed():
    student, teacher = _two_class_logits()
    a = 0.25
    m = [a * 0.9 + (1 - a) * 0.5, a * 0.1 + (1 - a) * 0.5]
    skew = 0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1])
    m_rev = [a * 0.5 + (1 - a) * 0.9, a * 0.5 + (1 - a) * 0.1]
    skew_rev = 0.5 * math.log(0.5 / m_rev[0]) + 0.5 * math.log(0.5 / m_rev[1])
    torch.testing.assert_close(
        token_divergence(student, teacher, "skew_kl", skew_alpha=a), torch.tensor([skew], dtype=torch.float64)
    )
    torch.testing.assert_close(
        token_divergence(student, teacher, "skew_reverse_kl", skew_alpha=a),
        torch.tensor([skew_rev], dtype=torch.float64),
    )


def test_generalized_jsd_hand_computed():
    student, teacher = _two_class_logits()
    b = 0.3
    m = [b * 0.9 + (1 - b) * 0.5, b * 0.1 + (1 - b) * 0.5]
    kl_t_m = 0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1])
    kl_s_m = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    expected = b * kl_t_m + (1 - b) * kl_s_m
    torch.testing.assert_close(
        token_divergence(student, teacher, "generalized_jsd", beta=b), torch.tensor([expected], dtype=torch.float64)
    )
    torch.testing.assert_close(
        token_divergence(student, teacher, "total_variation"), torch.tensor([0.4], dtype=torch.float64)
    )


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_generalized_jsd_end_points_are_the_kls(temperature):
    student, teacher = _logits((5, 21), 11), _logits((5, 21), 12)
    kwargs = {"temperature": temperature}
    forward = token_divergence(student, teacher, "forward_kl", **kwargs)
    reverse = token_divergence(student, teacher, "reverse_kl", **kwargs)
    torch.testing.assert_close(token_divergence(student, teacher, "generalized_jsd", beta=0.0, **kwargs), forward)
    torch.testing.assert_close(token_divergence(student, teacher, "generalized_jsd", beta=1.0, **kwargs), reverse)
    # skew_alpha = 0 also reduces the skew divergences to the plain KLs
    torch.testing.assert_close(token_divergence(student, teacher, "skew_kl", skew_alpha=0.0, **kwargs), forward)
    torch.testing.assert_close(
        token_divergence(student, teacher, "skew_reverse_kl", skew_alpha=0.0, **kwargs), reverse
    )


def test_symmetric_divergences_and_bounds():
    student, teacher = _logits((7, 15), 13), _logits((7, 15), 14)
    jsd = token_divergence(student, teacher, "generalized_jsd", beta=0.5)
    torch.testing.assert_close(jsd, token_divergence(teacher, student, "generalized_jsd", beta=0.5))
    assert (jsd <= math.log(2) + 1e-12).all()
    tv = token_divergence(student, teacher, "total_variation")
    torch.testing.assert_close(tv, token_divergence(teacher, student, "total_variation"))
    assert (tv <= 1.0 + 1e-12).all()
    # beta and 1 - beta swap the roles of student and teacher
    torch.testing.assert_close(
        token_divergence(student, teacher, "generalized_jsd", beta=0.2),
        token_divergence(teacher, student, "generalized_jsd", beta=0.8),
    )


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_temperature_divides_both_logits(name):
    student, teacher = _logits((4, 9), 15), _logits((4, 9), 16)
    torch.testing.assert_close(
        token_divergence(student, teacher, name, temperature=2.5, beta=0.4, skew_alpha=0.2),
        token_divergence(student / 2.5, teacher / 2.5, name, temperature=1.0, beta=0.4, skew_alpha=0.2),
    )


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_get_divergence_takes_log_probs(name):
    student, teacher = _logits((4, 9), 17), _logits((4, 9), 18)
    s_log, t_log = naive_softmax(student).log(), naive_softmax(teacher).log()
    fn = get_divergence(name, beta=0.4, skew_alpha=0.2)
    torch.testing.assert_close(fn(s_log, t_log), naive_divergence(student, teacher, name, beta=0.4, skew_alpha=0.2))


def test_reference_kl_sanity():
    # the reference itself: KL(p || p) = 0 and KL(p || q) > 0
    p, q = naive_softmax(_logits((3, 5), 19)), naive_softmax(_logits((3, 5), 20))
    torch.testing.assert_close(naive_kl(p, p), torch.zeros(3, dtype=torch.float64))
    assert (naive_kl(p, q) > 0).all()


def test_mismatched_vocab_raises():
    with pytest.raises(ValueError, match="vocabulary"):
        token_divergence(torch.randn(3, 10), torch.randn(3, 12), "forward_kl")


def test_unknown_divergence_raises():
    with pytest.raises(ValueError, match="Unknown divergence"):
        token_divergence(torch.randn(3, 10), torch.randn(3, 10), "kl_forward")
    with pytest.raises(ValueError, match="Unknown divergence"):
        get_divergence("jsd")

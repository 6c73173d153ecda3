"""`chunked_distillation_loss` with top-k teacher targets ([`TopKTeacher`]) against naive float64 references.

The references are written from the definitions: the student's full softmax, explicit bucket distributions (the k ids
plus a "rest" bucket summing the student's probabilities outside them) or distributions renormalised over the k ids,
the divergence summed term by term, and autograd through all of it.
"""

from __future__ import annotations

import pytest
import torch
from _reference import naive_cross_entropy_sum, naive_entropy, naive_head, naive_kl, naive_softmax

from hf_distill.losses import (
    DIVERGENCE_NAMES,
    SPARSE_TARGET_MODES,
    DenseTeacher,
    HiddenStateTeacher,
    LMHead,
    TopKTeacher,
    chunked_distillation_loss,
    rest_log_prob_from_top_k,
)
from hf_distill.losses.teacher_logits import select_teacher_rows

N, H, H_T, V, K = 23, 12, 10, 37, 8
BETA, SKEW_ALPHA = 0.3, 0.2
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
GRAD_TOL = {"rtol": 1e-5, "atol": 1e-7}
# k = V against the dense loss: the same float32 arithmetic but for the order of the sums (values ~1, gradients ~0.1)
FLOAT_ROUNDING = ({"rtol": 1e-6, "atol": 1e-7}, {"rtol": 1e-6, "atol": 5e-8})


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Problem:
    """Student hidden states and head (requiring grad), teacher logits (float64) and labels with -100s."""

    def __init__(self, n=N, v=V, v_student=None, v_teacher=None, seed=0, teacher_scale=2.5):
        gen = torch.Generator().manual_seed(seed)
        v_student, v_teacher = v_student or v, v_teacher or v
        self.gen = gen
        self.hidden = torch.randn(n, H, generator=gen).requires_grad_(True)
        self.weight = (torch.randn(v_student, H, generator=gen) * 2.0 / H**0.5).requires_grad_(True)
        self.bias = (torch.randn(v_student, generator=gen) * 0.5).requires_grad_(True)
        teacher_hidden = torch.randn(n, H_T, generator=gen, dtype=torch.float64)
        teacher_weight = torch.randn(v_teacher, H_T, generator=gen, dtype=torch.float64) * teacher_scale / H_T**0.5
        self.teacher_logits = naive_head(teacher_hidden, teacher_weight).float()  # [N, V_t]
        self.labels = torch.randint(0, v, (n,), generator=gen)
        self.labels[::3] = -100

    def params(self):
        return [self.hidden, self.weight, self.bias]

    def head(self) -> LMHead:
        return LMHead(self.weight, self.bias)

    def top_k(self, k, temperature=1.0, shuffle=True, exact_rest=True) -> TopKTeacher:
        """Top-k targets written from the definition: float64 softmax at T, top-k, exact remaining mass."""
        p = naive_softmax(self.teacher_logits, temperature)
        top, ids = p.topk(k, dim=-1)
        if shuffle:  # the order within a row must not matter
            order = torch.argsort(torch.rand(ids.shape, generator=self.gen), dim=-1)
            top, ids = top.gather(-1, order), ids.gather(-1, order)
        outside = p.clone().scatter_(-1, ids, 0.0).sum(-1)
        rest = torch.log(outside).float() if exact_rest else None
        if k == p.shape[-1]:
            rest = torch.full((p.shape[0],), float("-inf")) if exact_rest else None
        return TopKTeacher(ids, torch.log(top).float(), rest, temperature, vocab_rows=p.shape[-1])


def naive_divergence_from_probs(p_s, p_t, divergence, beta=BETA, skew_alpha=SKEW_ALPHA):
    """Per-row divergence between explicit probability vectors (float64), the conventions of `naive_divergence`."""
    if divergence == "forward_kl":
        return naive_kl(p_t, p_s)
    if divergence == "reverse_kl":
        return naive_kl(p_s, p_t)
    if divergence == "generalized_jsd":
        m = beta * p_t + (1.0 - beta) * p_s
        return beta * naive_kl(p_t, m) + (1.0 - beta) * naive_kl(p_s, m)
    if divergence == "total_variation":
        return 0.5 * (p_t - p_s).abs().sum(-1)
    if divergence == "skew_kl":
        return naive_kl(p_t, skew_alpha * p_t + (1.0 - skew_alpha) * p_s)
    if divergence == "skew_reverse_kl":
        return naive_kl(p_s, skew_alpha * p_s + (1.0 - skew_alpha) * p_t)
    raise KeyError(divergence)


def naive_sparse_loss(
    student_logits, teacher: TopKTeacher, labels, *, mode, divergence, temperature, alpha, vocab_size
):
    """Reference loss and statistics with top-k targets, from full float64 student logits."""
    ids, t_log_probs, t_rest = teacher.token_ids.long(), teacher.log_probs.double(), teacher.rest_log_prob
    if t_rest is None:
        t_rest = torch.log(torch.clamp(1.0 - t_log_probs.exp().sum(-1), min=0.0))
    scored = [i for i in range(labels.shape[0]) if int(labels[i]) != -100]
    rows = torch.tensor(scored, dtype=torch.long)
    student_logits, labels = student_logits[rows], labels[rows]
    ids, t_log_probs, t_rest = ids[rows], t_log_probs[rows], t_rest.double()[rows]
    p_s = naive_softmax(student_logits[:, :vocab_size], temperature)
    q_ids = t_log_probs.exp()
    p_ids = p_s.gather(-1, ids)
    if mode == "bucket":
        outside = torch.ones_like(p_s).scatter_(-1, ids, 0.0)
        p_buckets = torch.cat([p_ids, (p_s * outside).sum(-1, keepdim=True)], dim=-1)
        q_buckets = torch.cat([q_ids, t_rest.exp().unsqueeze(-1)], dim=-1)
    else:
        p_buckets = p_ids / p_ids.sum(-1, keepdim=True)
        q_buckets = q_ids / q_ids.sum(-1, keepdim=True)
    distill_sum = naive_divergence_from_probs(p_buckets, q_buckets, divergence).sum()
    ce_sum = naive_cross_entropy_sum(student_logits, labels)
    n = float(max(len(scored), 1))
    loss = ((1.0 - alpha) * temperature**2 * distill_sum + alpha * ce_sum) / n
    teacher_top1 = ids.gather(-1, t_log_probs.argmax(-1, keepdim=True)).squeeze(-1)
    student_top1 = student_logits[:, :vocab_size].detach().argmax(-1)
    return {
        "loss": loss,
        "distill_sum": distill_sum,
        "ce_sum": ce_sum,
        "agree_count": int((student_top1 == teacher_top1).sum()),
        "correct_count": int((student_logits.detach().argmax(-1) == labels).sum()),
        "entropy_sum": naive_entropy(student_logits.detach()).sum(),
        "num_tokens": len(scored),
    }


def run_sparse(problem: Problem, teacher, **kwargs):
    kwargs = {"beta": BETA, "skew_alpha": SKEW_ALPHA, **kwargs}  # the reference's
    out = chunked_distillation_loss(problem.hidden, problem.head(), teacher, problem.labels, **kwargs)
    return out, torch.autograd.grad(out.loss, problem.params())


def run_naive(problem: Problem, teacher, vocab_size=V, **kwargs):
    logits = naive_head(problem.hidden, problem.weight, problem.bias)
    ref = naive_sparse_loss(logits, teacher, problem.labels, vocab_size=vocab_size, **kwargs)
    return ref, torch.autograd.grad(ref["loss"], problem.params())


def assert_close_outputs(out, grads, ref, ref_grads, loss_tol=LOSS_TOL, grad_tol=GRAD_TOL):
    for name in ("loss", "distill_sum", "ce_sum", "entropy_sum"):
        torch.testing.assert_close(getattr(out, name).double(), ref[name].double(), **loss_tol)
    for name in ("agree_count", "correct_count", "num_tokens"):
        assert int(getattr(out, name)) == int(ref[name]), name
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad.double(), ref_grad.double(), **grad_tol)


def dense_as_ref(out, grads):
    ref = {name: getattr(out, name) for name in ("loss", "distill_sum", "ce_sum", "entropy_sum")}
    ref.update({name: int(getattr(out, name)) for name in ("agree_count", "correct_count", "num_tokens")})
    return ref, grads


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("mode", SPARSE_TARGET_MODES)
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_matches_naive_reference(divergence, mode, temperature, alpha):
    problem = Problem(seed=1)
    teacher = problem.top_k(K, temperature)
    kw = {"divergence": divergence, "temperature": temperature, "alpha": alpha}
    out, grads = run_sparse(problem, teacher, sparse_targets=mode, chunk_size=7, **kw)
    ref, ref_grads = run_naive(problem, teacher, mode=mode, **kw)
    assert out.num_tokens == N - len(range(0, N, 3))
    assert torch.isfinite(out.loss) and out.distill_sum > 0
    assert_close_outputs(out, grads, ref, ref_grads)


def test_default_mode_is_bucket():
    problem = Problem(seed=2)
    teacher = problem.top_k(K, 2.0)
    default, _ = run_sparse(problem, teacher, temperature=2.0)
    bucket, _ = run_sparse(problem, teacher, temperature=2.0, sparse_targets="bucket")
    renorm, _ = run_sparse(problem, teacher, temperature=2.0, sparse_targets="renormalize")
    assert default.loss.item() == bucket.loss.item() != renorm.loss.item()


@pytest.mark.parametrize("shuffle", [False, True], ids=["sorted", "shuffled"])
@pytest.mark.parametrize("mode", SPARSE_TARGET_MODES)
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_k_equal_to_vocabulary_is_the_dense_loss(divergence, mode, shuffle):
    problem = Problem(seed=3)
    kw = {"divergence": divergence, "temperature": 2.0, "alpha": 0.3, "beta": BETA, "skew_alpha": SKEW_ALPHA}
    dense, dense_grads = run_sparse(problem, DenseTeacher(problem.teacher_logits), chunk_size=7, **kw)
    for exact_rest in (True, False):
        teacher = problem.top_k(V, 2.0, shuffle=shuffle, exact_rest=exact_rest)
        out, grads = run_sparse(problem, teacher, sparse_targets=mode, chunk_size=7, **kw)
        ref, ref_grads = dense_as_ref(dense, dense_grads)
        assert_close_outputs(out, grads, ref, ref_grads, *FLOAT_ROUNDING)


@pytest.mark.parametrize("mode", SPARSE_TARGET_MODES)
def test_k_equal_to_vocabulary_matches_hidden_state_teacher(mode):
    # the library's float32 top-k (`from_logits`) against a live `HiddenStateTeacher`, also with a padded teacher head
    problem = Problem(seed=4)
    gen = torch.Generator().manual_seed(40)
    teacher_hidden = torch.randn(N, H_T, generator=gen)
    teacher_head = LMHead(torch.randn(V + 3, H_T, generator=gen) * 0.8, torch.randn(V + 3, generator=gen))
    kw = {"divergence": "forward_kl", "temperature": 2.0, "alpha": 0.3, "vocab_size": V}
    dense, dense_grads = run_sparse(problem, HiddenStateTeacher(teacher_hidden, teacher_head), chunk_size=5, **kw)
    teacher = TopKTeacher.from_logits(teacher_head.logits(teacher_hidden)[:, :V], V, temperature=2.0)
    teacher = TopKTeacher(teacher.token_ids, teacher.log_probs, None, 2.0, vocab_rows=V + 3)
    out, grads = run_sparse(problem, teacher, sparse_targets=mode, chunk_size=5, **kw)
    assert_close_outputs(out, grads, *dense_as_ref(dense, dense_grads), *FLOAT_ROUNDING)


def _dense_gap(problem, teacher_k, mode, divergence="forward_kl", temperature=1.0):
    kw = {"divergence": divergence, "temperature": temperature, "chunk_size": 64}
    with torch.no_grad():
        dense = chunked_distillation_loss(
            problem.hidden, problem.head(), DenseTeacher(problem.teacher_logits), problem.labels, **kw
        )
        sparse = chunked_distillation_loss(
            problem.hidden, problem.head(), teacher_k, problem.labels, sparse_targets=mode, **kw
        )
    return abs(sparse.loss.item() - dense.loss.item()), dense.loss.item()


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_gap_to_dense_shrinks_with_k(divergence):
    # a peaky teacher over a 300-token vocabulary: its top 16 hold ~98% of the mass, its top 64 ~99.9%
    problem = Problem(n=64, v=300, seed=5, teacher_scale=6.0)
    ks = (4, 16, 64, 128)
    gaps = {
        mode: [_dense_gap(problem, problem.top_k(k), mode, divergence)[0] for k in ks] for mode in SPARSE_TARGET_MODES
    }
    _, dense = _dense_gap(problem, problem.top_k(16), "bucket", divergence)
    for mode, gap in gaps.items():
        assert gap[0] > gap[1] > gap[2] >= gap[3], (mode, gap)
    # the rest bucket keeps the missing mass: closer to the dense loss than renormalising over the top-k
    assert all(b < r for b, r in zip(gaps["bucket"][:3], gaps["renormalize"][:3])), gaps
    if divergence != "reverse_kl":  # KL(student || teacher) weighs the student's tail token by token: k matters more
        assert gaps["bucket"][1] < 0.1 * dense and gaps["bucket"][2] < 2e-3 * dense, (gaps, dense)


@pytest.mark.parametrize("mode", SPARSE_TARGET_MODES)
def test_rest_from_log_probs_equals_exact_rest(mode):
    problem = Problem(seed=6)
    exact = problem.top_k(K, 2.0)
    computed = TopKTeacher(exact.token_ids, exact.log_probs, None, 2.0, vocab_rows=V)
    kw = {"temperature": 2.0, "sparse_targets": mode, "divergence": "generalized_jsd", "alpha": 0.3}
    out, grads = run_sparse(problem, exact, **kw)
    out_none, grads_none = run_sparse(problem, computed, **kw)
    assert_close_outputs(out_none, grads_none, *dense_as_ref(out, grads))
    torch.testing.assert_close(rest_log_prob_from_top_k(exact.log_probs).float(), exact.rest_log_prob)


def test_rest_from_log_probs_is_clamped():
    log_probs = torch.log(torch.tensor([[0.5, 0.5 + 1e-6], [0.25, 0.25], [1.0, 0.0]]))
    rest = rest_log_prob_from_top_k(log_probs)
    assert rest.dtype == torch.float64
    assert rest[0] == float("-inf") and rest[2] == float("-inf")
    torch.testing.assert_close(rest[1], torch.tensor(0.5, dtype=torch.float64).log())


@pytest.mark.parametrize("mode", SPARSE_TARGET_MODES)
def test_independent_of_chunk_size(mode):
    problem = Problem(seed=7)
    teacher = problem.top_k(K, 2.0)
    kw = {"temperature": 2.0, "sparse_targets": mode, "divergence": "skew_kl", "alpha": 0.3}
    base, base_grads = run_sparse(problem, teacher, chunk_size=N + 10, **kw)
    for chunk_size in (1, 7, None):
        out, grads = run_sparse(problem, teacher, chunk_size=chunk_size, **kw)
        assert_close_outputs(
            out, grads, *dense_as_ref(base, base_grads), {"rtol": 1e-6, "atol": 1e-7}, {"rtol": 1e-6, "atol": 1e-7}
        )


def test_select_teacher_rows():
    problem = Problem(seed=8)
    for teacher in (problem.top_k(K, 2.0), problem.top_k(K, 2.0, exact_rest=False)):
        index = torch.tensor([0, 3, 4, 10])
        part = select_teacher_rows(teacher, index)
        assert type(part) is TopKTeacher
        assert part.temperature == 2.0 and part.vocab_rows == V and part.k == K
        assert torch.equal(part.token_ids, teacher.token_ids[index])
        assert torch.equal(part.log_probs, teacher.log_probs[index])
        if teacher.rest_log_prob is None:
            assert part.rest_log_prob is None
        else:
            assert torch.equal(part.rest_log_prob, teacher.rest_log_prob[index])


def test_ignored_rows_are_not_checked_or_used():
    # a cache may hold anything at unscored positions: out-of-range ids and nan log-probs there never matter
    problem = Problem(seed=9)
    teacher = problem.top_k(K)
    ids, log_probs, rest = teacher.token_ids.clone(), teacher.log_probs.clone(), teacher.rest_log_prob.clone()
    ignored = problem.labels == -100
    ids[ignored] = 10 * V
    log_probs[ignored], rest[ignored] = float("nan"), float("nan")
    garbage = TopKTeacher(ids, log_probs, rest, vocab_rows=V)
    out, grads = run_sparse(problem, garbage, alpha=0.3, chunk_size=4)
    base, base_grads = run_sparse(problem, teacher, alpha=0.3, chunk_size=4)
    assert_close_outputs(out, grads, *dense_as_ref(base, base_grads), {"rtol": 0, "atol": 0}, {"rtol": 0, "atol": 0})


def test_low_precision_storage():
    # int32 ids and bfloat16 log-probs (a compact cache): the loss uses the stored values as they are
    problem = Problem(seed=10)
    exact = problem.top_k(K, 2.0)
    teacher = TopKTeacher(
        exact.token_ids.int(), exact.log_probs.bfloat16(), exact.rest_log_prob.bfloat16(), 2.0, vocab_rows=V
    )
    kw = {"divergence": "forward_kl", "temperature": 2.0, "alpha": 0.3}
    out, grads = run_sparse(problem, teacher, chunk_size=7, **kw)
    ref, ref_grads = run_naive(problem, teacher, mode="bucket", **kw)
    assert_close_outputs(out, grads, ref, ref_grads)


@pytest.mark.parametrize("mode", SPARSE_TARGET_MODES)
def test_padded_vocabulary(mode):
    # student head with 2 padding rows, teacher vocabulary of V + 4: the first V columns are compared; CE, accuracy
    # and entropy use all the student's rows
    problem = Problem(v_student=V + 2, v_teacher=V, seed=11)
    exact = problem.top_k(K, 2.0)
    teacher = TopKTeacher(exact.token_ids, exact.log_probs, exact.rest_log_prob, 2.0, vocab_rows=V + 4)
    kw = {"divergence": "reverse_kl", "temperature": 2.0, "alpha": 0.3}
    out, grads = run_sparse(problem, teacher, sparse_targets=mode, chunk_size=7, vocab_size=V, **kw)
    ref, ref_grads = run_naive(problem, teacher, mode=mode, **kw)
    assert_close_outputs(out, grads, ref, ref_grads)
    _, ce_free_grads = run_sparse(problem, teacher, sparse_targets=mode, vocab_size=V, **{**kw, "alpha": 0.0})
    assert (ce_free_grads[1][V:] == 0).all() and (ce_free_grads[2][V:] == 0).all()


def test_no_grad_gives_same_loss():
    problem = Problem(seed=12)
    teacher = problem.top_k(K, 2.0)
    for mode in SPARSE_TARGET_MODES:
        kw = {"temperature": 2.0, "alpha": 0.3, "sparse_targets": mode, "chunk_size": 7}
        out, _ = run_sparse(problem, teacher, **kw)
        with torch.no_grad():
            quiet = chunked_distillation_loss(problem.hidden, problem.head(), teacher, problem.labels, **kw)
        torch.testing.assert_close(quiet.loss, out.loss)
        assert int(quiet.agree_count) == int(out.agree_count)


def test_alpha_one_only_logs_the_divergence():
    problem = Problem(seed=13)
    teacher = problem.top_k(K)
    out, grads = run_sparse(problem, teacher, alpha=1.0, chunk_size=7)
    dense, dense_grads = run_sparse(problem, DenseTeacher(problem.teacher_logits), alpha=1.0, chunk_size=7)
    torch.testing.assert_close(out.loss, dense.loss)
    for a, b in zip(grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b)
    assert out.distill_sum > 0


def test_renormalize_gives_no_gradient_outside_the_ids():
    # one token whose hidden state is a one-hot: the head weight gradient's rows are the logit gradient
    gen = torch.Generator().manual_seed(14)
    weight = torch.randn(V, 1, generator=gen).requires_grad_(True)
    teacher_logits = torch.randn(1, V, generator=gen) * 3
    teacher = TopKTeacher.from_logits(teacher_logits, K)
    out = chunked_distillation_loss(torch.ones(1, 1), LMHead(weight), teacher, sparse_targets="renormalize")
    (grad,) = torch.autograd.grad(out.loss, [weight])
    outside = torch.ones(V, dtype=torch.bool)
    outside[teacher.token_ids[0]] = False
    assert (grad[outside] == 0).all() and (grad[~outside] != 0).all()


def test_from_logits():
    gen = torch.Generator().manual_seed(15)
    logits = torch.randn(5, V, generator=gen)
    teacher = TopKTeacher.from_logits(logits, K, temperature=2.0)
    assert teacher.k == K and teacher.vocab_rows == V and teacher.temperature == 2.0
    p = naive_softmax(logits, 2.0)
    torch.testing.assert_close(teacher.log_probs.double(), p.gather(-1, teacher.token_ids).log(), rtol=1e-6, atol=1e-6)
    assert torch.equal(teacher.token_ids, p.topk(K, dim=-1).indices)
    rest = (1 - p.topk(K, dim=-1).values.sum(-1)).log()
    torch.testing.assert_close(teacher.rest_log_prob.double(), rest, rtol=1e-6, atol=1e-6)
    assert torch.isneginf(TopKTeacher.from_logits(logits, V).rest_log_prob).all()


def test_sparse_targets_ignored_for_dense_teachers():
    problem = Problem(seed=16)
    dense = chunked_distillation_loss(problem.hidden, problem.head(), DenseTeacher(problem.teacher_logits))
    same = chunked_distillation_loss(
        problem.hidden, problem.head(), DenseTeacher(problem.teacher_logits), sparse_targets="not a mode"
    )
    torch.testing.assert_close(dense.loss, same.loss)


def test_temperature_mismatch_raises():
    problem = Problem(seed=17)
    teacher = problem.top_k(K, 2.0)
    with pytest.raises(ValueError, match=r"T=2\.0.*T=1\.0.*rebuild"):
        chunked_distillation_loss(problem.hidden, problem.head(), teacher, temperature=1.0)


def test_invalid_ids_raise():
    problem = Problem(v_student=V, v_teacher=V, seed=18)
    teacher = problem.top_k(K)
    ids = teacher.token_ids.clone()
    ids[4, 2] = V
    with pytest.raises(ValueError, match=rf"token id {V}.*`vocab_size`={V}"):
        chunked_distillation_loss(
            problem.hidden, problem.head(), TopKTeacher(ids, teacher.log_probs, vocab_rows=V + 1)
        )
    ids[4, 2] = -1
    with pytest.raises(ValueError, match="token id -1"):
        chunked_distillation_loss(problem.hidden, problem.head(), TopKTeacher(ids, teacher.log_probs, vocab_rows=V))
    # an id inside the teacher's vocabulary but past the compared columns
    with pytest.raises(ValueError, match=r"`vocab_size`=20"):
        chunked_distillation_loss(problem.hidden, problem.head(), teacher, vocab_size=20)


def test_known_ids_bound_replaces_the_id_scan(monkeypatch):
    # `ids_bound` (checked where the ids were made, e.g. by the cache's collator on the CPU) spares the read-back
    problem = Problem(v_student=V, v_teacher=V, seed=18)
    teacher = problem.top_k(K)
    base, base_grads = run_sparse(problem, teacher, alpha=0.3, chunk_size=4)
    bound = int(teacher.token_ids.max()) + 1
    known = TopKTeacher(teacher.token_ids, teacher.log_probs, teacher.rest_log_prob, vocab_rows=V, ids_bound=bound)
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: pytest.fail("the ids were scanned"))
    out, grads = run_sparse(problem, known, alpha=0.3, chunk_size=4)
    assert_close_outputs(out, grads, *dense_as_ref(base, base_grads), {"rtol": 0, "atol": 0}, {"rtol": 0, "atol": 0})
    assert select_teacher_rows(known, torch.tensor([0, 2])).ids_bound == bound
    too_far = TopKTeacher(teacher.token_ids, teacher.log_probs, vocab_rows=V + 1, ids_bound=V + 1)
    with pytest.raises(ValueError, match=rf"token id {V}, outside the compared vocabulary"):
        chunked_distillation_loss(problem.hidden, problem.head(), too_far)
    for bad in (-1, 2.0):
        with pytest.raises(ValueError, match="`ids_bound` must be a non-negative int"):
            TopKTeacher(teacher.token_ids, teacher.log_probs, vocab_rows=V, ids_bound=bad)


def test_validation():
    ids, log_probs = torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"`token_ids` must be \[N, k\]"):
        TopKTeacher(ids[0], log_probs[0], vocab_rows=V)
    with pytest.raises(ValueError, match="`log_probs` must have the shape"):
        TopKTeacher(ids, log_probs[:, :2], vocab_rows=V)
    with pytest.raises(ValueError, match=r"`rest_log_prob` must have shape \[N\] = \[4\]"):
        TopKTeacher(ids, log_probs, torch.zeros(4, 1), vocab_rows=V)
    with pytest.raises(ValueError, match="k = 0"):
        TopKTeacher(ids[:, :0], log_probs[:, :0], vocab_rows=V)
    with pytest.raises(ValueError, match="exceed the teacher's `vocab_rows`=2"):
        TopKTeacher(ids, log_probs, vocab_rows=2)
    with pytest.raises(ValueError, match="integer"):
        TopKTeacher(ids.float(), log_probs, vocab_rows=V)
    with pytest.raises(ValueError, match="float"):
        TopKTeacher(ids, ids, vocab_rows=V)
    with pytest.raises(ValueError, match="temperature"):
        TopKTeacher(ids, log_probs, temperature=0.0, vocab_rows=V)
    with pytest.raises(TypeError):
        TopKTeacher(ids, log_probs)  # vocab_rows is required
    problem = Problem(seed=19)
    teacher = problem.top_k(K)
    with pytest.raises(ValueError, match="sparse_targets"):
        chunked_distillation_loss(problem.hidden, problem.head(), teacher, sparse_targets="dense")
    wide = TopKTeacher.from_logits(problem.teacher_logits, 30)
    with pytest.raises(ValueError, match=r"k = 30 .*`vocab_size`=20"):
        chunked_distillation_loss(problem.hidden, problem.head(), wide, vocab_size=20)


def test_zero_tokens():
    problem = Problem(n=0, seed=20)
    teacher = TopKTeacher(torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K), vocab_rows=V)
    out = chunked_distillation_loss(problem.hidden, problem.head(), teacher, problem.labels, alpha=0.5)
    assert out.num_tokens == 0 and out.loss.item() == 0.0
    out.loss.backward()
    assert (problem.weight.grad == 0).all()


@pytest.mark.parametrize("mode", SPARSE_TARGET_MODES)
@pytest.mark.parametrize("divergence", ["forward_kl", "generalized_jsd", "total_variation", "skew_kl"])
def test_teacher_without_rest_mass(divergence, mode):
    # a teacher that has no mass outside its top-k (rest = -inf): every divergence that stays finite when the teacher
    # rules tokens out gives the finite value and gradient of the definition (0 log 0 = 0)
    problem = Problem(seed=21)
    logits = problem.teacher_logits.clone()
    logits.scatter_(-1, logits.topk(V - K, dim=-1, largest=False).indices, float("-inf"))
    problem.teacher_logits = logits
    teacher = problem.top_k(K, 2.0)
    assert torch.isneginf(teacher.rest_log_prob).all()
    kw = {"divergence": divergence, "temperature": 2.0, "alpha": 0.3}
    out, grads = run_sparse(problem, teacher, sparse_targets=mode, chunk_size=7, **kw)
    ref, ref_grads = run_naive(problem, teacher, mode=mode, **kw)
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
    assert_close_outputs(out, grads, ref, ref_grads)
    if mode == "renormalize" or divergence in ("generalized_jsd", "skew_kl"):
        return  # these also weigh the student's mass on each ruled-out token: not the dense loss
    # the rest bucket holds what the dense loss sees outside the top-k: the dense loss against those -inf logits
    dense, dense_grads = run_sparse(problem, DenseTeacher(logits), chunk_size=7, **kw)
    assert_close_outputs(out, grads, *dense_as_ref(dense, dense_grads), *FLOAT_ROUNDING)

"""Opt-in: llama.cpp (through llama-cpp-python) loads the exported GGUF files and agrees with PyTorch.

Runs only where `llama_cpp` is importable (`pip install llama-cpp-python`); select it with `pytest -m llama_cpp`.

A tiny BitNet student (ternary weights, 8-bit activations: lambda 1 throughout) is trained for a few dozen steps on
a small repeated corpus, so that its next-token choices are not near-ties, then exported with each llama.cpp arch
(`llama` without sub-norms, `bitnet` with sub-norms and tied embeddings) and each ternary type. For every position of
a set of prompts, the greedy next token of llama.cpp is compared with the PyTorch model's.

The two do not compute exactly the same numbers: PyTorch quantizes each token's activations to int8 with one absmax
scale per token, llama.cpp's TQ kernels with one scale per block of 256 (q8_K); llama.cpp keeps the ternary scale and
the embeddings in fp16 and accumulates differently. These perturbations are small against the logit margins of a
trained model, so the greedy choices should agree almost everywhere; only positions where the PyTorch top-2 logits
are nearly tied can flip. The bound (90 %) leaves room for those.

Greedy agreement alone is a weak check on a model that memorized its corpus: most next tokens follow from the current
token, so an export that gets attention wrong (measured: q/k left unpermuted for the `llama` arch) still agrees at
~94 % of the positions. The test therefore also bounds the logit error, `max |logits_llama.cpp - logits_torch|`
divided by the standard deviation of the PyTorch logits, averaged over positions: ~0.03-0.09 for a correct export
(random or trained), ~1.1 without the q/k permutation. The bound is 0.25.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from test_export_gguf import CORPUS, make_bpe_tokenizer, make_student  # noqa: E402

from hf_distill.export.gguf import export_gguf  # noqa: E402

pytestmark = pytest.mark.llama_cpp

MIN_AGREEMENT = 0.9
MAX_LOGIT_ERROR = 0.25
PROMPTS = sorted(set(CORPUS)) + [
    "the dog sat on the mat",
    "one two three four",
    "hello how are you",
    "the small red cat ran to the big tree",
]


def _train(model, tokenizer, steps: int = 40) -> None:
    """A few QAT steps at lambda 1 on the corpus: the model memorizes it, so its greedy choices are decisive."""
    texts = sorted(set(CORPUS))
    rows = [[tokenizer.bos_token_id] + tokenizer.encode(t) for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    mask = (labels != -100).long()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matrices: one thread is several times faster than two contending ones on a small shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    return make_bpe_tokenizer()


@pytest.fixture(scope="module")
def students(tokenizer):
    out = {}
    for arch, kwargs in (("llama", {}), ("bitnet", {"sub_norm": True, "tie": True})):
        model = make_student(len(tokenizer), **kwargs)
        _train(model, tokenizer)
        out[arch] = model
    return out


def _compare(model, tokenizer, path, prompts=PROMPTS) -> tuple[float, float, int, float]:
    """Greedy agreement, mean relative max logit error, positions and llama.cpp seconds over `prompts`."""
    batches = []
    for text in prompts:
        ids = [tokenizer.bos_token_id] + tokenizer.encode(text)
        with torch.no_grad():
            batches.append((text, ids, model(input_ids=torch.tensor([ids])).logits[0].numpy()))
    start = time.perf_counter()
    # one thread: ggml's worker threads spin between graphs and starve the other work of a small CPU box
    llm = llama_cpp.Llama(
        model_path=str(path), logits_all=True, vocab_only=False, n_ctx=128, n_threads=1, n_threads_batch=1,
        verbose=False,
    )  # fmt: skip
    agree = total = 0
    errors = []
    try:
        for text, ids, want in batches:
            # llama.cpp's BPE tokenizer reproduces the tokenizers one from the exported vocabulary and merges
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids[1:], text
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[: len(ids)])
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
            total += len(ids)
            errors.append(np.abs(got - want).max(-1) / want.std(-1))
    finally:
        llm.close()
    return agree / total, float(np.concatenate(errors).mean()), total, time.perf_counter() - start


@pytest.mark.parametrize("ternary_type", ["TQ2_0", "TQ1_0"])
@pytest.mark.parametrize("arch", ["llama", "bitnet"])
def test_llama_cpp_greedy_agreement(tmp_path, tokenizer, students, arch, ternary_type):
    model = students[arch]
    report = export_gguf(model, tmp_path / f"{arch}.gguf", tokenizer=tokenizer, ternary_type=ternary_type)
    assert report.arch == arch and report.fallback_tensors == []
    ratio, error, total, elapsed = _compare(model, tokenizer, report.path)
    print(
        f"\n[llama.cpp] arch={arch} type={ternary_type}: greedy agreement {ratio:.3f} over {total} positions, "
        f"max |logit diff| / logit std {error:.4f} (mean over positions), file {report.file_size} bytes, "
        f"{report.bits_per_ternary_weight:.4f} bits/ternary weight, load+eval {elapsed:.2f}s"
    )
    assert error < MAX_LOGIT_ERROR
    assert ratio >= MIN_AGREEMENT


def test_llama_cpp_f16_fallback_and_llama3_tokenizer(tmp_path):
    """A small student (rows of 64: most ternary tensors fall back to F16) with a Llama-3 style tokenizer."""
    tokenizer = make_bpe_tokenizer(style="llama3")
    model = make_student(len(tokenizer), hidden=64, intermediate=256, heads=4, kv_heads=2)
    _train(model, tokenizer)
    report = export_gguf(model, tmp_path / "small.gguf", tokenizer=tokenizer)
    assert report.fallback_tensors and report.tensor_types["TQ2_0"] == 2  # down_proj: 256 inputs
    prompts = PROMPTS + ["what is 12 + 3456 ? it's 3468 .", "Hello,  World!\n\nthe   cat"]
    ratio, error, total, elapsed = _compare(model, tokenizer, report.path, prompts)
    print(
        f"\n[llama.cpp] small llama with F16 fallback: greedy agreement {ratio:.3f} over {total} positions, "
        f"max |logit diff| / logit std {error:.4f}, load+eval {elapsed:.2f}s"
    )
    assert error < MAX_LOGIT_ERROR
    assert ratio >= MIN_AGREEMENT

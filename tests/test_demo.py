"""Tests of the self-contained demo: task generator, tokenizer, evaluation helpers, CLI and a quick end-to-end run."""

import json
import math
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_distill.cli.main import main
from hf_distill.demo.arithmetic import (
    ANSWER_MARKER,
    CHARACTERS,
    ArithmeticProblem,
    answer_of_prompt,
    extract_answer,
    make_arithmetic_dataset,
    make_arithmetic_splits,
    sample_problems,
    worked_solution,
)
from hf_distill.demo.evaluate import exact_match_accuracy, generate_completions, held_out_perplexity
from hf_distill.demo.models import STUDENT_SPEC, TEACHER_SPEC, build_tiny_model, count_parameters
from hf_distill.demo.run import DemoConfig, run_demo
from hf_distill.demo.tokenizer import build_char_tokenizer

STEP_RE = re.compile(r"(\d)([+-])(\d)\2([01])=([01])(\d)")


def check_worked_solution(a: int, b: int, op: str, width: int, completion: str) -> None:
    """Assert that every line of `completion` is arithmetically right for `a op b`."""
    assert completion.startswith("\n")
    lines = completion[1:].split("\n")
    assert lines[0] == f"{str(a).zfill(width)}{op}{str(b).zfill(width)}"
    column_lines, answer_line = lines[1:-1], lines[-1]
    assert len(column_lines) == width
    da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    carry_in, digits = 0, []
    for i, line in enumerate(column_lines):
        match = STEP_RE.fullmatch(line)
        assert match is not None, line
        x, line_op, y, c, t, u = match.groups()
        x, y, c, t, u = int(x), int(y), int(c), int(t), int(u)
        assert line_op == op
        assert (x, y) == (int(da[i]), int(db[i]))
        assert c == carry_in
        if op == "+":
            assert 10 * t + u == x + y + c
        else:
            assert u - 10 * t == x - y - c and 0 <= u <= 9
        carry_in = t
        digits.append(u)
    assert op == "+" or carry_in == 0  # a >= b: no final borrow
    expected = int(str(carry_in) + "".join(str(d) for d in reversed(digits)))
    assert answer_line == f"{ANSWER_MARKER} {str(expected).rjust(width + 1)}"
    assert expected == (a + b if op == "+" else a - b)


# Task generator


@pytest.mark.parametrize("operations", [("+",), ("-",), ("+", "-")])
def test_worked_steps_are_correct_and_answer_parses(operations):
    problems = sample_problems(500, seed=123, min_digits=1, max_digits=4, operations=operations)
    assert {p.op for p in problems} == set(operations)
    for p in problems:
        check_worked_solution(p.a, p.b, p.op, p.width, p.completion)
        assert extract_answer(p.completion) == p.answer
        assert answer_of_prompt(p.prompt) == p.answer
        assert p.answer >= 0
        assert set(p.prompt + p.completion) <= set(CHARACTERS)


@pytest.mark.parametrize(
    "a, b, op, answer",
    [(9999, 9999, "+", 19998), (5000, 5000, "+", 10000), (10, 10, "+", 20), (1000, 1, "-", 999), (4321, 4321, "-", 0)],
)
def test_edge_cases(a, b, op, answer):
    p = ArithmeticProblem(a, b, op, width=4)
    check_worked_solution(a, b, op, 4, p.completion)
    assert extract_answer(p.completion) == answer == p.answer


def test_documented_example():
    assert ArithmeticProblem(4738, 295).prompt == "4738+295="
    assert worked_solution(4738, 295, "+", 4) == "\n4738+0295\n8+5+0=13\n3+9+1=13\n7+2+1=10\n4+0+1=05\n####  5033"
    assert worked_solution(47, 5) == "\n47+05\n7+5+0=12\n4+0+1=05\n####  52"
    assert worked_solution(47, 5, width=4).endswith("\n####    52")


def test_invalid_problems_rejected():
    with pytest.raises(ValueError):
        ArithmeticProblem(3, 5, "-")
    with pytest.raises(ValueError):
        ArithmeticProblem(12345, 1, "+", width=4)
    with pytest.raises(ValueError):
        ArithmeticProblem(1, 1, "*")
    with pytest.raises(ValueError):
        sample_problems(10, operations=("*",))
    with pytest.raises(ValueError):  # only 10 * 10 one-digit additions exist
        sample_problems(101, min_digits=1, max_digits=1)


def test_extract_answer():
    assert extract_answer("\n1+2+0=03\n#### 3") == 3
    assert extract_answer("#### 12</s>junk") == 12
    assert extract_answer("#### 1\n#### 42") == 42
    assert extract_answer("####-7") == -7
    assert extract_answer("no answer here") is None
    assert extract_answer("#### ") is None


def test_dataset_format_and_determinism():
    ds = make_arithmetic_dataset(64, seed=7)
    assert set(ds.column_names) == {"prompt", "completion", "answer"}
    assert len(ds) == 64
    for row in ds:
        assert answer_of_prompt(row["prompt"]) == row["answer"] == extract_answer(row["completion"])
        a, b = (int(x) for x in row["prompt"][:-1].split("+"))
        assert 10 <= a <= 9999 and 10 <= b <= 9999
    assert make_arithmetic_dataset(64, seed=7)[:] == ds[:]
    assert make_arithmetic_dataset(64, seed=8)["prompt"] != ds["prompt"]


def test_splits_are_disjoint_and_distinct():
    train, held_out = make_arithmetic_splits(3000, 300, seed=0, min_digits=2, max_digits=2)
    assert len(train) == 3000 and len(held_out) == 300
    train_prompts, held_out_prompts = set(train["prompt"]), set(held_out["prompt"])
    assert len(train_prompts) == 3000 and len(held_out_prompts) == 300
    assert not train_prompts & held_out_prompts
    # excluding keys keeps separately built datasets disjoint too
    excluded = {p.key for p in sample_problems(50, seed=1)}
    other = sample_problems(500, seed=1, exclude=excluded)
    assert not excluded & {p.key for p in other}


# Tokenizer


def test_tokenizer_round_trip_and_special_tokens():
    tokenizer = build_char_tokenizer()
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    )
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}) == 4
    assert len(tokenizer) == 4 + len(set(CHARACTERS))
    for row in make_arithmetic_dataset(50, seed=3):
        text = row["prompt"] + row["completion"]
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert len(ids) == len(text) + 1  # one token per character
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        # the EOS text TRL appends to completions becomes the EOS token
        assert tokenizer(text + tokenizer.eos_token)["input_ids"] == ids + [tokenizer.eos_token_id]
        # the prompt's tokens are a prefix of the prompt+completion's (TRL's completion mask relies on it)
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
    space, one = tokenizer.convert_tokens_to_ids([" ", "1"])
    assert tokenizer("a 1")["input_ids"][1:] == [tokenizer.unk_token_id, space, one]


def test_tokenizer_save_and_reload(tmp_path):
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "4738+295=\n4738+0295\n8+5+0=13\n#### 5033"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"], skip_special_tokens=True) == text
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "padding_side"):
        assert getattr(reloaded, name) == getattr(tokenizer, name)
    reloaded.padding_side = "left"
    batch = reloaded(["1+2=", "10+20="], padding=True)
    assert batch["input_ids"][0][:2] == [reloaded.pad_token_id] * 2
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1, 1]


# Models and evaluation


def test_models_share_vocab_and_student_is_smaller():
    tokenizer = build_char_tokenizer()
    teacher = build_tiny_model(TEACHER_SPEC, tokenizer, seed=0)
    student = build_tiny_model(STUDENT_SPEC, tokenizer, seed=0)
    assert teacher.config.vocab_size == student.config.vocab_size == len(tokenizer)
    assert count_parameters(student) * 3 < count_parameters(teacher)
    assert teacher.generation_config.eos_token_id == tokenizer.eos_token_id
    again = build_tiny_model(STUDENT_SPEC, tokenizer, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), again.parameters()))


def test_perplexity_scores_completion_tokens_only():
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(STUDENT_SPEC, tokenizer, seed=0)
    ds = make_arithmetic_dataset(5, seed=0)
    # reference: the model's own loss with the prompt masked out, one example at a time
    nll, count = 0.0, 0
    for row in ds:
        prompt_len = len(tokenizer(row["prompt"])["input_ids"])
        ids = torch.tensor([tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]])
        labels = ids.clone()
        labels[:, :prompt_len] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        n = ids.shape[1] - prompt_len
        nll, count = nll + loss * n, count + n
    batched = held_out_perplexity(model, tokenizer, ds, batch_size=4, show_progress=False)
    assert batched == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert 1.0 < batched < 10 * len(tokenizer)  # untrained: roughly uniform over the vocabulary


def test_exact_match_uses_final_answer(monkeypatch):
    import hf_distill.demo.evaluate as evaluate

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(STUDENT_SPEC, tokenizer, seed=0)
    ds = make_arithmetic_dataset(4, seed=0)
    fake = [ds[0]["completion"], "#### 0", "garbage", f"\n wrong steps\n#### {ds[3]['answer']}"]
    monkeypatch.setattr(evaluate, "generate_completions", lambda *args, **kwargs: fake)
    assert evaluate.exact_match_accuracy(model, tokenizer, ds, show_progress=False) == 0.5


def test_generation_is_left_padded_and_restores_padding_side():
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(STUDENT_SPEC, tokenizer, seed=0)
    prompts = ["12+34=", "1234+5678="]
    together = generate_completions(model, tokenizer, prompts, max_new_tokens=6, show_progress=False)
    alone = [generate_completions(model, tokenizer, [p], max_new_tokens=6, show_progress=False)[0] for p in prompts]
    assert together == alone
    assert tokenizer.padding_side == "right"
    assert 0.0 <= exact_match_accuracy(model, tokenizer, make_arithmetic_dataset(4), show_progress=False) <= 1.0


# CLI and end-to-end


def test_cli_help_and_dispatch(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines to the terminal width
    defaults = DemoConfig()
    assert f"default: {defaults.output_dir}" in help_text
    assert f"default: {defaults.teacher_steps}, quick: {DemoConfig.quick().teacher_steps}" in help_text
    assert f"default: {defaults.student_steps}, quick: {DemoConfig.quick().student_steps}" in help_text
    assert f"default: {defaults.divergence}" in help_text
    assert f"default: {defaults.batch_size}, quick: {DemoConfig.quick().batch_size}" in help_text
    assert f"default: {defaults.eval_size}, quick: {DemoConfig.quick().eval_size}" in help_text
    assert main([]) == 2


def test_cli_divergence_choices_match_library():
    from hf_distill.cli.demo import DIVERGENCES
    from hf_distill.losses import DIVERGENCE_NAMES

    assert tuple(DIVERGENCES) == tuple(DIVERGENCE_NAMES)


def _finite_positive(x):
    return isinstance(x, float) and math.isfinite(x) and x >= 1.0


def test_quick_demo_via_cli(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--sft-baseline", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "student (distilled)" in printed and "teacher (SFT)" in printed
    assert str(out / "student") in printed
    results = json.loads((out / "results.json").read_text())
    for key in ("teacher", "student", "student_sft"):
        assert _finite_positive(results[key]["perplexity"])
        assert 0.0 <= results[key]["exact_match"] <= 1.0
    assert results["teacher"]["parameters"] > results["student"]["parameters"]
    for name in ("teacher", "student"):
        assert (out / name / "config.json").exists() and (out / name / "tokenizer.json").exists()
    AutoModelForCausalLM.from_pretrained(out / "student")


def test_quick_demo_saved_student_matches_in_memory(tmp_path):
    results = run_demo(DemoConfig.quick(output_dir=str(tmp_path), show_progress=False), return_models=True)
    assert _finite_positive(results["teacher"]["perplexity"])
    assert _finite_positive(results["student"]["perplexity"])
    student = results["student_model"]
    reloaded = AutoModelForCausalLM.from_pretrained(results["student_dir"])
    tokenizer = AutoTokenizer.from_pretrained(results["student_dir"])
    assert reloaded.config.num_hidden_layers == STUDENT_SPEC.num_hidden_layers
    batch = tokenizer(["12+34=\n0012+0034", "999+1="], return_tensors="pt", padding=True)
    student.eval()
    with torch.no_grad():
        expected = student(**batch).logits
        actual = reloaded(**batch).logits
    torch.testing.assert_close(actual, expected)
    # the teacher was saved too, and the distilled student learned something from it
    AutoModelForCausalLM.from_pretrained(results["teacher_dir"])
    assert results["student"]["perplexity"] < len(tokenizer)

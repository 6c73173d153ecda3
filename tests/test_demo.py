"""Tests of the self-contained demo: task generator, tokenizer, evaluation helpers, CLI and a quick end-to-end run."""

import json
import math
import os
import re
import subprocess
import sys
import time

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
from hf_distill.demo.config import MAX_DIGITS, DemoConfigError, longest_example_length
from hf_distill.demo.evaluate import exact_match_accuracy, generate_completions, held_out_perplexity
from hf_distill.demo.models import (
    MAX_SEQUENCE_LENGTH,
    STUDENT_SPEC,
    TEACHER_SPEC,
    TinyModelSpec,
    build_tiny_model,
    count_parameters,
)
from hf_distill.demo.run import DemoConfig, format_results, run_demo
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
        expected = student(**batch.to(student.device)).logits.cpu()
        actual = reloaded(**batch.to(reloaded.device)).logits
    torch.testing.assert_close(actual, expected)
    # the teacher was saved too, and the distilled student learned something from it
    AutoModelForCausalLM.from_pretrained(results["teacher_dir"])
    assert results["student"]["perplexity"] < len(tokenizer)


# Settings are validated before any training


# (settings, offending field, part of the message)
INVALID_SETTINGS = [
    ({"teacher_steps": 0}, "teacher_steps", "must be >= 1, got 0"),
    ({"student_steps": -5}, "student_steps", "must be >= 1, got -5"),
    ({"student_steps": 2.5}, "student_steps", "must be an integer"),
    ({"batch_size": 0}, "batch_size", "must be >= 1"),
    ({"teacher_learning_rate": 0.0}, "teacher_learning_rate", "must be > 0"),
    ({"student_learning_rate": float("nan")}, "student_learning_rate", "finite"),
    ({"eval_size": 0}, "eval_size", "must be >= 1"),
    ({"divergence": "kl"}, "divergence", "must be one of forward_kl"),
    ({"temperature": 0.0}, "temperature", "must be > 0"),
    ({"temperature": float("inf")}, "temperature", "finite"),
    ({"alpha": 1.5}, "alpha", "must be in [0, 1]"),
    ({"alpha": -0.1}, "alpha", "must be in [0, 1]"),
    ({"min_digits": 0}, "min_digits", "between 1 and"),
    ({"max_digits": MAX_DIGITS + 1}, "max_digits", f"between 1 and {MAX_DIGITS}"),
    ({"min_digits": 3, "max_digits": 2}, "max_digits", "must be >= min_digits (3)"),
    ({"seed": -1}, "seed", "between 0 and"),
    ({"seed": 2**32}, "seed", "between 0 and"),
    ({"num_threads": 0}, "num_threads", "must be >= 1"),
    ({"sft_baseline": "yes"}, "sft_baseline", "True or False"),
    ({"output_dir": ""}, "output_dir", "non-empty"),
    ({"student_spec": (96, 2, 4, 384)}, "student_spec", "TinyModelSpec"),
    # 100 one-digit additions exist, but the quick settings need 20 * 16 + 16 problems
    ({"min_digits": 1, "max_digits": 1}, None, "only 100 additions"),
]


@pytest.mark.parametrize("overrides, field, message", INVALID_SETTINGS)
def test_demo_config_rejects_invalid_settings(overrides, field, message):
    with pytest.raises(DemoConfigError) as info:
        DemoConfig.quick(**overrides)
    assert info.value.field == field
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_demo_config_accepts_edge_values(tmp_path):
    DemoConfig.quick(alpha=0.0, output_dir=tmp_path).validate()
    DemoConfig.quick(alpha=1.0, temperature=0.5, seed=0, num_threads=1, min_digits=1, max_digits=MAX_DIGITS)
    config = DemoConfig(min_digits=1, max_digits=2, teacher_steps=10, student_steps=10, batch_size=100, eval_size=100)
    assert config.batch_size * 10 + config.eval_size <= 100 * 100
    assert DemoConfig(output_dir=tmp_path).output_dir == str(tmp_path)  # path-likes become strings


def test_tiny_model_spec_rejects_bad_shapes():
    with pytest.raises(ValueError, match="positive integer"):
        TinyModelSpec(hidden_size=0, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    with pytest.raises(ValueError, match="even head size"):
        TinyModelSpec(hidden_size=96, num_hidden_layers=2, num_attention_heads=5, intermediate_size=64)
    with pytest.raises(ValueError, match="even head size"):
        TinyModelSpec(hidden_size=12, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)  # head size 3


def test_max_digits_fit_the_models():
    tokenizer = build_char_tokenizer()
    for width in (1, 2, 4, MAX_DIGITS, MAX_DIGITS + 1):
        worst = ArithmeticProblem(10**width - 1, 10**width - 1, width=width)
        ids = tokenizer(worst.prompt + worst.completion + tokenizer.eos_token)["input_ids"]
        assert len(ids) == longest_example_length(width)
    assert longest_example_length(MAX_DIGITS) <= MAX_SEQUENCE_LENGTH < longest_example_length(MAX_DIGITS + 1)


def test_output_dir_checks(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(DemoConfigError, match="is a file"):
        DemoConfig.quick(output_dir=a_file).validate()
    with pytest.raises(DemoConfigError, match="cannot be created"):
        DemoConfig.quick(output_dir=a_file / "below" / "demo").validate()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "student").write_text("")
    with pytest.raises(DemoConfigError, match="holds a file 'student'"):
        DemoConfig.quick(output_dir=occupied).validate()
    (occupied / "student").unlink()
    (occupied / "results.json").mkdir()
    with pytest.raises(DemoConfigError, match="results.json"):
        DemoConfig.quick(output_dir=occupied).validate()
    # a directory that does not exist yet is fine, and validation creates nothing
    DemoConfig.quick(output_dir=tmp_path / "new" / "demo").validate()
    assert not (tmp_path / "new").exists()


def test_output_dir_must_be_writable(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # as for a read-only directory (chmod is no test when run as root)
        if os.path.abspath(path) == str(locked) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(DemoConfigError, match="is not writable"):
        DemoConfig.quick(output_dir=locked).validate()
    with pytest.raises(DemoConfigError, match="cannot be created: .* is not writable"):
        DemoConfig.quick(output_dir=locked / "demo").validate()


@pytest.fixture
def no_training(monkeypatch):
    """Make any training (or the whole demo) fail the test."""
    import hf_distill.demo.run as run_module

    def fail(*args, **kwargs):
        raise AssertionError("training started although a setting is invalid")

    for name in ("train_teacher", "distil_student", "train_student_sft", "make_arithmetic_splits"):
        monkeypatch.setattr(run_module, name, fail)
    return fail


def test_run_demo_validates_before_training(tmp_path, no_training):
    out = tmp_path / "demo"
    with pytest.raises(DemoConfigError, match="alpha"):
        run_demo(DemoConfig.quick(output_dir=str(out)), alpha=2.0)
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(DemoConfigError, match="is a file"):
        run_demo(DemoConfig.quick(output_dir=str(a_file)))
    assert not out.exists()  # nothing written either


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--teacher-steps", "0"], "argument --teacher-steps: must be >= 1, got 0"),
        (["--student-steps", "-1"], "argument --student-steps: must be >= 1"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
        (["--teacher-learning-rate", "0"], "argument --teacher-learning-rate: must be > 0"),
        (["--student-learning-rate", "nan"], "argument --student-learning-rate: must be a finite number"),
        (["--eval-size", "0"], "argument --eval-size: must be >= 1"),
        (["--temperature", "0"], "argument --temperature: must be > 0"),
        (["--alpha", "2"], "argument --alpha: must be in [0, 1], got 2.0"),
        (["--min-digits", "0"], "argument --min-digits: must be between 1 and"),
        (["--max-digits", "99"], f"argument --max-digits: must be between 1 and {MAX_DIGITS}"),
        (["--min-digits", "3", "--max-digits", "2"], "argument --max-digits: must be >= min_digits (3)"),
        (["--min-digits", "1", "--max-digits", "1"], "only 100 additions have 1-1 digit operands"),
        (["--seed", "-1"], "argument --seed: must be between 0 and"),
        (["--num-threads", "0"], "argument --num-threads: must be >= 1"),
        (["--divergence", "kl"], "argument --divergence: invalid choice: 'kl'"),  # argparse's own check
    ],
)
def test_cli_rejects_bad_flags_before_training(tmp_path, capsys, no_training, flags, message):
    start = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main(["demo", "--quick", "--output-dir", str(tmp_path / "demo"), *flags])
    assert time.perf_counter() - start < 5
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    last_line = captured.err.strip().splitlines()[-1]
    assert last_line.startswith("hf-distill demo: error: ")
    assert message in last_line
    assert "Traceback" not in captured.err
    assert not (tmp_path / "demo").exists()


def test_cli_rejects_unwritable_output_dir(tmp_path, capsys, no_training):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for output_dir, message in ((a_file, "is a file"), (a_file / "demo", "cannot be created")):
        with pytest.raises(SystemExit) as info:
            main(["demo", "--quick", "--output-dir", str(output_dir)])
        assert info.value.code == 2
        last_line = capsys.readouterr().err.strip().splitlines()[-1]
        assert last_line.startswith("hf-distill demo: error: argument --output-dir: ") and message in last_line


def test_cli_bad_flag_fails_before_importing_torch(tmp_path):
    # a fresh process: the error comes before torch, transformers or datasets are even imported
    code = (
        "import sys\nfrom hf_distill.cli.main import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as exit:\n"
        "    heavy = [m for m in ('torch', 'transformers', 'datasets', 'trl') if m in sys.modules]\n"
        "    print(exit.code, heavy)\n"
    )
    argv = ["demo", "--alpha", "2", "--output-dir", str(tmp_path / "demo")]
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "2 []"
    assert result.stderr.strip().splitlines()[-1].startswith("hf-distill demo: error: argument --alpha: ")


def test_quick_demo_no_progress_prints_only_results(tmp_path, capfd):
    out = tmp_path / "demo"
    tiny = ["--teacher-steps", "2", "--student-steps", "2", "--batch-size", "4", "--eval-size", "4"]
    assert main(["demo", "--quick", "--no-progress", *tiny, "--output-dir", str(out)]) == 0
    captured = capfd.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["show_progress"] is False and results["eval_size"] == 4
    assert captured.out == format_results(results) + "\n"  # the table, and not one line more
    assert captured.err == ""  # no progress bars, no log dicts, no library logs


def test_demo_package_is_lazy_and_complete():
    import hf_distill.demo as demo

    assert dir(demo) == sorted(demo.__all__)
    for name in demo.__all__:
        assert getattr(demo, name) is not None
    assert demo.DemoConfig is DemoConfig and demo.run_demo is run_demo
    heavy = ("torch", "transformers", "datasets")
    code = f"import sys, hf_distill.demo.config; print([m for m in {heavy!r} if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_docs_list_every_demo_flag():
    import argparse

    from hf_distill.cli import demo as demo_cli

    parser = demo_cli.add_parser(argparse.ArgumentParser().add_subparsers())
    flags = {option for action in parser._actions for option in action.option_strings if option.startswith("--")}
    flags -= {"--help", "--quick"}
    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "demo.md"), encoding="utf-8").read()
    documented = set(re.findall(r"^\| `(--[a-z-]+)", docs, flags=re.MULTILINE))
    assert documented == flags

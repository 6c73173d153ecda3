"""`hf-distill cache-teacher` end to end: write a cache with the distill flags, train from it, and bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tiny import lm_dataset, make_model, make_tokenizer

from hf_distill.cli.main import main

FLAGS = ["--use_cpu", "True", "--bf16", "False", "--report_to", "none", "--attn_implementation", "eager"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_cli")
    tokenizer = make_tokenizer()
    student, teacher = make_model(len(tokenizer), seed=1), make_model(len(tokenizer), 48, seed=2)
    for model, name in ((student, "student"), (teacher, "t")):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    with open(root / "train.jsonl", "w") as f:
        for text in lm_dataset(12)["text"]:
            f.write(json.dumps({"text": text}) + "\n")
    models = ["--model_name_or_path", str(root / "student"), "--teacher_model_name_or_path", str(root / "t")]
    return root, [*models, "--dataset_name", str(root / "train.jsonl"), *FLAGS]


def _cache_path(out: str) -> str:
    match = re.search(r"--teacher_cache (\S+)", out)
    assert match, out
    return match.group(1)


def test_cache_then_train_from_it_and_rerun_reuses(assets, tmp_path, capsys):
    root, common = assets
    write = ["cache-teacher", *common, "--cache_dir", str(tmp_path / "caches"), "--cache_top_k", "8"]
    assert main([*write, "--output_dir", str(tmp_path / "o")]) == 0
    path = _cache_path(capsys.readouterr().out)
    files = {p: p.read_bytes() for p in sorted((tmp_path / "caches").rglob("*")) if p.is_file()}
    assert any(p.name == "manifest.json" for p in files)
    # the same inputs: the same folder, nothing rewritten
    assert main([*write, "--output_dir", str(tmp_path / "o")]) == 0
    assert _cache_path(capsys.readouterr().out) == path
    assert {p: p.read_bytes() for p in files} == files
    # another k: another folder
    assert main([*write[:-1], "4", "--output_dir", str(tmp_path / "o")]) == 0
    assert _cache_path(capsys.readouterr().out) != path
    train = ["distill", *common, "--teacher_cache", path, "--max_steps", "4", "--logging_steps", "1"]
    assert main([*train, "--learning_rate", "1e-2", "--output_dir", str(tmp_path / "run")]) == 0
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    losses = [log["loss"] for log in state["log_history"] if "loss" in log]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert f"a top-k teacher cache (`{path}`)" in (tmp_path / "run" / "README.md").read_text()  # the card says so


def test_bad_input_is_one_line_and_exit_2(assets, tmp_path, capsys):
    root, common = assets
    out = ["--output_dir", str(tmp_path / "o")]
    cases = {
        "no cache dir": (["cache-teacher", *common, *out], "--cache_dir"),
        "k above the vocabulary": (
            ["cache-teacher", *common, *out, "--cache_dir", str(tmp_path / "c"), "--cache_top_k", "100000"],
            "larger than the distilled vocabulary",
        ),
        "a cache made for another max_length": None,  # filled below
        "a missing cache": (
            ["distill", *common, *out, "--teacher_cache", str(tmp_path / "nope")],
            "does not exist",
        ),
    }
    assert main(["cache-teacher", *common, *out, "--cache_dir", str(tmp_path / "c"), "--cache_top_k", "4"]) == 0
    path = _cache_path(capsys.readouterr().out)
    before = {p: p.read_bytes() for p in sorted((tmp_path / "c").rglob("*")) if p.is_file()}
    cases["a cache made for another max_length"] = (
        ["distill", *common, *out, "--teacher_cache", path, "--max_length", "6"],
        "max_length: 1024 in the cache, 6 expected",
    )
    for name, (argv, fragment) in cases.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) >= 1 and err[-1].startswith("hf-distill"), (name, err)
        assert fragment in err[-1], (name, err[-1])
        assert "Traceback" not in "\n".join(err), name
    assert {p: p.read_bytes() for p in before} == before  # nothing overwritten


def test_the_eval_split_is_cached_and_distill_evaluates_from_it(assets, tmp_path, capsys):
    root, common = assets
    data = tmp_path / "data"
    data.mkdir()
    for split, rows in (("train", lm_dataset(12)), ("test", lm_dataset(4, seed=1))):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows["text"]))
    common = [str(data) if flag == str(root / "train.jsonl") else flag for flag in common]
    evals = ["--eval_strategy", "steps", "--eval_steps", "2", "--dataset_test_split", "test"]
    cache = ["cache-teacher", *common, "--cache_dir", str(tmp_path / "caches"), "--cache_top_k", "8"]
    assert main([*cache, *evals, "--output_dir", str(tmp_path / "o")]) == 0
    with_eval = _cache_path(capsys.readouterr().out)
    train = ["distill", *common, *evals, "--max_steps", "2", "--logging_steps", "1"]
    assert main([*train, "--teacher_cache", with_eval, "--output_dir", str(tmp_path / "run")]) == 0
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    eval_losses = [log["eval_loss"] for log in state["log_history"] if "eval_loss" in log]
    assert len(eval_losses) == 1 and torch.isfinite(torch.tensor(eval_losses)).all()
    # a cache of the training rows alone: refused before training, in one line
    assert main([*cache, "--output_dir", str(tmp_path / "o2")]) == 0
    train_only = _cache_path(capsys.readouterr().out)
    assert train_only != with_eval
    assert main([*train, "--teacher_cache", train_only, "--output_dir", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert "4 of the 4 rows of the eval dataset are not in the teacher cache" in err
    assert not (tmp_path / "run2" / "model.safetensors").exists()

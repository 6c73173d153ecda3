"""TRL's own SFT script becomes a distillation script by changing the import, the config class and `teacher_model`."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import trl.scripts.sft
from safetensors.torch import load_file
from sft_port import port_sft_script
from tiny import lm_dataset, make_model, make_tokenizer, subprocess_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def local_assets(tmp_path):
    tokenizer = make_tokenizer()
    student_dir, teacher_dir, data_dir = tmp_path / "student", tmp_path / "teacher", tmp_path / "data"
    make_model(len(tokenizer), seed=1).save_pretrained(student_dir)
    make_model(len(tokenizer), hidden_size=48, num_layers=3, seed=2).save_pretrained(teacher_dir)
    for directory in (student_dir, teacher_dir):
        tokenizer.save_pretrained(directory)
    data_dir.mkdir()
    with open(data_dir / "train.jsonl", "w") as f:
        for text in lm_dataset(16)["text"]:
            f.write(json.dumps({"text": text}) + "\n")
    return student_dir, teacher_dir, data_dir


def _run(script: Path, student_dir, teacher_dir, data_dir, output_dir) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, str(script),
        "--model_name_or_path", str(student_dir),
        "--teacher_model_name_or_path", str(teacher_dir),
        "--dataset_name", str(data_dir),
        "--output_dir", str(output_dir),
        "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
        "--report_to", "none", "--bf16", "False", "--gradient_checkpointing", "False",
        "--logging_steps", "1", "--save_strategy", "no", "--max_length", "32",
        "--divergence", "reverse_kl", "--temperature", "2.0", "--alpha", "0.2",
    ]  # fmt: skip
    env = subprocess_env(CI="true")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _check_trained(result: subprocess.CompletedProcess, student_dir: Path, output_dir: Path) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Training completed" in result.stdout
    assert "'distill_loss'" in result.stdout or "distill_loss" in result.stderr + result.stdout
    before, after = load_file(student_dir / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert any(not (before[k] == after[k]).all() for k in before), "the student was not updated"


def test_trl_sft_script_distils_with_three_changes(tmp_path, local_assets):
    script = tmp_path / "sft_distill.py"
    script.write_text(port_sft_script(inspect.getsource(trl.scripts.sft)))
    result = _run(script, *local_assets, tmp_path / "out")
    _check_trained(result, local_assets[0], tmp_path / "out")


def test_shipped_example_runs(tmp_path, local_assets):
    result = _run(REPO / "examples" / "sft_distill.py", *local_assets, tmp_path / "out")
    _check_trained(result, local_assets[0], tmp_path / "out")

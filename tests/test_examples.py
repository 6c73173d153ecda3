"""The example scripts and YAML recipes in `examples/`.

Each script runs with `--tiny` (local tiny models and data, a few steps, offline) in a subprocess, as `python` and,
for one of them, under `accelerate launch`; each recipe parses with TRL's parser into DistillationConfig without
unknown keys and without loading a model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
RECIPES = sorted((EXAMPLES / "recipes").glob("*.yaml"))
SUMMARY = "hf_distill example summary:"


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",  # tiny models: one thread; two spin against each other on a busy 2-core machine
        TOKENIZERS_PARALLELISM="false",
        CI="true",
    )


def _run(cmd: list[str], tmp_path: Path) -> dict:
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(SUMMARY)]
    assert lines, result.stdout[-2000:]
    summary = json.loads(lines[-1][len(SUMMARY) :])
    assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["last_loss"])
    assert summary["last_loss"] < summary["first_loss"], summary
    return summary


def _trainer_state(output_dir: Path) -> dict:
    return json.loads((output_dir / "trainer_state.json").read_text())


def test_chat_example(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(EXAMPLES / "chat_distill.py"),
        "--tiny",
        "--assistant-only-loss",
        "--output-dir",
        str(out),
    ]
    summary = _run(cmd, tmp_path)
    assert summary["steps"] == 30
    assert (out / "model.safetensors").is_file()
    logged = [entry for entry in _trainer_state(out)["log_history"] if "loss" in entry]
    assert {"distill_loss", "ce_loss", "teacher_agreement"} <= set(logged[0])


def test_lora_example(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    _run([sys.executable, str(EXAMPLES / "lora_distill.py"), "--tiny", "--output-dir", str(out)], tmp_path)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert any(bool(tensor.abs().sum() > 0) for tensor in lora_b), "the adapter did not train (LoRA B still zero)"


def test_arithmetic_example(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(EXAMPLES / "arithmetic_distill.py"), "--tiny", "--output-dir", str(out)]
    summary = _run(cmd, tmp_path)
    for name in ("teacher", "student"):
        assert math.isfinite(summary[name]["perplexity"]) and 0 <= summary[name]["exact_match"] <= 1
    assert (out / "student" / "model.safetensors").is_file()


def test_example_under_accelerate_launch(tmp_path):
    pytest.importorskip("accelerate")
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        # `--cpu` on a GPU machine would put the model on the CPU while TrainingArguments picks the GPU
        *([] if torch.cuda.is_available() else ["--cpu"]),
        str(EXAMPLES / "chat_distill.py"), "--tiny", "--max-steps", "6", "--output-dir", str(out),
    ]  # fmt: skip
    summary = _run(cmd, tmp_path)
    assert summary["steps"] == 6


def test_recipes_exist():
    names = {path.name for path in RECIPES}
    assert {"qwen3-1.7b-to-0.6b.yaml", "llama-3.2-3b-to-1b.yaml", "smollm2-1.7b-to-360m.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_parses(recipe):
    from trl import ModelConfig, ScriptArguments, TrlParser

    from hf_distill import DistillationConfig
    from hf_distill.bitnet.arguments import BitNetArguments

    text = recipe.read_text()
    assert "GPU memory" in text and "hf-distill distill --config" in text
    parser = TrlParser((ScriptArguments, DistillationConfig, ModelConfig, BitNetArguments))
    # fail_with_unknown_args (the default) rejects any key that is not a field of the four dataclasses
    script_args, config, model_args, bitnet_args = parser.parse_args_and_config(["--config", str(recipe)])
    assert bitnet_args.bitnet == ("bitnet" in recipe.stem)
    assert script_args.dataset_name
    assert model_args.model_name_or_path and config.teacher_model_name_or_path
    assert model_args.model_name_or_path != config.teacher_model_name_or_path
    assert config.divergence and config.temperature > 0 and 0 <= config.alpha <= 1
    assert config.teacher_model_init_kwargs == {"dtype": "bfloat16"}


def test_cached_teacher_example(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(EXAMPLES / "cached_teacher_distill.py"), "--tiny", "--output-dir", str(out)]
    cmd += ["--cache-dir", str(tmp_path / "caches")]
    summary = _run(cmd, tmp_path)
    assert summary["steps"] == 30 and (out / "model.safetensors").is_file()
    assert len(list((tmp_path / "caches").glob("*/manifest.json"))) == 1


def test_on_policy_example(tmp_path):
    out = tmp_path / "out"
    summary = _run(
        [sys.executable, str(EXAMPLES / "on_policy_distill.py"), "--tiny", "--output-dir", str(out)], tmp_path
    )
    assert summary["steps"] == 20
    logged = [entry for entry in _trainer_state(out)["log_history"] if "loss" in entry]
    assert all(entry["on_policy"] == 1.0 for entry in logged)  # a prompt-only dataset: every batch generated


def test_bitnet_example(tmp_path):
    out = tmp_path / "out"
    summary = _run([sys.executable, str(EXAMPLES / "bitnet_distill.py"), "--tiny", "--output-dir", str(out)], tmp_path)
    assert summary["steps"] == 30 and summary["last_loss"] < summary["first_loss"]
    qat = json.loads((out / "config.json").read_text())["quantization_config"]
    packed = json.loads((out / "packed" / "config.json").read_text())["quantization_config"]
    assert (qat["quant_method"], qat["linear_class"], qat["quantization_mode"]) == (
        "bitnet",
        "autobitlinear",
        "online",
    )
    assert (packed["linear_class"], packed["quantization_mode"]) == ("bitlinear", "offline")
    from safetensors import safe_open

    with safe_open(str(out / "packed" / "model.safetensors"), framework="pt") as f:
        up = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    config = json.loads((out / "config.json").read_text())
    assert up.dtype == torch.uint8 and tuple(up.shape) == (config["intermediate_size"] // 4, config["hidden_size"])

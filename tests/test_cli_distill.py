"""`hf-distill distill` and `hf-distill env`, end to end on tiny local models and datasets (no Hub access)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import lm_dataset, make_model, make_tokenizer, subprocess_env

from hf_distill.cli.main import main

REPO = Path(__file__).resolve().parents[1]

# Same data, optimiser and tolerance as tests/test_distributed.py (2 processes x batch 2 vs 1 process x batch 4).
TRAINING = [
    "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
    "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--max_grad_norm", "0",
    "--alpha", "0.3", "--temperature", "2.0", "--use_cpu", "True", "--gradient_checkpointing", "False",
    "--dataloader_pin_memory", "False",
    # TRL's configs default to bf16=True, which on CPU runs the forwards under bf16 autocast: two batchings of the
    # same tokens then differ by bf16 rounding (~4e-3 relative on gradients). float32 makes them agree to ~1e-7.
    "--bf16", "False",
    # models loaded by path default to SDPA, whose CPU kernel depends on the padded length (2 vs 4 rows padded
    # differently): ~2e-5 relative on the loss. Eager attention makes the two runs agree to ~1e-7.
    "--attn_implementation", "eager",
]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_assets")
    tokenizer = make_tokenizer()
    student, teacher = make_model(len(tokenizer), seed=1), make_model(len(tokenizer), hidden_size=48, seed=2)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8)  # a confident teacher: a distillation term that matters
    for model, name in ((student, "student"), (teacher, "teacher")):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    with open(root / "train.jsonl", "w") as f:
        for text in lm_dataset(12)["text"]:
            f.write(json.dumps({"text": text}) + "\n")
    return {"student": str(root / "student"), "teacher": str(root / "teacher"), "data": str(root / "train.jsonl")}


def _models(assets) -> list[str]:
    return ["--model_name_or_path", assets["student"], "--teacher_model_name_or_path", assets["teacher"]]


def _losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [log["loss"] for log in state["log_history"] if "loss" in log]


def _env() -> dict[str, str]:
    # CPU runs (DDP over gloo) even where a GPU is: a second process would look for a second GPU
    return subprocess_env(OMP_NUM_THREADS="1", CI="true", CUDA_VISIBLE_DEVICES="")


def test_recipe_with_flag_overrides(tmp_path, assets, monkeypatch):
    monkeypatch.setenv("HF_DISTILL_RECIPE_VAR", "unset")  # restored after the test
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "env:\n  HF_DISTILL_RECIPE_VAR: from-the-recipe\n"
        f"model_name_or_path: {assets['student']}\nteacher_model_name_or_path: {assets['teacher']}\n"
        f"dataset_name: {assets['data']}\noutput_dir: {tmp_path / 'out'}\n"
        "max_steps: 4\nlogging_steps: 1\nper_device_train_batch_size: 4\nmax_length: 32\n"
        "divergence: reverse_kl\ntemperature: 2.0\nreport_to: none\nsave_strategy: 'no'\n"
        "teacher_model_init_kwargs:\n  dtype: bfloat16\n"
    )
    overrides = ["--max_steps", "2", "--temperature", "3.0", "--teacher_model_init_kwargs", '{"dtype": "float32"}']
    assert main(["distill", "--config", str(recipe), *overrides]) == 0

    out = tmp_path / "out"
    assert os.environ["HF_DISTILL_RECIPE_VAR"] == "from-the-recipe"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["max_steps"] == state["global_step"] == 2  # the flag beat the recipe's 4
    assert state["logging_steps"] == 1  # the recipe beat the default (10)
    assert all("distill_loss" in log for log in state["log_history"][:2])
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.temperature == 3.0  # flag
    assert args.divergence == "reverse_kl"  # recipe
    assert args.teacher_model_init_kwargs == {"dtype": "float32"}  # JSON flag beat the recipe's mapping
    assert (out / "model.safetensors").is_file()


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        main(["distill", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in (
        "--divergence {forward_kl,reverse_kl,generalized_jsd,total_variation,skew_kl,skew_reverse_kl}",
        "Distillation divergence (default: generalized_jsd when `beta` is set, else forward_kl). (default: None)",
        "temperature**2. (default: 1.0)",
        "--teacher_model_name_or_path TEACHER_MODEL_NAME_OR_PATH",
        "Name or local path of the teacher model (required). (default: None)",
        "--alpha ALPHA",
        "--learning_rate LEARNING_RATE",  # TrainingArguments
        "--max_length MAX_LENGTH",  # SFTConfig
        "--lora_r LORA_R",  # ModelConfig
        "--dataset_train_split DATASET_TRAIN_SPLIT",  # ScriptArguments
        "--config YAML",
        "--accelerate_config NAME|PATH",
    ):
        assert expected in text, expected


def test_bad_input_gives_one_line_and_non_zero_exit(tmp_path, assets):
    unknown_key = tmp_path / "typo.yaml"
    unknown_key.write_text(f"model_name_or_path: {assets['student']}\ntemprature: 2.0\n")
    data = ["--dataset_name", assets["data"], "--output_dir", str(tmp_path / "never")]
    cases = {
        "unknown command": (["distil"], "invalid choice: 'distil'"),
        "missing recipe": (["distill", "--config", str(tmp_path / "nope.yaml")], "does not exist"),
        "unknown recipe key": (["distill", "--config", str(unknown_key)], "unknown key in"),
        "unknown flag": (["distill", *_models(assets), *data, "--temprature", "2"], "unrecognized arguments"),
        "missing teacher": (
            ["distill", "--model_name_or_path", assets["student"], *data],
            "required: --teacher_model_name_or_path",
        ),
        "missing dataset path": (
            ["distill", *_models(assets), "--dataset_name", str(tmp_path / "no" / "train.jsonl")],
            "does not exist",
        ),
        "bad value": (["distill", *_models(assets), *data, "--temperature", "-1"], "`temperature` must be > 0"),
        "bad choice": (["distill", *_models(assets), *data, "--divergence", "kl"], "invalid choice: 'kl'"),
        "unknown preset": (
            ["distill", *_models(assets), *data, "--accelerate_config", "eight_gpus"],
            "neither a file nor a preset",
        ),
        "bitnet option alone": (
            ["distill", *_models(assets), *data, "--bitnet_sub_norm", "true"],
            "--bitnet_sub_norm has no effect without --bitnet",
        ),
        "bad bitnet schedule": (
            ["distill", *_models(assets), *data, "--bitnet", "true", "--bitnet_schedule", "cosine"],
            "--bitnet_schedule must be one of",
        ),
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "hf_distill.cli.main", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for name, (argv, _) in cases.items()
    }
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (name, stderr[-2000:])
        assert "Traceback" not in stderr, (name, stderr[-2000:])
        errors = [line for line in stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], (name, stderr[-2000:])
        prefix = "hf-distill: error: " if name == "unknown command" else "hf-distill distill: error: "
        assert errors[0].startswith(prefix) and cases[name][1] in errors[0], (name, errors[0])
    assert not (tmp_path / "never").exists()


def test_bitnet_flags_train_a_ternary_student(tmp_path, assets):
    out = tmp_path / "out"
    argv = ["distill", *_models(assets), "--dataset_name", assets["data"], "--output_dir", str(out), *TRAINING]
    argv += ["--max_length", "32", "--bitnet", "true", "--bitnet_warmup_steps", "2", "--bitnet_sub_norm", "true"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bitnet"  # a Llama student with sub-norms is transformers' BitNet
    assert config["quantization_config"]["quant_method"] == "bitnet"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "AutoBitLinear"
    assert model.model.layers[0].mlp.ffn_sub_norm.weight.shape == (model.config.intermediate_size,)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_two_processes_match_one(tmp_path, assets):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["distill", *_models(assets), "--dataset_name", assets["data"], *TRAINING]
    assert main([*common, "--per_device_train_batch_size", "4", "--output_dir", str(single)]) == 0
    launch = ["--accelerate_config", "multi_gpu", "--num_processes", "2", "--mixed_precision", "no"]
    launch += ["--main_process_port", str(_free_port())]
    result = subprocess.run(
        [sys.executable, "-m", "hf_distill.cli.main", *common, *launch,
         "--per_device_train_batch_size", "2", "--output_dir", str(ddp)],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((ddp / "trainer_state.json").read_text())["train_batch_size"] == 2  # per process: 2 ran
    losses_single, losses_ddp = _losses(single), _losses(ddp)
    assert len(losses_single) == 3
    # The logged losses: tests/test_distributed.py's tolerance (observed: 1e-7 relative on steps 1-2, 2e-6 on step 3).
    torch.testing.assert_close(torch.tensor(losses_ddp), torch.tensor(losses_single), rtol=1e-4, atol=1e-6)
    # The weights after 3 SGD steps at lr 0.5: tests/test_distributed.py's tolerance.
    weights_single, weights_ddp = load_file(single / "model.safetensors"), load_file(ddp / "model.safetensors")
    for key, value in weights_single.items():
        torch.testing.assert_close(weights_ddp[key], value, rtol=1e-4, atol=1e-5)


def test_env_prints_versions(capsys):
    import hf_distill

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"- hf_distill version: {hf_distill.__version__}" in out
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        assert f"- {name} version: " in out and f"- {name} version: not installed" not in out
    for name in ("Python version", "Platform", "CUDA available", "MPS available"):
        assert f"- {name}: " in out
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch version"] == torch.__version__


def test_local_datasets_load_offline(tmp_path):
    from datasets import Dataset, DatasetDict

    from hf_distill.data import DatasetNotFound, load_dataset_by_name, looks_like_local_path

    rows = lm_dataset(6)
    rows.to_json(tmp_path / "d.jsonl")
    rows.to_csv(tmp_path / "d.csv", index=False)
    rows.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("\n".join(rows["text"]) + "\n")
    (tmp_path / "dir").mkdir()
    rows.to_json(tmp_path / "dir" / "train.jsonl")
    DatasetDict({"train": rows, "test": Dataset.from_dict({"text": ["a b"]})}).save_to_disk(tmp_path / "saved")
    for name in ("d.jsonl", "d.csv", "d.parquet", "d.txt", "dir", "saved"):
        loaded = load_dataset_by_name(str(tmp_path / name))
        assert loaded["train"]["text"] == rows["text"], name
    assert set(load_dataset_by_name(str(tmp_path / "saved"))) == {"train", "test"}
    with pytest.raises(DatasetNotFound, match="does not exist"):
        load_dataset_by_name(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.xlsx").write_text("")
    with pytest.raises(DatasetNotFound, match="unsupported suffix"):
        load_dataset_by_name(str(tmp_path / "d.xlsx"))
    assert looks_like_local_path("./data") and looks_like_local_path("data/train.json")
    assert not looks_like_local_path("trl-lib/Capybara") and not looks_like_local_path("imdb")

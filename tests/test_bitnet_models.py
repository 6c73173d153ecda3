"""The model types hf_distill registers (Qwen2/Qwen3/Mistral with BitNet sub-norms): Auto classes after
`import hf_distill` in either import order, and `trust_remote_code=True` without hf_distill at all."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny import subprocess_env
from transformers import AutoModelForCausalLM

import hf_distill  # noqa: F401  (registers the model types)
from hf_distill.models.bitnet_sub_norm import SUB_NORM_MODELS

SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def save_sub_norm_model(family: str, folder) -> torch.nn.Module:
    config_cls, model_cls = SUB_NORM_MODELS[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**SIZES))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_sub_norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("family", sorted(SUB_NORM_MODELS))
def test_sub_norm_models_round_trip_through_the_auto_classes(tmp_path, family):
    model = save_sub_norm_model(family, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == f"{family}_bitnet_sub_norm"
    assert config["auto_map"]["AutoModelForCausalLM"] == f"bitnet_sub_norm.{type(model).__name__}"
    assert (tmp_path / "bitnet_sub_norm.py").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # the sub-norms act: with weight 1 everywhere the logits differ
    with torch.no_grad():
        for name, p in reloaded.named_parameters():
            if "_sub_norm" in name:
                p.fill_(1.0)
    assert not torch.allclose(reloaded(ids).logits, model(ids).logits)


LOAD = """
import sys, torch
{prelude}
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({path!r}{extra})
torch.manual_seed(0)
print(type(model).__name__, float(model(torch.arange(8)[None]).logits.sum()))
"""


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_trust_remote_code_loads_without_hf_distill(tmp_path):
    model = save_sub_norm_model("qwen3", tmp_path)
    with torch.no_grad():
        expected = float(model(torch.arange(8)[None]).logits.sum())
    # importing hf_distill is made impossible: the saved code must be self-contained
    out = run_python(
        LOAD.format(prelude="sys.modules['hf_distill'] = None", path=str(tmp_path), extra=", trust_remote_code=True")
    )
    name, value = out.split()
    assert name == "Qwen3BitNetSubNormForCausalLM" and float(value) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("order", ["hf_distill first", "transformers first"])
def test_import_hf_distill_registers_in_either_order(tmp_path, order):
    save_sub_norm_model("qwen2", tmp_path)
    prelude = "import hf_distill" if order == "hf_distill first" else "import transformers.models.auto.modeling_auto"
    code = LOAD.format(prelude=prelude, path=str(tmp_path), extra="")
    if order == "transformers first":
        code = code.replace(
            "from transformers import AutoModelForCausalLM",
            "import hf_distill\nfrom transformers import AutoModelForCausalLM",
        )
    assert run_python(code).split()[0] == "Qwen2BitNetSubNormForCausalLM"


def test_only_new_model_types_are_registered():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    ours = {config_cls.model_type for config_cls, _ in SUB_NORM_MODELS.values()}
    assert not ours & set(CONFIG_MAPPING_NAMES)  # none shadows a transformers type (llama+sub-norms is `bitnet`)
    assert ours <= set(CONFIG_MAPPING.keys())
    assert "bitnet" in CONFIG_MAPPING_NAMES and "llama_bitnet_sub_norm" not in ours

"""`hf-distill export`: run in-process on a tiny saved BitNet checkpoint; exit codes, outputs, one-line errors."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from hf_distill.bitnet import convert_to_bitnet
from hf_distill.cli.main import main


@pytest.fixture(autouse=True)
def eager_bitnet_kernels():
    torch.compiler.set_stance("force_eager")  # skip compiling transformers' packed kernels on CPU (see test_export)
    yield
    torch.compiler.set_stance("default")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A BitNet QAT checkpoint with its tokenizer, as a training run saves it, and the logits it computes."""
    from tiny import make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    convert_to_bitnet(model)
    path = tmp_path_factory.mktemp("student")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    ids = tokenizer(["the cat sat on the mat", "hello how are you"], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        return path, ids, model(ids).logits


def export(*args):
    return main(["export", *map(str, args)])


def test_qat_and_packed(checkpoint, tmp_path, capsys):
    path, ids, ref = checkpoint
    assert export("--model", path, "--output", tmp_path / "qat", "--format", "qat") == 0
    out = capsys.readouterr().out
    assert f"Exported (qat) to {tmp_path / 'qat'}" in out and "32.000 bits/weight" in out
    assert AutoTokenizer.from_pretrained(tmp_path / "qat")("the cat").input_ids == (
        AutoTokenizer.from_pretrained(path)("the cat").input_ids
    )
    with torch.no_grad():
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(tmp_path / "qat")(ids).logits, ref, atol=1e-6, rtol=0
        )

    argv = ["--model", path, "--output", tmp_path / "packed", "--format", "packed"]
    assert export(*argv, "--linear_class", "autobitlinear", "--dtype", "float32") == 0
    out = capsys.readouterr().out
    bits = float(out.split(" bits/weight")[0].rsplit(", ", 1)[1])
    assert "linear_class=autobitlinear" in out and 2.0 < bits <= 2.1
    with open(tmp_path / "packed" / "config.json") as f:
        quant = json.load(f)["quantization_config"]
    assert (quant["linear_class"], quant["quantization_mode"]) == ("autobitlinear", "offline")
    assert os.path.isfile(tmp_path / "packed" / "tokenizer.json")
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")(ids).logits
    assert ((logits - ref).norm() / ref.norm()) < 5e-3

    # an existing output is refused (one line, exit 2, untouched), then replaced with --overwrite
    before = sorted(os.listdir(tmp_path / "packed"))
    capsys.readouterr()
    assert export(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hf-distill export: error: ") and "overwrite" in err
    assert sorted(os.listdir(tmp_path / "packed")) == before
    assert export(*argv, "--overwrite") == 0
    assert "dtype=bfloat16, linear_class=bitlinear" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--format", "qat", "--ternary_type", "TQ1_0"], "--ternary_type: does not apply to --format qat"),
        (["--format", "gguf", "--linear_class", "bitlinear"], "--linear_class: does not apply to --format gguf"),
        (["--format", "packed", "--model", "{tmp}/missing"], "is not a folder"),
        (["--format", "packed", "--model", "{tmp}/plain"], "is not a BitNet checkpoint"),
    ],
    ids=["ternary_type-qat", "linear_class-gguf", "missing", "not-bitnet"],
)
def test_bad_input_is_one_line_and_exit_code_2(checkpoint, tmp_path, capsys, argv, message):
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path / "plain")  # fmt: skip
    argv = [a.format(tmp=tmp_path) for a in argv]
    capsys.readouterr()
    if "--model" not in argv:
        argv += ["--model", str(checkpoint[0])]
    assert export("--output", tmp_path / "out", *argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hf-distill export: error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_missing_required_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        export("--model", "x", "--output", "y")
    assert exit_info.value.code == 2 and "--format" in capsys.readouterr().err


def test_gguf_dispatch(checkpoint, tmp_path, capsys, monkeypatch):
    """The gguf branch calls hf_distill.export.gguf.export_gguf with the checkpoint, its tokenizer and the type
    (the GGUF file itself is tested in test_export_gguf.py)."""
    import hf_distill.export.gguf as gguf_module

    calls = []

    def fake_export_gguf(model_or_path, output_path, tokenizer=None, ternary_type="TQ2_0", arch=None, overwrite=False):
        calls.append((model_or_path, output_path, tokenizer, ternary_type, overwrite))
        return gguf_module.GGUFExportReport(
            path=output_path, arch="llama", ternary_type=ternary_type, file_size=123, bits_per_ternary_weight=1.69
        )

    monkeypatch.setattr(gguf_module, "export_gguf", fake_export_gguf)
    output = tmp_path / "student.gguf"
    assert export("--model", checkpoint[0], "--output", output, "--format", "gguf", "--ternary_type", "TQ1_0") == 0
    ((model, path, tokenizer, ternary_type, overwrite),) = calls
    assert (model, path, ternary_type, overwrite) == (str(checkpoint[0]), str(output), "TQ1_0", False)
    assert (
        tokenizer is not None
        and tokenizer("the cat").input_ids == AutoTokenizer.from_pretrained(checkpoint[0])("the cat").input_ids
    )
    out = capsys.readouterr().out
    assert f"Exported (gguf) to {output}" in out and "bits/weight of the ternary layers: 1.690" in out

    def refuse(*args, **kwargs):
        raise FileExistsError(f"{output} exists: pass overwrite=True to replace it.")

    monkeypatch.setattr(gguf_module, "export_gguf", refuse)
    assert export("--model", checkpoint[0], "--output", output, "--format", "gguf") == 2
    assert "exists: pass overwrite=True" in capsys.readouterr().err

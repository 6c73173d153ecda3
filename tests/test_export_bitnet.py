"""BitNet exports: the QAT checkpoint and the packed 1.58-bit safetensors, reloaded by stock transformers."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
from transformers.integrations.bitnet import AutoBitLinear, unpack_weights
from transformers.integrations.bitnet import BitLinear as HFBitLinear

from hf_distill.bitnet import bitlinear_layers, convert_to_bitnet, load_bitnet_student
from hf_distill.export import export_packed, export_qat

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(autouse=True)
def eager_bitnet_kernels():
    """transformers' packed BitLinear runs `@torch.compile`d kernels; on CPU the first call compiles for 7-16 s per
    dtype and class. `force_eager` runs the same Python code without compiling (`test_packed_compiled` checks that
    the compiled kernels give the same numbers)."""
    torch.compiler.set_stance("force_eager")
    yield
    torch.compiler.set_stance("default")


def student(sub_norm=False, seed=0, config_cls=LlamaConfig, **overrides):
    torch.manual_seed(seed)
    config = config_cls(**{**SIZES, "num_key_value_heads": 2, **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    convert_to_bitnet(model, sub_norm=sub_norm)
    return model


def input_ids(seed=0):
    return torch.randint(0, SIZES["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def relative_error(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


def stored(folder):
    tensors = {}
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors


def read_config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def layer_inputs(model, ids):
    """The input of every BitLinear layer (after its sub-norm) during a forward of `model`."""
    captured, handles = {}, []
    for name, layer in bitlinear_layers(model).items():
        handles.append(layer.register_forward_pre_hook(lambda m, args, name=name: captured.setdefault(name, args[0])))
    logits(model, ids)
    for handle in handles:
        handle.remove()
    return captured


@pytest.mark.parametrize("sub_norm", [False, True], ids=["llama", "sub_norm-bitnet"])
def test_qat_export_reloads_with_stock_transformers(tmp_path, sub_norm):
    model, ids = student(sub_norm=sub_norm, attention_bias=sub_norm), input_ids()
    ref = logits(model, ids)
    report = export_qat(model, tmp_path / "qat")

    config = read_config(tmp_path / "qat")
    assert config["model_type"] == ("bitnet" if sub_norm else "llama")
    assert config["quantization_config"]["linear_class"] == "autobitlinear"
    assert config["quantization_config"]["quantization_mode"] == "online"
    assert config["quantization_config"]["modules_to_not_convert"] == ["lm_head"]
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "qat").eval()
    assert type(stock).__name__ == ("BitNetForCausalLM" if sub_norm else "LlamaForCausalLM")
    assert (
        isinstance(stock.model.layers[0].mlp.down_proj, AutoBitLinear)
        and stock.model.layers[0].mlp.down_proj.online_quant
    )
    assert type(stock.lm_head) is torch.nn.Linear
    torch.testing.assert_close(logits(stock, ids), ref, rtol=0, atol=1e-6)  # measured: identical (0.0)

    assert report.model_type == config["model_type"] and report.ternary_layers == 14
    assert report.bits_per_weight == 32.0 and report.weights_bytes == os.path.getsize(
        tmp_path / "qat/model.safetensors"
    )
    # The QAT checkpoint goes back into hf_distill (and through a path-based export again) unchanged.
    again = load_bitnet_student(tmp_path / "qat")
    torch.testing.assert_close(logits(again, ids), ref, rtol=0, atol=1e-6)
    export_qat(tmp_path / "qat", tmp_path / "qat2")
    first, second = stored(tmp_path / "qat"), stored(tmp_path / "qat2")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    "overrides, reason",
    [({"mlp_bias": True}, "mlp_bias"), ({"head_dim": 32}, "head_dim")],
    ids=["mlp_bias", "head_dim"],
)
def test_llama_students_that_cannot_be_bitnet_refuse_sub_norms(overrides, reason):
    with pytest.raises(ValueError, match=f"cannot: .*{reason}"):
        student(sub_norm=True, **overrides)


@pytest.mark.parametrize(
    "config_cls, overrides", [(Qwen2Config, {}), (Qwen3Config, {"head_dim": 16})], ids=["qwen2", "qwen3"]
)
def test_sub_norm_students_of_other_families_export_as_their_registered_type(tmp_path, config_cls, overrides):
    model = student(sub_norm=True, config_cls=config_cls, **overrides)
    ids = input_ids()
    ref = logits(model, ids)
    export_qat(model, tmp_path / "qat")
    export_packed(model, tmp_path / "packed", dtype=torch.float32)
    for name in ("qat", "packed"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["model_type"] == model.config.model_type and "auto_map" in config
        assert (tmp_path / name / "bitnet_sub_norm.py").is_file()  # trust_remote_code loads it without hf_distill
    with torch.compiler.set_stance("force_eager"):
        qat = AutoModelForCausalLM.from_pretrained(tmp_path / "qat")
        packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
        torch.testing.assert_close(logits(qat, ids), ref, rtol=0, atol=0)
        assert relative_error(logits(packed, ids), ref) < 5e-3


@pytest.mark.parametrize(
    "linear_class, sub_norm", [("bitlinear", False), ("autobitlinear", True)], ids=["bitlinear", "autobitlinear"]
)
def test_packed_float32_matches_the_ternary_model(tmp_path, linear_class, sub_norm):
    # attention biases: AutoBitLinear scales `x @ codes.T + bias` by weight_scale, so the bias is stored over alpha
    model, ids = student(sub_norm=sub_norm, attention_bias=True), input_ids()
    ref, inputs = logits(model, ids), layer_inputs(model, ids)
    report = export_packed(model, tmp_path / "packed", linear_class=linear_class, dtype=torch.float32)
    assert (report.linear_class, report.dtype, report.ternary_layers) == (linear_class, "float32", 14)

    quant = read_config(tmp_path / "packed")["quantization_config"]
    assert quant["quant_method"] == "bitnet" and quant["quantization_mode"] == "offline"
    assert quant["linear_class"] == linear_class and quant["modules_to_not_convert"] == ["lm_head"]
    tensors = stored(tmp_path / "packed")
    for name, layer in bitlinear_layers(model).items():
        codes, alpha = layer.ternary_weight()
        packed = tensors[f"{name}.weight"]
        assert packed.dtype == torch.uint8 and packed.shape == (layer.out_features // 4, layer.in_features)
        assert torch.equal(unpack_weights(packed, torch.float32), codes.float())
        scale = tensors[f"{name}.weight_scale"]
        assert scale.shape == (1,) and scale.dtype == torch.float32
        torch.testing.assert_close(scale[0], alpha if linear_class == "autobitlinear" else 1 / alpha)
    assert {t.dtype for k, t in tensors.items() if not k.endswith("proj.weight")} == {torch.float32}

    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
    assert type(stock).__name__ == ("BitNetForCausalLM" if sub_norm else "LlamaForCausalLM")
    cls = AutoBitLinear if linear_class == "autobitlinear" else HFBitLinear
    assert type(stock.model.layers[1].self_attn.q_proj) is cls and type(stock.lm_head) is torch.nn.Linear
    # Layer by layer on the real activations: same numbers up to float rounding (measured <= 4e-7 relative).
    for name, x in inputs.items():
        with torch.no_grad():
            mine, theirs = bitlinear_layers(model)[name].forward(x), stock.get_submodule(name).forward(x)  # no hooks
        assert (theirs - mine).abs().max() <= 2e-6 * mine.abs().max(), name
    # End to end: ~3e-7 relative, or ~1e-3 when a float-rounding difference flips one int8 activation rounding.
    out = logits(stock, ids)
    assert relative_error(out, ref) < 5e-3 and (out - ref).abs().max() < 1e-2 * ref.abs().max()


def test_packed_bfloat16_sizes_and_tied_head(tmp_path):
    model, ids = student(tie_word_embeddings=True, seed=1), input_ids()
    ref = logits(model, ids)
    packed = export_packed(model, tmp_path / "packed")  # bitlinear, bfloat16
    qat = export_qat(model, tmp_path / "qat")

    tensors = stored(tmp_path / "packed")
    assert "lm_head.weight" not in tensors  # tied to the embeddings, written once
    assert {t.dtype for t in tensors.values()} == {torch.uint8, torch.bfloat16}
    assert read_config(tmp_path / "packed")["dtype"] == "bfloat16"
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
    assert stock.dtype == torch.bfloat16 and stock.lm_head.weight is stock.model.embed_tokens.weight
    out = logits(stock, ids)
    # bf16 arithmetic against the float32 model: measured 0.6-3.3 % relative over seeds and both classes
    assert relative_error(out, ref) < 0.08 and (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8

    # bits/weight of the packed layers: 2 bits per code + one bf16 scale per layer (in_features >= 64 here)
    weights = sum(m.weight.numel() for m in bitlinear_layers(model).values())
    packed_bytes = sum(
        t.numel() * t.element_size() for k, t in tensors.items() if k.endswith(("proj.weight", "_scale"))
    )
    assert packed.ternary_weights == weights and packed.linear_bytes == packed_bytes
    assert 2.0 < packed.bits_per_weight <= 2.1
    assert qat.bits_per_weight == 32.0 and qat.linear_bytes == 4 * weights  # float32 latent weights
    assert packed.linear_bytes < qat.linear_bytes / 15.9
    assert packed.weights_bytes == os.path.getsize(tmp_path / "packed/model.safetensors")
    non_linear_bytes = sum(
        t.numel() * 2 for k, t in tensors.items() if t.dtype == torch.bfloat16 and "_scale" not in k
    )
    assert packed.weights_bytes - packed_bytes - non_linear_bytes < 8192  # the rest is the safetensors header
    assert packed.total_bytes == sum(os.path.getsize(tmp_path / "packed" / f) for f in packed.files)


def test_packed_rows_not_multiple_of_four_are_refused(tmp_path):
    model = student(intermediate_size=130)
    with pytest.raises(ValueError, match=r"multiple of 4.*model\.layers\.0\.mlp\.gate_proj \(out_features=130\)"):
        export_packed(model, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()
    export_qat(model, tmp_path / "qat")  # the QAT checkpoint has no such constraint


def test_bad_inputs_are_refused(tmp_path):
    plain = AutoModelForCausalLM.from_config(LlamaConfig(**SIZES))
    with pytest.raises(ValueError, match="no BitLinear layer: it was not trained with BitNet"):
        export_packed(plain, tmp_path / "out")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="is not a BitNet checkpoint"):
        export_qat(tmp_path / "plain", tmp_path / "out")
    with pytest.raises(ValueError, match="is not a folder"):
        export_packed(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="linear_class"):
        export_packed(student(), tmp_path / "out", linear_class="bitnet")
    with pytest.raises(ValueError, match="dtype"):
        export_packed(student(), tmp_path / "out", dtype="int8")
    assert sorted(os.listdir(tmp_path)) == ["plain"]

    model = student()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty: pass overwrite=True"):
        export_qat(model, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["old.txt"]
    export_qat(model, tmp_path / "out", overwrite=True)
    assert "old.txt" not in os.listdir(tmp_path / "out") and "model.safetensors" in os.listdir(tmp_path / "out")
    with pytest.raises(ValueError, match="is the checkpoint being exported"):
        export_packed(tmp_path / "out", tmp_path / "out", overwrite=True)


def test_a_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    import hf_distill.export.packed as packed_module

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(packed_module, "save_extras", fail)  # after the weights were written
    with pytest.raises(RuntimeError, match="disk full"):
        export_packed(student(), tmp_path / "packed")
    assert os.listdir(tmp_path) == []  # neither the output nor its temporary sibling
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "old.txt").write_text("previous export")
    with pytest.raises(RuntimeError, match="disk full"):
        export_packed(student(), tmp_path / "packed", overwrite=True)
    assert os.listdir(tmp_path) == ["packed"] and os.listdir(tmp_path / "packed") == ["old.txt"]


def test_mid_warmup_model_warns_and_exports_lambda_one(tmp_path):
    from hf_distill.bitnet import set_bitnet_lambda

    model, ids = student(), input_ids()
    ref = logits(model, ids)  # lambda 1
    set_bitnet_lambda(model, 0.5)
    with pytest.warns(UserWarning, match="warm-up is not finished"):
        export_qat(model, tmp_path / "qat")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "qat")
    torch.testing.assert_close(logits(stock, ids), ref, rtol=0, atol=1e-6)


def test_packed_compiled(tmp_path):
    """transformers' `@torch.compile`d kernels (compiled on CPU: the slow path the other tests skip)."""
    model, ids = student(), input_ids()
    export_packed(model, tmp_path / "packed", dtype=torch.float32)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
    eager = logits(stock, ids)
    torch.compiler.set_stance("default")
    torch.testing.assert_close(logits(stock, ids), eager, rtol=1e-5, atol=1e-6)

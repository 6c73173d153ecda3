"""BitLinear, conversion and the lambda warm-up, pinned against references written from the BitNet b1.58 paper."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import make_model

from hf_distill.bitnet import (
    BitLinear,
    LambdaSchedule,
    bitlinear_layers,
    convert_to_bitnet,
    load_bitnet_student,
    set_bitnet_lambda,
)


def paper_weight_quant(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BitNet b1.58, eq. (1)-(3): gamma = mean|W|, W~ = RoundClip(W / gamma, -1, 1), used as W~ * gamma.

    Written element by element in float64 (transformers bounds gamma below by eps instead of adding it; same here).
    """
    gamma = max(sum(abs(v) for v in w.double().flatten().tolist()) / w.numel(), eps)
    out = torch.empty_like(w, dtype=torch.float64)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            out[i, j] = max(-1.0, min(1.0, round(float(w[i, j]) / gamma))) * gamma
    return out


def paper_act_quant(x: torch.Tensor, bits: int = 8, eps: float = 1e-5) -> torch.Tensor:
    """Per-token absmax quantization to [-2^(b-1), 2^(b-1) - 1]: x~ = Clip(round(x * Qp / max|x|)) * max|x| / Qp."""
    qp = 2 ** (bits - 1) - 1
    rows = x.double().reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        gamma = max(rows[r].abs().max().item(), eps)
        for c in range(rows.shape[1]):
            out[r, c] = max(-qp - 1, min(qp, round(rows[r, c].item() * qp / gamma))) * gamma / qp
    return out.reshape(x.shape)


def random_layer(in_features=24, out_features=16, bias=True, seed=0) -> BitLinear:
    torch.manual_seed(seed)
    return BitLinear.from_linear(torch.nn.Linear(in_features, out_features, bias=bias))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_the_paper_formulas(bits, bias):
    layer = random_layer(bias=bias)
    layer.activation_bits = bits
    x = torch.randn(3, 5, 24)
    expected = paper_act_quant(x, bits) @ paper_weight_quant(layer.weight.detach()).T
    if bias:
        expected = expected + layer.bias.detach().double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_straight_through_gradients():
    layer = random_layer()
    x = torch.randn(4, 24, requires_grad=True)
    g = torch.randn(4, 16)
    layer(x).backward(g)
    w_q = paper_weight_quant(layer.weight.detach()).float()
    x_q = paper_act_quant(x.detach()).float()
    # d/dW of x~ W~^T through the identity-gradient quantizers: g^T x~; d/dx: g W~
    torch.testing.assert_close(layer.weight.grad, g.T @ x_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, g @ w_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))


def test_lambda_one_gives_three_values_per_tensor():
    model = make_model(64, hidden_size=32)
    convert_to_bitnet(model)
    for name, layer in bitlinear_layers(model).items():
        w = layer.quantized_weight()
        codes, scale = layer.ternary_weight()
        torch.testing.assert_close(scale, layer.weight.detach().abs().mean(), rtol=1e-6, atol=0)
        assert set(w.unique().tolist()) <= {-scale.item(), 0.0, scale.item()}, name
        assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
        torch.testing.assert_close(codes.float() * scale, w, rtol=0, atol=0)


def test_lambda_zero_is_the_full_precision_model_exactly():
    model = make_model(64, hidden_size=32)
    reference = copy.deepcopy(model)
    convert_to_bitnet(model)
    set_bitnet_lambda(model, 0.0)
    ids = torch.randint(0, 64, (2, 12))
    out, ref = model(ids, labels=ids), reference(ids, labels=ids)
    assert torch.equal(out.logits, ref.logits)
    out.loss.backward()
    ref.loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_intermediate_lambda_mixes_values():
    layer = random_layer(bias=False)
    x = torch.randn(4, 24)
    layer.weight_lambda, layer.activation_lambda = 0.25, 0.5
    w = layer.weight.detach()
    w_mix = w + 0.25 * (paper_weight_quant(w).float() - w)
    x_mix = x + 0.5 * (paper_act_quant(x).float() - x)
    torch.testing.assert_close(layer(x), x_mix @ w_mix.T, rtol=1e-5, atol=1e-5)


def test_conversion_keeps_head_embeddings_norms_and_parameters():
    model = make_model(64, hidden_size=32)
    before = {name: p for name, p in model.named_parameters()}
    result = convert_to_bitnet(model)
    assert result.skipped == ["lm_head"] and len(result.converted) == 2 * 7
    assert type(model.lm_head) is torch.nn.Linear
    assert all(p is before[name] for name, p in model.named_parameters())  # shared, not copied
    quant = model.config.quantization_config
    assert (quant.linear_class, quant.quantization_mode, quant.modules_to_not_convert) == (
        "autobitlinear",
        "online",
        ["lm_head"],
    )


def test_modules_to_not_convert_patterns():
    model = make_model(64, hidden_size=32)
    # transformers' syntax: a prefix up to a module boundary, a regex from the start, or a suffix
    patterns = ["lm_head", r".*\.mlp", "model.layers.1.self_attn", "v_proj"]
    result = convert_to_bitnet(model, modules_to_not_convert=patterns)
    assert result.converted == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.o_proj",
    ]
    assert len(result.skipped) == 2 * 7 + 1 - 3


def test_tied_head_is_kept():
    model = make_model(64, hidden_size=32, tie=True)
    assert convert_to_bitnet(model).skipped == ["lm_head"]


def test_errors_are_clear():
    model = make_model(64, hidden_size=32)
    with pytest.raises(ValueError, match="No linear layer .* can be converted"):
        convert_to_bitnet(model, modules_to_not_convert=["model", "lm_head"])
    convert_to_bitnet(model)
    with pytest.raises(ValueError, match="already has BitLinear"):
        convert_to_bitnet(model)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        set_bitnet_lambda(model, 1.5)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="Conv1D"):
        convert_to_bitnet(gpt2)
    with pytest.raises(ValueError, match="sub_norm=True supports the model types"):
        convert_to_bitnet(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2)), ["wte"], sub_norm=True)


def test_sub_norms_are_placed_like_transformers_bitnet():
    from transformers import BitNetConfig, BitNetForCausalLM

    model = make_model(64, hidden_size=32)
    result = convert_to_bitnet(model, sub_norm=True)
    assert result.sub_norms == [
        f"model.layers.{i}.{part}" for i in range(2) for part in ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm")
    ]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_sub_norm" in name:
                p.uniform_(0.5, 1.5)
    set_bitnet_lambda(model, 0.0)
    cfg = model.config
    # transformers' own BitNet model (Llama + sub-norms) with the same weights computes the same logits
    bitnet = BitNetForCausalLM(
        BitNetConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            hidden_act=cfg.hidden_act,
            rms_norm_eps=cfg.rms_norm_eps,
            tie_word_embeddings=False,
            max_position_embeddings=cfg.max_position_embeddings,
            rope_parameters=cfg.rope_parameters,
        )
    )
    missing, unexpected = bitnet.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected
    ids = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(model(ids).logits, bitnet(ids).logits, rtol=1e-5, atol=1e-5)


def test_saved_checkpoint_reloads_in_stock_transformers_and_in_hf_distill(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model(64, hidden_size=32)
    convert_to_bitnet(model)
    ids = torch.randint(0, 64, (2, 10))
    expected = model(ids).logits
    model.save_pretrained(tmp_path / "plain")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert type(stock.model.layers[0].mlp.up_proj).__name__ == "AutoBitLinear"
    torch.testing.assert_close(stock(ids).logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(load_bitnet_student(tmp_path / "plain")(ids).logits, expected, rtol=0, atol=0)

    sub = make_model(64, hidden_size=32, seed=3)
    convert_to_bitnet(sub, sub_norm=True)
    with torch.no_grad():
        sub.model.layers[1].mlp.ffn_sub_norm.weight.fill_(0.7)
    sub.save_pretrained(tmp_path / "sub")
    reloaded = load_bitnet_student(tmp_path / "sub")
    assert torch.equal(reloaded.model.layers[1].mlp.ffn_sub_norm.weight, sub.model.layers[1].mlp.ffn_sub_norm.weight)
    torch.testing.assert_close(reloaded(ids).logits, sub(ids).logits, rtol=0, atol=0)
    # a Llama with sub-norms is saved as transformers' `bitnet` type: stock transformers keeps the sub-norms
    stock_sub = AutoModelForCausalLM.from_pretrained(tmp_path / "sub")
    assert type(stock_sub).__name__ == "BitNetForCausalLM"
    torch.testing.assert_close(stock_sub(ids).logits, sub(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not a BitNet checkpoint"):
        make_model(64, hidden_size=32).save_pretrained(tmp_path / "fp")
        load_bitnet_student(tmp_path / "fp")


def test_lambda_schedules():
    linear = LambdaSchedule("linear", warmup_steps=4)
    assert [linear(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert LambdaSchedule("linear", warmup_steps=0)(0) == 1.0
    assert LambdaSchedule("constant", value=0.3)(100) == 0.3
    assert LambdaSchedule(lambda step: 0.1 * step)(3) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="Unknown lambda schedule"):
        LambdaSchedule("cosine")
    with pytest.raises(ValueError, match="must lie in"):
        LambdaSchedule(lambda step: 2.0)(0)
    with pytest.raises(ValueError, match="warmup_steps"):
        LambdaSchedule("linear", warmup_steps=-1)
    with pytest.raises(ValueError, match="constant lambda"):
        LambdaSchedule("constant", value=1.5)


def test_gradient_of_training_step_through_sub_norms():
    model = make_model(64, hidden_size=32)
    convert_to_bitnet(model, sub_norm=True)
    ids = torch.randint(0, 64, (2, 10))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sub_norms_follow_a_replaced_projection():
    """A quantizer or PEFT replacing `o_proj` / `down_proj` after the insertion keeps the sub-norm in the path."""
    model = make_model(64, hidden_size=32)
    convert_to_bitnet(model, sub_norm=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_sub_norm" in name:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, 64, (2, 10))
    expected = model(ids).logits
    for layer in model.model.layers:
        for parent, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            old = getattr(parent, name)
            new = BitLinear.from_linear(torch.nn.Linear(old.in_features, old.out_features, bias=False))
            new.weight = old.weight
            setattr(parent, name, new)
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(copy.deepcopy(model)(ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_sub_norms_on_other_families_save_as_a_registered_type(tmp_path, family):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, num_key_value_heads=2, **sizes))
    result = convert_to_bitnet(model, sub_norm=True)
    assert len(result.sub_norms) == 4 and model.config.model_type == f"{family}_bitnet_sub_norm"
    with torch.no_grad():
        model.model.layers[0].self_attn.attn_sub_norm.weight.fill_(0.6)
    ids = torch.randint(0, 64, (2, 9))
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)  # online QAT layers, with the sub-norms
    assert type(stock.model.layers[0].self_attn.o_proj).__name__ == "AutoBitLinear"
    # eager: transformers compiles its quantizers, and a 1e-7 difference can move an activation across an int8 step
    with torch.compiler.set_stance("force_eager"):
        torch.testing.assert_close(stock(ids).logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(load_bitnet_student(tmp_path)(ids).logits, expected, rtol=0, atol=0)

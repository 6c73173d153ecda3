"""GGUF export of BitNet students: the file read back with `gguf.GGUFReader` (metadata, tensors, ternary values)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, PreTrainedTokenizerFast, Qwen2Config  # noqa: E402

from hf_distill.bitnet import convert_to_bitnet, set_bitnet_lambda  # noqa: E402
from hf_distill.export.gguf import GGUFExportReport, export_gguf  # noqa: E402

CORPUS = [
    "the cat sat on the mat and the dog ran to the park",
    "one two three four five six seven eight nine ten",
    "hello how are you ? fine thanks , and you ?",
    "the big red sun and the small blue moon in the sky at night",
    "what is two plus three ? it is five .",
] * 4
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]


def make_bpe_tokenizer(vocab_size: int = 300, style: str = "gpt2") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `CORPUS` (GPT-2 style, or Llama-3 style with a Split regex)."""
    backend = Tokenizer(models.BPE())
    if style == "gpt2":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        from tokenizers import Regex

        from hf_distill.export.gguf_vocab import _LLAMA3_REGEX

        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )


def make_student(
    vocab_size: int,
    hidden: int = 256,
    intermediate: int = 512,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    sub_norm: bool = False,
    tie: bool = False,
    seed: int = 0,
    family: str = "llama",
    **extra,
):
    """A tiny Llama converted to BitNet (lambda 1), random weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cls = LlamaConfig if family == "llama" else Qwen2Config
    config = cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(config)
    convert_to_bitnet(model, sub_norm=sub_norm)
    if sub_norm:  # non-trivial sub-norm weights, so that a wrong mapping shows
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "_sub_norm" in name:
                    p.uniform_(0.5, 1.5)
    set_bitnet_lambda(model, 1.0)
    return model.eval()


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {}
    for name, f in reader.fields.items():
        fields[name] = f.contents()
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def dequant(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(x) for x in t.shape])))


@pytest.fixture(scope="module")
def bpe():
    return make_bpe_tokenizer()


@pytest.mark.parametrize("ternary_type", ["TQ2_0", "TQ1_0"])
def test_llama_arch_roundtrip(tmp_path, bpe, ternary_type):
    model = make_student(len(bpe) + 4)  # padded vocabulary: unused ids become [PAD{i}]
    path = tmp_path / "student.gguf"
    report = export_gguf(model, path, tokenizer=bpe, ternary_type=ternary_type)
    assert isinstance(report, GGUFExportReport) and report.arch == "llama"
    assert report.tensor_types == {ternary_type: 14, "F32": 5, "F16": 2}
    assert report.fallback_tensors == []
    assert report.file_size == os.path.getsize(path)
    assert report.bits_per_ternary_weight == pytest.approx(66 * 8 / 256 if ternary_type == "TQ2_0" else 54 * 8 / 256)

    fields, tensors = read(path)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2
    assert fields["llama.embedding_length"] == 256
    assert fields["llama.feed_forward_length"] == 512
    assert fields["llama.attention.head_count"] == 4
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 64
    assert fields["llama.rope.freq_base"] == pytest.approx(model.config.rope_parameters["rope_theta"])
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(model.config.rms_norm_eps)
    assert fields["general.file_type"] == gguf.LlamaFileType[f"MOSTLY_{ternary_type}"]
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == model.config.vocab_size
    vocab = bpe.get_vocab()
    assert all(tokens[i] == tok for tok, i in vocab.items())
    assert tokens[-1] == f"[PAD{len(tokens) - 1}]"
    types = fields["tokenizer.ggml.token_type"]
    assert types[vocab["<|bos|>"]] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert types[vocab["the"]] == gguf.TokenType.NORMAL
    assert len(fields["tokenizer.ggml.merges"]) > 0 and all(" " in m for m in fields["tokenizer.ggml.merges"])
    assert fields["tokenizer.ggml.bos_token_id"] == bpe.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == bpe.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == bpe.pad_token_id

    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(2):
        for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up"):
            expected.add(f"blk.{i}.{t}.weight")
        expected.add(f"blk.{i}.ffn_down.weight")
    assert set(tensors) == expected
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert list(tensors["token_embd.weight"].shape) == [256, model.config.vocab_size]  # ggml order: (in, out)
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [512, 256]
    assert list(tensors["blk.0.attn_k.weight"].shape) == [256, 128]

    qtype = gguf.GGMLQuantizationType[ternary_type]
    for i, layer in enumerate(model.model.layers):
        for proj, name in (
            (layer.self_attn.q_proj, "attn_q"),
            (layer.self_attn.k_proj, "attn_k"),
            (layer.self_attn.v_proj, "attn_v"),
            (layer.self_attn.o_proj, "attn_output"),
            (layer.mlp.gate_proj, "ffn_gate"),
            (layer.mlp.up_proj, "ffn_up"),
            (layer.mlp.down_proj, "ffn_down"),
        ):
            t = tensors[f"blk.{i}.{name}.weight"]
            assert t.tensor_type == qtype
            codes, alpha = proj.ternary_weight()
            want = (codes.float() * alpha).numpy()
            if name in ("attn_q", "attn_k"):
                want = permute(want, 4 if name == "attn_q" else 2)
            got = dequant(t)
            assert got.shape == want.shape
            # lossless up to the fp16 rounding of alpha: the codes are exact
            alpha16 = float(np.float16(alpha.item()))
            np.testing.assert_array_equal(np.sign(got), np.sign(want))
            np.testing.assert_allclose(got, np.sign(want) * alpha16, rtol=0, atol=0)
            assert abs(alpha16 - alpha.item()) <= 1e-3 * alpha.item()
    norm = tensors["blk.1.ffn_norm.weight"].data
    np.testing.assert_array_equal(norm, model.model.layers[1].post_attention_layernorm.weight.detach().numpy())
    np.testing.assert_allclose(
        dequant(tensors["output.weight"]), model.lm_head.weight.detach().numpy(), atol=1e-3, rtol=1e-3
    )


def test_f16_baseline_stores_the_same_ternary_values_unpacked(tmp_path, bpe):
    model = make_student(len(bpe))
    report = export_gguf(model, tmp_path / "f16.gguf", tokenizer=bpe, ternary_type="F16")
    assert report.tensor_types == {"F16": 16, "F32": 5} and report.bits_per_ternary_weight == 16
    fields, tensors = read(tmp_path / "f16.gguf")
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    codes, alpha = model.model.layers[1].mlp.down_proj.ternary_weight()
    got = dequant(tensors["blk.1.ffn_down.weight"])
    np.testing.assert_array_equal(got, (codes.float() * alpha).numpy().astype(np.float16).astype(np.float32))


def test_bitnet_arch_sub_norms(tmp_path, bpe):
    model = make_student(len(bpe), sub_norm=True, tie=True)
    report = export_gguf(model, tmp_path / "b.gguf", tokenizer=bpe)
    assert report.arch == "bitnet"
    fields, tensors = read(tmp_path / "b.gguf")
    assert fields["general.architecture"] == "bitnet"
    assert fields["bitnet.block_count"] == 2
    assert "output.weight" not in tensors  # bitnet uses token_embd as the head
    assert tensors["blk.0.attn_sub_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert list(tensors["blk.0.attn_sub_norm.weight"].shape) == [256]
    assert list(tensors["blk.1.ffn_sub_norm.weight"].shape) == [512]
    np.testing.assert_array_equal(
        tensors["blk.1.ffn_sub_norm.weight"].data, model.model.layers[1].mlp.ffn_sub_norm.weight.detach().numpy()
    )
    # NeoX rotary in llama.cpp's bitnet arch: q/k are not permuted
    codes, alpha = model.model.layers[0].self_attn.q_proj.ternary_weight()
    got = dequant(tensors["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(np.sign(got), codes.numpy())
    assert report.tensor_types == {"TQ2_0": 14, "F32": 9, "F16": 1}


def test_small_model_falls_back_to_f16(tmp_path, bpe, caplog):
    model = make_student(len(bpe), hidden=64, intermediate=256, heads=4, kv_heads=4)
    with caplog.at_level("WARNING", logger="hf_distill.export.gguf"):
        report = export_gguf(model, tmp_path / "s.gguf", tokenizer=bpe)
    # rows of 64: q/k/v/o/gate/up fall back; down_proj has 256 inputs and stays ternary
    assert sorted(report.fallback_tensors) == sorted(
        f"blk.{i}.{n}.weight"
        for i in range(2)
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")
    )
    assert report.tensor_types == {"TQ2_0": 2, "F16": 14, "F32": 5}
    assert "not a multiple of 256" in caplog.text
    _, tensors = read(tmp_path / "s.gguf")
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.F16
    codes, alpha = model.model.layers[0].self_attn.q_proj.ternary_weight()
    want = permute((codes.float() * alpha).numpy(), 4)
    np.testing.assert_allclose(dequant(q), want, rtol=1e-3)


def test_checkpoint_path_and_llama3_tokenizer(tmp_path):
    tok = make_bpe_tokenizer(style="llama3")
    model = make_student(len(tok))
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    report = export_gguf(ckpt, tmp_path / "out" / "m.gguf", ternary_type="TQ1_0")
    fields, tensors = read(report.path)
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert report.tensor_types["TQ1_0"] == 14
    codes, alpha = model.model.layers[1].mlp.down_proj.ternary_weight()
    np.testing.assert_array_equal(np.sign(dequant(tensors["blk.1.ffn_down.weight"])), codes.numpy())

    sub = make_student(len(tok), sub_norm=True, tie=True, seed=1)
    sub.save_pretrained(tmp_path / "sub")
    tok.save_pretrained(tmp_path / "sub")
    report = export_gguf(tmp_path / "sub", tmp_path / "out" / "sub.gguf")
    assert report.arch == "bitnet"
    _, tensors = read(report.path)
    np.testing.assert_array_equal(
        tensors["blk.0.ffn_sub_norm.weight"].data, sub.model.layers[0].mlp.ffn_sub_norm.weight.detach().numpy()
    )


def _no_files(path) -> bool:
    return not any(p for p in os.listdir(path))


def test_errors_leave_nothing(tmp_path, bpe):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=len(bpe), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                    num_attention_heads=4)
    )  # fmt: skip
    with pytest.raises(ValueError, match="no BitLinear layer"):
        export_gguf(plain, tmp_path / "x.gguf", tokenizer=bpe)

    qwen = make_student(len(bpe), hidden=64, intermediate=128, family="qwen2")
    with pytest.raises(ValueError, match="model_type 'qwen2'.*Supported: Llama-family"):
        export_gguf(qwen, tmp_path / "x.gguf", tokenizer=bpe)

    biased = make_student(len(bpe), hidden=64, intermediate=128, attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias"):
        export_gguf(biased, tmp_path / "x.gguf", tokenizer=bpe)

    untied = make_student(len(bpe), hidden=64, intermediate=128, sub_norm=True)
    with pytest.raises(ValueError, match="untied lm_head"):
        export_gguf(untied, tmp_path / "x.gguf", tokenizer=bpe)
    with pytest.raises(ValueError, match="sub-norms"):
        export_gguf(untied, tmp_path / "x.gguf", tokenizer=bpe, arch="llama")
    plain_bitnet = make_student(len(bpe), hidden=64, intermediate=128, tie=True)
    with pytest.raises(ValueError, match="needs sub-norms"):
        export_gguf(plain_bitnet, tmp_path / "x.gguf", tokenizer=bpe, arch="bitnet")
    with pytest.raises(ValueError, match="ternary_type"):
        export_gguf(plain_bitnet, tmp_path / "x.gguf", tokenizer=bpe, ternary_type="Q4_0")
    with pytest.raises(ValueError, match="pass tokenizer"):
        export_gguf(plain_bitnet, tmp_path / "x.gguf")

    from tiny import make_tokenizer  # word-level: llama.cpp has no such vocabulary

    word = make_tokenizer()
    small = make_student(len(word), hidden=64, intermediate=128)
    with pytest.raises(ValueError, match="Cannot export a WordLevel tokenizer"):
        export_gguf(small, tmp_path / "x.gguf", tokenizer=word)
    with pytest.raises(ValueError, match="does not belong to the model"):
        export_gguf(make_student(100, hidden=64, intermediate=128), tmp_path / "x.gguf", tokenizer=bpe)
    assert _no_files(tmp_path)


def test_failure_while_writing_leaves_no_file(tmp_path, bpe, monkeypatch):
    model = make_student(len(bpe), hidden=64, intermediate=256)
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")

    with pytest.raises(FileExistsError):
        export_gguf(model, target, tokenizer=bpe)

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(model, target, tokenizer=bpe, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"] and target.read_bytes() == b"old"
    monkeypatch.undo()
    export_gguf(model, target, tokenizer=bpe, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"] and target.read_bytes()[:4] == b"GGUF"

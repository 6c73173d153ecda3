"""Tokenizer metadata for the GGUF export: what llama.cpp needs to load and run a byte-level BPE vocabulary.

This follows `convert_hf_to_gguf.py` (`get_vocab_base`, `_set_vocab_gpt2`) and `gguf.SpecialVocab`, but reads the
tokenizer object in memory instead of files, and picks llama.cpp's pre-tokenizer type (`tokenizer.ggml.pre`) from the
tokenizer's own pre-tokenizer definition instead of a hash table of known Hub models.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# HF split regexes -> llama.cpp pre-tokenizer names (see `llm_tokenizer_bpe` in llama.cpp's src/llama-vocab.cpp).
_REGEX_HEAD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REGEX_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = _REGEX_HEAD + r"\p{N}{1,3}" + _REGEX_TAIL
_QWEN2_REGEX = _REGEX_HEAD + r"\p{N}" + _REGEX_TAIL
_SPLIT_REGEXES = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}

SUPPORTED_TOKENIZERS = (
    "byte-level BPE tokenizers (`tokenizers` BPE model with a ByteLevel pre-tokenizer and decoder): GPT-2 style "
    "(ByteLevel with its own regex), Llama-3 style and Qwen2 style (a Split regex followed by ByteLevel)"
)

# gguf.TokenType values (kept here so that this module imports without gguf).
_NORMAL, _UNUSED, _CONTROL, _USER_DEFINED = 1, 5, 3, 4


@dataclass
class GGUFVocab:
    """The tokenizer as llama.cpp reads it (`tokenizer.ggml.*` keys).

    Attributes:
        model (`str`): `tokenizer.ggml.model` (`"gpt2"`: byte-level BPE).
        pre (`str`): `tokenizer.ggml.pre`, llama.cpp's pre-tokenizer type.
        tokens (`list[str]`): One entry per row of the embedding matrix (missing ids become `[PAD{i}]`).
        token_types (`list[int]`): `gguf.TokenType` per token.
        merges (`list[str]`): BPE merges as `"left right"`.
        special_ids (`dict[str, int]`): `bos`, `eos`, `unk`, `pad` ids that are set.
        add_bos (`bool`): Whether encoding prepends the BOS token.
        add_eos (`bool`): Whether encoding appends the EOS token.
        chat_template (`str`, *optional*): The tokenizer's chat template.
    """

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def _pre_tokenizer_type(spec: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for a `tokenizers` pre-tokenizer definition, or None when it has none."""
    if not spec:
        return None
    kind = spec.get("type")
    if kind == "ByteLevel":
        if spec.get("use_regex", True) and not spec.get("add_prefix_space", False):
            return "gpt-2"
        return None
    if kind == "Sequence":
        parts = spec.get("pretokenizers") or []
        if (
            len(parts) == 2
            and parts[0].get("type") == "Split"
            and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)
            and not parts[1].get("add_prefix_space", False)
            and parts[0].get("behavior") == "Isolated"
            and not parts[0].get("invert", False)
        ):
            pattern = parts[0].get("pattern") or {}
            return _SPLIT_REGEXES.get(pattern.get("Regex"))
    return None


def _describe(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "none"
    if spec.get("type") == "Sequence":
        return "Sequence[" + ", ".join(_describe(p) for p in spec.get("pretokenizers") or []) + "]"
    return str(spec.get("type"))


def _added_bos_eos(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, probed on a short text (the post-processor decides, not a flag)."""
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    try:
        plain = tokenizer.encode("a b", add_special_tokens=False)
        full = tokenizer.encode("a b", add_special_tokens=True)
    except Exception:  # noqa: BLE001 - an exotic tokenizer: fall back to no special tokens
        return False, False
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return add_bos, add_eos


def build_gguf_vocab(tokenizer: Any, vocab_size: int, config: Any = None) -> GGUFVocab:
    """Read a fast tokenizer into the `tokenizer.ggml.*` metadata of a GGUF file.

    Args:
        tokenizer (`PreTrainedTokenizerFast`): The student's tokenizer (must have a `backend_tokenizer`).
        vocab_size (`int`): Rows of the model's embedding matrix; ids the tokenizer lacks are padded as unused tokens.
        config (`PretrainedConfig`, *optional*): The model config, for BOS/EOS/PAD ids the tokenizer does not set.

    Returns:
        [`GGUFVocab`]

    Raises:
        ValueError: The tokenizer is not a byte-level BPE tokenizer llama.cpp can reproduce (see
            `SUPPORTED_TOKENIZERS`), or it has more tokens than the model's embedding matrix.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"The GGUF export needs a fast tokenizer (PreTrainedTokenizerFast), got {type(tokenizer).__name__}. "
            f"Supported: {SUPPORTED_TOKENIZERS}."
        )
    spec = json.loads(backend.to_str())
    model_spec = spec.get("model") or {}
    model_type = model_spec.get("type")
    decoder = spec.get("decoder") or {}
    if model_type != "BPE" or model_spec.get("byte_fallback"):
        kind = "BPE with byte_fallback (SentencePiece style)" if model_type == "BPE" else model_type
        raise ValueError(
            f"Cannot export a {kind} tokenizer to GGUF: llama.cpp's vocabulary types need the original files for it. "
            f"Supported: {SUPPORTED_TOKENIZERS}."
        )
    pre = _pre_tokenizer_type(spec.get("pre_tokenizer"))
    if pre is None or decoder.get("type") != "ByteLevel":
        raise ValueError(
            "Cannot export this BPE tokenizer to GGUF: llama.cpp has no pre-tokenizer matching "
            f"pre_tokenizer={_describe(spec.get('pre_tokenizer'))}, decoder={decoder.get('type')}. "
            f"Supported: {SUPPORTED_TOKENIZERS}."
        )

    vocab: dict[str, int] = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"The tokenizer has token ids up to {max(vocab.values())} but the model's embedding matrix has only "
            f"{vocab_size} rows: this tokenizer does not belong to the model."
        )
    reverse = {i: tok for tok, i in vocab.items()}
    added = {i: t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            continue
        tok = reverse[i]
        if i in added:
            types.append(_CONTROL if added[i].special else _USER_DEFINED)
        else:
            types.append(_NORMAL)
        tokens.append(tok)

    merges = [m if isinstance(m, str) else " ".join(m) for m in model_spec.get("merges") or []]
    if not merges:
        raise ValueError("The BPE tokenizer has no merges: llama.cpp needs them (`tokenizer.ggml.merges`).")

    special_ids: dict[str, int] = {}
    for key in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{key}_token_id", None)
        if value is None and config is not None:
            value = getattr(config, f"{key}_token_id", None)
            value = value[0] if isinstance(value, (list, tuple)) and value else value
        if isinstance(value, int) and 0 <= value < vocab_size:
            special_ids[key] = value
    add_bos, add_eos = _added_bos_eos(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    return GGUFVocab(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        token_types=types,
        merges=merges,
        special_ids=special_ids,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=template if isinstance(template, str) else None,
    )


def write_gguf_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Add the `tokenizer.ggml.*` keys of `vocab` to a `gguf.GGUFWriter`."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for key, value in vocab.special_ids.items():
        getattr(writer, {"pad": "add_pad_token_id"}.get(key, f"add_{key}_token_id"))(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)

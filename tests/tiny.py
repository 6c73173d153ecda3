"""Tiny tokenizers, models and datasets built locally for the tests (no Hub access)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config  # noqa: E402

WORDS = (
    "the a cat dog sat on mat ran to park and saw bird tree big small red blue one two three four five six seven "
    "eight nine ten plus minus is what user assistant hello hi how are you fine thanks yes no good bad day night "
    "sun moon star sky"
).split()

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|> ' }}{% generation %}{{ message['content'] + ' <|end|>' }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|> ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def make_tokenizer(extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `WORDS` (+ `extra_words`) with pad/bos/eos/unk and a chat template."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(WORDS) + list(extra_words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(
    vocab_size: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
    family: str = "llama",
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised tiny causal LM (`llama` or `qwen2`)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlamaConfig(**common) if family == "llama" else Qwen2Config(**common)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def lm_dataset(n: int = 16, seed: int = 0) -> Dataset:
    """Language-modeling dataset (column 'text')."""
    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        k = int(torch.randint(4, 12, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        texts.append(" ".join(WORDS[i] for i in idx))
    return Dataset.from_dict({"text": texts})


def prompt_completion_dataset(n: int = 16, seed: int = 0) -> Dataset:
    """Prompt-completion dataset."""
    texts = lm_dataset(2 * n, seed)["text"]
    return Dataset.from_dict({"prompt": texts[:n], "completion": [" " + t for t in texts[n:]]})


def conversational_dataset(n: int = 8, seed: int = 0) -> Dataset:
    """Conversational dataset (column 'messages')."""
    texts = lm_dataset(2 * n, seed)["text"]
    return Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": texts[i]}, {"role": "assistant", "content": texts[n + i]}]
                for i in range(n)
            ]
        }
    )


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a test's subprocess: offline, the repository first on `PYTHONPATH` (keeping what is there,
    e.g. packages installed with `--target`), plus `extra`."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=path, **extra)

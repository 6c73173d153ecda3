"""Tiny local stand-ins for the examples' `--tiny` mode: a word-level tokenizer with a chat template, random-init
Llama models built from configs and small in-memory datasets. Nothing is downloaded.

The examples import this module only with `--tiny`; it is not part of the library.
"""

from __future__ import annotations

import random

WORDS = (
    "the a cat dog sat on mat ran to park and saw bird tree big small red blue one two three four five six seven "
    "eight nine ten plus minus is what hello hi how are you fine thanks yes no good bad day night sun moon star sky"
).split()

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|> ' }}{% generation %}{{ message['content'] + ' <|end|>' }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|> ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def make_tokenizer():
    """Word-level tokenizer over `WORDS` with pad/bos/eos/unk, chat tokens and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(tokenizer, hidden_size: int = 32, num_layers: int = 2, seed: int = 0):
    """Random-init tiny Llama causal LM over `tokenizer`'s vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def save_pair(directory: str, seed: int = 0) -> tuple[str, str]:
    """Save a tiny teacher (48 wide, 3 layers) and student (32 wide, 2 layers) with the tokenizer; return their paths.

    Saved models are loaded by path exactly like Hub models, so the examples' code path is the real one.
    """
    import os

    tokenizer = make_tokenizer()
    paths = []
    for name, hidden_size, num_layers, offset in (("teacher", 48, 3, 0), ("student", 32, 2, 1)):
        path = os.path.join(directory, f"tiny-{name}")
        make_model(tokenizer, hidden_size, num_layers, seed=seed + offset).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))


def chat_dataset(n: int = 64, seed: int = 0):
    """Conversational dataset (`messages` column): a user turn and an assistant turn of random words.

    The assistant repeats the user's words in reverse, which a tiny model can learn in a few steps.
    """
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question = _sentence(rng)
        answer = " ".join(reversed(question.split()))
        rows.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return Dataset.from_dict({"messages": rows})

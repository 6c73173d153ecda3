"""A character-level tokenizer built locally (no download), wrapped as a `transformers` fast tokenizer.

Every character of the alphabet is one token; four special tokens (`<pad>`, `<s>`, `</s>`, `<unk>`) come first.
Encoding prepends `<s>` (as most causal LMs do) and never appends `</s>`: TRL's `SFTTrainer` appends the EOS text
to completions itself. The result saves with `save_pretrained` and reloads with `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .arithmetic import CHARACTERS

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
"""Special tokens, with ids 0, 1, 2 and 3."""


def build_char_tokenizer(characters: str = CHARACTERS, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Character-level tokenizer over `characters` plus [`SPECIAL_TOKENS`].

    Args:
        characters (`str`, *optional*, defaults to the arithmetic task's alphabet): Characters that get their own
            token (duplicates are ignored); any other character encodes as `<unk>`.
        model_max_length (`int`, *optional*, defaults to `512`): Longest sequence the models are meant to see.

    Returns:
        [`~transformers.PreTrainedTokenizerFast`]: Tokenizer with `pad_token`, `bos_token`, `eos_token` and
        `unk_token` set, padding on the right (generation code switches to left padding itself).
    """
    alphabet = list(dict.fromkeys(characters))
    clashes = [c for c in alphabet if c in SPECIAL_TOKENS]
    if clashes:
        raise ValueError(f"Characters {clashes} clash with special tokens.")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # One "word" per character, whitespace and newlines included; `Fuse` joins tokens back without separators.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )

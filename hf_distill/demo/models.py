"""Tiny Llama-style teacher and student for the demo, built from configs (random init, no download).

Both share the demo tokenizer's vocabulary (so their logits can be compared token for token). The teacher is sized to
learn the arithmetic task in one to two minutes of CPU training; the student is a few times smaller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is imported where it is used, so that `hf_distill.demo.config` stays light
    from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny Llama model.

    Args:
        hidden_size (`int`): Width of the residual stream.
        num_hidden_layers (`int`): Number of decoder layers.
        num_attention_heads (`int`): Number of attention heads (and key-value heads).
        intermediate_size (`int`): Width of the MLP.

    Raises:
        ValueError: If a size is not a positive integer, or `hidden_size` is not `num_attention_heads` times an even
            head size.
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TinyModelSpec.{name} must be a positive integer, got {value!r}.")
        head_dim, remainder = divmod(self.hidden_size, self.num_attention_heads)
        if remainder or head_dim % 2:
            raise ValueError(
                f"TinyModelSpec.hidden_size ({self.hidden_size}) must be num_attention_heads "
                f"({self.num_attention_heads}) times an even head size (rotary embeddings rotate pairs of channels)."
            )


TEACHER_SPEC = TinyModelSpec(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
"""Default teacher: 1.05M parameters. 300 steps of 64 examples (about 2 minutes on two CPU cores) bring it to about 90%
exact match on 2-4 digit addition."""

STUDENT_SPEC = TinyModelSpec(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384)
"""Default student: 0.30M parameters, 3.5 times fewer than the teacher. Width matters more than depth here: with the
same budget a 64-wide student (2 or 3 layers) rarely gets the final answer right."""


MAX_SEQUENCE_LENGTH = 256
"""Longest tokenized example (prompt, completion and special tokens) the demo models are built and trained for."""


def tiny_llama_config(
    spec: TinyModelSpec, tokenizer: PreTrainedTokenizerBase, max_position_embeddings: int = MAX_SEQUENCE_LENGTH
) -> LlamaConfig:
    """`LlamaConfig` of shape `spec` over `tokenizer`'s vocabulary and special tokens.

    Args:
        spec ([`TinyModelSpec`]): Model shape.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): Tokenizer whose vocabulary size and pad, BOS and EOS
            ids the model uses.
        max_position_embeddings (`int`, *optional*, defaults to [`MAX_SEQUENCE_LENGTH`]): Longest sequence the
            model is meant for.

    Returns:
        [`~transformers.LlamaConfig`]: The configuration (untied embeddings, no dropout).
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_tiny_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerBase, seed: int | None = None):
    """Randomly initialised causal LM of shape `spec` (float32).

    Args:
        spec ([`TinyModelSpec`]): Model shape, e.g. [`TEACHER_SPEC`] or [`STUDENT_SPEC`].
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The tokenizer the model is trained with.
        seed (`int`, *optional*): Seed of the initialisation; `None` uses the current RNG state.

    Returns:
        [`~transformers.PreTrainedModel`]: The model, with its generation config's pad and EOS ids set.
    """
    from transformers import AutoModelForCausalLM, set_seed

    if seed is not None:
        set_seed(seed)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(tiny_llama_config(spec, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def count_parameters(model: PreTrainedModel) -> int:
    """Number of parameters of `model`."""
    return sum(p.numel() for p in model.parameters())

"""Quality of a causal LM on a prompt-completion dataset: completion perplexity and exact-match accuracy.

Both functions tokenise exactly as TRL's `SFTTrainer` does for prompt-completion data (the prompt with the
tokenizer's special tokens, then the completion followed by the EOS token), so the perplexity is the one the
training loss estimates. Exact match decodes greedily and compares the final answer (see
[`hf_distill.demo.arithmetic.extract_answer`]) with the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arithmetic import extract_answer


def _batches(n: int, batch_size: int) -> list[range]:
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@torch.inference_mode()
def held_out_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    batch_size: int = 64,
    show_progress: bool = True,
) -> float:
    """Perplexity of `model` on the completion tokens (EOS included) of a prompt-completion dataset.

    Args:
        model ([`~transformers.PreTrainedModel`]): Causal LM.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): Its tokenizer; needs `pad_token` and `eos_token`.
        dataset (`datasets.Dataset`): Columns `"prompt"` and `"completion"` (plain strings).
        batch_size (`int`, *optional*, defaults to `64`): Sequences per forward pass.
        show_progress (`bool`, *optional*, defaults to `True`): Show a progress bar.

    Returns:
        `float`: `exp` of the mean negative log-likelihood per completion token.
    """
    was_training = model.training
    model.eval()
    device = model.device
    total_nll, total_tokens = 0.0, 0
    for rows in tqdm(_batches(len(dataset), batch_size), desc="perplexity", disable=not show_progress, leave=False):
        batch = dataset.select(rows)
        ids, masks = [], []
        for prompt, completion in zip(batch["prompt"], batch["completion"]):
            prompt_ids = tokenizer(prompt)["input_ids"]
            full_ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
            ids.append(full_ids)
            masks.append([0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids)))
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        scored = torch.zeros((len(ids), width), dtype=torch.bool)
        for i, (x, m) in enumerate(zip(ids, masks)):
            input_ids[i, : len(x)] = torch.tensor(x)
            attention[i, : len(x)] = 1
            scored[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
        input_ids, attention, scored = input_ids.to(device), attention.to(device), scored.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = input_ids[:, 1:]
        nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        keep = scored[:, 1:]
        total_nll += nll[keep].sum().item()
        total_tokens += int(keep.sum().item())
    model.train(was_training)
    return math.exp(total_nll / max(total_tokens, 1))


@torch.inference_mode()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 64,
    show_progress: bool = True,
) -> list[str]:
    """Greedy completions of `prompts`, batched with left padding.

    Args:
        model ([`~transformers.PreTrainedModel`]): Causal LM; generation stops at its EOS token.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): Its tokenizer (its padding side is restored after).
        prompts (`Sequence[str]`): Prompts.
        max_new_tokens (`int`): Most tokens generated per prompt.
        batch_size (`int`, *optional*, defaults to `64`): Prompts per `generate` call.
        show_progress (`bool`, *optional*, defaults to `True`): Show a progress bar.

    Returns:
        `list[str]`: The generated text of each prompt, special tokens removed.
    """
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        for rows in tqdm(_batches(len(prompts), batch_size), desc="generate", disable=not show_progress, leave=False):
            enc = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True).to(model.device)
            generated = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs


def exact_match_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    answer_fn: Callable[[str], int | None] = extract_answer,
    show_progress: bool = True,
) -> float:
    """Fraction of prompts whose greedy completion has the right final answer.

    Args:
        model ([`~transformers.PreTrainedModel`]): Causal LM.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): Its tokenizer.
        dataset (`datasets.Dataset`): Columns `"prompt"` and `"completion"`; the reference answer is the `"answer"`
            column when there is one, else `answer_fn` of the reference completion.
        max_new_tokens (`int`, *optional*): Most tokens generated; defaults to the longest reference completion
            (in tokens, EOS included) plus 8.
        batch_size (`int`, *optional*, defaults to `64`): Prompts per `generate` call.
        answer_fn (`Callable[[str], int | None]`, *optional*, defaults to [`extract_answer`]): Parses the final
            answer out of a completion; `None` means no answer (always wrong).
        show_progress (`bool`, *optional*, defaults to `True`): Show a progress bar.

    Returns:
        `float`: Exact-match accuracy in `[0, 1]`.
    """
    if len(dataset) == 0:
        return float("nan")
    if "answer" in dataset.column_names:
        references = list(dataset["answer"])
    else:
        references = [answer_fn(c) for c in dataset["completion"]]
    if max_new_tokens is None:
        lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in dataset["completion"]]
        max_new_tokens = max(lengths) + 8
    completions = generate_completions(model, tokenizer, dataset["prompt"], max_new_tokens, batch_size, show_progress)
    correct = sum(answer_fn(text) == ref for text, ref in zip(completions, references))
    return correct / len(dataset)

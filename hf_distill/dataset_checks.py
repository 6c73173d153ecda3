"""Early, readable errors for datasets that SFT-style distillation cannot train on."""

from __future__ import annotations

from typing import Any

from datasets import Dataset, IterableDataset
from trl.data_utils import get_dataset_column_names


def check_dataset_columns(dataset: Any, args: Any, has_formatting_func: bool, name: str) -> None:
    """Fail early, with the fix, when a dataset has none of the columns SFT-style distillation can train on.

    Raises:
        ValueError: If no accepted format (language modeling, prompt-completion, conversational, pre-tokenized) is
            recognised.
    """
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, value in dataset.items():
            check_dataset_columns(value, args, has_formatting_func, f"{name}[{key!r}]")
        return
    if not isinstance(dataset, Dataset | IterableDataset):
        return  # SFTTrainer reports unsupported types itself
    columns = set(get_dataset_column_names(dataset) or [])
    if not columns and isinstance(dataset, IterableDataset):
        return  # streaming dataset with unknown features: SFTTrainer inspects the first example
    skip_prepare = bool((args.dataset_kwargs or {}).get("skip_prepare_dataset", False))
    if skip_prepare:
        if "input_ids" not in columns:
            raise ValueError(
                f"The {name} dataset has columns {sorted(columns)} but `skip_prepare_dataset=True` needs tokenized "
                "examples with an 'input_ids' column (and 'labels' to mask tokens). Tokenize it first, or drop "
                "`skip_prepare_dataset`."
            )
        return
    accepted = (
        "input_ids" in columns
        or args.dataset_text_field in columns
        or {"prompt", "completion"} <= columns
        or "messages" in columns
        or "conversations" in columns
        or has_formatting_func
    )
    if accepted:
        return
    raise ValueError(
        f"The {name} dataset has columns {sorted(columns)}, none of which DistillationTrainer can train on. Provide "
        f"one of: a '{args.dataset_text_field}' column (language modeling; set `dataset_text_field` to use another "
        "column), 'prompt' + 'completion' columns, a 'messages' column (conversational), a tokenized 'input_ids' "
        "column, or a `formatting_func`."
    )

"""Shared test set-up: offline Hub, deterministic CPU torch, a tiny tokenizer."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def tokenizer():
    from tiny import make_tokenizer

    return make_tokenizer()

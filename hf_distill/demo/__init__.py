"""Self-contained distillation demo: no download, a few minutes on a laptop CPU.

`hf-distill demo` generates an arithmetic task with worked solutions ([`arithmetic`]), builds a character-level
tokenizer ([`tokenizer`]), trains a tiny Llama teacher on it with TRL's `SFTTrainer`, distils a smaller student from
it with [`hf_distill.DistillationTrainer`] ([`run`]) and compares both on held-out problems ([`evaluate`]).

The task generator, tokenizer and evaluation helpers are reusable on their own, e.g.:

```python
from hf_distill.demo.arithmetic import make_arithmetic_splits
from hf_distill.demo.tokenizer import build_char_tokenizer

train, held_out = make_arithmetic_splits(n_train=10_000, n_eval=200, seed=0)
tokenizer = build_char_tokenizer()
```
"""

import importlib as _importlib

_LAZY = {
    "ANSWER_MARKER": "arithmetic",
    "ArithmeticProblem": "arithmetic",
    "extract_answer": "arithmetic",
    "make_arithmetic_dataset": "arithmetic",
    "make_arithmetic_splits": "arithmetic",
    "worked_solution": "arithmetic",
    "DemoConfig": "config",
    "DemoConfigError": "config",
    "exact_match_accuracy": "evaluate",
    "generate_completions": "evaluate",
    "held_out_perplexity": "evaluate",
    "STUDENT_SPEC": "models",
    "TEACHER_SPEC": "models",
    "TinyModelSpec": "models",
    "build_tiny_model": "models",
    "run_demo": "run",
    "build_char_tokenizer": "tokenizer",
}
# Imported on first use, like `hf_distill`'s own names: `hf-distill demo` checks its flags with `config` alone, before
# the seconds that torch, transformers and datasets take to import.

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(_importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)

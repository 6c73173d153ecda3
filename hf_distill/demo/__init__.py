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

from .arithmetic import (
    ANSWER_MARKER,
    ArithmeticProblem,
    extract_answer,
    make_arithmetic_dataset,
    make_arithmetic_splits,
    worked_solution,
)
from .evaluate import exact_match_accuracy, generate_completions, held_out_perplexity
from .models import STUDENT_SPEC, TEACHER_SPEC, TinyModelSpec, build_tiny_model
from .run import DemoConfig, run_demo
from .tokenizer import build_char_tokenizer

__all__ = [
    "ANSWER_MARKER",
    "ArithmeticProblem",
    "DemoConfig",
    "STUDENT_SPEC",
    "TEACHER_SPEC",
    "TinyModelSpec",
    "build_char_tokenizer",
    "build_tiny_model",
    "exact_match_accuracy",
    "extract_answer",
    "generate_completions",
    "held_out_perplexity",
    "make_arithmetic_dataset",
    "make_arithmetic_splits",
    "run_demo",
    "worked_solution",
]

r"""Multi-digit arithmetic with worked, digit-by-digit solutions: a generated task with checkable answers.

The demo trains a teacher on it from scratch and distils a student from that teacher; later examples reuse it for
reasoning distillation, because every completion is a short chain of verifiable steps that ends in a final answer.

A problem is `a + b` (or `a - b` with `a >= b`, so results are never negative) on numbers with `min_digits` to
`max_digits` digits. The prompt is the bare expression and the completion works through the columns from the right,
after aligning both operands to the same width:

```
prompt:      "4738+295="
completion:  "\n4738+0295\n8+5+0=13\n3+9+1=13\n7+2+1=10\n4+0+1=05\n####  5033"
```

which reads

```
4738+295=
4738+0295
8+5+0=13
3+9+1=13
7+2+1=10
4+0+1=05
####  5033
```

- The first line rewrites both operands zero-padded to `width = max(max_digits, len(a), len(b))` digits.
- Each column line is `x{op}y{op}c=tu`, for the column's digits `x` (of `a`) and `y` (of `b`), the carry (or borrow)
  `c` coming in from the column on its right, and a two-digit result `tu`: `u` is the result digit of that column and
  `t` is the carry (borrow) going out. For addition `10 * t + u = x + y + c`; for subtraction `u - 10 * t = x - y - c`.
- The last line is [`ANSWER_MARKER`], a space, and the result (the final carry when it is 1, then the result digits
  from the last column to the first, without leading zeros) right-aligned in `width + 1` characters, like the sum
  under a written addition. [`extract_answer`] reads it back.

Every line has a fixed width and every character of the answer a fixed offset from the digit it copies, so a small
character-level transformer learns the task in a minute or two of CPU training. (With a left-aligned answer, small
models get the column steps right but often misplace digits of the final answer.)

Everything is deterministic given the seed, and [`make_arithmetic_splits`] returns train and held-out sets with no
problem in common.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from datasets import Dataset

ANSWER_MARKER = "####"
"""Marker that precedes the final answer on the last line of every completion."""

OPERATIONS = ("+", "-")
"""Supported operations."""

CHARACTERS = "0123456789+-=# \n"
"""Every character that can appear in a prompt or a completion (the demo tokenizer's alphabet)."""

_ANSWER_RE = re.compile(re.escape(ANSWER_MARKER) + r"\s*(-?\d+)")


@dataclass(frozen=True)
class ArithmeticProblem:
    """One problem `a op b`.

    Args:
        a (`int`): Left operand, non-negative.
        b (`int`): Right operand, non-negative (and at most `a` for subtraction).
        op (`str`): `"+"` or `"-"`.
        width (`int`): Number of columns of the worked solution; at least the number of digits of `a` and `b`.
    """

    a: int
    b: int
    op: str = "+"
    width: int = 4

    def __post_init__(self) -> None:
        if self.op not in OPERATIONS:
            raise ValueError(f"Unknown operation {self.op!r}; expected one of {OPERATIONS}.")
        if self.a < 0 or self.b < 0:
            raise ValueError("Operands must be non-negative.")
        if self.op == "-" and self.b > self.a:
            raise ValueError("Subtraction problems need a >= b so that the result is non-negative.")
        if self.width < max(len(str(self.a)), len(str(self.b))):
            raise ValueError(f"width={self.width} is smaller than the number of digits of the operands.")

    @property
    def answer(self) -> int:
        """The true result."""
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def prompt(self) -> str:
        """The prompt, e.g. `"4738+295="`."""
        return f"{self.a}{self.op}{self.b}="

    @property
    def completion(self) -> str:
        """The worked solution, starting with a newline and ending with the answer line (no end-of-sequence)."""
        return worked_solution(self.a, self.b, self.op, self.width)

    @property
    def key(self) -> tuple[int, str, int]:
        """Identity of the problem (used to keep splits disjoint)."""
        return (self.a, self.op, self.b)


def worked_solution(a: int, b: int, op: str = "+", width: int | None = None) -> str:
    """Digit-by-digit solution of `a op b` in the format described in the module docstring.

    Args:
        a (`int`): Left operand, non-negative.
        b (`int`): Right operand, non-negative (at most `a` for subtraction).
        op (`str`, *optional*, defaults to `"+"`): `"+"` or `"-"`.
        width (`int`, *optional*): Number of columns; defaults to the number of digits of the longer operand.

    Returns:
        `str`: The completion text, e.g. `"\\n47+05\\n7+5+0=12\\n4+0+1=05\\n####  52"` for `47+5` with `width=2`.
    """
    width = width or max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width), str(b).zfill(width)
    lines = [f"{da}{op}{db}"]
    carry = 0
    digits = []
    for x, y in zip(reversed(da), reversed(db)):
        x, y = int(x), int(y)
        if op == "+":
            value = x + y + carry
            out, digit = divmod(value, 10)
        else:
            value = x - y - carry
            out, digit = (1, value + 10) if value < 0 else (0, value)
        lines.append(f"{x}{op}{y}{op}{carry}={out}{digit}")
        digits.append(str(digit))
        carry = out
    result = str(int(str(carry) + "".join(reversed(digits))))
    # right-aligned under the columns: every answer character sits at a fixed offset from the digits it comes from
    lines.append(f"{ANSWER_MARKER} {result.rjust(width + 1)}")
    return "\n" + "\n".join(lines)


def extract_answer(text: str) -> int | None:
    """Final answer of a completion: the integer after the last [`ANSWER_MARKER`].

    Args:
        text (`str`): A (generated) completion, possibly followed by other text or special tokens.

    Returns:
        `int` or `None`: The parsed answer, or `None` when the text has no parseable answer.
    """
    matches = _ANSWER_RE.findall(text)
    return int(matches[-1]) if matches else None


def answer_of_prompt(prompt: str) -> int:
    """True result of a prompt such as `"4738+295="`.

    Args:
        prompt (`str`): A prompt produced by [`ArithmeticProblem.prompt`].

    Returns:
        `int`: The exact result.
    """
    match = re.fullmatch(r"\s*(\d+)\s*([+-])\s*(\d+)\s*=\s*", prompt)
    if match is None:
        raise ValueError(f"Not an arithmetic prompt: {prompt!r}")
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return a + b if op == "+" else a - b


def _random_number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    digits = rng.randint(min_digits, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def sample_problems(
    n: int,
    seed: int = 0,
    min_digits: int = 2,
    max_digits: int = 4,
    operations: Sequence[str] = ("+",),
    exclude: Iterable[tuple[int, str, int]] = (),
) -> list[ArithmeticProblem]:
    """Draw `n` distinct problems.

    The number of digits of each operand is uniform in `[min_digits, max_digits]` and the operand is uniform among the
    numbers with that many digits, so short and long numbers are equally represented.

    Args:
        n (`int`): Number of problems.
        seed (`int`, *optional*, defaults to `0`): Seed of the generator; the same seed gives the same problems.
        min_digits (`int`, *optional*, defaults to `2`): Fewest digits of an operand.
        max_digits (`int`, *optional*, defaults to `4`): Most digits of an operand (also the column count).
        operations (`Sequence[str]`, *optional*, defaults to `("+",)`): Operations to draw from, uniformly.
        exclude (`Iterable[tuple[int, str, int]]`, *optional*): Keys ([`ArithmeticProblem.key`]) never to return.

    Returns:
        `list[ArithmeticProblem]`: `n` problems with distinct keys, none of them in `exclude`.
    """
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"Need 1 <= min_digits <= max_digits, got {min_digits} and {max_digits}.")
    unknown = set(operations) - set(OPERATIONS)
    if not operations or unknown:
        raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}, got {tuple(operations)}.")
    rng = random.Random(seed)
    seen = set(exclude)
    problems: list[ArithmeticProblem] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"Could not draw {n} distinct problems with {min_digits}-{max_digits} digit operands.")
        op = rng.choice(list(operations))
        a, b = _random_number(rng, min_digits, max_digits), _random_number(rng, min_digits, max_digits)
        if op == "-" and b > a:
            a, b = b, a
        problem = ArithmeticProblem(a, b, op, width=max_digits)
        if problem.key in seen:
            continue
        seen.add(problem.key)
        problems.append(problem)
    return problems


def problems_to_dataset(problems: Sequence[ArithmeticProblem]) -> Dataset:
    """TRL prompt-completion dataset of `problems`, with the true result in an extra `"answer"` column.

    Args:
        problems (`Sequence[ArithmeticProblem]`): The problems.

    Returns:
        `datasets.Dataset`: Columns `"prompt"` (str), `"completion"` (str) and `"answer"` (int).
    """
    return Dataset.from_dict(
        {
            "prompt": [p.prompt for p in problems],
            "completion": [p.completion for p in problems],
            "answer": [p.answer for p in problems],
        }
    )


def make_arithmetic_dataset(
    n: int,
    seed: int = 0,
    min_digits: int = 2,
    max_digits: int = 4,
    operations: Sequence[str] = ("+",),
    exclude: Iterable[tuple[int, str, int]] = (),
) -> Dataset:
    """Prompt-completion dataset of `n` distinct arithmetic problems with worked solutions.

    Args:
        n (`int`): Number of examples.
        seed (`int`, *optional*, defaults to `0`): Seed; the same arguments always give the same dataset.
        min_digits (`int`, *optional*, defaults to `2`): Fewest digits of an operand.
        max_digits (`int`, *optional*, defaults to `4`): Most digits of an operand.
        operations (`Sequence[str]`, *optional*, defaults to `("+",)`): Any of `"+"` and `"-"`.
        exclude (`Iterable[tuple[int, str, int]]`, *optional*): Problem keys to leave out (e.g. another split's).

    Returns:
        `datasets.Dataset`: Columns `"prompt"`, `"completion"` and `"answer"` (the true result, for exact match).
    """
    return problems_to_dataset(sample_problems(n, seed, min_digits, max_digits, operations, exclude))


def make_arithmetic_splits(
    n_train: int,
    n_eval: int,
    seed: int = 0,
    min_digits: int = 2,
    max_digits: int = 4,
    operations: Sequence[str] = ("+",),
) -> tuple[Dataset, Dataset]:
    """Disjoint train and held-out datasets (no problem appears in both).

    Args:
        n_train (`int`): Number of training examples.
        n_eval (`int`): Number of held-out examples.
        seed (`int`, *optional*, defaults to `0`): Seed of both splits.
        min_digits (`int`, *optional*, defaults to `2`): Fewest digits of an operand.
        max_digits (`int`, *optional*, defaults to `4`): Most digits of an operand.
        operations (`Sequence[str]`, *optional*, defaults to `("+",)`): Any of `"+"` and `"-"`.

    Returns:
        `tuple[datasets.Dataset, datasets.Dataset]`: `(train, held_out)`, as [`make_arithmetic_dataset`] builds them.
    """
    problems = sample_problems(n_train + n_eval, seed, min_digits, max_digits, operations)
    return problems_to_dataset(problems[:n_train]), problems_to_dataset(problems[n_train:])

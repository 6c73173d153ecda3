"""Teacher logit sources for the chunked loss: where the teacher's logits for a range of scored tokens come from.

The loss asks a source for `logits(start, end)` one tile at a time, so a source never has to hold `[N, V]` logits:
[`HiddenStateTeacher`] projects the teacher's hidden states on demand; [`DenseTeacher`] slices logits in memory.
A cached or served teacher plugs in as another source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .lm_head import LMHead
from .sparse import TopKTeacher


class TeacherLogits(Protocol):
    """Where the teacher's logits for a range of (already selected) tokens come from."""

    @property
    def vocab_rows(self) -> int:
        """Number of vocabulary columns the teacher's logits have."""
        ...

    def logits(self, start: int, end: int) -> torch.Tensor:
        """Teacher logits (float32, final: scaled and soft-capped) for tokens `start:end`, shape `[end-start, V_t]`."""
        ...


@dataclass
class HiddenStateTeacher:
    """Teacher logits projected on demand from the teacher's last hidden states and its LM head.

    Args:
        hidden (`torch.Tensor`): Teacher hidden states of the selected tokens, shape `[N, H_t]`.
        head ([`LMHead`]): The teacher's LM head.
        device (`torch.device`, *optional*): Device the logits are returned on (the student's), when the teacher
            lives elsewhere.
    """

    hidden: torch.Tensor
    head: LMHead
    device: torch.device | None = None

    @property
    def vocab_rows(self) -> int:
        return self.head.vocab_rows

    def logits(self, start: int, end: int) -> torch.Tensor:
        with torch.no_grad():
            out = self.head.logits(self.hidden[start:end])
        return out if self.device is None else out.to(self.device, non_blocking=True)


@dataclass
class DenseTeacher:
    """Teacher logits that already exist in memory (tests, or small vocabularies), shape `[N, V_t]`."""

    logits_tensor: torch.Tensor

    @property
    def vocab_rows(self) -> int:
        return self.logits_tensor.shape[-1]

    def logits(self, start: int, end: int) -> torch.Tensor:
        return self.logits_tensor[start:end].detach().float()


@dataclass
class _RowSubsetTeacher:
    """Any [`TeacherLogits`] restricted to some of its rows (sorted ascending), fetched a contiguous run at a time."""

    source: TeacherLogits
    rows: list[int]

    @property
    def vocab_rows(self) -> int:
        return self.source.vocab_rows

    def logits(self, start: int, end: int) -> torch.Tensor:
        rows = self.rows[start:end]
        if not rows:
            return self.source.logits(0, 0)
        parts, run_start = [], 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                parts.append(self.source.logits(rows[run_start], rows[i - 1] + 1))
                run_start = i
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def select_teacher_rows(teacher: TeacherLogits | TopKTeacher, index: torch.Tensor) -> TeacherLogits | TopKTeacher:
    """The teacher's rows `index` (sorted ascending) as a teacher of `len(index)` rows (`TopKTeacher` too)."""
    if isinstance(teacher, TopKTeacher):
        return teacher.select_rows(index)
    if type(teacher) is HiddenStateTeacher:
        hidden = teacher.hidden.index_select(0, index.to(teacher.hidden.device))
        return HiddenStateTeacher(hidden, teacher.head, teacher.device)
    if type(teacher) is DenseTeacher:
        return DenseTeacher(teacher.logits_tensor.index_select(0, index.to(teacher.logits_tensor.device)))
    return _RowSubsetTeacher(teacher, index.tolist())

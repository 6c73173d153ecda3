"""Does the teacher speak the student's vocabulary? Which logit columns can be compared?

Logit distillation compares the two next-token distributions column by column, so both models must give each column
the same token. This module checks that from whatever is known (both tokenizers, or only the teacher's config), picks
the number of leading columns to compare, and warns visibly when it cannot check.
"""

from __future__ import annotations

import warnings
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

CROSS_TOKENIZER_HINT = (
    "Logit distillation compares the two next-token distributions token by token, so the teacher and the student must "
    "share one tokenizer. Pick a teacher from the student's model family, or use a cross-tokenizer method such as "
    "ULD (TRL's `trl.experimental.gold.GOLDTrainer`)."
)


class VocabularyWarning(UserWarning):
    """The teacher's vocabulary could not be fully checked, or only part of it is compared."""


def _first_vocab_difference(student_vocab: dict[str, int], teacher_vocab: dict[str, int]) -> str:
    inverse = {i: t for t, i in teacher_vocab.items()}
    for token, index in sorted(student_vocab.items(), key=lambda item: item[1]):
        if inverse.get(index) != token:
            return f"id {index} is {token!r} for the student but {inverse.get(index)!r} for the teacher"
    return f"the student has {len(student_vocab)} tokens and the teacher {len(teacher_vocab)}"


def _added_tokens(student_vocab: dict[str, int], teacher_vocab: dict[str, int]) -> list[str] | None:
    """Tokens the student's tokenizer adds after the teacher's whole vocabulary, or `None` if it is not that case."""
    if len(student_vocab) <= len(teacher_vocab):
        return None
    if any(student_vocab.get(token) != index for token, index in teacher_vocab.items()):
        return None
    shared = len(teacher_vocab)
    extra = sorted((index, token) for token, index in student_vocab.items() if token not in teacher_vocab)
    if any(index < shared for index, _ in extra):
        return None
    return [token for _, token in extra]


def _special_ids(config: Any) -> dict[str, Any]:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {name: getattr(config, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _as_set(value: Any) -> set[int]:
    if value is None:
        return set()
    return set(value) if isinstance(value, list | tuple) else {value}


def special_token_differences(tokenizer: Any, teacher_config: Any) -> list[str]:
    """Special token ids of the teacher's config that are not the student tokenizer's.

    A base and an instruct model of one family often name different end-of-sequence tokens, so a difference is a hint,
    not a proof, that the tokenizers differ.
    """
    if tokenizer is None or teacher_config is None:
        return []
    student_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    differences = []
    for name, teacher_value in _special_ids(teacher_config).items():
        teacher_ids, student_id = _as_set(teacher_value), student_ids[name]
        if teacher_ids and student_id is not None and student_id not in teacher_ids:
            differences.append(f"the teacher's {name} is {teacher_value} but the student's tokenizer has {student_id}")
    return differences


def resolve_distill_vocab_size(
    student_rows: int,
    teacher_rows: int,
    tokenizer=None,
    teacher_tokenizer=None,
    requested: int | None = None,
    teacher_config: Any = None,
) -> int:
    """Number of leading vocabulary columns to compare between student and teacher logits.

    Rules:
    - an explicit `requested` wins (it must fit both heads);
    - with both tokenizers: identical vocabularies compare every real token; a student tokenizer that only *adds*
      tokens after the teacher's whole vocabulary (e.g. a chat template that adds special tokens, with the student's
      embeddings resized) compares the teacher's tokens, with a [`VocabularyWarning`] (the added tokens then learn
      only from the hard-label cross-entropy, `alpha > 0`); any other difference is an error;
    - without the teacher's tokenizer nothing proves the two models share a tokenizer: a [`VocabularyWarning`] says so
      (with any special token id of the teacher's config that disagrees with the student's tokenizer);
    - equal row counts compare all rows; different row counts (padded embedding matrices of one tokenizer, e.g. 151936
      vs 152064) compare the first `len(tokenizer)` rows.

    Args:
        student_rows (`int`): Rows of the student's LM head.
        teacher_rows (`int`): Rows of the teacher's LM head.
        tokenizer (*optional*): The student's tokenizer.
        teacher_tokenizer (*optional*): The teacher's tokenizer, when known.
        requested (`int`, *optional*): `DistillationConfig.distill_vocab_size`.
        teacher_config (*optional*): The teacher's model config, to compare special token ids when its tokenizer is
            unknown.

    Raises:
        ValueError: If the tokenizers differ, or the row counts cannot come from one tokenizer.
    """
    n_tokens = len(tokenizer) if tokenizer is not None else None
    if tokenizer is not None and teacher_tokenizer is not None:
        student_vocab, teacher_vocab = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if student_vocab != teacher_vocab:
            added = _added_tokens(student_vocab, teacher_vocab)
            if added is None:
                raise ValueError(
                    "The teacher's tokenizer differs from the student's: "
                    f"{_first_vocab_difference(student_vocab, teacher_vocab)}. {CROSS_TOKENIZER_HINT}"
                )
            n_tokens = len(teacher_vocab)
            if requested is None:
                shown = ", ".join(repr(t) for t in added[:5]) + (", ..." if len(added) > 5 else "")
                warnings.warn(
                    f"The student's tokenizer adds {len(added)} token(s) after the teacher's {n_tokens} ({shown}). "
                    f"Distillation compares the first {n_tokens} vocabulary entries, which both models know; the "
                    "added tokens learn only from the hard-label cross-entropy (set `alpha > 0`, or they get no "
                    "training signal). Set `distill_vocab_size` to silence this warning.",
                    VocabularyWarning,
                    stacklevel=3,
                )
    elif teacher_tokenizer is None and requested is None:
        differences = special_token_differences(tokenizer, teacher_config)
        rows = "" if student_rows == teacher_rows else (
            f" The LM heads have {student_rows} (student) and {teacher_rows} (teacher) rows; only the first "
            f"{n_tokens if n_tokens is not None else min(student_rows, teacher_rows)} columns are compared."
        )  # fmt: skip
        hint = (" Also, " + "; ".join(differences) + ".") if differences else ""
        warnings.warn(
            "Could not check that the teacher uses the student's tokenizer (no tokenizer was found for the teacher)."
            f"{rows}{hint} If the tokenizers differ, distillation trains on wrong targets without any error: pass the "
            "teacher's tokenizer as `teacher_processing_class=` to check, or set `distill_vocab_size` once you are "
            "sure.",
            VocabularyWarning,
            stacklevel=3,
        )
    smallest = min(student_rows, teacher_rows)
    if requested is not None:
        if requested > smallest:
            raise ValueError(
                f"`distill_vocab_size={requested}` is larger than the LM heads allow (student {student_rows} rows, "
                f"teacher {teacher_rows} rows). Use at most {smallest}."
            )
        return requested
    if n_tokens is not None and n_tokens > smallest:
        raise ValueError(
            f"The tokenizer has {n_tokens} tokens but the {'teacher' if teacher_rows < student_rows else 'student'} "
            f"LM head has only {smallest} rows, so the two models do not share this tokenizer. {CROSS_TOKENIZER_HINT}"
        )
    if student_rows == teacher_rows and (n_tokens is None or n_tokens == len(tokenizer)):
        return student_rows
    if n_tokens is None:
        raise ValueError(
            f"The student LM head has {student_rows} rows and the teacher's {teacher_rows}. If they share a tokenizer "
            "and only the padding differs, pass the tokenizer (`processing_class`) or set `distill_vocab_size` to its "
            f"length. Otherwise: {CROSS_TOKENIZER_HINT}"
        )
    logger.info(
        f"Student ({student_rows} rows) and teacher ({teacher_rows} rows) LM heads differ only by padding; comparing "
        f"the first {n_tokens} vocabulary entries."
    )
    return n_tokens


def teacher_input_limit(teacher: Any, teacher_tokenizer: Any, student: Any) -> int | None:
    """The first token id the teacher cannot read, when the student's inputs can hold such ids; else `None`.

    The teacher embeds ids below its embedding rows, and knows ids below its tokenizer's length. When the student's
    embeddings are larger (a student tokenizer with added tokens), a batch can hold ids the teacher cannot read.
    """
    embeddings = getattr(teacher, "get_input_embeddings", lambda: None)()
    student_embeddings = getattr(student, "get_input_embeddings", lambda: None)()
    if embeddings is None or student_embeddings is None:
        return None
    limit = embeddings.weight.shape[0]
    if teacher_tokenizer is not None:
        limit = min(limit, len(teacher_tokenizer))
    return limit if limit < student_embeddings.weight.shape[0] else None


def check_teacher_can_read(input_ids: Any, limit: int | None, tokenizer: Any = None) -> None:
    """Refuse a batch with token ids the teacher has no embedding (or no token) for.

    Raises:
        ValueError: If `input_ids` holds ids `>= limit`, naming the tokens and the fixes.
    """
    if limit is None or input_ids is None:
        return
    unknown = input_ids[input_ids >= limit]
    if unknown.numel() == 0:
        return
    ids = sorted(set(unknown.tolist()))
    names = tokenizer.convert_ids_to_tokens(ids[:5]) if tokenizer is not None else ids[:5]
    raise ValueError(
        f"The batch holds tokens the teacher does not know (ids >= {limit}: {', '.join(map(repr, names))}"
        f"{', ...' if len(ids) > 5 else ''}): the student's tokenizer adds them (e.g. through `chat_template_path`) "
        "and the teacher has no embedding for them, so it cannot read this text. Use a chat template made of tokens "
        "both tokenizers have (e.g. the teacher's own: `chat_template_path=<teacher>`), or add the same tokens to "
        "the teacher and train its new embeddings before distilling."
    )

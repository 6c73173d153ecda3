"""The README.md written beside a distilled student: what it was distilled from, how, and with what."""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

_TEMPLATE = """---
{{ card_data }}
---

# Model Card for {{ model_name }}

{{ origin }}
It has been trained with [hf_distill](https://github.com/hf-distill/hf-distill) {{ hf_distill_version }} (a
`DistillationTrainer` built on [TRL](https://github.com/huggingface/trl)'s `SFTTrainer`).

## Distillation

| | |
|---|---|
| teacher | {{ teacher }} |
| student initialised from | {{ student_origin }} |
| divergence | `{{ divergence }}`{% if divergence == "generalized_jsd" %} (beta = {{ beta }}){% endif %} |
| temperature | {{ temperature }} (the term is multiplied by temperature²) |
| hard-label cross-entropy weight `alpha` | {{ alpha }} |
| compared vocabulary | first {{ distill_vocab_size }} tokens |
{% if dataset_name %}| dataset | {{ dataset_name }} |
{% endif %}
### Framework versions

- hf_distill: {{ hf_distill_version }}
- TRL: {{ trl_version }}
- Transformers: {{ transformers_version }}
- PyTorch: {{ pytorch_version }}
"""


def describe_origin(name_or_path: str | None) -> tuple[str | None, str]:
    """`(base_model metadata, human description)` for a model's `_name_or_path`.

    A Hub id becomes the `base_model` metadata; a local folder is only named (it means nothing on the Hub); a model
    built from a config has no origin to name.
    """
    if not name_or_path:
        return None, "a model built from its config (randomly initialised)"
    if os.path.isdir(name_or_path):
        return None, f"`{name_or_path}` (a local checkpoint)"
    return name_or_path, f"[{name_or_path}](https://huggingface.co/{name_or_path})"


def build_model_card(
    *,
    model_name: str,
    student_name_or_path: str | None,
    teacher_name_or_path: str | None,
    args: Any,
    distill_vocab_size: int,
    dataset_name: str | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """A model card for a distilled student.

    Args:
        model_name (`str`): The student's name (the output folder's name by default).
        student_name_or_path (`str`, *optional*): Where the student's initial weights came from.
        teacher_name_or_path (`str`, *optional*): The teacher's Hub id or path.
        args ([`DistillationConfig`]): The training configuration (divergence, temperature, alpha, beta).
        distill_vocab_size (`int`): Number of vocabulary columns compared.
        dataset_name (`str`, *optional*): The training dataset's name.
        tags (`list[str]`, *optional*): Extra tags.
    """
    import torch
    import transformers
    import trl

    from . import __version__

    base_model, student_origin = describe_origin(student_name_or_path)
    teacher_hub, teacher = describe_origin(teacher_name_or_path)
    if base_model:
        origin = f"This model is {student_origin} distilled from the teacher {teacher}."
    else:
        origin = (
            f"This model was distilled from the teacher {teacher} into a student initialised from {student_origin}."
        )
    card_data = ModelCardData(
        base_model=base_model,
        datasets=dataset_name,
        library_name="transformers",
        model_name=model_name,
        tags=sorted({"generated_from_trainer", "distillation", "hf_distill", *(tags or [])}),
    )
    if teacher_hub:
        card_data.teacher_model = teacher_hub  # extra metadata key, kept by the Hub
    return ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        model_name=model_name,
        origin=origin,
        teacher=teacher,
        student_origin=student_origin,
        divergence=args.divergence,
        beta=args.beta,
        temperature=args.temperature,
        alpha=args.alpha,
        distill_vocab_size=distill_vocab_size,
        dataset_name=dataset_name,
        hf_distill_version=__version__,
        trl_version=trl.__version__,
        transformers_version=transformers.__version__,
        pytorch_version=torch.__version__,
    )

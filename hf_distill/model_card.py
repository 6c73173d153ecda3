"""The README.md written beside a distilled student: what it was distilled from, how, with what, and how it did.

[`build_model_card`] assembles the card (YAML metadata through `huggingface_hub.ModelCardData`, including a
`model-index` of the evaluation metrics that were computed); [`write_model_card`] writes it, with the training-curves
plot of [`hf_distill.plots`], into a folder. `DistillationTrainer.create_model_card` and `save_model` call it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

_TEMPLATE = """---
{{ card_data }}
---

# Model Card for {{ model_name }}

{{ origin }}
It has been trained with [hf_distill](https://github.com/hf-distill/hf-distill) {{ hf_distill_version }} (a
`DistillationTrainer` built on [TRL](https://github.com/huggingface/trl)'s `SFTTrainer`){{ progress }}.

## Distillation

The student minimises `alpha * CE(student, labels) + (1 - alpha) * temperature² * D(student ‖ teacher)` over the
tokens supervised fine-tuning would train on, both distributions softened by the temperature.

| | |
|---|---|
| teacher | {{ teacher }} |
| student initialised from | {{ student_origin }} |
{% for name, value in settings %}| {{ name }} | {{ value }} |
{% endfor %}{% if dataset_name %}| dataset | {{ dataset_name }} |
{% endif %}{% if eval_rows %}
## Evaluation

{{ eval_intro }}

| metric | value |
|---|---|
{% for name, value in eval_rows %}| {{ name }} | {{ value }} |
{% endfor %}{% endif %}{% if plot_file %}
## Training curves

![Training curves: distillation loss, cross-entropy, teacher agreement and loss over steps]({{ plot_file }})
{% endif %}
## Reproducing this run

{{ command_intro }}
{% if command %}
```bash
{{ command }}
```
{% endif %}
### Framework versions

{% for name, version in versions %}- {{ name }}: {{ version }}
{% endfor %}"""

_METRIC_LABELS = {
    "loss": "loss (training objective)",
    "distill_loss": "distillation loss",
    "ce_loss": "cross-entropy",
    "teacher_agreement": "teacher agreement",
    "mean_token_accuracy": "mean token accuracy",
    "entropy": "entropy",
}
# Logged with every evaluation but not measurements of the model
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "num_tokens", "model_preparation_time")
# Command-line options whose values are secrets
_SECRET_OPTION = re.compile(r"^--?(hub_token|token|hf_token|api_key|\w*_api_key|\w*password|\w*secret)$", re.I)


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


def reproduce_command(argv: Sequence[str] | None = None, orig_argv: Sequence[str] | None = None) -> str | None:
    """The shell command that started this process, or `None` from an interactive session (notebook, REPL, `-c`).

    `python script.py ...`, `python -m module ...` and console scripts (`hf-distill ...`) are given as typed, with
    `python` for the interpreter; the values of secret options (`--hub_token`, ...) are replaced by `REDACTED`.
    """
    argv = list(sys.argv if argv is None else argv)
    orig_argv = list(getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv)
    if not argv or not argv[0] or argv[0] == "-c" or "ipykernel" in argv[0]:
        return None
    script, args = argv[0], _redact(argv[1:])
    # `python [options] -m module args...`: `argv[0]` is then the module's file; the interpreter's part of
    # `orig_argv` ends with `-m module`
    interpreter = orig_argv[: len(orig_argv) - len(args)]
    if len(interpreter) >= 3 and interpreter[-2] == "-m":
        return shlex.join(["python", "-m", interpreter[-1], *args])
    if not script.endswith(".py") and os.path.basename(os.path.dirname(os.path.abspath(script))) in ("bin", "Scripts"):
        # A console script installed by pip (`hf-distill`, `accelerate`, `torchrun`): its name is the entry point
        return shlex.join([os.path.basename(script), *args])
    return shlex.join(["python", script, *args])


def _redact(args: list[str]) -> list[str]:
    redacted, hide_next = [], False
    for arg in args:
        if hide_next:
            redacted.append("REDACTED")
            hide_next = False
            continue
        option, sep, _ = arg.partition("=")
        if _SECRET_OPTION.match(option):
            if sep:
                arg = f"{option}=REDACTED"
            else:
                hide_next = True
        redacted.append(arg)
    return redacted


def eval_metrics_from_log_history(
    log_history: Iterable[Mapping[str, Any]], eval_set_names: Sequence[str | None] = (None,)
) -> dict[str | None, tuple[dict[str, float], int | None]]:
    """The latest value of each evaluation metric, per evaluation set: `{set name: ({metric: value}, step)}`.

    `metric` is the logged key without its `eval_` (or `eval_<set name>_`) prefix; timings and token counts are left
    out, and so are sets never evaluated. `eval_set_names` is `(None,)` for a single evaluation dataset, and the keys
    of `eval_dataset` when it is a dict (logged as `eval_<name>_loss`, ...).
    """
    found: dict[str | None, tuple[dict[str, float], int | None]] = {}
    for name in eval_set_names:
        prefix = "eval_" if name is None else f"eval_{name}_"
        metrics: dict[str, float] = {}
        step = None
        for entry in log_history:
            for key, value in entry.items():
                if not key.startswith(prefix) or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                metric = key[len(prefix) :]
                if metric.endswith(_NOT_METRICS) or not math.isfinite(value):
                    continue
                if name is None and any(metric.startswith(f"{other}_") for other in eval_set_names if other):
                    continue
                metrics[metric] = float(value)
                step = entry.get("step", step)
        if metrics:
            found[name] = (metrics, step)
    return found


def _format(value: float) -> str:
    return f"{value:.4g}"


def _teacher_signal(args: Any) -> str:
    cache = getattr(args, "teacher_cache", None)
    if not cache:
        return "the live teacher's full distribution"
    return f"a top-k teacher cache (`{cache}`), rest of the mass treated as `{args.sparse_targets}`"


def _completion_sources(args: Any) -> str:
    lmbda = float(getattr(args, "lmbda", 0.0) or 0.0)
    other = "the teacher's samples (`seq_kd`)" if args.seq_kd else "the dataset's completions"
    return (
        f"the student's own samples with probability `lmbda={lmbda:g}`, else {other}; up to {args.max_new_tokens} "
        "new tokens"
    )


def build_model_card(
    *,
    model_name: str,
    student_name_or_path: str | None,
    teacher_name_or_path: str | None,
    args: Any,
    distill_vocab_size: int,
    dataset_name: str | None = None,
    tags: list[str] | None = None,
    log_history: Iterable[Mapping[str, Any]] = (),
    eval_set_names: Sequence[str | None] = (None,),
    plot_file: str | None = None,
    command: str | None = None,
    num_processes: int = 1,
    global_step: int | None = None,
    epoch: float | None = None,
    bitnet: str | None = None,
) -> ModelCard:
    """A model card for a distilled student.

    Args:
        model_name (`str`): The student's name (the output folder's name by default).
        student_name_or_path (`str`, *optional*): Where the student's initial weights came from.
        teacher_name_or_path (`str`, *optional*): The teacher's Hub id or path.
        args ([`DistillationConfig`]): The training configuration (divergence, temperature, alpha, beta, CE options).
        distill_vocab_size (`int`): Number of vocabulary columns compared.
        dataset_name (`str`, *optional*): The training dataset's name (Hub id), put in the metadata.
        tags (`list[str]`, *optional*): Extra tags.
        log_history (`list[dict]`, *optional*): `trainer.state.log_history`; its evaluation metrics become the
            card's `model-index` (none when no evaluation ran).
        eval_set_names (`list`, *optional*): `(None,)` for one evaluation dataset, the names of a dict of them.
        plot_file (`str`, *optional*): File name of the training-curves plot beside the card, linked when given.
        command (`str`, *optional*): The command that started the run (see [`reproduce_command`]).
        num_processes (`int`, *optional*, defaults to 1): Number of training processes.
        global_step (`int`, *optional*), epoch (`float`, *optional*): How far training went.
        bitnet (`str`, *optional*): How the student was made ternary (see
            [`BitNetCallback.describe_for_card`]); adds the `bitnet` tag.
    """
    import datasets
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

    settings = [("divergence", f"`{args.divergence}`")]
    if args.divergence == "generalized_jsd":
        settings.append(("beta (teacher weight of the JSD mixture)", args.beta))
    if args.divergence.startswith("skew"):
        settings.append(("skew_alpha", args.skew_alpha))
    t2 = args.temperature**2
    settings.append(("temperature", f"{args.temperature} (the distillation term is multiplied by T² = {t2:g})"))
    settings.append(("hard-label cross-entropy weight `alpha`", args.alpha))
    if getattr(args, "label_smoothing_factor", 0.0):
        settings.append(("label smoothing (cross-entropy)", args.label_smoothing_factor))
    loss_type = getattr(args, "loss_type", "nll")
    if loss_type and loss_type != "nll":
        settings.append(("cross-entropy `loss_type`", f"`{loss_type}`"))
    settings.append(("compared vocabulary", f"first {distill_vocab_size} tokens"))
    settings.append(("teacher signal", _teacher_signal(args)))
    if getattr(args, "lmbda", None) or getattr(args, "seq_kd", False):
        settings.append(("completions", _completion_sources(args)))
    if bitnet:
        settings.append(("student weights", bitnet))
        tags = [*(tags or []), "bitnet", "1.58-bit"]

    eval_metrics = eval_metrics_from_log_history(log_history, eval_set_names)
    eval_results, eval_rows = [], []
    for set_name, (metrics, _) in eval_metrics.items():
        for metric, value in metrics.items():
            label = _METRIC_LABELS.get(metric, metric)
            eval_results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Text Generation",
                    dataset_type=dataset_name or "custom",
                    dataset_name=" ".join(filter(None, [dataset_name or "evaluation set", set_name])),
                    dataset_split=set_name,
                    metric_type=metric,
                    metric_name=label,
                    metric_value=value,
                )
            )
            eval_rows.append((f"{label} ({set_name})" if set_name else label, _format(value)))
    steps = sorted({step for _, step in eval_metrics.values() if step is not None})
    eval_intro = "Latest evaluation" + (f" (step {', '.join(map(str, steps))})" if steps else "") + "."
    if dataset_name:
        eval_intro = eval_intro[:-1] + f", on an evaluation set of {dataset_name}."

    card_data = ModelCardData(
        base_model=base_model,
        datasets=[dataset_name] if dataset_name else None,
        library_name="transformers",
        model_name=model_name,
        eval_results=eval_results or None,
        tags=sorted({"generated_from_trainer", "distillation", "hf_distill", *(tags or [])}),
    )
    if teacher_hub:
        card_data.teacher_model = teacher_hub  # extra metadata key, kept by the Hub

    progress = ""
    if global_step:
        progress = f", for {global_step} optimizer steps"
        if epoch:
            progress += f" ({epoch:.3g} epoch{'' if epoch == 1 else 's'})"
    if command:
        command_intro = "The command that started this run"
        if num_processes > 1:
            command_intro += f" (in each of its {num_processes} processes: `accelerate launch`, `torchrun`, ...)"
        command_intro += ":"
    else:
        command_intro = "This run was started from an interactive session (a notebook or a Python prompt)."
    versions = [
        ("hf_distill", __version__),
        ("TRL", trl.__version__),
        ("Transformers", transformers.__version__),
        ("PyTorch", torch.__version__),
        ("Datasets", datasets.__version__),
    ]
    return ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        model_name=model_name,
        origin=origin,
        progress=progress,
        teacher=teacher,
        student_origin=student_origin,
        settings=settings,
        dataset_name=dataset_name,
        eval_rows=eval_rows,
        eval_intro=eval_intro,
        plot_file=plot_file,
        command=command,
        command_intro=command_intro,
        versions=versions,
        hf_distill_version=__version__,
    )


def write_model_card(
    trainer: Any,
    output_dir: str,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tags: list[str] | None = None,
) -> str:
    """Write `README.md`, and the training-curves plot when anything was logged, into `output_dir`.

    The plot never fails the save: an error drawing it is logged as a warning and the card is written without it.

    Returns:
        The card's path.
    """
    from . import plots

    os.makedirs(output_dir, exist_ok=True)
    log_history = list(getattr(trainer.state, "log_history", None) or [])
    plot_file = None
    try:
        path = plots.plot_training_curves(log_history, output_dir)
        plot_file = os.path.basename(path) if path else None
    except Exception as error:  # a plot is never worth losing the save
        logger.warning("Could not draw the training curves for the model card (%s: %s).", type(error).__name__, error)
    eval_dataset = getattr(trainer, "eval_dataset", None)
    eval_set_names = list(eval_dataset) if isinstance(eval_dataset, dict) else [None]
    from .model_forward import unwrap_peft

    model = unwrap_peft(trainer.model)  # PEFT: the wrapped model's config
    bitnet = next((cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "describe_for_card")), None)
    card = build_model_card(
        model_name=model_name or os.path.basename(os.path.normpath(trainer.args.output_dir)),
        student_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None),
        teacher_name_or_path=getattr(trainer, "_teacher_name_or_path", None),
        args=trainer.args,
        distill_vocab_size=trainer.distill_vocab_size,
        dataset_name=dataset_name,
        tags=tags,
        log_history=log_history,
        eval_set_names=eval_set_names,
        plot_file=plot_file,
        command=reproduce_command(),
        num_processes=getattr(trainer.args, "world_size", 1),
        global_step=getattr(trainer.state, "global_step", None),
        epoch=getattr(trainer.state, "epoch", None),
        bitnet=bitnet.describe_for_card() if bitnet is not None else None,
    )
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    return path

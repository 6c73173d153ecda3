"""Training curves of a distillation run, drawn from `trainer.state.log_history` into a PNG beside the model card.

matplotlib is imported inside [`plot_training_curves`] and draws on its non-interactive Agg canvas, so that importing
`hf_distill` stays light and no display is needed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

TRAINING_CURVES_FILE = "training_curves.png"
"""File name of the training-curves plot written beside a saved student's README.md."""

# (title, y label, [(log_history key, legend label), ...]); a panel is drawn when one of its keys has a point
_PANELS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "Distillation loss",
        "divergence (per token)",
        (("distill_loss", "train"), ("eval_distill_loss", "eval")),
    ),
    (
        "Cross-entropy",
        "CE (per token)",
        (("ce_loss", "train"), ("eval_ce_loss", "eval")),
    ),
    (
        "Teacher agreement",
        "share of tokens, same argmax",
        (("teacher_agreement", "train"), ("eval_teacher_agreement", "eval")),
    ),
    (
        "Loss",
        "training objective",
        (("loss", "train"), ("eval_loss", "eval")),
    ),
)


def curve_points(log_history: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """`(steps, values)` of one logged quantity; entries without it, or with a non-finite value, are skipped."""
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        steps.append(int(entry.get("step", len(steps))))
        values.append(float(value))
    return steps, values


def plot_training_curves(
    log_history: Iterable[Mapping[str, Any]], output_dir: str, filename: str = TRAINING_CURVES_FILE
) -> str | None:
    """Draw the distillation loss, cross-entropy, teacher agreement and loss (train, and eval when present) over
    optimizer steps, one subplot each, into `output_dir/filename`.

    Args:
        log_history (`list[dict]`): `trainer.state.log_history`.
        output_dir (`str`): Folder to write the PNG into (created if needed).
        filename (`str`, *optional*, defaults to `"training_curves.png"`): The PNG's file name.

    Returns:
        The PNG's path, or `None` when nothing was logged (no file is written then).
    """
    log_history = list(log_history)
    panels = []
    for title, ylabel, series in _PANELS:
        curves = [(label, *curve_points(log_history, key)) for key, label in series]
        curves = [(label, steps, values) for label, steps, values in curves if steps]
        if curves:
            panels.append((title, ylabel, curves))
    if not panels:
        return None

    # The Agg canvas on a bare `Figure`, not pyplot: no display, no global backend switch (a notebook's inline
    # plots are left alone), no figure registry to leak into
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5.5 * columns, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (title, ylabel, curves) in zip(axes, panels):
        for label, steps, values in curves:
            if label == "eval":
                style = {"marker": "o", "linestyle": "--"}
            else:
                style = {"marker": "." if len(steps) < 50 else ""}
            ax.plot(steps, values, label=label, **style)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if len(curves) > 1:
            ax.legend()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, filename)
    figure.savefig(path, dpi=100, format="png")
    return path

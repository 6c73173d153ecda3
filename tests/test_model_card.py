"""The model card (README.md) and training-curves plot written with every saved student."""

from __future__ import annotations

import logging
import sys

import pytest
from huggingface_hub import ModelCard
from test_trainer import config, peaky_teacher
from tiny import lm_dataset, make_model, make_tokenizer

from hf_distill import DistillationTrainer
from hf_distill.model_card import eval_metrics_from_log_history, reproduce_command
from hf_distill.plots import TRAINING_CURVES_FILE, plot_training_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _trainer(tmp_path, hub_ids: bool = True, eval_dataset=None, **overrides) -> DistillationTrainer:
    tokenizer = make_tokenizer()
    student = make_model(len(tokenizer), seed=1)
    teacher = peaky_teacher(len(tokenizer))
    if hub_ids:  # as if both had been loaded from the Hub
        student.config._name_or_path = "org/student"
        teacher.config._name_or_path = "org/teacher"
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, **overrides),
        train_dataset=lm_dataset(),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        teacher_processing_class=tokenizer,
    )


def _assert_png(path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_saved_student_has_card_with_metadata_eval_results_command_and_plot(tmp_path, monkeypatch):
    trainer = _trainer(
        tmp_path,
        eval_dataset=lm_dataset(8, seed=1),
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=4,
        save_strategy="steps",
        save_steps=2,
        save_only_model=True,
        divergence="generalized_jsd",
        beta=0.3,
        temperature=2.0,
        alpha=0.5,
        label_smoothing_factor=0.1,
    )
    trainer.train()
    # The command line of a training script (the real one is pytest's)
    argv = ["train.py", "--divergence", "generalized_jsd", "--hub_token", "hf_secret", "--output_dir", "out dir"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "orig_argv", ["/usr/bin/python3", *argv])
    trainer.save_model()

    out = tmp_path / "out"
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.base_model == "org/student"
    assert data.teacher_model == "org/teacher"
    assert data.library_name == "transformers"
    assert {"distillation", "hf_distill", "trl", "sft"} <= set(data.tags)
    assert data.datasets is None  # not given

    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evals) == 2
    latest = evals[-1]
    results = {result.metric_type: result.metric_value for result in data.eval_results}
    for metric in ("loss", "distill_loss", "ce_loss", "teacher_agreement", "mean_token_accuracy"):
        assert results[metric] == pytest.approx(latest[f"eval_{metric}"], rel=1e-12)
    assert not any(name.endswith(("runtime", "per_second", "num_tokens")) for name in results)
    assert all(result.task_type == "text-generation" for result in data.eval_results)
    assert data.model_name == "out"

    text = card.text
    assert "[org/teacher](https://huggingface.co/org/teacher)" in text
    assert "`generalized_jsd`" in text and "| beta (teacher weight of the JSD mixture) | 0.3 |" in text
    assert "| temperature | 2.0 (the distillation term is multiplied by T² = 4) |" in text
    assert "| hard-label cross-entropy weight `alpha` | 0.5 |" in text
    assert "| label smoothing (cross-entropy) | 0.1 |" in text
    assert f"| compared vocabulary | first {trainer.distill_vocab_size} tokens |" in text
    assert "The command that started this run" in text
    assert "python train.py --divergence generalized_jsd --hub_token REDACTED --output_dir 'out dir'" in text
    assert "hf_secret" not in card.content
    for library in ("hf_distill", "TRL", "Transformers", "PyTorch", "Datasets"):
        assert f"- {library}: " in text
    assert "None" not in card.content
    assert f"]({TRAINING_CURVES_FILE})" in text
    _assert_png(out / TRAINING_CURVES_FILE)
    assert (out / "model.safetensors").exists()

    # Each checkpoint is a saved student too: its own card (with the metrics so far) and plot
    checkpoint = out / "checkpoint-2"
    checkpoint_card = ModelCard.load(checkpoint / "README.md")
    assert checkpoint_card.data.teacher_model == "org/teacher"
    assert {r.metric_type: r.metric_value for r in checkpoint_card.data.eval_results}["loss"] == evals[0]["eval_loss"]
    _assert_png(checkpoint / TRAINING_CURVES_FILE)


def test_run_without_eval_has_no_model_index_and_remembers_dataset_and_tags(tmp_path):
    trainer = _trainer(tmp_path, hub_ids=False, max_steps=2)
    trainer.train()
    trainer.create_model_card(dataset_name="org/data", tags="math")
    trainer.save_model(str(tmp_path / "final"))  # another folder: the card and plot follow the weights

    for folder in (tmp_path / "out", tmp_path / "final"):
        card = ModelCard.load(folder / "README.md")
        assert card.data.eval_results is None
        assert "model-index" not in card.content and "## Evaluation" not in card.text
        assert card.data.base_model is None  # a from-config student has no Hub origin: described in the text
        assert "a model built from its config" in card.text
        assert card.data.datasets == ["org/data"]
        assert {"math", "distillation", "hf_distill"} <= set(card.data.tags)
        assert "| dataset | org/data |" in card.text
        _assert_png(folder / TRAINING_CURVES_FILE)
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_plotting_failure_still_saves_model_and_card(tmp_path, monkeypatch, caplog):
    import hf_distill.plots

    def broken_plot(*args, **kwargs):
        raise RuntimeError("no fonts here")

    monkeypatch.setattr(hf_distill.plots, "plot_training_curves", broken_plot)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.train()
    with caplog.at_level(logging.WARNING, logger="hf_distill.model_card"):
        trainer.save_model()

    out = tmp_path / "out"
    assert (out / "model.safetensors").exists()
    card = ModelCard.load(out / "README.md")
    assert card.data.teacher_model == "org/teacher"
    assert "## Training curves" not in card.text
    assert not (out / TRAINING_CURVES_FILE).exists()
    assert "no fonts here" in caplog.text


def test_nothing_logged_means_no_plot(tmp_path):
    assert plot_training_curves([], str(tmp_path)) is None
    assert plot_training_curves([{"train_runtime": 1.0, "step": 0}], str(tmp_path)) is None
    assert not (tmp_path / TRAINING_CURVES_FILE).exists()


def test_plot_of_train_only_history(tmp_path):
    history = [{"step": s, "loss": 3.0 - s / 10, "distill_loss": 1.0 / s, "teacher_agreement": s / 10} for s in (1, 2)]
    path = plot_training_curves(history, str(tmp_path))
    assert path == str(tmp_path / TRAINING_CURVES_FILE)
    _assert_png(tmp_path / TRAINING_CURVES_FILE)


def test_eval_metrics_per_eval_set_and_latest_value():
    history = [
        {"loss": 2.0, "distill_loss": 1.0, "step": 1},
        {"eval_a_loss": 3.0, "eval_a_teacher_agreement": 0.1, "eval_a_runtime": 0.5, "step": 2},
        {"eval_b_loss": 4.0, "eval_b_samples_per_second": 10.0, "step": 2},
        {"eval_a_loss": 2.5, "eval_a_teacher_agreement": 0.2, "step": 4},
        {"train_loss": 2.2, "train_runtime": 1.0, "step": 4},
    ]
    assert eval_metrics_from_log_history(history, ["a", "b"]) == {
        "a": ({"loss": 2.5, "teacher_agreement": 0.2}, 4),
        "b": ({"loss": 4.0}, 2),
    }
    assert eval_metrics_from_log_history(history[:1]) == {}
    assert eval_metrics_from_log_history([{"eval_loss": 1.5, "eval_num_tokens": 9.0, "step": 3}]) == {
        None: ({"loss": 1.5}, 3)
    }


@pytest.mark.parametrize(
    "argv, orig_argv, expected",
    [
        (["train.py", "--lr", "1e-5"], ["/usr/bin/python3", "train.py", "--lr", "1e-5"], "python train.py --lr 1e-5"),
        (
            ["/site/trl/scripts/sft.py", "--token=abc", "-m", "x"],
            ["python", "-X", "dev", "-m", "trl.scripts.sft", "--token=abc", "-m", "x"],
            "python -m trl.scripts.sft --token=REDACTED -m x",
        ),
        (
            ["/venv/bin/hf-distill", "distill", "--x", "a b"],
            ["python", "/venv/bin/hf-distill"],
            "hf-distill distill --x 'a b'",
        ),
        ([""], ["python"], None),
        (["-c", "x"], ["python", "-c", "code", "x"], None),
        (["/env/ipykernel_launcher.py", "-f", "kernel.json"], ["python", "-m", "ipykernel_launcher"], None),
    ],
)
def test_reproduce_command(argv, orig_argv, expected):
    assert reproduce_command(argv, orig_argv) == expected


def test_card_for_several_eval_sets_and_skew_divergence_parses_back(tmp_path):
    from hf_distill import DistillationConfig
    from hf_distill.model_card import build_model_card

    args = DistillationConfig(
        output_dir=str(tmp_path), divergence="skew_reverse_kl", alpha=0.5, loss_type="dft", report_to="none"
    )
    history = [
        {"loss": 2.0, "step": 1},
        {"eval_a_loss": 3.0, "eval_a_teacher_agreement": 0.25, "step": 2},
        {"eval_b_loss": 4.0, "step": 2},
    ]
    card = build_model_card(
        model_name="student",
        student_name_or_path=str(tmp_path),  # a local folder: named in the text, not `base_model`
        teacher_name_or_path="org/teacher",
        args=args,
        distill_vocab_size=10,
        dataset_name="org/data",
        log_history=history,
        eval_set_names=["a", "b"],
        command=None,
        global_step=4,
        epoch=1.5,
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.base_model is None and f"`{tmp_path}` (a local checkpoint)" in loaded.text
    assert loaded.data.datasets == ["org/data"]
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in loaded.data.eval_results}
    assert results == {("a", "loss"): 3.0, ("a", "teacher_agreement"): 0.25, ("b", "loss"): 4.0}
    assert all(r.dataset_type == "org/data" for r in loaded.data.eval_results)
    assert "| skew_alpha | 0.1 |" in loaded.text and "| cross-entropy `loss_type` | `dft` |" in loaded.text
    assert "| teacher agreement (a) | 0.25 |" in loaded.text
    assert "for 4 optimizer steps (1.5 epochs)" in loaded.text
    assert "interactive session" in loaded.text and "```bash" not in loaded.text
    assert "## Training curves" not in loaded.text  # no plot file given

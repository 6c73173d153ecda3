"""Porting TRL scripts: `examples/trl_port/` holds a `trl.DistillationTrainer` script and a GKD script in which only
the import differs between TRL and hf_distill. Each runs here with both libraries on the same tiny models and data,
and the first-step losses are compared (docs/porting_from_trl.md reports the numbers).

Generation is made deterministic: greedy through `generation_kwargs={"do_sample": False}` for the DistillationTrainer
script (a field both libraries have); GKD has no such field, so its on-policy comparison switches both trainers'
generation to greedy after they are built. Each dataset holds exactly one batch, so both trainers see the same rows.

Tolerances: the tiny random-init models are nearly uniform and nearly equal, so the divergences are small (1e-3 to
1e-2) and float32 rounding in the two implementations differs by ~1e-8 absolute: 1e-5 relative at `temperature=1`,
1e-4 where the temperature shrinks the divergence further.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PORTS = REPO / "examples" / "trl_port"
SCRIPTS = {"distillation": PORTS / "distillation_trainer_port.py", "gkd": PORTS / "gkd_port.py"}
GREEDY = ["--generation-kwargs", json.dumps({"do_sample": False})]
EXACT, TEMPERED = 1e-5, 1e-4


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"trl_port_{name}", SCRIPTS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _greedy_after_build(trainer) -> None:
    """GKD samples with `do_sample=True` and has no setting to change it: switch both trainers to greedy."""
    if hasattr(trainer, "lmbda") and hasattr(trainer, "generation_config"):  # TRL's GKDTrainer
        trainer.generation_config.do_sample = False
        trainer.generation_kwargs["do_sample"] = False
    else:
        trainer._generator.settings.generation_kwargs = {"do_sample": False}


def _first_step(name: str, backend: str, tmp_path: Path, *extra: str, after_build=None, config_overrides=None):
    """Build the script's trainer with `backend`, train one step, and return its first loss, the `num_items_in_batch`
    it was normalised by and the trained batch."""
    module = _load(name)
    argv = ["--tiny", "--backend", backend, "--output-dir", str(tmp_path / backend), "--max-steps", "1",
            "--gradient-accumulation-steps", "1", *extra]  # fmt: skip
    if config_overrides:  # what a script that sets other fields would pass (hf_distill's side only)
        import hf_distill

        original = hf_distill.DistillationConfig

        def config(**kwargs):
            kwargs.update(config_overrides)
            return original(**{k: v for k, v in kwargs.items() if v is not _DROP})

        hf_distill.DistillationConfig = config
        try:
            trainer = module.build(argv)
        finally:
            hf_distill.DistillationConfig = original
    else:
        trainer = module.build(argv)
    if after_build is not None:
        after_build(trainer)
    seen = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        batch = {k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)}
        value = loss[0] if isinstance(loss, tuple) else loss
        seen.append((float(value.detach()), num_items_in_batch, batch))
        return loss

    trainer.compute_loss = recording
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(seen) == 1 and logged[0] == pytest.approx(seen[0][0], rel=1e-6)
    return seen[0]


_DROP = object()


def _trl_completions(batch) -> list[list[int]]:
    """TRL DistillationTrainer's batch: left-padded prompts, right-padded completions with their mask."""
    return sorted(ids[mask.bool()].tolist() for ids, mask in zip(batch["completion_ids"], batch["completion_mask"]))


def _labelled(batch) -> list[list[int]]:
    """hf_distill's (and GKD's) batch: the tokens that carry a label."""
    return sorted(row[row != -100].tolist() for row in batch["labels"])


# ----------------------------------------------------------------------------------------------------------------
# Only the import differs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_only_the_import_differs(name):
    tree = ast.parse(SCRIPTS[name].read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    library_imports = [
        (function, node)
        for function, body in functions.items()
        for node in ast.walk(body)
        if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in ("trl", "hf_distill")
    ]
    library_imports += [(None, node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                        and (getattr(node, "module", "") or "").split(".")[0] in ("trl", "hf_distill")]  # fmt: skip
    # The libraries are imported in `import_trainer` only: one statement each, binding the same two names
    assert [function for function, _ in library_imports] == ["import_trainer", "import_trainer"]
    (_, trl_import), (_, ours_import) = library_imports
    assert trl_import.module.startswith("trl") and ours_import.module == "hf_distill"
    bound = [sorted(alias.asname or alias.name for alias in node.names) for node in (trl_import, ours_import)]
    assert bound[0] == bound[1]
    # and the backend is read nowhere else: one call of `import_trainer(args.backend)` in `build`
    uses = [(function, node.lineno) for function, body in functions.items() for node in ast.walk(body)
            if isinstance(node, ast.Attribute) and node.attr == "backend"]  # fmt: skip
    assert [function for function, _ in uses] == ["build"]


# ----------------------------------------------------------------------------------------------------------------
# trl.DistillationTrainer (always on-policy, prompt-only data)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("beta", "temperature"),
    [("1.0", 1.0), ("0.0", 1.0), ("0.5", 2.0), ("1.0", 0.5)],
    ids=["rkl", "fkl", "jsd-T2", "rkl-T0.5"],
)
def test_distillation_trainer_port_first_step_loss(tmp_path, beta, temperature):
    extra = ("--beta", beta, "--temperature", str(temperature), *GREEDY)
    trl_loss, _, trl_batch = _first_step("distillation", "trl", tmp_path, *extra)
    ours_loss, _, ours_batch = _first_step("distillation", "hf_distill", tmp_path, *extra)
    assert _trl_completions(trl_batch) == _labelled(ours_batch)  # the same greedy completions, EOS included
    # TRL applies the temperature to both distributions and does not rescale; hf_distill multiplies by T^2
    tolerance = EXACT if temperature == 1.0 else TEMPERED
    assert ours_loss == pytest.approx(temperature**2 * trl_loss, rel=tolerance)


def test_distillation_trainer_port_keeps_beta(tmp_path):
    from hf_distill import DistillationConfig

    # The script sets beta: generalized JSD with that weight, as in TRL
    config = DistillationConfig(output_dir=str(tmp_path), beta=1.0, max_completion_length=16, bf16=False)
    assert (config.divergence, config.beta, config.max_new_tokens) == ("generalized_jsd", 1.0, 16)
    # A script that leaves beta unset gets TRL's reverse KL (beta=1.0) there but hf_distill's forward KL here
    assert DistillationConfig(output_dir=str(tmp_path), bf16=False).divergence == "forward_kl"
    # and beta with another divergence is refused, never ignored
    with pytest.raises(ValueError, match="beta"):
        DistillationConfig(output_dir=str(tmp_path), beta=0.5, divergence="forward_kl", bf16=False)


def test_distillation_trainer_port_without_beta_changes_the_divergence(tmp_path):
    trl_loss, _, _ = _first_step("distillation", "trl", tmp_path, "--beta", "1.0", *GREEDY)
    ours_default, _, _ = _first_step("distillation", "hf_distill", tmp_path, *GREEDY, config_overrides={"beta": _DROP})
    ours_reverse, _, _ = _first_step("distillation", "hf_distill", tmp_path, "--beta", "1.0", *GREEDY)
    assert ours_reverse == pytest.approx(trl_loss, rel=EXACT)
    assert ours_default != pytest.approx(trl_loss, rel=1e-4)  # forward KL, not TRL's default reverse KL


# ----------------------------------------------------------------------------------------------------------------
# GKD (GKDTrainer / GKDConfig -> DistillationTrainer / DistillationConfig)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", ["0.5", "0.0", "1.0"])
def test_gkd_port_off_policy_first_step_loss(tmp_path, beta):
    trl_loss, _, trl_batch = _first_step("gkd", "trl", tmp_path, "--lmbda", "0", "--beta", beta)
    ours_loss, _, ours_batch = _first_step("gkd", "hf_distill", tmp_path, "--lmbda", "0", "--beta", beta)
    # GKD's collator trains on the last assistant turn; `assistant_only_loss=True` gives SFT the same tokens
    assert _labelled(trl_batch) == _labelled(ours_batch)
    assert ours_loss == pytest.approx(trl_loss, rel=EXACT)


def test_gkd_port_temperature_only_samples_in_gkd(tmp_path):
    """GKD's loss ignores `temperature` (it only samples at it); hf_distill's loss is T^2 * divergence at T."""
    extra = ("--lmbda", "0", "--temperature", "2.0")

    def loss_at_temperature(trainer):  # TRL's own loss function, at the temperature the script set
        loss = trainer.generalized_jsd_loss
        trainer.generalized_jsd_loss = lambda **kwargs: loss(**kwargs, temperature=2.0)

    trl_loss, _, _ = _first_step("gkd", "trl", tmp_path, *extra)
    trl_at_t, _, _ = _first_step("gkd", "trl", tmp_path, *extra, after_build=loss_at_temperature)
    ours_loss, _, _ = _first_step("gkd", "hf_distill", tmp_path, *extra)
    trl_at_one, _, _ = _first_step("gkd", "trl", tmp_path, "--lmbda", "0", "--temperature", "1.0")
    assert trl_loss == trl_at_one  # the temperature changed nothing in GKD's loss
    assert ours_loss == pytest.approx(4.0 * trl_at_t, rel=TEMPERED)
    assert ours_loss != pytest.approx(trl_loss, rel=1e-4)


def test_gkd_port_on_policy_first_step_loss(tmp_path):
    """lmbda=1: the same greedy completions; GKD divides their divergence sum by the token count of the dataset's
    completions (`num_items_in_batch`, counted before the batch was replaced), hf_distill by the generated ones."""
    extra = ("--lmbda", "1")
    trl_loss, trl_items, trl_batch = _first_step("gkd", "trl", tmp_path, *extra, after_build=_greedy_after_build)
    ours_loss, ours_items, ours_batch = _first_step(
        "gkd", "hf_distill", tmp_path, *extra, after_build=_greedy_after_build
    )
    assert _labelled(trl_batch) == _labelled(ours_batch)
    generated = int((ours_batch["labels"][:, 1:] != -100).sum())
    assert int(ours_items) == generated and int(trl_items) != generated  # the dataset's completions: other lengths
    assert ours_loss * generated == pytest.approx(trl_loss * int(trl_items), rel=EXACT)


def test_gkd_port_without_assistant_only_loss(tmp_path):
    """Without `assistant_only_loss`, SFT trains on every token of the conversation: another loss off-policy, and a
    clear error on-policy (there is no prompt to generate from)."""
    trl_loss, _, trl_batch = _first_step("gkd", "trl", tmp_path, "--lmbda", "0")
    ours_loss, _, ours_batch = _first_step(
        "gkd", "hf_distill", tmp_path, "--lmbda", "0", config_overrides={"assistant_only_loss": False}
    )
    assert sum(map(len, _labelled(ours_batch))) > sum(map(len, _labelled(trl_batch)))
    assert ours_loss != pytest.approx(trl_loss, rel=1e-4)
    with pytest.raises(ValueError, match="assistant_only_loss=True"):
        _first_step("gkd", "hf_distill", tmp_path, "--lmbda", "1", config_overrides={"assistant_only_loss": False})


# ----------------------------------------------------------------------------------------------------------------
# The scripts run from the command line
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_port_script_runs(tmp_path, name):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))  # fmt: skip
    cmd = [sys.executable, str(SCRIPTS[name]), "--tiny", "--output-dir", str(tmp_path / "out"), "--max-steps", "2",
           "--gradient-accumulation-steps", "1"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    line = [line for line in result.stdout.splitlines() if line.startswith("trl port summary:")][-1]
    assert json.loads(line.split(":", 1)[1])["steps"] == 2

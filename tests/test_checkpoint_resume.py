"""Resuming after crashes, kills and preemption: atomic checkpoints, `resume_from_checkpoint="auto"`, the finder.

The kill tests run `tests/resume_worker.py` in a subprocess, SIGKILL it at random moments (during a step, and in the
middle of a checkpoint write), rerun the same command, and compare the final weights with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from resume_worker import MAX_STEPS, build_trainer, config
from safetensors.torch import load_file
from tiny import lm_dataset, make_model, make_tokenizer, subprocess_env
from transformers import TrainerCallback

from hf_distill import DistillationTrainer
from hf_distill.callbacks import PREEMPTED_EXIT_CODE, CheckpointResumer, TrainingPreempted
from hf_distill.checkpoints import (
    STAGING_DIR,
    IncompleteCheckpointWarning,
    checkpoint_problem,
    find_resumable_checkpoint,
    rotate_complete_checkpoints,
)
from hf_distill.cli.main import main

WORKER = str(Path(__file__).resolve().parent / "resume_worker.py")
SEED = int(os.environ.get("RESUME_TEST_SEED", random.randrange(1 << 30)))  # printed on failure: rerun with it


class RecordingTrainer(DistillationTrainer):
    """Records the `input_ids` of every micro-batch it trains on."""

    batches: list[list[list[int]]]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.batches.append(inputs["input_ids"].tolist())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class SignalAtStep(TrainerCallback):
    """Sends `signum` to this process at the end of step `step` (as a cluster's preemption would, mid-run)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in this process: final weights and the batches of every step."""
    out = tmp_path_factory.mktemp("reference") / "out"
    trainer = build_trainer(str(out), trainer_cls=RecordingTrainer)
    trainer.batches = []
    trainer.train()
    return {
        "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "out": out,
        **vars(trainer),
    }


def test_sigterm_saves_stops_and_resumes_with_the_same_data_and_weights(tmp_path, reference):
    out = tmp_path / "out"
    previous = signal.getsignal(signal.SIGTERM)
    first = build_trainer(str(out), trainer_cls=RecordingTrainer, callbacks=[SignalAtStep(2)], save_strategy="no")
    first.batches = []
    with pytest.raises(TrainingPreempted, match="stopped by SIGTERM after step 2") as info:
        first.train(resume_from_checkpoint="auto")
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    assert info.value.checkpoint == str(out / "checkpoint-2") and info.value.global_step == 2
    assert checkpoint_problem(str(out / "checkpoint-2")) is None  # saved although save_strategy="no"
    assert not (out / STAGING_DIR).exists()

    second = build_trainer(str(out), trainer_cls=RecordingTrainer, save_strategy="no")
    second.batches = []
    second.train(resume_from_checkpoint="auto")
    assert second.state.global_step == MAX_STEPS
    # no repeated or skipped batch: the two runs together saw exactly the uninterrupted run's batches, in order
    assert first.batches + second.batches == reference["batches"]
    assert len(first.batches) == 2
    _assert_same_weights(second.model.state_dict(), reference["weights"])


def test_second_signal_exits_at_once_without_saving():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the first signal only sets the flag, the second ends the process at once
        os.close(read)
        sys.stderr = open(write, "w", buffering=1)  # noqa: SIM115 (this process ends with os._exit)
        resumer = CheckpointResumer()
        resumer.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        ok = resumer.received == "SIGUSR1"
        if ok:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        os._exit(0 if ok else 1)  # not reached when the second signal works
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        stderr = f.read()
    assert os.WEXITSTATUS(status) == 128 + signal.SIGTERM, stderr
    assert "SIGUSR1 received: finishing the current step" in stderr and "exiting now, without saving" in stderr


def _copy_checkpoints(reference, tmp_path: Path, steps=(1, 2, 3)) -> Path:
    import shutil

    out = tmp_path / "out"
    for step in steps:
        shutil.copytree(reference["out"] / f"checkpoint-{step}", out / f"checkpoint-{step}")
    return out


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda c: (c / "optimizer.pt").unlink(), "`optimizer.pt` is missing"),
        (lambda c: os.truncate(c / "model.safetensors", 2000), "`model.safetensors` is truncated"),
        (lambda c: os.truncate(c / "rng_state.pth", 100), "`rng_state.pth` is truncated"),
        (lambda c: (c / "trainer_state.json").write_text('{"global_st'), "`trainer_state.json` is truncated"),
        (lambda c: (c / "trainer_state.json").unlink(), "`trainer_state.json` is missing"),
        (lambda c: (c / "scheduler.pt").write_bytes(b""), "`scheduler.pt` is empty"),
        (lambda c: (c / "training_args.bin").unlink(), "`training_args.bin` is missing"),
    ],
    ids=["missing_optimizer", "truncated_weights", "truncated_rng", "truncated_state", "no_state", "empty", "no_args"],
)
def test_incomplete_checkpoint_is_skipped_with_a_warning_and_kept(tmp_path, reference, damage, expected):
    out = _copy_checkpoints(reference, tmp_path)
    damage(out / "checkpoint-3")
    files_before = sorted(p.name for p in (out / "checkpoint-3").iterdir())
    with pytest.warns(IncompleteCheckpointWarning, match=f"checkpoint-3: {expected}"):
        found = find_resumable_checkpoint(str(out))
    assert found.path == str(out / "checkpoint-2") and found.step == 2
    assert [s.path for s in found.skipped] == [str(out / "checkpoint-3")] and expected in found.skipped[0].reason
    assert sorted(p.name for p in (out / "checkpoint-3").iterdir()) == files_before  # left on disk as it was


def test_sharded_and_adapter_weights_are_checked(tmp_path, reference):
    out = _copy_checkpoints(reference, tmp_path, steps=(1,))
    folder = out / "checkpoint-1"
    assert checkpoint_problem(str(folder)) is None
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_problem(str(folder)) == "`model-00002-of-00002.safetensors` is missing"
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model-00001-of-00002.safetensors").rename(folder / "adapter_model.safetensors")
    assert checkpoint_problem(str(folder)) is None
    os.truncate(folder / "adapter_model.safetensors", 100)
    assert "`adapter_model.safetensors` is truncated" in checkpoint_problem(str(folder))


def test_model_only_checkpoints(tmp_path, reference):
    out = _copy_checkpoints(reference, tmp_path, steps=(1,))
    folder = out / "checkpoint-1"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (folder / name).unlink()
    assert checkpoint_problem(str(folder)) is None  # as `save_only_model=True` writes it
    assert checkpoint_problem(str(folder), save_only_model=False) == "`optimizer.pt` is missing"
    assert find_resumable_checkpoint(str(out), save_only_model=True, warn=False).step == 1


def test_auto_resumes_past_an_incomplete_checkpoint_and_replaces_it_without_deleting(tmp_path, reference):
    out = _copy_checkpoints(reference, tmp_path)
    (out / "checkpoint-3" / "optimizer.pt").unlink()  # a crash mid-save from before atomic checkpoints
    (out / STAGING_DIR / "checkpoint-4").mkdir(parents=True)  # and a partial write of the staging kind
    trainer = build_trainer(str(out), save_total_limit=1)
    with pytest.warns(IncompleteCheckpointWarning, match="checkpoint-3: `optimizer.pt` is missing"):
        trainer.train(resume_from_checkpoint="auto")
    _assert_same_weights(trainer.model.state_dict(), reference["weights"])
    # save_total_limit=1 rotated the complete checkpoints only; the incomplete one was kept aside, not deleted
    names = sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".")))
    assert names == ["checkpoint-3.replaced-0", f"checkpoint-{MAX_STEPS}"], names
    assert not (out / "checkpoint-3.replaced-0" / "optimizer.pt").exists()


def test_rotation_never_deletes_the_newest_complete_checkpoint(tmp_path, reference):
    out = _copy_checkpoints(reference, tmp_path)
    (out / "checkpoint-3" / "scheduler.pt").unlink()
    deleted = rotate_complete_checkpoints(str(out), save_total_limit=1)
    assert deleted == [str(out / "checkpoint-1")]
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-3").is_dir()


def test_no_checkpoint_starts_fresh_and_says_so(tmp_path, caplog):
    trainer = build_trainer(str(tmp_path / "out"), max_steps=1)
    assert trainer.resolve_resume_checkpoint("auto") is None
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        trainer.resolve_resume_checkpoint(True)


def test_bad_resume_from_checkpoint_gives_clear_errors_and_deletes_nothing(tmp_path, reference):
    out = _copy_checkpoints(reference, tmp_path, steps=(1,))
    trainer = build_trainer(str(tmp_path / "other"), max_steps=1)
    with pytest.raises(ValueError, match="does not exist. Give an existing `checkpoint-N` folder"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "nope"))
    not_a_checkpoint = tmp_path / "notes"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not a complete checkpoint: `trainer_state.json` is missing"):
        trainer.train(resume_from_checkpoint=str(not_a_checkpoint))
    assert (not_a_checkpoint / "notes.txt").read_text() == "keep me"

    tokenizer = make_tokenizer()
    wider = DistillationTrainer(
        model=make_model(len(tokenizer), hidden_size=48, seed=1),
        teacher_model=make_model(len(tokenizer), hidden_size=48, seed=2),
        args=trainer.args,
        train_dataset=lm_dataset(16),
        processing_class=tokenizer,
    )
    files_before = sorted(p.name for p in (out / "checkpoint-1").iterdir())
    mismatch = r"tensor `\S+` has shape \(\d+, 32\) in `model.safetensors` but \(\d+, 48\) in the model"
    with pytest.raises(ValueError, match=mismatch):
        wider.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert sorted(p.name for p in (out / "checkpoint-1").iterdir()) == files_before
    assert wider.state.global_step == 0


# Kill -9 at random moments, then rerun ---------------------------------------------------------------------------


class Run:
    """A worker subprocess whose stdout markers (`STEP n`, `IN_SAVE n`) are read as they come."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.process = subprocess.Popen(
            [sys.executable, WORKER, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.stderr = ""
        self.event = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            with self.event:
                self.lines.append(line.strip())
                self.event.notify_all()

    def _read_stderr(self):
        self.stderr = self.process.stderr.read()

    def wait_for(self, prefix: str, timeout: float = 120) -> str | None:
        """The first marker starting with `prefix`; `None` if the run ended without one."""
        deadline = time.monotonic() + timeout
        with self.event:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                if self.process.poll() is not None or time.monotonic() > deadline:
                    return None
                self.event.wait(0.05)

    def kill(self) -> int:
        self.process.kill()  # SIGKILL
        return self.process.wait(timeout=60)

    def finish(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout=timeout)
        time.sleep(0.1)
        return code


def _env(**extra: str) -> dict[str, str]:
    return subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", **extra)


def _visible_checkpoints_are_complete(out: Path) -> None:
    found = find_resumable_checkpoint(str(out), warn=False)
    assert found.skipped == [], f"an incomplete checkpoint became visible: {found.skipped}"


@pytest.mark.slow  # subprocesses: ~30-50 s each on 2 CPU cores
def test_sigkill_at_random_moments_then_rerun_ends_with_the_uninterrupted_weights(tmp_path, reference):
    rng = random.Random(SEED)
    out = tmp_path / "out"
    argv, env = ["api", str(out)], _env(RESUME_WORKER_SAVE_SLEEP="1")
    # 1: in the middle of writing a checkpoint (the model is written, the optimizer not yet)
    run = Run(argv, env)
    assert run.wait_for(f"IN_SAVE {rng.randint(1, 3)}"), (SEED, run.stderr[-3000:])
    run.kill()
    _visible_checkpoints_are_complete(out)
    assert (out / STAGING_DIR).is_dir()  # the partial write stayed hidden
    # 2: during a step, a random moment after it started
    run = Run(argv, _env(RESUME_WORKER_STEP_SLEEP="0.3"))
    assert run.wait_for(f"STEP {rng.randint(3, MAX_STEPS - 1)}"), (SEED, run.stderr[-3000:])
    time.sleep(rng.uniform(0, 0.5))
    run.kill()
    _visible_checkpoints_are_complete(out)
    # then the same command until it finishes
    run = Run(argv, _env())
    assert run.finish() == 0, (SEED, run.stderr[-3000:])
    assert "DONE" in run.lines
    _assert_same_weights(_weights(out), reference["weights"])


@pytest.fixture(scope="module")
def cli_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_cli_assets")
    tokenizer = make_tokenizer()
    for model, name in (
        (make_model(len(tokenizer), seed=1), "student"),
        (make_model(len(tokenizer), 48, seed=2), "t"),
    ):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    with open(root / "train.jsonl", "w") as f:
        for text in lm_dataset(16)["text"]:
            f.write(json.dumps({"text": text}) + "\n")
    return [
        "--model_name_or_path", str(root / "student"), "--teacher_model_name_or_path", str(root / "t"),
        "--dataset_name", str(root / "train.jsonl"), "--max_steps", str(MAX_STEPS), "--save_steps", "1",
        "--per_device_train_batch_size", "2", "--max_length", "32", "--optim", "sgd", "--learning_rate", "0.5",
        "--alpha", "0.3", "--temperature", "2.0", "--use_cpu", "True", "--bf16", "False", "--report_to", "none",
        "--gradient_checkpointing", "False", "--dataloader_pin_memory", "False", "--attn_implementation", "eager",
        "--logging_steps", "1", "--seed", "0",
    ]  # fmt: skip


@pytest.mark.slow  # subprocesses: ~30-50 s each on 2 CPU cores
def test_cli_sigterm_then_three_sigkills_then_rerun_ends_with_the_uninterrupted_weights(tmp_path, cli_assets):
    rng = random.Random(SEED + 1)
    out = tmp_path / "out"
    argv = ["cli", "distill", *cli_assets, "--output_dir", str(out), "--resume_from_checkpoint", "auto"]
    # SIGTERM: the step finishes, a checkpoint is written, the documented exit code and message
    run = Run(argv, _env(RESUME_WORKER_STEP_SLEEP="0.3"))
    # meanwhile (the subprocess is importing) the uninterrupted run, here; saving does not change the weights
    reference_args = [*cli_assets, "--output_dir", str(tmp_path / "reference"), "--save_strategy", "no"]
    assert main(["distill", *reference_args]) == 0
    expected = _weights(tmp_path / "reference")
    assert run.wait_for("STEP 2"), (SEED, run.stderr[-3000:])
    os.kill(run.process.pid, signal.SIGTERM)
    assert run.finish() == PREEMPTED_EXIT_CODE, (SEED, run.stderr[-3000:])
    assert "training stopped by SIGTERM after step" in run.stderr and "Rerun the same command" in run.stderr
    saved = find_resumable_checkpoint(str(out), warn=False)
    assert saved.step is not None and saved.step >= 2 and saved.skipped == []
    # three SIGKILLs at random moments: mid-checkpoint-write, mid-step, and any time after the start
    kills = [("IN_SAVE", "RESUME_WORKER_SAVE_SLEEP"), ("STEP", "RESUME_WORKER_STEP_SLEEP"), (None, None)]
    for marker, slow in kills:
        run = Run(argv, _env(**({slow: "0.5"} if slow else {})))
        if marker is None:
            time.sleep(rng.uniform(2, 12))
        else:
            run.wait_for(marker)  # the first one after resuming
            time.sleep(rng.uniform(0, 0.3))
        run.kill()
        _visible_checkpoints_are_complete(out)
    run = Run(argv, _env())
    assert run.finish() == 0, (SEED, run.stderr[-3000:])
    _assert_same_weights(_weights(out), expected)


def test_peft_student_preempted_and_resumed_matches_uninterrupted(tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")

    def run(out: Path, callbacks=None, **overrides) -> DistillationTrainer:
        tokenizer = make_tokenizer()
        trainer = DistillationTrainer(
            model=make_model(len(tokenizer), seed=1),
            teacher_model=make_model(len(tokenizer), hidden_size=48, seed=2),
            args=config(str(out), max_steps=4, learning_rate=0.05, **overrides),
            train_dataset=lm_dataset(16),
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=callbacks,
        )
        return trainer

    first = run(tmp_path / "out", [SignalAtStep(2)], save_strategy="no")  # the signal alone saves
    with pytest.raises(TrainingPreempted):
        first.train(resume_from_checkpoint="auto")
    saved = tmp_path / "out" / "checkpoint-2"
    assert (saved / "adapter_model.safetensors").is_file() and not (saved / "model.safetensors").exists()
    assert checkpoint_problem(str(saved)) is None
    resumed = run(tmp_path / "out", save_strategy="no")
    resumed.train(resume_from_checkpoint="auto")
    straight = run(tmp_path / "straight", save_strategy="no")
    straight.train()
    expected = {k: v for k, v in straight.model.state_dict().items() if "lora" in k}
    assert len(expected) == 8
    _assert_same_weights({k: v for k, v in resumed.model.state_dict().items() if "lora" in k}, expected)


def test_cli_bad_resume_from_checkpoint_is_one_error_line(tmp_path, cli_assets, capsys):
    argv = ["distill", *cli_assets, "--output_dir", str(tmp_path / "out")]
    assert main([*argv, "--resume_from_checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hf-distill distill: error: argument --resume_from_checkpoint: ") and "does not exist" in err
    assert not (tmp_path / "out" / "checkpoint-1").exists()


@pytest.mark.slow
def test_two_processes_stop_together_when_one_is_signalled_and_resume(tmp_path):
    """DDP over gloo: SIGTERM to rank 1 alone stops both ranks at the same step with one checkpoint holding both RNG
    states; the rerun ends with the weights of an uninterrupted two-process run."""
    import re
    import socket

    from safetensors.torch import load_file
    from tiny import subprocess_env

    worker = str(Path(__file__).parent / "resume_worker.py")
    env = subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", RESUME_WORKER_STEP_SLEEP="0.3")

    def torchrun(output_dir: Path) -> subprocess.Popen:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               worker, "api", str(output_dir)]  # fmt: skip
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    reference = torchrun(tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stdout.read()[-3000:]

    run = torchrun(tmp_path / "run")
    pids, lines = {}, []
    for line in run.stdout:
        lines.append(line)
        match = re.match(r"RANK (\d) PID (\d+)", line)
        if match:
            pids[int(match.group(1))] = int(match.group(2))
        if line.startswith("STEP 3") and 1 in pids:
            os.kill(pids[1], signal.SIGTERM)
            break
    lines += run.stdout.readlines()
    assert run.wait(timeout=300) != 0, "".join(lines)[-3000:]  # preempted: the launcher reports the stop
    complete = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert complete, "".join(lines)[-3000:]
    last = complete[-1]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in last.iterdir()}
    stopped = int(last.name.split("-")[1])
    assert 2 <= stopped < 6

    rerun = torchrun(tmp_path / "run")
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, output[-3000:]
    expected = load_file(tmp_path / "reference" / "model.safetensors")
    actual = load_file(tmp_path / "run" / "model.safetensors")
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=1e-6)


def test_second_ctrl_c_interrupts_like_python_does():
    """Ctrl-C twice raises KeyboardInterrupt (a notebook kernel survives it) instead of ending the process."""
    resumer = CheckpointResumer()
    resumer.install_signal_handlers()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert resumer.received == "SIGINT" and not resumer.preempted  # the first: finish the step, then save
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        resumer.restore_signal_handlers()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

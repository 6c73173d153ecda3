"""GPU-only checks (fp16/bf16 mixed precision, the chunked loss on CUDA). Skipped on machines without CUDA."""

from __future__ import annotations

import pytest
import torch
from test_trainer import config, peaky_teacher
from tiny import lm_dataset, make_model, make_tokenizer, subprocess_env

from hf_distill import DistillationTrainer
from hf_distill.losses import HiddenStateTeacher, LMHead, chunked_distillation_loss, token_divergence

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_chunked_loss_on_cuda_matches_cpu():
    torch.manual_seed(0)
    hidden, weight = torch.randn(300, 64), torch.randn(1000, 64) * 0.1
    teacher_hidden, teacher_weight = torch.randn(300, 96), torch.randn(1000, 96) * 0.1
    results = []
    for device in ("cpu", "cuda"):
        h = hidden.to(device).requires_grad_()
        out = chunked_distillation_loss(
            h,
            LMHead(weight.to(device)),
            HiddenStateTeacher(teacher_hidden.to(device), LMHead(teacher_weight.to(device))),
            divergence="generalized_jsd",
            temperature=2.0,
            chunk_size=64,
        )
        (grad,) = torch.autograd.grad(out.loss, h)
        results.append((out.loss.cpu(), grad.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-3, atol=1e-6)
    reference = token_divergence(hidden @ weight.T, teacher_hidden @ teacher_weight.T, "generalized_jsd", 2.0)
    torch.testing.assert_close(results[0][0], 4.0 * reference.mean(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda(tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("bf16 not supported on this GPU")
    tokenizer = make_tokenizer()
    args = config(tmp_path, max_steps=20, per_device_train_batch_size=8, learning_rate=3e-3, **{precision: True})
    trainer = DistillationTrainer(
        model=make_model(len(tokenizer), seed=1),
        teacher_model=peaky_teacher(len(tokenizer)),
        args=args,
        train_dataset=lm_dataset(8),
        processing_class=tokenizer,
    )
    assert trainer.model.device.type == "cuda" and trainer.teacher_model.device.type == "cuda"
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_fsdp2_preset_one_process_matches_plain_run(tmp_path):
    """`--accelerate_config fsdp2` on one GPU: student sharded by accelerate, teacher by `fully_shard_teacher`, both on
    the GPU; the same losses and weights as a run without FSDP (float32, one process: the shards are whole)."""
    import json
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    tokenizer = make_tokenizer()
    student, teacher = make_model(len(tokenizer), seed=1), make_model(len(tokenizer), hidden_size=48, seed=2)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8)
    for model, name in ((student, "student"), (teacher, "teacher")):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    with open(tmp_path / "train.jsonl", "w") as f:
        for text in lm_dataset(12)["text"]:
            f.write(json.dumps({"text": text}) + "\n")
    common = [
        "distill", "--model_name_or_path", str(tmp_path / "student"),
        "--teacher_model_name_or_path", str(tmp_path / "teacher"), "--dataset_name", str(tmp_path / "train.jsonl"),
        "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--optim", "sgd",
        "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--alpha", "0.3",
        "--temperature", "2.0", "--bf16", "False", "--attn_implementation", "eager",
        "--per_device_train_batch_size", "4",
    ]  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = subprocess_env()
    runs = {
        "plain": [*common, "--output_dir", str(tmp_path / "plain")],
        "fsdp2": [*common, "--output_dir", str(tmp_path / "fsdp2"), "--accelerate_config", "fsdp2",
                  "--num_processes", "1", "--mixed_precision", "no", "--main_process_port", str(port)],
    }  # fmt: skip
    for name, argv in runs.items():
        result = subprocess.run(
            [sys.executable, "-m", "hf_distill.cli.main", *argv], capture_output=True, text=True, env=env, timeout=300
        )
        assert result.returncode == 0, f"{name}:\n{result.stderr[-4000:]}"
    logs = {
        name: [log["loss"] for log in json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
               if "loss" in log]
        for name in runs
    }  # fmt: skip
    torch.testing.assert_close(torch.tensor(logs["fsdp2"]), torch.tensor(logs["plain"]), rtol=1e-4, atol=1e-6)
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    fsdp2 = load_file(tmp_path / "fsdp2" / "model.safetensors")
    for key, value in plain.items():
        torch.testing.assert_close(fsdp2[key].float(), value.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_teacher_quantized_with_bitsandbytes(tmp_path, bits):
    """A teacher loaded in 8/4-bit through `teacher_model_init_kwargs` trains a student; its loss is close to the
    full-precision teacher's."""
    pytest.importorskip("bitsandbytes")
    from test_trainer import peaky_teacher

    tokenizer = make_tokenizer()
    teacher = peaky_teacher(len(tokenizer))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    losses = {}
    for name, kwargs in {"full": None, "quantized": {"quantization_config": {f"load_in_{bits}bit": True}}}.items():
        args = config(tmp_path / name, max_steps=10, learning_rate=3e-3, teacher_model_init_kwargs=kwargs)
        trainer = DistillationTrainer(
            model=make_model(len(tokenizer), seed=1), teacher_model=str(tmp_path / "teacher"), args=args,
            train_dataset=lm_dataset(8), processing_class=tokenizer,
        )  # fmt: skip
        if name == "quantized":
            assert getattr(trainer.teacher_model, f"is_loaded_in_{bits}bit")
        trainer.train()
        losses[name] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses["quantized"][-1] < losses["quantized"][0]
    assert losses["quantized"][0] == pytest.approx(losses["full"][0], rel=0.1)


def test_bitnet_student_trains_in_bf16_on_cuda_and_its_packed_export_loads_there(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_distill import BitNetCallback
    from hf_distill.export import export_packed

    tokenizer = make_tokenizer()
    trainer = DistillationTrainer(
        model=make_model(len(tokenizer)),
        teacher_model=peaky_teacher(len(tokenizer)),
        args=config(tmp_path, max_steps=20, bf16=True, learning_rate=3e-3),
        train_dataset=lm_dataset(32),
        processing_class=tokenizer,
        callbacks=[BitNetCallback(schedule="linear", warmup_steps=5)],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    model = trainer.model.eval()
    ids = torch.tensor([tokenizer("the cat sat on the mat")["input_ids"]], device=model.device)
    with torch.no_grad():
        expected = model(ids).logits.float()
    export_packed(model, tmp_path / "packed", tokenizer=tokenizer, dtype=torch.float32)
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", device_map="cuda")
    with torch.no_grad():
        got = packed(ids.to("cuda")).logits.float()
    assert ((got.cpu() - expected.cpu()).norm() / expected.norm().cpu()) < 5e-3


def test_on_policy_steps_with_vllm_colocate(tmp_path, monkeypatch):
    """`use_vllm=True`, colocate mode: a real vLLM engine samples the student's completions, synced every step."""
    pytest.importorskip("vllm")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, to load the weights
    tokenizer = make_tokenizer()
    path = tmp_path / "student"  # colocate mode builds the engine from the student's folder
    # head size 64 and bf16 on disk: shapes and a dtype every vLLM attention backend takes
    make_model(len(tokenizer), hidden_size=256, seed=1, dtype=torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    prompts = {"prompt": ["the cat sat", "a dog ran to", "the bird saw", "one red"] * 4}
    vllm = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.2}
    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        teacher_model=peaky_teacher(len(tokenizer)),
        args=config(tmp_path, max_steps=3, bf16=True, lmbda=1.0, max_new_tokens=8, **vllm),
        train_dataset=Dataset.from_dict(prompts),
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer._generator.vllm.engine is not None and trainer._generator.counts["student"] == 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all(h["on_policy"] == 1.0 for h in trainer.state.log_history if "loss" in h)


def test_cache_training_on_cuda_in_dataloader_workers_with_pinned_targets(tmp_path):
    """On CUDA the collator's targets are pinned by the DataLoader and copied without waiting; 2 workers train like
    the in-process lookup."""
    from test_cache_training import make_trainer, train_losses

    from hf_distill.teachers.cached_batches import CACHED_TARGETS_KEY

    writer = make_trainer(tmp_path / "writer")
    assert writer.teacher_model.device.type == "cuda"
    cache = writer.write_teacher_cache(tmp_path / "root", k=16, show_progress=False)
    losses = {}
    for workers in (0, 2):
        trainer = make_trainer(
            tmp_path / f"w{workers}", teacher=False, teacher_cache=str(cache.path), dataloader_num_workers=workers
        )
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["input_ids"].device.type == "cuda"
        assert batch[CACHED_TARGETS_KEY].token_ids.device.type == "cpu"
        assert batch[CACHED_TARGETS_KEY].token_ids.is_pinned()
        losses[workers] = train_losses(trainer)
    assert all(torch.isfinite(torch.tensor(losses[0])))
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)

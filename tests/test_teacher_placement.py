"""Where the teacher goes: sharded with FSDP2 (run for real over gloo on CPU), replicated, or refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from tiny import make_model, subprocess_env

from hf_distill.teachers.placement import fully_shard_teacher, place_teacher

HERE = Path(__file__).parent


def test_fsdp2_sharded_teacher_gives_the_same_loss_and_keeps_layers_sharded(tmp_path):
    env = subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on CPUs
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29544",
         str(HERE / "fsdp_teacher_worker.py"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # every step, including one after the layers were resharded, equals the whole teacher's loss and gradient
        assert report["sharded_losses"] == pytest.approx([report["reference_loss"]] * 2, rel=1e-6)
        assert report["max_grad_diff"] < 1e-7
        # between steps each process holds half of every decoder layer
        assert report["layers_sharded_between_steps"]
        assert report["layer_local_fraction"] == pytest.approx(0.5, abs=0.02)


def _accelerator(kind: str, **state) -> SimpleNamespace:
    return SimpleNamespace(
        distributed_type=kind, is_fsdp2=False, device=torch.device("cpu"), state=SimpleNamespace(**state),
        prepare_model=lambda model, evaluation_mode: ("prepared", model, evaluation_mode),
    )  # fmt: skip


def test_teacher_device_wins_and_ddp_goes_through_prepare_model():
    teacher = make_model(50, seed=0)
    assert place_teacher(teacher, _accelerator(DistributedType.MULTI_GPU), "cpu") is teacher
    assert place_teacher(teacher, _accelerator(DistributedType.MULTI_GPU)) == ("prepared", teacher, True)


def test_zero3_is_refused_with_a_way_out():
    accelerator = _accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=SimpleNamespace(zero_stage=3))
    with pytest.raises(NotImplementedError, match="ZeRO-3.*fsdp2"):
        place_teacher(make_model(50, seed=0), accelerator)


def test_fsdp1_replicates_the_teacher_with_a_warning():
    teacher = make_model(50, seed=0).train()
    with pytest.warns(UserWarning, match="FSDP1 the teacher is not sharded"):
        placed = place_teacher(teacher, _accelerator(DistributedType.FSDP))
    assert placed is teacher and not placed.training


def test_fully_shard_refuses_a_teacher_without_layer_units():
    with pytest.raises(ValueError, match="fsdp_transformer_layer_cls_to_wrap"):
        fully_shard_teacher(make_model(50, seed=0), layer_class_names={"NoSuchLayer"})


def _teacher_on_disk(tmp_path):
    from test_trainer import peaky_teacher
    from tiny import make_tokenizer

    tokenizer = make_tokenizer()
    peaky_teacher(len(tokenizer)).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    return tokenizer, str(tmp_path / "teacher")


def _first_loss(tmp_path, name, teacher_path, tokenizer, **init_kwargs):
    from test_trainer import config
    from tiny import lm_dataset

    from hf_distill import DistillationTrainer

    args = config(tmp_path / name, teacher_model_init_kwargs=init_kwargs or None, alpha=0.2, temperature=2.0)
    trainer = DistillationTrainer(
        model=make_model(len(tokenizer), seed=1), teacher_model=teacher_path, args=args,
        train_dataset=lm_dataset(8), processing_class=tokenizer,
    )  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss = trainer.compute_loss(trainer.model, batch)
    (grad,) = torch.autograd.grad(loss, trainer.model.lm_head.weight)
    return trainer, loss.detach(), grad


def test_teacher_offloaded_to_disk_by_a_device_map_gives_the_same_loss(tmp_path):
    tokenizer, path = _teacher_on_disk(tmp_path)
    _, loss, grad = _first_loss(tmp_path, "whole", path, tokenizer)
    offload = {"device_map": "auto", "max_memory": {"cpu": 20_000}, "offload_folder": str(tmp_path / "offload")}
    trainer, offloaded_loss, offloaded_grad = _first_loss(tmp_path, "offloaded", path, tokenizer, **offload)
    assert "disk" in set(trainer.teacher_model.hf_device_map.values())  # the teacher really is offloaded
    assert trainer.teacher_model.lm_head.weight.device.type == "meta"
    torch.testing.assert_close(offloaded_loss, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(offloaded_grad, grad, rtol=1e-5, atol=1e-8)
    trainer.train()  # and a whole training run goes through
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)

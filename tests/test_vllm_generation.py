"""`use_vllm=True`: the student's on-policy samples come from TRL's `VLLMGeneration` (faked here: no vLLM on CPU).

The fake records its constructor arguments and calls and returns fixed completion ids; the trainer must sync the
student's weights before generating, pass the batch's prompts and the sampling settings, and train on exactly the
returned tokens. A real vLLM engine is exercised in `tests/test_gpu.py`.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from tiny import make_model, make_tokenizer

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.generation import vllm_backend

PAIRS = {"prompt": ["the cat sat", "a dog ran to", "the bird saw", "one red"] * 3,
         "completion": [" on the mat", " the park", " a big tree", " bird"] * 3}  # fmt: skip


class FakeVLLMGeneration:
    """Stands in for `trl.generation.vllm_generation.VLLMGeneration`: records, and answers `completion` per prompt."""

    instances: list[FakeVLLMGeneration] = []
    completion: list[int] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple] = []
        FakeVLLMGeneration.instances.append(self)

    def sync_weights(self):
        weights = torch.cat([p.detach().flatten().cpu() for p in self.kwargs["model"].parameters()])
        self.calls.append(("sync", weights.clone()))

    def generate(self, prompts, images, num_generations, profiler=None):
        assert images is None and num_generations == 1
        self.calls.append(("generate", [list(p) for p in prompts]))
        return prompts, [list(self.completion) for _ in prompts], None, None


@pytest.fixture
def fake_vllm(monkeypatch):
    FakeVLLMGeneration.instances = []
    tokenizer = make_tokenizer()
    sky, moon, dog = tokenizer.convert_tokens_to_ids(["sky", "moon", "dog"])
    # everything after the first EOS is cut, as on the `transformers` path
    FakeVLLMGeneration.completion = [sky, moon, tokenizer.eos_token_id, dog]
    monkeypatch.setattr(vllm_backend, "vllm_installed", lambda: True)
    monkeypatch.setattr(vllm_backend, "import_vllm_generation", lambda: FakeVLLMGeneration)
    return FakeVLLMGeneration


def _config(tmp_path, **overrides) -> DistillationConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, report_to="none",
        save_strategy="no", bf16=False, use_cpu=True, max_length=64, dataloader_pin_memory=False, seed=0,
        logging_steps=1, learning_rate=1e-2, max_new_tokens=5, use_vllm=True, vllm_mode="server",
    )  # fmt: skip
    values.update(overrides)
    return DistillationConfig(**values)


def _trainer(tmp_path, dataset=None, student=None, **overrides):
    tokenizer = make_tokenizer()
    student = student if student is not None else make_model(len(tokenizer), seed=1)

    def no_hf_generate(*args, **kwargs):
        raise AssertionError("the student must not generate with transformers when use_vllm=True")

    student.generate = no_hf_generate
    return DistillationTrainer(
        model=student,
        teacher_model=make_model(len(tokenizer), seed=2),
        args=_config(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else Dataset.from_dict(PAIRS),
        processing_class=tokenizer,
    )


def _record_loss_inputs(trainer) -> list[dict[str, torch.Tensor]]:
    seen = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        seen.append({k: v.clone() for k, v in inputs.items() if k in ("input_ids", "labels", "attention_mask")})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    return seen


def test_lmbda_one_syncs_then_generates_with_vllm_and_trains_on_its_completions(tmp_path, fake_vllm):
    trainer = _trainer(tmp_path, lmbda=1.0, generation_temperature=0.7, top_p=0.9, top_k=20, min_p=0.05,
                       repetition_penalty=1.1, generation_kwargs={"seed": 3})  # fmt: skip
    seen = _record_loss_inputs(trainer)
    trainer.train()

    (engine,) = fake_vllm.instances
    assert engine.kwargs["model"] is trainer.model and engine.kwargs["accelerator"] is trainer.accelerator
    eos = make_tokenizer().eos_token_id
    expected = {
        "mode": "server", "temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
        "max_completion_length": 5, "logprobs": None, "tensor_parallel_size": 1, "gpu_memory_utilization": 0.3,
        "max_num_seqs": 4, "model_impl": "vllm", "server_port": 8000,
        "generation_kwargs": {"seed": 3, "stop_token_ids": [eos]},
    }  # fmt: skip
    assert {key: engine.kwargs[key] for key in expected} == expected
    # one optimizer step per micro-batch: the weights are synced before every generation, and they changed
    assert [name for name, _ in engine.calls] == ["sync", "generate"] * 3
    syncs = [weights for name, weights in engine.calls if name == "sync"]
    assert not torch.equal(syncs[0], syncs[1]) and not torch.equal(syncs[1], syncs[2])

    tokenizer = make_tokenizer()
    dataset_prompts = {tuple(tokenizer(p)["input_ids"]) for p in PAIRS["prompt"]}
    completion = fake_vllm.completion[:3]  # cut after the EOS
    generations = [prompts for name, prompts in engine.calls if name == "generate"]
    assert len(seen) == 3
    for prompts, batch in zip(generations, seen):
        assert len(prompts) == 4 and {tuple(p) for p in prompts} <= dataset_prompts
        for row, prompt in enumerate(prompts):  # each trained row is the prompt then the fake's completion
            length = int(batch["attention_mask"][row].sum())
            assert batch["input_ids"][row, :length].tolist() == prompt + completion
            labels = batch["labels"][row]
            assert labels[labels != -100].tolist() == completion
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all(math.isfinite(log["loss"]) for log in logs) and all(log["on_policy"] == 1.0 for log in logs)


def test_weights_are_synced_once_per_optimizer_step(tmp_path, fake_vllm):
    trainer = _trainer(tmp_path, lmbda=1.0, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer.train()
    (engine,) = fake_vllm.instances
    assert [name for name, _ in engine.calls] == ["sync", "generate", "generate"] * 2
    assert engine.kwargs["max_num_seqs"] == 4


def test_mixed_lmbda_uses_vllm_only_for_the_student_batches(tmp_path, fake_vllm):
    trainer = _trainer(tmp_path, lmbda=0.5, max_steps=6)
    trainer.train()
    counts = trainer._generator.counts
    assert 0 < counts["student"] < 6 and counts["teacher"] == 0
    generations = [call for call in fake_vllm.instances[0].calls if call[0] == "generate"]
    assert len(generations) == counts["student"]


def test_prompt_only_dataset_defaults_to_vllm_on_policy(tmp_path, fake_vllm):
    dataset = Dataset.from_dict({"prompt": PAIRS["prompt"]})
    trainer = _trainer(tmp_path, dataset, max_steps=2)
    trainer.train()
    assert trainer.args.lmbda == 1.0 and trainer._generator.counts["student"] == 2


def test_colocate_mode_needs_a_student_with_a_path(tmp_path, fake_vllm):
    trainer = _trainer(tmp_path, lmbda=1.0, vllm_mode="colocate", max_steps=1)
    with pytest.raises(ValueError, match="name_or_path"):
        trainer.train()


def test_colocate_mode_passes_its_engine_settings(tmp_path, fake_vllm):
    student = make_model(len(make_tokenizer()), seed=1)
    student.name_or_path = str(tmp_path / "student")  # as set by from_pretrained
    engine = {"vllm_gpu_memory_utilization": 0.5, "vllm_max_model_length": 96, "vllm_enable_sleep_mode": True}
    trainer = _trainer(tmp_path, student=student, lmbda=1.0, vllm_mode="colocate", max_steps=1, **engine)
    trainer.train()
    kwargs = fake_vllm.instances[0].kwargs
    assert (kwargs["mode"], kwargs["gpu_memory_utilization"], kwargs["max_model_length"]) == ("colocate", 0.5, 96)
    assert kwargs["enable_sleep_mode"] is True


def test_use_vllm_without_generated_batches_is_refused(tmp_path, fake_vllm):
    trainer = _trainer(tmp_path)  # lmbda unset: 0 for a dataset with completions
    with pytest.raises(ValueError, match="lmbda > 0"):
        trainer.train()


def test_missing_vllm_is_a_clear_import_error(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_backend, "vllm_installed", lambda: False)
    with pytest.raises(ImportError, match="pip install vllm"):
        vllm_backend.import_vllm_generation()
    with pytest.raises(ImportError, match="pip install vllm"):
        _trainer(tmp_path, lmbda=1.0)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"vllm_mode": "remote"}, "vllm_mode"),
        ({"seq_kd": True}, "seq_kd"),
        ({"lmbda": 0.5, "seq_kd": True}, "seq_kd"),
        ({"lmbda": 0.0}, "lmbda > 0"),
        ({"vllm_gpu_memory_utilization": 0.0}, "vllm_gpu_memory_utilization"),
        ({"vllm_gpu_memory_utilization": 1.5}, "vllm_gpu_memory_utilization"),
        ({"vllm_tensor_parallel_size": 0}, "vllm_tensor_parallel_size"),
        ({"vllm_max_model_length": 0}, "vllm_max_model_length"),
        ({"vllm_server_timeout": 0}, "vllm_server_timeout"),
    ],
)
def test_config_validation(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **overrides)


def test_config_defaults_match_trl_and_leave_generation_alone(tmp_path):
    from trl import DistillationConfig as TRLDistillationConfig

    ours = DistillationConfig(output_dir=str(tmp_path), bf16=False)
    theirs = TRLDistillationConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True)
    names = [name for name in vars(theirs) if name.startswith("vllm_") or name == "use_vllm"]
    assert names and {name: getattr(ours, name) for name in names} == {name: getattr(theirs, name) for name in names}
    assert ours.use_vllm is False


def test_hf_generate_stays_the_default(tmp_path):
    tokenizer = make_tokenizer()
    trainer = DistillationTrainer(
        model=make_model(len(tokenizer), seed=1),
        teacher_model=make_model(len(tokenizer), seed=2),
        args=_config(tmp_path, use_vllm=False, lmbda=1.0, max_steps=1),
        train_dataset=Dataset.from_dict(PAIRS),
        processing_class=tokenizer,
    )
    assert trainer._generator.vllm is None
    trainer.train()

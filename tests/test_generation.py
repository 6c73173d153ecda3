"""hf_distill.generation: prompts from SFT batches, generation with the student or the teacher, rebuilt batches, the
GKD schedule (lmbda / seq_kd) and the sampling settings, on tiny local models."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import conversational_dataset, lm_dataset, make_model, make_tokenizer, prompt_completion_dataset
from transformers import GenerationConfig

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.generation import (
    GenerationSchedule,
    GenerationSettings,
    build_completion_batch,
    extract_prompts,
    generate_completions,
    on_policy_batch,
)


def make_trainer(tmp_path, dataset, **overrides) -> DistillationTrainer:
    tokenizer = make_tokenizer()
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=False,
        max_length=64,
        dataloader_pin_memory=False,
        seed=0,
    )
    values.update(overrides)
    return DistillationTrainer(
        model=make_model(len(tokenizer), seed=1),
        teacher_model=make_model(len(tokenizer), seed=2),
        args=DistillationConfig(**values),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def collated(trainer: DistillationTrainer, n: int = 4) -> dict:
    """The first `n` prepared rows, in dataset order, through the trainer's (TRL SFT) collator."""
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def greedy(max_new_tokens: int = 8, **kwargs) -> GenerationConfig:
    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0, **kwargs)


def always_emits(vocab_size: int, token_id: int, seed: int = 0, strength: float = 30.0):
    """A tiny model whose next token is `token_id` whatever the context: a zero-weight LM head with a bias."""
    model = make_model(vocab_size, seed=seed)
    head = torch.nn.Linear(model.config.hidden_size, vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = strength
    model.lm_head = head
    return model


PROMPTS = [[8, 9, 10, 11, 12], [13, 14], [15, 16, 17]]

# ----------------------------------------------------------------------------------------------------
# extract_prompts
# ----------------------------------------------------------------------------------------------------


def test_prompts_of_prompt_completion_batch_are_the_tokenized_prompts(tmp_path):
    tokenizer = make_tokenizer()
    dataset = prompt_completion_dataset()
    trainer = make_trainer(tmp_path, dataset)
    batch = collated(trainer)
    # The SFT collator right-pads: input_ids with the pad id, labels with -100, attention_mask with 0
    assert batch["attention_mask"][:, 0].all() and not batch["attention_mask"][:, -1].all()
    prompts = extract_prompts(batch, tokenizer.pad_token_id)
    assert prompts == [tokenizer(dataset[i]["prompt"])["input_ids"] for i in range(4)]


def test_prompts_of_conversational_batch_end_with_the_generation_prompt(tmp_path):
    tokenizer = make_tokenizer()
    dataset = conversational_dataset()
    trainer = make_trainer(tmp_path, dataset, assistant_only_loss=True)
    prompts = extract_prompts(collated(trainer), tokenizer.pad_token_id)
    for i, prompt in enumerate(prompts):
        expected = tokenizer.apply_chat_template(dataset[i]["messages"][:1], add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert prompt == list(expected)
        assert prompt[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_language_modeling_batch_is_refused(tmp_path):
    batch = collated(make_trainer(tmp_path, lm_dataset()))
    with pytest.raises(ValueError, match="has no prompt.*prompt-completion.*conversational"):
        extract_prompts(batch, 0)


def test_padding_free_and_packed_batches_are_refused():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]},
    ]
    padding_free = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    with pytest.raises(ValueError, match="padding-free or packed"):
        extract_prompts(padding_free, 0)
    # Position ids that restart inside a row (packing with position ids, without the flash-attention keys)
    packed = {k: padding_free[k] for k in ("input_ids", "labels", "position_ids")}
    with pytest.raises(ValueError, match="padding-free or packed"):
        extract_prompts(packed, 0)
    # Plain position ids (return_position_ids=True: one sequence per row, padding positions are 0) are fine
    with_positions = DataCollatorForLanguageModeling(pad_token_id=0, return_position_ids=True)(examples)
    assert extract_prompts(with_positions, 0) == [[5, 6], [9]]


def test_vision_language_batches_are_refused():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7]]),
        "labels": torch.tensor([[-100, 6, 7]]),
        "pixel_values": torch.zeros(1, 3, 4, 4),
    }
    with pytest.raises(ValueError, match="vision-language"):
        extract_prompts(batch, 0)


def test_prompts_with_left_padding_without_attention_mask_and_truncated_completion():
    batch = {
        "input_ids": torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9], [4, 4, 4, 0, 0]]),
        "labels": torch.tensor(
            [[-100, -100, -100, 6, 7], [-100, -100, -100, -100, 9], [-100, -100, -100, -100, -100]]
        ),
    }
    # Without attention_mask, leading/trailing pad ids are padding; a row with no labelled token is all prompt
    assert extract_prompts(batch, pad_token_id=0) == [[5], [5, 6, 7, 8], [4, 4, 4]]
    batch["attention_mask"] = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert extract_prompts(batch, pad_token_id=None) == [[5], [5, 6, 7, 8], [4, 4, 4]]


def test_multi_turn_prompt_end_first_or_last():
    # user1 [assistant1] user2 [assistant2] pad
    batch = {
        "input_ids": torch.tensor([[10, 11, 12, 13, 14, 15, 16, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, -100, 12, 13, -100, 15, 16, -100]]),
    }
    assert extract_prompts(batch, 0) == [[10, 11]]
    assert extract_prompts(batch, 0, prompt_end="last") == [[10, 11, 12, 13, 14]]


# ----------------------------------------------------------------------------------------------------
# generate_completions
# ----------------------------------------------------------------------------------------------------


def left_padded(prompts, pad=0):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_greedy_completions_are_what_generate_returns():
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), seed=3)
    config = greedy(8, eos_token_id=len(tokenizer) - 1)  # an id this model does not emit here: no early stop
    completions = generate_completions(
        model, PROMPTS, tokenizer=tokenizer, generation_config=config, max_new_tokens=None
    )
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        direct = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.size(1) :]
    assert completions == direct.tolist()
    assert all(len(c) == 8 for c in completions)
    # An unpadded prompt alone gives the same tokens as in the padded batch
    alone = generate_completions(
        model, PROMPTS[:1], tokenizer=tokenizer, generation_config=config, max_new_tokens=None
    )
    with torch.no_grad():
        single = model.generate(input_ids=torch.tensor(PROMPTS[:1]), generation_config=config)[0, 5:].tolist()
    assert alone == [single] == completions[:1]
    short = generate_completions(
        model, PROMPTS[1:2], tokenizer=tokenizer, generation_config=config, max_new_tokens=None
    )
    assert short == completions[1:2]  # left padding does not change a row's tokens


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_completions_stop_after_the_first_eos_which_is_kept(pad_is_eos):
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), seed=3)
    unused = len(tokenizer) - 1
    raw = generate_completions(
        model, PROMPTS, tokenizer=tokenizer, generation_config=greedy(8, eos_token_id=unused), max_new_tokens=None
    )
    eos = raw[1][3]  # make the fourth token of the second completion an EOS: that row stops before the others
    config = greedy(8, eos_token_id=[unused, eos])
    if pad_is_eos:  # finished rows are then padded with the EOS id itself
        config.pad_token_id = eos
    completions = generate_completions(model, PROMPTS, tokenizer=tokenizer, generation_config=config, max_new_tokens=8)
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in raw]
    assert completions == expected
    assert completions[1][-1] == eos and len(completions[1]) <= 4
    assert any(len(row) == 8 for row in completions)  # rows that never stop keep max_new_tokens tokens


def test_max_new_tokens_argument_overrides_the_config_without_modifying_it():
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), seed=3)
    config = greedy(8, eos_token_id=len(tokenizer) - 1)
    completions = generate_completions(model, PROMPTS, tokenizer=tokenizer, generation_config=config, max_new_tokens=3)
    assert [len(c) for c in completions] == [3, 3, 3]
    assert config.max_new_tokens == 8


def test_completions_come_from_the_model_passed():
    tokenizer = make_tokenizer()
    x, y = tokenizer.convert_tokens_to_ids(["cat", "dog"])
    student, teacher = always_emits(len(tokenizer), x, seed=1), always_emits(len(tokenizer), y, seed=2)
    config = GenerationSettings(max_new_tokens=4).to_generation_config(tokenizer=tokenizer, model=student)
    assert config.do_sample
    from_student = generate_completions(
        student, PROMPTS, tokenizer=tokenizer, generation_config=config, max_new_tokens=None
    )
    from_teacher = generate_completions(
        teacher, PROMPTS, tokenizer=tokenizer, generation_config=config, max_new_tokens=None
    )
    assert from_student == [[x] * 4] * 3
    assert from_teacher == [[y] * 4] * 3


def test_vocab_limit_keeps_a_larger_teacher_inside_the_student_vocabulary():
    tokenizer = make_tokenizer()
    student_vocab = len(tokenizer)
    teacher = always_emits(student_vocab + 16, student_vocab + 3)  # padded embedding rows, favouring a missing id
    config = GenerationSettings(max_new_tokens=5).to_generation_config(tokenizer=tokenizer)
    unlimited = generate_completions(
        teacher, PROMPTS, tokenizer=tokenizer, generation_config=config, max_new_tokens=None
    )
    assert all(t >= student_vocab for row in unlimited for t in row)
    limited = generate_completions(
        teacher, PROMPTS, tokenizer=tokenizer, generation_config=config, max_new_tokens=None, vocab_limit=student_vocab
    )
    assert all(0 <= t < student_vocab for row in limited for t in row)


def test_train_and_eval_modes_are_restored():
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), seed=3)
    model.train()
    model.model.layers[0].eval()  # a deliberately frozen submodule keeps its own mode
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    config = greedy(4)
    generate_completions(model, PROMPTS, tokenizer=tokenizer, generation_config=config, max_new_tokens=None)
    assert seen and not any(seen)  # generated in eval mode
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training
    model.eval()
    generate_completions(model, PROMPTS, tokenizer=tokenizer, generation_config=config, max_new_tokens=None)
    assert not any(m.training for m in model.modules())


def test_generation_does_not_track_gradients_and_works_with_gradient_checkpointing():
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), seed=3)
    model.gradient_checkpointing_enable()
    model.train()
    reference = copy.deepcopy(model).eval()
    config = greedy(6, eos_token_id=len(tokenizer) - 1)
    completions = generate_completions(
        model, PROMPTS, tokenizer=tokenizer, generation_config=config, max_new_tokens=None
    )
    expected = generate_completions(
        reference, PROMPTS, tokenizer=tokenizer, generation_config=config, max_new_tokens=None
    )
    assert completions == expected
    assert model.is_gradient_checkpointing and model.training
    assert all(p.grad is None for p in model.parameters())


def test_peft_lora_student_generates():
    from peft import LoraConfig, get_peft_model

    tokenizer = make_tokenizer()
    base = make_model(len(tokenizer), seed=3)
    reference = copy.deepcopy(base)
    student = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    )
    student.train()
    config = greedy(6, eos_token_id=len(tokenizer) - 1)
    completions = generate_completions(
        student, PROMPTS, tokenizer=tokenizer, generation_config=config, max_new_tokens=None
    )
    # A fresh LoRA adapter (B = 0) leaves the model unchanged: the same tokens as the base model
    expected = generate_completions(
        reference, PROMPTS, tokenizer=tokenizer, generation_config=config, max_new_tokens=None
    )
    assert completions == expected
    assert student.training
    # ... and a trained adapter (B != 0) is used by generation
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(std=5.0)
    changed = generate_completions(
        student, PROMPTS, tokenizer=tokenizer, generation_config=config, max_new_tokens=None
    )
    assert changed != expected


def test_wrapped_model_is_unwrapped():
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), seed=3)
    config = greedy(5, eos_token_id=len(tokenizer) - 1)
    wrapped = torch.nn.DataParallel(model)  # a container without `generate`, like DDP
    assert not hasattr(wrapped, "generate")
    completions = generate_completions(
        wrapped, PROMPTS, tokenizer=tokenizer, generation_config=config, max_new_tokens=None
    )
    assert completions == generate_completions(
        model, PROMPTS, tokenizer=tokenizer, generation_config=config, max_new_tokens=None
    )


def test_bad_generation_requests_are_refused():
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), seed=3)
    with pytest.raises(ValueError, match="at least one token"):
        generate_completions(model, [[5], []], tokenizer=tokenizer, generation_config=greedy(), max_new_tokens=None)
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate_completions(
            model, PROMPTS, tokenizer=tokenizer, generation_config=greedy(num_return_sequences=2), max_new_tokens=None
        )
    assert generate_completions(model, [], tokenizer=tokenizer, generation_config=greedy(), max_new_tokens=None) == []


# ----------------------------------------------------------------------------------------------------
# build_completion_batch / on_policy_batch
# ----------------------------------------------------------------------------------------------------


def test_build_completion_batch_right_padded_like_the_collator():
    batch = build_completion_batch([[5, 6, 7], [8]], [[9, 2], [10, 11, 12, 2]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 2], [8, 10, 11, 12, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 9, 2], [-100, 10, 11, 12, 2]]
    batch = build_completion_batch([[5, 6, 7], [8]], [[9], []], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 9], [-100, -100, -100, -100]]
    assert all(t.dtype == torch.long and t.device.type == "cpu" for t in batch.values())


def test_build_completion_batch_left_padding_and_max_length_keeps_the_prompt():
    batch = build_completion_batch(
        [[5, 6, 7], [8]], [[9, 10, 2], [11, 2]], pad_token_id=0, max_length=4, padding_side="left"
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9], [0, 8, 11, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 9], [-100, -100, 11, 2]]
    # A prompt that fills max_length keeps no completion token; a longer one is refused
    full = build_completion_batch([[5, 6, 7]], [[9]], pad_token_id=0, max_length=3)
    assert full["input_ids"].tolist() == [[5, 6, 7]] and (full["labels"] == -100).all()
    with pytest.raises(ValueError, match="does not fit"):
        build_completion_batch([[5, 6, 7]], [[9]], pad_token_id=0, max_length=2)
    with pytest.raises(ValueError, match="2 prompts but 1"):
        build_completion_batch([[5], [6]], [[9]], pad_token_id=0)


def test_on_policy_batch_replaces_completions_and_feeds_the_loss(tmp_path):
    tokenizer = make_tokenizer()
    trainer = make_trainer(tmp_path, prompt_completion_dataset())
    batch = collated(trainer)
    prompts = extract_prompts(batch, tokenizer.pad_token_id)
    x = tokenizer.convert_tokens_to_ids("moon")
    sampler = always_emits(len(tokenizer), x)
    config = GenerationSettings(max_new_tokens=6).to_generation_config(tokenizer=tokenizer, model=trainer.model)
    new = on_policy_batch(
        sampler, batch, tokenizer=tokenizer, generation_config=config, max_new_tokens=None, max_length=14
    )
    assert set(new) == {"input_ids", "attention_mask", "labels"}
    for key in new:
        assert new[key].dtype == batch[key].dtype and new[key].device == batch[key].device
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        kept = min(6, 14 - n)
        assert new["input_ids"][row, :n].tolist() == prompt
        assert (new["labels"][row, :n] == -100).all()
        assert new["labels"][row, n : n + kept].tolist() == [x] * kept
        assert (new["labels"][row, n + kept :] == -100).all() and (new["attention_mask"][row, n + kept :] == 0).all()
    assert new["input_ids"].size(1) <= 14
    # The rebuilt batch goes through the trainer's loss
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(new))
    assert torch.isfinite(loss)
    # On-policy with the student itself: the student is back in train mode
    again = on_policy_batch(
        trainer.model, batch, tokenizer=tokenizer, generation_config=config, max_new_tokens=3, max_length=None
    )
    assert trainer.model.training
    assert [again["input_ids"][i, : len(p)].tolist() for i, p in enumerate(prompts)] == prompts


# ----------------------------------------------------------------------------------------------------
# GenerationSchedule
# ----------------------------------------------------------------------------------------------------


def draws(schedule: GenerationSchedule, n: int) -> list[str]:
    return [schedule.next_source() for _ in range(n)]


def test_schedule_lmbda_extremes_and_seq_kd():
    assert set(draws(GenerationSchedule(lmbda=0.0, seed=1), 500)) == {"dataset"}
    assert set(draws(GenerationSchedule(lmbda=1.0, seed=1), 500)) == {"student"}
    assert set(draws(GenerationSchedule(lmbda=0.0, seq_kd=True, seed=1), 500)) == {"teacher"}
    assert set(draws(GenerationSchedule(lmbda=1.0, seq_kd=True, seed=1), 500)) == {"student"}
    mixed = draws(GenerationSchedule(lmbda=0.5, seq_kd=True, seed=1), 500)
    assert set(mixed) == {"student", "teacher"}
    assert not GenerationSchedule().uses_generation and GenerationSchedule(seq_kd=True).uses_generation


def test_schedule_is_reproducible_and_stateless_per_step():
    a, b = GenerationSchedule(lmbda=0.3, seed=42), GenerationSchedule(lmbda=0.3, seed=42)
    sequence = draws(a, 200)
    assert sequence == draws(b, 200)
    assert sequence != draws(GenerationSchedule(lmbda=0.3, seed=43), 200)
    # Another "rank" asking for step i directly, or a schedule resumed from a checkpoint, agrees
    assert [GenerationSchedule(lmbda=0.3, seed=42).source_for_step(i) for i in range(200)] == sequence
    resumed = GenerationSchedule(lmbda=0.3, seed=42)
    resumed.load_state_dict(GenerationSchedule(lmbda=0.3, seed=42).state_dict() | {"step": 150})
    assert draws(resumed, 50) == sequence[150:]
    # Same draw, with seq_kd: exactly the non-student steps become teacher steps
    with_teacher = draws(GenerationSchedule(lmbda=0.3, seq_kd=True, seed=42), 200)
    assert with_teacher == [s if s == "student" else "teacher" for s in sequence]
    # The global `random` state is neither used nor changed
    import random

    random.seed(0)
    state = random.getstate()
    draws(GenerationSchedule(lmbda=0.3, seed=42), 10)
    assert random.getstate() == state


def test_schedule_frequency_matches_lmbda():
    sources = draws(GenerationSchedule(lmbda=0.3, seed=0), 2000)
    frequency = sources.count("student") / len(sources)
    assert abs(frequency - 0.3) < 0.035  # ~3.4 standard deviations
    assert set(sources) == {"student", "dataset"}


def test_schedule_validates_lmbda():
    with pytest.raises(ValueError, match="lmbda"):
        GenerationSchedule(lmbda=1.5)
    with pytest.raises(ValueError, match="lmbda"):
        GenerationSchedule(lmbda=-0.1)


# ----------------------------------------------------------------------------------------------------
# GenerationSettings
# ----------------------------------------------------------------------------------------------------


def test_generation_settings_defaults_follow_trl_distillation_trainer():
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    model.generation_config.eos_token_id = [2, 7]  # e.g. an end-of-turn token besides the tokenizer's EOS
    config = GenerationSettings().to_generation_config(tokenizer=tokenizer, model=model)
    assert config.max_new_tokens == 512
    assert config.do_sample is True
    assert (config.temperature, config.top_p, config.top_k) == (1.0, 1.0, 0)
    assert config.pad_token_id == tokenizer.pad_token_id
    assert config.eos_token_id == [tokenizer.eos_token_id, 7]
    assert config.bos_token_id == tokenizer.bos_token_id


def test_generation_settings_overrides():
    tokenizer = make_tokenizer()
    settings = GenerationSettings(
        max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=20, generation_kwargs={"top_k": 5, "suppress_tokens": [3]}
    )
    config = settings.to_generation_config(tokenizer=tokenizer, pad_token_id=4, eos_token_id=6)
    assert (config.max_new_tokens, config.temperature, config.top_p, config.top_k) == (16, 0.7, 0.9, 5)
    assert config.suppress_tokens == [3] and config.pad_token_id == 4 and config.eos_token_id == 6
    # No pad token: the EOS token pads, as in TRL
    tokenizer.pad_token = None
    assert GenerationSettings().to_generation_config(tokenizer=tokenizer).pad_token_id == tokenizer.eos_token_id


def test_top_k_zero_reaches_generate_instead_of_the_default_50():
    # `generate` fills unset fields from the global defaults (top_k=50): top_k=0 must survive the merge
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    config = GenerationSettings(max_new_tokens=2).to_generation_config(tokenizer=tokenizer, model=model)
    merged, _ = model._prepare_generation_config(config)
    assert merged.top_k == 0
    unset, _ = model._prepare_generation_config(GenerationConfig(do_sample=True, max_new_tokens=2))
    assert unset.top_k == 50


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_generation_settings_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationSettings(**kwargs)

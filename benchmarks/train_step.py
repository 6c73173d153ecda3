"""Training-step benchmark: time (and peak memory) per optimizer step of three trainers on one teacher/student pair.

- ours: `hf_distill.DistillationTrainer` (generalized JSD, beta 0.5, temperature 1, alpha 0: pure distillation);
- GKD: `trl.experimental.gkd.GKDTrainer` with `GKDConfig(lmbda=0.0, beta=0.5, seq_kd=False)` (off-policy, full
  logits of both models);
- floor: `trl.SFTTrainer` student step plus one full teacher forward per step under `torch.no_grad()` (the least any
  logit distillation has to do: a teacher forward and a student forward/backward).

Models: random-init Qwen2 configs (default teacher 4 layers x 512, student 2 layers x 256, vocab 32000) built with
`AutoModelForCausalLM.from_config`, a local WordLevel tokenizer over synthetic words with a chat template, and a
synthetic dataset of single-turn conversations with a fixed token count. Ours and the floor read it as conversational
prompt-completion (`prompt=[user]`, `completion=[assistant]`; SFT masks the prompt); GKD reads the same conversations
as `messages` (its `DataCollatorForChatML` masks the prompt). Every sequence has the same length, so there is no
padding, and all three trainers train on the same tokens: the whole assistant turn. The script checks that the first
batch of each trainer has identical `input_ids` and the same number of trained tokens.

Time per step is measured with a `TrainerCallback` (`on_step_begin` -> `on_step_end`: forward, backward, clipping and
optimizer step; data loading and logging fall outside). Timing runs in ONE process: the three trainers are built side
by side and take turns, `--rounds` times, each turn a short `trainer.train()` of `--warmup-steps` (discarded) plus
`--steps` measured steps, the order rotating every round. Slow phases of a shared machine then hit every variant, and
the ratios are also given per round (paired), which cancels most of that noise. Peak memory is measured separately,
each variant in a fresh subprocess (a short run after the trainer is built), so that no variant inherits another's
freed-but-kept memory.

Usage:
    python benchmarks/train_step.py --threads 1  # batch 8 x 64; 4 rounds x (1 warm-up + 4 measured steps) per variant
    python benchmarks/train_step.py --quick      # smoke run: tiny models, no memory subprocesses
    python benchmarks/train_step.py --device cuda
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common  # noqa: E402

SECTION = "train_step"
VARIANTS = ("ours", "gkd", "floor")
VARIANT_LABELS = {
    "ours": "ours: DistillationTrainer (generalized_jsd, beta 0.5)",
    "gkd": "GKDTrainer (lmbda 0, beta 0.5, seq_kd False)",
    "floor": "floor: SFTTrainer step + teacher forward",
}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
PROMPT_OVERHEAD = 3  # "<|user|>", "<|end|>", "<|assistant|>" around the user words
COMPLETION_OVERHEAD = 1  # "<|end|>" after the assistant words


# Building blocks ---------------------------------------------------------------------------------------------------


def build_tokenizer(vocab_size: int):
    """WordLevel tokenizer over `vocab_size` tokens (specials + synthetic words `w<i>`), with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 4096
    return tokenizer


def build_model(spec: dict, role: str, tokenizer):
    from transformers import AutoModelForCausalLM, Qwen2Config

    hidden, layers = spec[f"{role}_hidden"], spec[f"{role}_layers"]
    heads = max(1, hidden // 64)
    config = Qwen2Config(
        vocab_size=spec["vocab"],
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75) // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2) if heads % 2 == 0 else heads,
        max_position_embeddings=max(512, spec["seq_len"]),
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_datasets(spec: dict):
    """Same conversations twice: prompt-completion (ours, floor) and messages (GKD)."""
    import torch
    from datasets import Dataset

    n = spec["batch_size"] * (spec["warmup_steps"] + spec["steps"])
    prompt_words = spec["prompt_len"]
    completion_words = spec["seq_len"] - prompt_words - PROMPT_OVERHEAD - COMPLETION_OVERHEAD
    if prompt_words < 1 or completion_words < 1:
        raise ValueError("--seq-len too short for --prompt-len.")
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    n_words = spec["vocab"] - len(SPECIAL_TOKENS)
    ids = torch.randint(0, n_words, (n, prompt_words + completion_words), generator=g).tolist()
    prompts, completions, messages = [], [], []
    for row in ids:
        user = {"role": "user", "content": " ".join(f"w{i}" for i in row[:prompt_words])}
        assistant = {"role": "assistant", "content": " ".join(f"w{i}" for i in row[prompt_words:])}
        prompts.append([user])
        completions.append([assistant])
        messages.append([user, assistant])
    prompt_completion = Dataset.from_dict({"prompt": prompts, "completion": completions})
    conversations = Dataset.from_dict({"messages": messages})
    return prompt_completion, conversations


class StepTimer:
    """`TrainerCallback` recording wall time per optimizer step and the logged loss of each step."""

    def __new__(cls, device: str):
        from transformers import TrainerCallback

        class _StepTimer(TrainerCallback):
            def __init__(self):
                self.times, self.losses, self._start = [], [], None

            def on_step_begin(self, args, state, control, **kwargs):
                common.synchronize(device)
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                common.synchronize(device)
                self.times.append(time.perf_counter() - self._start)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    self.losses.append(float(logs["loss"]))

        return _StepTimer()


def training_arguments(spec: dict, config_cls, **extra):
    return config_cls(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=spec["warmup_steps"] + spec["steps"],
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        dataloader_num_workers=spec.get("dataloader_workers", 0),
        max_length=max(1024, spec["seq_len"]),
        seed=spec["seed"],
        use_cpu=spec["device"] == "cpu",
        **extra,
    )


def build_trainer(spec: dict, variant: str, callback):
    import torch
    from transformers import set_seed

    tokenizer = build_tokenizer(spec["vocab"])
    set_seed(spec["seed"])
    teacher = build_model(spec, "teacher", tokenizer)
    student = build_model(spec, "student", tokenizer)
    prompt_completion, conversations = build_datasets(spec)

    if variant == "ours":
        from hf_distill import DistillationConfig, DistillationTrainer

        args = training_arguments(
            spec, DistillationConfig, divergence="generalized_jsd", beta=spec["beta"], temperature=1.0, alpha=0.0
        )
        return DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=prompt_completion,
            processing_class=tokenizer,
            callbacks=[callback],
        )
    if variant == "gkd":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = training_arguments(spec, GKDConfig, lmbda=0.0, beta=spec["beta"], seq_kd=False, temperature=1.0)
        return GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=conversations,
            processing_class=tokenizer,
            callbacks=[callback],
        )
    if variant == "floor":
        from trl import SFTConfig, SFTTrainer

        class SFTPlusTeacherForward(SFTTrainer):
            """SFT student step plus one full teacher forward (no grad) per micro-batch: the distillation floor."""

            def __init__(self, *args, teacher_model, **kwargs):
                super().__init__(*args, **kwargs)
                self.teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                teacher_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
                with torch.no_grad():
                    self.teacher_model(**teacher_inputs, use_cache=False)
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        args = training_arguments(spec, SFTConfig)
        return SFTPlusTeacherForward(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=prompt_completion,
            processing_class=tokenizer,
            callbacks=[callback],
        )
    raise ValueError(f"Unknown variant {variant!r}.")


def first_batch_summary(trainer) -> dict:
    """What the first batch holds: a hash of its `input_ids` and the number of trained (shifted-label) tokens."""
    batch = next(iter(trainer.get_train_dataloader()))
    input_ids, labels = batch["input_ids"], batch["labels"]
    trained = int((labels[:, 1:] != -100).sum())
    # Compare token content independently of left/right padding: drop pad positions row by row
    mask = batch["attention_mask"].bool()
    rows = [row[m].tolist() for row, m in zip(input_ids, mask)]
    digest = hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:12]
    return {"shape": list(input_ids.shape), "trained_tokens": trained, "input_ids_sha1": digest}


def run_variant(spec: dict) -> dict:
    """Build one trainer, train `warmup_steps + steps` steps, return timings and memory."""
    import datasets
    import torch
    from transformers import PrinterCallback

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    datasets.disable_progress_bars()
    callback = StepTimer(spec["device"])
    with tempfile.TemporaryDirectory(prefix="hf_distill_bench_") as output_dir:
        spec = {**spec, "output_dir": output_dir}
        trainer = build_trainer(spec, spec["variant"], callback)
        trainer.remove_callback(PrinterCallback)  # logs every step (for the losses); keep the console quiet
        summary = first_batch_summary(trainer)
        params = {
            "teacher": sum(p.numel() for p in trainer.teacher_model.parameters()),
            "student": sum(p.numel() for p in trainer.model.parameters()),
        }
        probe = common.MemoryProbe(spec["device"])
        probe.start()
        start = time.perf_counter()
        trainer.train()
        train_wall = time.perf_counter() - start
        memory = probe.stop()
    return {
        "variant": spec["variant"],
        "round": spec["round"],
        "step_times_s": callback.times[spec["warmup_steps"] :],
        "warmup_times_s": callback.times[: spec["warmup_steps"]],
        "losses": callback.losses,
        "memory": memory,
        "process_peak_rss_mib": common.process_peak_rss_mib(),
        "first_batch": summary,
        "params": params,
        "train_wall_s": train_wall,
    }


# Parent ----------------------------------------------------------------------------------------------------------


def timing_phase(args, base: dict, variants: list[str]) -> dict:
    """All trainers in this process, taking turns; returns per-variant lists of per-round results."""
    import datasets
    from transformers import PrinterCallback

    datasets.disable_progress_bars()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out_root = tempfile.mkdtemp(prefix="hf_distill_bench_")
    trainers = {}
    for variant in variants:
        callback = StepTimer(args.device)
        spec = {**base, "variant": variant, "output_dir": os.path.join(out_root, variant)}
        print(f"Building {variant} ...", flush=True)
        trainer = build_trainer(spec, variant, callback)
        trainer.remove_callback(PrinterCallback)  # logs every step (for the losses); keep the console quiet
        trainers[variant] = (trainer, callback, first_batch_summary(trainer))
    rounds: dict[str, list[dict]] = {v: [] for v in variants}
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            trainer, callback, summary = trainers[variant]
            callback.times, callback.losses = [], []
            probe = common.MemoryProbe(args.device)
            probe.start()
            trainer.train()
            memory = probe.stop()
            times = callback.times[args.warmup_steps :]
            rounds[variant].append(
                {"times": times, "losses": callback.losses, "memory": memory, "first_batch": summary}
            )
            print(
                f"  round {round_index + 1}/{args.rounds} {variant}: median {common.median(times):.3f} s/step "
                f"({', '.join(f'{t:.2f}' for t in times)})",
                flush=True,
            )
    params = {
        "teacher": sum(p.numel() for p in trainers[variants[0]][0].teacher_model.parameters()),
        "student": sum(p.numel() for p in trainers[variants[0]][0].model.parameters()),
    }
    del trainers
    import shutil

    shutil.rmtree(out_root, ignore_errors=True)
    return {"rounds": rounds, "params": params}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_size_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64, help="Tokens per sequence (all sequences equal).")
    parser.add_argument("--prompt-len", type=int, default=4, help="User words per sequence (not trained on).")
    parser.add_argument("--beta", type=float, default=0.5, help="Generalized JSD beta (ours and GKD).")
    common.add_round_arguments(parser, rounds=4)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated subset of ours,gkd,floor.")
    common.add_device_arguments(parser)
    common.add_write_arguments(parser, SECTION)
    common.add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.teacher_hidden, args.teacher_layers = 2048, 64, 2
        args.student_hidden, args.student_layers = 64, 1
        args.batch_size, args.seq_len, args.prompt_len = 4, 32, 4
    common.finish_round_arguments(args)
    return args


paired_ratios = common.paired_ratios  # imported from here by cache_step.py


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        common.emit_result(run_variant(json.loads(args.worker)))
        return
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    common.quiet_transformers()
    wall_start = time.perf_counter()
    variants = common.parse_variants(args.variants, VARIANTS)
    machine = common.machine_description(args.device, args.threads)
    print(f"Command: {common.command_line()}")
    print(f"Machine: {machine}")
    keys = (
        "vocab", "teacher_hidden", "teacher_layers", "student_hidden", "student_layers", "batch_size", "seq_len",
        "prompt_len", "beta", "warmup_steps", "steps", "device", "threads", "seed",
    )  # fmt: skip
    base = {key: getattr(args, key) for key in keys}

    timing = timing_phase(args, base, variants)
    rounds = timing["rounds"]
    load_after_timing = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    isolated = common.memory_phase(__file__, args, base, variants, round=0) if args.memory_steps > 0 else {}

    # Same tokens for every trainer?
    summaries = {v: rounds[v][0]["first_batch"] for v in variants}
    same_ids = len({s["input_ids_sha1"] for s in summaries.values()}) == 1
    same_trained = len({s["trained_tokens"] for s in summaries.values()}) == 1
    first = next(iter(summaries.values()))

    stats = {}
    for variant in variants:
        times = [t for r in rounds[variant] for t in r["times"]]
        losses = rounds[variant][0]["losses"]
        if isolated:
            memory = isolated[variant]["memory"]
            peak_above, peak = memory["peak_above_mib"], memory["peak_mib"]
        else:  # in-process only: indicative (freed memory of other variants is reused)
            peak_above = max(r["memory"]["peak_above_mib"] for r in rounds[variant])
            peak = max(r["memory"]["peak_mib"] for r in rounds[variant])
        stats[variant] = {
            "median": common.median(times),
            "mean": common.mean(times),
            "min": min(times),
            "max": max(times),
            "per_round": [common.median(r["times"]) for r in rounds[variant]],
            "peak_above": peak_above,
            "peak": peak,
            "first_loss": losses[0] if losses else float("nan"),
        }
    unit = "MiB allocated" if args.device.startswith("cuda") else "MiB RSS"
    mem_where = "fresh process" if isolated else "in-process, indicative"
    headers = [
        "variant",
        "median s/step",
        "mean s/step",
        "min / max",
        "median per round",
        f"peak above setup ({unit}, {mem_where})",
        f"peak ({unit})",
        "step-1 loss",
    ]
    rows = [
        [
            VARIANT_LABELS[v],
            s["median"],
            s["mean"],
            f"{s['min']:.3f} / {s['max']:.3f}",
            ", ".join(f"{x:.3f}" for x in s["per_round"]),
            s["peak_above"],
            s["peak"],
            f"{s['first_loss']:.5f}",
        ]
        for v, s in stats.items()
    ]
    table = common.markdown_table(headers, rows)

    ratio_lines = []
    for other, target, label in (("floor", 1.10, "<= 1.10"), ("gkd", 1.0, "< 1")):
        if "ours" not in stats or other not in stats:
            continue
        paired = paired_ratios(rounds, "ours", other)
        r_paired = common.median(paired)
        r_med = stats["ours"]["median"] / stats[other]["median"]
        r_mean = stats["ours"]["mean"] / stats[other]["mean"]
        ok = r_paired <= target if other == "floor" else r_paired < target
        name = "floor" if other == "floor" else "GKD"
        line = (
            f"- ours / {name}: {r_paired:.3f} (median of the per-round ratios "
            f"{', '.join(f'{x:.3f}' for x in paired)}); pooled medians {r_med:.3f}, pooled means {r_mean:.3f}. "
            f"Target {label}: {'meets' if ok else 'misses'}."
        )
        if other == "gkd":
            mem = stats["ours"]["peak_above"] / stats["gkd"]["peak_above"]
            line += f" Peak memory above setup ours / GKD: {100 * mem:.0f}%."
        ratio_lines.append(line)
    if "ours" in stats and "gkd" in stats:
        loss_ours, loss_gkd = stats["ours"]["first_loss"], stats["gkd"]["first_loss"]
        ratio_lines.append(
            f"- Step-1 loss (same initial weights, same batch): ours {loss_ours:.6f}, GKD {loss_gkd:.6f} "
            f"(abs diff {abs(loss_ours - loss_gkd):.1e}); the floor's is the student's cross-entropy."
        )
    ratio_lines.append(
        f"- Tokens: first batch {first['shape']} for every trainer, identical `input_ids`: "
        f"{'yes' if same_ids else 'NO'}; trained tokens per step "
        + ", ".join(f"{v} {s['trained_tokens']}" for v, s in summaries.items())
        + f" ({'equal' if same_trained else 'NOT equal'})."
    )
    params = timing["params"]
    wall = time.perf_counter() - wall_start
    setup = (
        f"Qwen2-style random-init models, vocab {args.vocab}: teacher {args.teacher_layers} layers x "
        f"{args.teacher_hidden} ({params['teacher'] / 1e6:.1f}M parameters), student {args.student_layers} layers x "
        f"{args.student_hidden} ({params['student'] / 1e6:.1f}M parameters), untied embeddings, float32. Batch "
        f"{args.batch_size} x {args.seq_len} tokens ({args.prompt_len + PROMPT_OVERHEAD} prompt tokens, not trained; "
        f"the rest is the assistant turn), AdamW, no gradient checkpointing, device `{args.device}`. Timing: one "
        f"process, {args.rounds} turns per variant (order rotated each round), each {args.warmup_steps} warm-up + "
        f"{args.steps} measured steps; statistics over all measured steps."
        + (
            f" Memory: each variant in a fresh process, {args.memory_steps} steps after the trainer is built."
            if isolated
            else " Memory: measured in the timing process (indicative only)."
        )
    )
    body = common.report_body(
        f"## Training step, batch {args.batch_size} x {args.seq_len}: DistillationTrainer vs GKDTrainer vs "
        "SFT + teacher forward (`benchmarks/train_step.py`)",
        setup,
        table,
        ratio_lines,
        common.timing_machine_line(machine, load_after_timing, wall),
    )
    common.print_summary([setup, table, "\n".join(ratio_lines)], wall)
    common.maybe_update_docs(args, body)
    if not (same_ids and same_trained):
        print("WARNING: the trainers did not see the same tokens.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

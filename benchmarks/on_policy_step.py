"""On-policy step benchmark: time (and peak memory) per optimizer step of a fully on-policy distillation step
(`lmbda=1`: the student samples the completions, the teacher scores them) in hf_distill and in TRL.

- ours: `hf_distill.DistillationTrainer` with `DistillationConfig(lmbda=1.0, max_new_tokens=N,
  divergence="generalized_jsd", beta=B, temperature=1.0, alpha=0.0)` on a prompt-only dataset;
- TRL: `trl.DistillationTrainer` with `trl.DistillationConfig(max_completion_length=N, beta=B, temperature=1.0,
  use_vllm=False)` (always on-policy) on the same prompt-only dataset.

Both sample with `temperature=1.0`, `top_p=1.0`, `top_k=0` (no filtering) and `generation_kwargs={"min_new_tokens":
N}`, so every completion runs to exactly N tokens (EOS cannot be sampled before that) and both trainers generate and
train on the same number of tokens; the script records the generated tokens of every `generate` call and the trained
(completion) tokens of every step on each side, and checks that they agree. Both use the same models, prompts (read in
order: `train_sampling_strategy="sequential"` / `shuffle_dataset=False`), batch size, float32, no gradient
checkpointing, AdamW with a constant learning rate.

Models, tokenizer and timing method are those of `benchmarks/train_step.py` (random-init Qwen2 configs, a local
WordLevel tokenizer with a chat template; a `TrainerCallback` times `on_step_begin` -> `on_step_end`; the variants are
built side by side in one process and take turns, `--rounds` times, with a rotating order; the ratio is the median of
the per-round ratios; peak memory comes from one fresh subprocess per variant). Inside each step the script also times,
with wrappers around instance methods (no library file is changed):

- `generate`: the student's `generate` call (wrapped on the model instance);
- `batch prep`: everything that turns the dataloader's batch into the generated training batch, `generate` included
  (ours: `DistillationTrainer._generated_batch`; TRL: `DistillationTrainer._prepare_inputs`, which also tokenizes the
  prompts with the chat template: TRL's dataloader yields raw prompts);
- `loss fwd`: `compute_loss` (student forward, teacher forward, chunked divergence);
- the rest of the step: backward, gradient clipping, optimizer step and the trainer's bookkeeping.

Peak memory (fresh process per variant): on CPU, the peak resident set size above setup, and, in a second run of the
same steps, the peak of the bytes held by tensors (`_common.TensorAllocationPeak`, from the PyTorch profiler's memory
events: the CPU analogue of `torch.cuda.max_memory_allocated`; RSS hides short-lived logit tiles). On cuda, allocated
bytes.

Usage:
    python benchmarks/on_policy_step.py --threads 1  # batch 8 prompts x 16 tokens, 32 new tokens; ~3 min
    python benchmarks/on_policy_step.py --quick      # smoke run: tiny models, no memory subprocesses
    python benchmarks/on_policy_step.py --profile    # also: cProfile of a few steps of each variant (top functions)
    python benchmarks/on_policy_step.py --device cuda
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
import train_step  # noqa: E402

SECTION = "on_policy_step"
VARIANTS = ("ours", "trl")
VARIANT_LABELS = {
    "ours": "ours: DistillationTrainer (lmbda 1, generalized_jsd)",
    "trl": "trl.DistillationTrainer (on-policy, generalized JSD)",
}
PROMPT_OVERHEAD = train_step.PROMPT_OVERHEAD  # "<|user|>", "<|end|>", "<|assistant|>" around the user words
PHASES = ("generate", "prep", "loss")
PHASE_LABELS = {"generate": "generate", "prep": "batch prep", "loss": "loss forward", "rest": "rest"}


# Building blocks ---------------------------------------------------------------------------------------------------


def build_prompts(spec: dict):
    """`batch_size * (warmup_steps + steps)` conversational prompts of `prompt_len` synthetic words each."""
    import torch
    from datasets import Dataset

    n = spec["batch_size"] * (spec["warmup_steps"] + spec["steps"])
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    n_words = spec["vocab"] - len(train_step.SPECIAL_TOKENS)
    ids = torch.randint(0, n_words, (n, spec["prompt_len"]), generator=g).tolist()
    prompts = [[{"role": "user", "content": " ".join(f"w{i}" for i in row)}] for row in ids]
    return Dataset.from_dict({"prompt": prompts})


class StepParts:
    """Per-call timings of the phases inside a step, plus what each generation produced and each step trained on."""

    def __init__(self, device: str):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.times = {phase: [] for phase in PHASES}
        self.new_tokens: list[list[int]] = []  # generated tokens per row, per `generate` call
        self.prompt_digests: list[str] = []  # hash of the prompt rows (without padding) of each `generate` call
        self.trained_tokens: list[int] = []  # completion tokens in the loss, per step

    def timed(self, phase: str, fn, after=None):
        def wrapper(*args, **kwargs):
            common.synchronize(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            common.synchronize(self.device)
            self.times[phase].append(time.perf_counter() - start)
            if after is not None:
                after(args, kwargs, out)
            return out

        return wrapper

    def record_generation(self, args, kwargs, out) -> None:
        input_ids, attention_mask = kwargs["input_ids"], kwargs["attention_mask"]
        sequences = out.sequences if hasattr(out, "sequences") else out
        self.new_tokens.append([int(sequences.shape[1] - input_ids.shape[1])] * int(input_ids.shape[0]))
        rows = sorted(row[m].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu().bool()))
        self.prompt_digests.append(hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:12])


def instrument(trainer, variant: str, parts: StepParts) -> None:
    """Wrap the student's `generate`, the batch preparation and `compute_loss` of `trainer` (instance attributes)."""
    student = trainer.accelerator.unwrap_model(trainer.model)
    student.generate = parts.timed("generate", student.generate, parts.record_generation)
    trainer.compute_loss = parts.timed("loss", trainer.compute_loss)
    if variant == "ours":

        def count(args, kwargs, out):  # (batch, num_items_in_batch)
            parts.trained_tokens.append(int((out[0]["labels"][:, 1:] != -100).sum()))

        trainer._generated_batch = parts.timed("prep", trainer._generated_batch, count)
    else:

        def count(args, kwargs, out):
            mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
            parts.trained_tokens.append(int(mask.sum()))

        trainer._prepare_inputs = parts.timed("prep", trainer._prepare_inputs, count)


def build_trainer(spec: dict, variant: str, callback):
    from transformers import set_seed

    tokenizer = train_step.build_tokenizer(spec["vocab"])
    set_seed(spec["seed"])
    teacher = train_step.build_model(spec, "teacher", tokenizer)
    student = train_step.build_model(spec, "student", tokenizer)
    prompts = build_prompts(spec)
    n = spec["new_tokens"]
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "generation_kwargs": {"min_new_tokens": n}}

    if variant == "ours":
        from hf_distill import DistillationConfig, DistillationTrainer

        args = train_step.training_arguments(
            spec,
            DistillationConfig,
            divergence="generalized_jsd",
            beta=spec["beta"],
            alpha=0.0,
            lmbda=1.0,
            max_new_tokens=n,
            gradient_checkpointing=False,
            train_sampling_strategy="sequential",
            **sampling,
        )
        return DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=prompts,
            processing_class=tokenizer,
            callbacks=[callback],
            teacher_processing_class=tokenizer,  # the same tokenizer (silences the "could not check" warning)
        )
    if variant == "trl":
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(
            output_dir=spec["output_dir"],
            per_device_train_batch_size=spec["batch_size"],
            gradient_accumulation_steps=1,
            max_steps=spec["warmup_steps"] + spec["steps"],
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            disable_dropout=True,  # ours' default (Qwen2 has no active dropout anyway)
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            dataloader_pin_memory=False,
            dataloader_num_workers=0,
            seed=spec["seed"],
            use_cpu=spec["device"] == "cpu",
            max_completion_length=n,
            beta=spec["beta"],
            use_vllm=False,
            shuffle_dataset=False,
            **sampling,
        )
        return DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=prompts,
            processing_class=tokenizer,
            callbacks=[callback],
        )
    raise ValueError(f"Unknown variant {variant!r}.")


def prepared(spec: dict, variant: str):
    """A trainer with its step timer and phase wrappers, the console logger removed."""
    from transformers import PrinterCallback

    callback = train_step.StepTimer(spec["device"])
    trainer = build_trainer(spec, variant, callback)
    trainer.remove_callback(PrinterCallback)  # logs every step (for the losses); keep the console quiet
    parts = StepParts(spec["device"])
    instrument(trainer, variant, parts)
    return trainer, callback, parts


def turn_result(callback, parts: StepParts, warmup: int) -> dict:
    """One `train()` call: measured step times and phase times (warm-up steps dropped), tokens, losses."""
    n_steps = len(callback.times)
    for phase, values in parts.times.items():
        if len(values) != n_steps:
            raise RuntimeError(f"{phase}: {len(values)} calls for {n_steps} steps (expected one per step).")
    phases = {phase: values[warmup:] for phase, values in parts.times.items()}
    times = callback.times[warmup:]
    phases["rest"] = [t - p - lo for t, p, lo in zip(times, phases["prep"], phases["loss"])]
    return {
        "times": times,
        "phases": phases,
        "new_tokens": parts.new_tokens,
        "trained_tokens": parts.trained_tokens,
        "prompt_digests": parts.prompt_digests,
        "losses": callback.losses,
    }


def run_variant(spec: dict) -> dict:
    """Worker (fresh process): build one trainer, train `warmup_steps + steps` steps, return times and peak memory."""
    import datasets
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="hf_distill_bench_") as output_dir:
        spec = {**spec, "output_dir": output_dir}
        trainer, callback, parts = prepared(spec, spec["variant"])
        probe = common.MemoryProbe(spec["device"])
        probe.start()
        trainer.train()
        memory = probe.stop()
        tensor_peak_mib = None
        if not spec["device"].startswith("cuda"):  # the same steps again under the profiler (it would inflate the RSS)
            with common.TensorAllocationPeak() as tensor_peak:
                trainer.train()
            tensor_peak_mib = tensor_peak.peak_mib
    return {
        **turn_result(callback, parts, spec["warmup_steps"]),
        "variant": spec["variant"],
        "memory": memory,
        "tensor_peak_mib": tensor_peak_mib,
        "process_peak_rss_mib": common.process_peak_rss_mib(),
    }


# Parent ----------------------------------------------------------------------------------------------------------


def timing_phase(args, base: dict, variants: list[str]) -> dict:
    """All trainers in this process, taking turns; returns per-variant lists of per-round results."""
    import datasets

    datasets.disable_progress_bars()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out_root = tempfile.mkdtemp(prefix="hf_distill_bench_")
    trainers = {}
    for variant in variants:
        print(f"Building {variant} ...", flush=True)
        spec = {**base, "variant": variant, "output_dir": os.path.join(out_root, variant)}
        trainers[variant] = prepared(spec, variant)
    rounds: dict[str, list[dict]] = {v: [] for v in variants}
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            trainer, callback, parts = trainers[variant]
            callback.times, callback.losses = [], []
            parts.reset()
            trainer.train()
            result = turn_result(callback, parts, args.warmup_steps)
            rounds[variant].append(result)
            gen = result["phases"]["generate"]
            print(
                f"  round {round_index + 1}/{args.rounds} {variant}: median {common.median(result['times']):.3f} "
                f"s/step, generate {common.median(gen):.3f} s ({', '.join(f'{t:.2f}' for t in result['times'])})",
                flush=True,
            )
    params = {
        "teacher": sum(p.numel() for p in trainers[variants[0]][0].teacher_model.parameters()),
        "student": sum(p.numel() for p in trainers[variants[0]][0].model.parameters()),
    }
    profiles = profile_phase(args, trainers, variants) if args.profile else {}
    del trainers
    import shutil

    shutil.rmtree(out_root, ignore_errors=True)
    return {"rounds": rounds, "params": params, "profiles": profiles}


def profile_phase(args, trainers: dict, variants: list[str]) -> dict:
    """cProfile one more `train()` of each variant; print and return the top functions by cumulative time."""
    import cProfile
    import io
    import pstats

    out = {}
    for variant in variants:
        trainer, callback, parts = trainers[variant]
        callback.times, callback.losses = [], []
        parts.reset()
        profiler = cProfile.Profile()
        profiler.enable()
        trainer.train()
        profiler.disable()
        buffer = io.StringIO()
        stats = pstats.Stats(profiler, stream=buffer).sort_stats("cumulative")
        stats.print_stats(args.profile_lines)
        text = buffer.getvalue()
        print(f"\n--- cProfile of one train() of {variant} ({len(callback.times)} steps) ---\n{text}", flush=True)
        out[variant] = text
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_size_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="Prompts per step.")
    parser.add_argument(
        "--prompt-len", type=int, default=13, help=f"User words per prompt (+{PROMPT_OVERHEAD} template tokens)."
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="Generated tokens per completion (exactly).")
    parser.add_argument("--beta", type=float, default=0.5, help="Generalized JSD beta (both trainers).")
    common.add_round_arguments(parser, rounds=5)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated subset of ours,trl.")
    common.add_device_arguments(parser)
    parser.add_argument("--profile", action="store_true", help="cProfile one extra train() of each variant.")
    parser.add_argument("--profile-lines", type=int, default=40, help="Functions shown per profile.")
    common.add_write_arguments(
        parser,
        SECTION,
        section_help=f"Marker name of the docs/benchmarks.md section to replace (default {SECTION!r}).",
    )
    common.add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.teacher_hidden, args.teacher_layers = 2048, 64, 2
        args.student_hidden, args.student_layers = 64, 1
        args.batch_size, args.prompt_len, args.new_tokens = 4, 5, 8
    common.finish_round_arguments(args)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        common.emit_result(run_variant(json.loads(args.worker)))
        return
    common.quiet_transformers()
    wall_start = time.perf_counter()
    variants = common.parse_variants(args.variants, VARIANTS)
    machine = common.machine_description(args.device, args.threads)
    print(f"Command: {common.command_line()}")
    print(f"Machine: {machine}")
    keys = (
        "vocab", "teacher_hidden", "teacher_layers", "student_hidden", "student_layers", "batch_size", "prompt_len",
        "new_tokens", "beta", "warmup_steps", "steps", "device", "threads", "seed",
    )  # fmt: skip
    base = {key: getattr(args, key) for key in keys}
    prompt_tokens = args.prompt_len + PROMPT_OVERHEAD
    base["seq_len"] = prompt_tokens + args.new_tokens  # for the models' max_position_embeddings / max_length

    timing = timing_phase(args, base, variants)
    rounds = timing["rounds"]
    load_after_timing = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    isolated = common.memory_phase(__file__, args, base, variants) if args.memory_steps > 0 else {}

    # Same prompts, same generated and trained tokens on both sides?
    expected_new = args.batch_size * args.new_tokens
    checks = {}
    for variant in variants:
        runs = rounds[variant]
        new = sorted({sum(call) for r in runs for call in r["new_tokens"]})
        trained = sorted({t for r in runs for t in r["trained_tokens"]})
        digests = [r["prompt_digests"] for r in runs]
        stable = all(d == digests[0] for d in digests)
        checks[variant] = {"new": new, "trained": trained, "digests": digests[0], "stable": stable}
    same_prompts = all(c["stable"] for c in checks.values())
    same_prompts = same_prompts and len({tuple(c["digests"]) for c in checks.values()}) == 1
    tokens_ok = all(c["new"] == [expected_new] and c["trained"] == [expected_new] for c in checks.values())

    stats = {}
    for variant in variants:
        times = [t for r in rounds[variant] for t in r["times"]]
        phases = {p: common.median([t for r in rounds[variant] for t in r["phases"][p]]) for p in (*PHASES, "rest")}
        if isolated:
            memory = isolated[variant]["memory"]
            peak_above, peak = memory["peak_above_mib"], memory["peak_mib"]
            tensor_peak = isolated[variant]["tensor_peak_mib"]
        else:
            peak_above = peak = float("nan")
            tensor_peak = None
        stats[variant] = {
            "median": common.median(times),
            "mean": common.mean(times),
            "min": min(times),
            "max": max(times),
            "per_round": [common.median(r["times"]) for r in rounds[variant]],
            "phases": phases,
            "peak_above": peak_above,
            "peak": peak,
            "tensor_peak": float("nan") if tensor_peak is None else tensor_peak,
            "first_loss": rounds[variant][0]["losses"][0] if rounds[variant][0]["losses"] else float("nan"),
        }
    cuda = args.device.startswith("cuda")
    unit = "MiB allocated" if cuda else "MiB RSS"
    headers = [
        "variant",
        "median s/step",
        "mean s/step",
        "min / max",
        "median per round",
        "generate (s)",
        "batch prep incl. generate (s)",
        "loss fwd (s)",
        "rest: bwd + optim (s)",
        f"peak above setup ({unit}, fresh process)",
        f"peak ({unit})",
        "peak tensor allocation above setup (MiB, CPU profiler)",
    ]
    rows = []
    for v, s in stats.items():
        ph = s["phases"]
        rows.append(
            [
                VARIANT_LABELS[v],
                s["median"],
                s["mean"],
                f"{s['min']:.3f} / {s['max']:.3f}",
                ", ".join(f"{x:.3f}" for x in s["per_round"]),
                ph["generate"],
                ph["prep"],
                ph["loss"],
                ph["rest"],
                s["peak_above"],
                s["peak"],
                "–" if s["tensor_peak"] != s["tensor_peak"] else s["tensor_peak"],
            ]
        )
    table = common.markdown_table(headers, rows)

    lines = []
    if "ours" in stats and "trl" in stats:
        paired = common.paired_ratios(rounds, "ours", "trl")
        r_paired = common.median(paired)
        r_med = stats["ours"]["median"] / stats["trl"]["median"]
        r_mean = stats["ours"]["mean"] / stats["trl"]["mean"]
        lines.append(
            f"- ours / TRL: {r_paired:.3f} (median of the per-round ratios {', '.join(f'{x:.3f}' for x in paired)}); "
            f"pooled medians {r_med:.3f}, pooled means {r_mean:.3f}. Target < 1: "
            f"{'meets' if r_paired < 1 else 'misses'}."
        )
        po, pt = stats["ours"]["phases"], stats["trl"]["phases"]
        lines.append(
            "- Phase ratios ours / TRL (medians): "
            + ", ".join(f"{PHASE_LABELS[p]} {po[p] / pt[p]:.3f}" for p in (*PHASES, "rest"))
            + "."
        )
        lines.append(
            "- Reading the phases: both sides generate with the same `transformers` sampling loop (`generate` -> "
            "`_sample`, KV cache, one `torch.multinomial` over the full vocabulary per token), so the generate "
            'times differ only by noise. The split between "loss forward" and "rest" is not like for like: '
            "ours computes the divergence's gradient inside the forward (`hf_distill/losses/chunked.py`, one "
            "projection of each LM head per chunk; backward only applies it), while TRL's "
            "`trl/kernels/chunked_divergence.py` `ChunkedDivergenceFunction` projects both heads twice in the "
            "forward for a JSD (a log-normaliser pass, then a divergence pass) and once more in `backward`, so "
            'its backward (in "rest") is much heavier.'
        )
        if isolated:
            mem = stats["ours"]["peak_above"] / stats["trl"]["peak_above"]
            lines.append(f"- Peak memory above setup ({unit}) ours / TRL: {100 * mem:.0f}%.")
            if not cuda:
                tensors = stats["ours"]["tensor_peak"] / stats["trl"]["tensor_peak"]
                lines.append(f"- Peak tensor allocation above setup (CPU profiler) ours / TRL: {100 * tensors:.0f}%.")
    lines.append(
        "- Tokens: generated per `generate` call "
        + ", ".join(f"{v} {c['new']}" for v, c in checks.items())
        + "; trained (completion) tokens per step "
        + ", ".join(f"{v} {c['trained']}" for v, c in checks.items())
        + f" (expected {args.batch_size} x {args.new_tokens} = {expected_new}: "
        f"{'equal' if tokens_ok else 'NOT equal'}). Same prompts in the same steps on both sides: "
        f"{'yes' if same_prompts else 'NO'}."
    )
    lines.append(
        "- Step-1 loss (different samples on each side, so not comparable): "
        + ", ".join(f"{v} {s['first_loss']:.5f}" for v, s in stats.items())
        + "."
    )
    params = timing["params"]
    wall = time.perf_counter() - wall_start
    setup = (
        f"Qwen2-style random-init models, vocab {args.vocab}: teacher {args.teacher_layers} layers x "
        f"{args.teacher_hidden} ({params['teacher'] / 1e6:.1f}M parameters), student {args.student_layers} layers x "
        f"{args.student_hidden} ({params['student'] / 1e6:.1f}M parameters), untied embeddings, float32. Each step: "
        f"{args.batch_size} prompts of {prompt_tokens} tokens, the student samples exactly {args.new_tokens} new "
        f"tokens per prompt (temperature 1, top_p 1, top_k 0, `min_new_tokens={args.new_tokens}`, KV cache), then the "
        f"generalized JSD (beta {args.beta}, temperature 1) against the teacher on the {expected_new} generated "
        f"tokens, backward and AdamW step; no gradient checkpointing, device `{args.device}`. Timing: one process, "
        f"{args.rounds} turns per variant (order rotated each round), each {args.warmup_steps} warm-up + "
        f"{args.steps} measured steps; statistics over all measured steps. Phase columns are medians per step of "
        'the wrapped calls (see the script\'s docstring); "rest" is, per step, the step time minus batch prep and '
        "loss forward."
        + (
            f" Memory: each variant in a fresh process, {args.memory_steps} steps after the trainer is built."
            + (
                " 'Peak tensor allocation': on CPU, the peak of the bytes held by tensors in a second run of the same "
                "steps after the RSS measurement (the profiler's buffers would inflate the RSS), above what they held "
                "at its start (`TensorAllocationPeak`: PyTorch profiler memory events, the CPU "
                "analogue of `torch.cuda.max_memory_allocated`; RSS hides short-lived logit tiles served from pages "
                "the allocator already holds)."
                if not cuda
                else " On cuda, the allocated-bytes columns are already the tensors' peak (no profiler column)."
            )
            if isolated
            else " Memory: not measured (no fresh-process runs)."
        )
    )
    body = common.report_body(
        f"## On-policy step (lmbda 1), {args.batch_size} prompts x {args.new_tokens} new tokens: "
        "DistillationTrainer vs trl.DistillationTrainer (`benchmarks/on_policy_step.py`)",
        setup,
        table,
        lines,
        common.timing_machine_line(machine, load_after_timing, wall),
    )
    common.print_summary([setup, table, "\n".join(lines)], wall)
    common.maybe_update_docs(args, body)
    if not (tokens_ok and same_prompts):
        print("WARNING: the trainers did not generate / train on the same tokens or prompts.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

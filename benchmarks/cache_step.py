"""Training step from a teacher cache vs an SFT-only step: time and peak memory per optimizer step, and cache size.

Variants, all on the same student (same initial weights, same batches, same tokens, same AdamW):

- sft: `trl.SFTTrainer` on the student alone (cross-entropy): what a training step costs without any teacher;
- cache<k>: `hf_distill.DistillationTrainer` with `DistillationConfig(teacher_cache=...)` and no teacher model,
  reading the top-k teacher log-probs (8-bit by default) that `DistillationTrainer.write_teacher_cache` stored
  beforehand (k = 64 and 16 by default; `sparse_targets="bucket"`);
- live: `DistillationTrainer` with the live teacher (the reference: one teacher forward per step).

The distillation settings are those of `benchmarks/train_step.py` ("ours"): generalized JSD, beta 0.5, temperature 1,
alpha 0. Models, tokenizer, dataset, arguments and timing callback are `train_step.py`'s (imported from it):
random-init Qwen2 configs (default teacher 4 layers x 512, student 2 layers x 256, vocab 32000), synthetic single-turn
conversations of a fixed token count read as conversational prompt-completion (the prompt is masked). The student is
built first from the seed and the teacher after it, so every variant starts from the same student weights; the script
checks that the first batch of every trainer has identical `input_ids` and the same number of trained tokens.

The caches are written once per run, before the timing, by the live trainer (`write_teacher_cache(root, k=k,
logprob_bits=...)`, which runs the teacher over the prepared training set with the trainer's own collator); the time
of each write and the bytes of each cache (all files on disk, per scored token and per kept logit) are reported.

Time per step is measured with `train_step.py`'s `TrainerCallback` (`on_step_begin` -> `on_step_end`: forward,
teacher targets, loss, backward, clipping and optimizer step). Timing runs in ONE process: the trainers are built side
by side and take turns, `--rounds` times, each turn a short `trainer.train()` of `--warmup-steps` (discarded) plus
`--steps` measured steps, the order rotating every round; ratios are also given per round (paired). Every variant's
DataLoader uses `--dataloader-workers` worker processes (`dataloader_num_workers`; default 2 on cuda, 0 on cpu).

The cache lookup runs in the data collator, off the training step: `DistillationTrainer` wraps its collator in
`hf_distill.teachers.cached_batches.CacheTargetsCollator`, which looks the batch's rows up and decodes their top-k
targets (`fetch_cached_targets`) into a `CachedBatchTargets`; the step only moves those to the device
(`CachedBatchTargets.to_teacher`, non-blocking copies). In the timing runs, three things are timed by wrapping them:
the collator's lookup + decode (`hf_distill.teachers.cached_batches.fetch_cached_targets`, per batch; only seen when
the DataLoader runs in the main process, `--dataloader-workers 0`: calls in worker processes are not recorded; the
batch is fetched before the step timer starts, so this time is not inside the measured step), the in-step transfer
(`CachedBatchTargets.to_teacher`, per step) and the chunked loss (`hf_distill.trainer.chunked_distillation_loss`,
forward and gradient, per step).

Peak memory is measured separately, each variant in a fresh subprocess (a short run after the trainer is built); the
cache variants' processes never build the teacher. On CPU, two measures: the resident set size (peak RSS above
setup), and the peak of the bytes held by tensors (`_common.TensorAllocationPeak`, from the PyTorch profiler's memory
events, the CPU analogue of `torch.cuda.max_memory_allocated`), in a second run of the same steps: RSS hides
short-lived logit tiles that the allocator serves from pages it already holds. With DataLoader workers, their
allocations (the lookup) are in other processes and counted by neither.

Usage:
    python benchmarks/cache_step.py --threads 1   # batch 8 x 64; 4 rounds x (1 warm-up + 4 measured steps)
    python benchmarks/cache_step.py --quick       # smoke run: tiny models, no memory subprocesses
    python benchmarks/cache_step.py --profile     # also print torch.profiler tables of an sft and a cache step
    python benchmarks/cache_step.py --device cuda  # 2 DataLoader workers by default on cuda
    python benchmarks/cache_step.py --quick --dataloader-workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common  # noqa: E402
from train_step import (  # noqa: E402
    PROMPT_OVERHEAD,
    StepTimer,
    build_datasets,
    build_model,
    build_tokenizer,
    first_batch_summary,
    training_arguments,
)

SECTION = "cache_step"
DISTILL_KWARGS = {"divergence": "generalized_jsd", "temperature": 1.0, "alpha": 0.0}
TARGET = 1.10


def variant_label(variant: str, logprob_bits: int) -> str:
    if variant == "sft":
        return "SFT only: SFTTrainer, student alone"
    if variant == "live":
        return "ours, live teacher (reference)"
    return f"ours from cache, k={variant[len('cache') :]} ({logprob_bits}-bit)"


# Building blocks ---------------------------------------------------------------------------------------------------


def build_models(spec: dict, tokenizer, with_teacher: bool):
    """The student first (so that its weights do not depend on whether a teacher is built), then the teacher."""
    from transformers import set_seed

    set_seed(spec["seed"])
    student = build_model(spec, "student", tokenizer)
    teacher = build_model(spec, "teacher", tokenizer) if with_teacher else None
    return student, teacher


def build_trainer(spec: dict, variant: str, callback):
    """One trainer; the dataset always covers `data_steps` steps (the rows the caches were written for)."""
    tokenizer = build_tokenizer(spec["vocab"])
    student, teacher = build_models(spec, tokenizer, with_teacher=variant == "live")
    dataset, _ = build_datasets({**spec, "warmup_steps": 0, "steps": spec["data_steps"]})
    common_kwargs = {"train_dataset": dataset, "processing_class": tokenizer, "callbacks": [callback]}
    if variant == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(model=student, args=training_arguments(spec, SFTConfig), **common_kwargs)

    from hf_distill import DistillationConfig, DistillationTrainer

    distill = {**DISTILL_KWARGS, "beta": spec["beta"]}
    if variant == "live":
        args = training_arguments(spec, DistillationConfig, **distill)
        return DistillationTrainer(model=student, teacher_model=teacher, args=args, **common_kwargs)
    path = spec["cache_paths"][variant]
    args = training_arguments(spec, DistillationConfig, **distill, teacher_cache=path)
    trainer = DistillationTrainer(model=student, teacher_model=None, args=args, **common_kwargs)
    assert trainer.teacher_model is None and trainer.teacher_cache is not None
    return trainer


class SectionTimer:
    """Times each call of the cached-target lookup in the collator, of the in-step transfer and of the chunked loss.

    - `fetch_cached_targets`: the module-level function of `hf_distill.teachers.cached_batches`, which
      `CacheTargetsCollator` calls by that name (lookup + decode, once per batch, in the data loader). Calls made in
      DataLoader worker processes (`dataloader_num_workers > 0`) are not seen here: this is recorded only when the
      data loader runs in the main process.
    - `to_teacher`: the method `CachedBatchTargets.to_teacher` (replaced on the class), the step's part: the
      non-blocking copies of the targets to the device.
    - `chunked_distillation_loss`: called by `hf_distill.trainer` by its module-level name.

    Calls are recorded under `self.current` (the variant whose turn it is). The device is synchronized around the
    in-step calls (so a transfer's or the loss's time includes its device work); the collator's lookup is CPU work.
    """

    NAMES = ("fetch_cached_targets", "to_teacher", "chunked_distillation_loss")

    def __init__(self, device: str):
        import hf_distill.teachers.cached_batches as batches_module
        import hf_distill.trainer as trainer_module

        self.device = device
        self.current = None
        self.calls: dict[tuple[str, str], list[float]] = {}
        batches_module.fetch_cached_targets = self._wrap(
            "fetch_cached_targets", batches_module.fetch_cached_targets, sync=False
        )
        targets_class = batches_module.CachedBatchTargets
        targets_class.to_teacher = self._wrap("to_teacher", targets_class.to_teacher)
        trainer_module.chunked_distillation_loss = self._wrap(
            "chunked_distillation_loss", trainer_module.chunked_distillation_loss
        )

    def _wrap(self, name: str, function, sync: bool = True):
        device = self.device if sync else "cpu"

        def timed(*args, **kwargs):
            common.synchronize(device)
            start = time.perf_counter()
            out = function(*args, **kwargs)
            common.synchronize(device)
            self.calls.setdefault((self.current, name), []).append(time.perf_counter() - start)
            return out

        return timed

    def take(self, variant: str, skip: int) -> dict[str, list[float]]:
        """The calls of `variant` since the last `take`, without the first `skip` (the warm-up steps' batches)."""
        return {name: self.calls.pop((variant, name), [])[skip:] for name in self.NAMES}


# Caches ------------------------------------------------------------------------------------------------------------


def write_caches(trainer, root: str, ks: list[int], logprob_bits: int) -> dict[int, dict]:
    """Write one cache per k with the live trainer; time each write and measure its files."""
    import torch

    from hf_distill.teachers.cache_format import expected_bytes_per_logit
    from hf_distill.teachers.cache_keys import fingerprint_model

    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    start = time.perf_counter()
    fingerprint_model(teacher)
    fingerprint_s = time.perf_counter() - start
    out = {}
    for k in ks:
        common.synchronize(trainer.args.device.type)
        start = time.perf_counter()
        cache = trainer.write_teacher_cache(root, k=k, logprob_bits=logprob_bits, show_progress=False)
        common.synchronize(trainer.args.device.type)
        write_s = time.perf_counter() - start
        manifest = cache.manifest
        files = {p.name: p.stat().st_size for p in cache.path.iterdir() if p.is_file()}
        positions = int(manifest["scored_positions"])
        disk = sum(files.values())
        # The teacher's probability mass inside its top k, averaged over the scored tokens (1 - exp(rest))
        rest = torch.cat([cache.lookup(key).rest_log_prob for key in cache.row_keys()])
        top_k_mass = float((1.0 - rest.double().exp()).mean())
        out[k] = {
            "path": str(cache.path),
            "write_s": write_s,
            "fingerprint_s": fingerprint_s,
            "rows": len(cache),
            "tokens": int(manifest["total_tokens"]),
            "scored_positions": positions,
            "payload_bytes": int(manifest["payload_bytes"]),
            "disk_bytes": disk,
            "files": files,
            "bytes_per_logit": float(manifest["bytes_per_logit"]),
            "expected_bytes_per_logit": expected_bytes_per_logit(cache.vocab_size, k, logprob_bits),
            "disk_bytes_per_token": disk / positions,
            "payload_bytes_per_token": int(manifest["payload_bytes"]) / positions,
            "disk_bytes_per_logit": disk / (positions * k),
            "vocab_size": cache.vocab_size,
            "top_k_mass": top_k_mass,
        }
        print(
            f"  cache k={k}: {disk} bytes on disk, {disk / positions:.1f} bytes per scored token, "
            f"{cache.bytes_per_logit:.3f} payload bytes per logit; written in {write_s:.2f} s",
            flush=True,
        )
    return out


# Fresh-process memory run ------------------------------------------------------------------------------------------


def _live_parameters(torch) -> list:
    import gc

    found = {id(obj): obj for obj in gc.get_objects() if isinstance(obj, torch.nn.Parameter)}
    return list(found.values())


def run_variant(spec: dict) -> dict:
    """Build one trainer, train `warmup_steps + steps` steps, return timings and memory (worker process)."""
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
        trainer.remove_callback(PrinterCallback)
        teacher = getattr(trainer, "teacher_model", None)
        teacher_params = 0 if teacher is None else sum(p.numel() for p in teacher.parameters())
        # Every parameter alive in this process: the student's (and its optimizer has none yet) unless the variant
        # is the live one
        params_in_process = sum(p.numel() for p in _live_parameters(torch))
        setup_rss_mib = (common._status_kib("VmRSS") or 0) / 1024
        cuda = spec["device"].startswith("cuda")
        probe = common.MemoryProbe(spec["device"])
        probe.start()
        trainer.train()
        memory = probe.stop()
        tensor_peak_mib = None
        if not cuda:  # the same steps again under the profiler (its event buffers would inflate the RSS)
            with common.TensorAllocationPeak() as tensor_peak:
                trainer.train()
            tensor_peak_mib = tensor_peak.peak_mib
    return {
        "variant": spec["variant"],
        "step_times_s": callback.times[spec["warmup_steps"] :],
        "losses": callback.losses,
        "memory": memory,
        "tensor_peak_mib": tensor_peak_mib,
        "setup_rss_mib": setup_rss_mib,
        "process_peak_rss_mib": common.process_peak_rss_mib(),
        "teacher_params": teacher_params,
        "params_in_process": params_in_process,
    }


def memory_phase(args, base: dict, variants: list[str]) -> dict:
    results = {}
    for variant in variants:
        spec = {**base, "variant": variant, "name": f"{variant} (memory)", "warmup_steps": 1}
        spec["steps"] = args.memory_steps - 1
        print(f"Memory run (fresh process): {variant} ...", flush=True)
        results[variant] = common.run_worker(__file__, spec, timeout=args.timeout, verbose=args.verbose)
        r = results[variant]
        m = r["memory"]
        tensors = "" if r["tensor_peak_mib"] is None else f", tensor allocation peak {r['tensor_peak_mib']:.0f} MiB"
        print(
            f"  {variant}: peak above setup {m['peak_above_mib']:.0f} MiB, peak {m['peak_mib']:.0f} MiB{tensors}, "
            f"teacher parameters in the process {r['teacher_params']}",
            flush=True,
        )
    return results


# Timing phase ------------------------------------------------------------------------------------------------------


def timing_phase(args, base: dict, variants: list[str], cache_root: str) -> dict:
    """Build the live trainer, write the caches with it, build the others; then they take turns."""
    import datasets
    from transformers import PrinterCallback

    datasets.disable_progress_bars()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out_root = tempfile.mkdtemp(prefix="hf_distill_bench_")
    sections = SectionTimer(args.device)
    trainers = {}

    def add(variant: str, spec: dict) -> None:
        callback = StepTimer(args.device)
        print(f"Building {variant} ...", flush=True)
        trainer = build_trainer({**spec, "output_dir": os.path.join(out_root, variant)}, variant, callback)
        trainer.remove_callback(PrinterCallback)  # logs every step (for the losses); keep the console quiet
        trainers[variant] = (trainer, callback, first_batch_summary(trainer))

    add("live", base)
    print(f"Writing the teacher caches (k = {', '.join(map(str, args.ks))}, {args.logprob_bits}-bit) ...", flush=True)
    caches = write_caches(trainers["live"][0], cache_root, args.ks, args.logprob_bits)
    cache_paths = {f"cache{k}": c["path"] for k, c in caches.items()}
    for variant in variants:
        if variant != "live":
            add(variant, {**base, "cache_paths": cache_paths})
    params = {
        "teacher": sum(p.numel() for p in trainers["live"][0].teacher_model.parameters()),
        "student": sum(p.numel() for p in trainers["live"][0].model.parameters()),
    }

    rounds: dict[str, list[dict]] = {v: [] for v in variants}
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            trainer, callback, summary = trainers[variant]
            callback.times, callback.losses = [], []
            sections.current = variant
            probe = common.MemoryProbe(args.device)
            probe.start()
            trainer.train()
            memory = probe.stop()
            times = callback.times[args.warmup_steps :]
            rounds[variant].append(
                {
                    "times": times,
                    "losses": callback.losses,
                    "memory": memory,
                    "first_batch": summary,
                    "sections": sections.take(variant, args.warmup_steps),
                }
            )
            print(
                f"  round {round_index + 1}/{args.rounds} {variant}: median {common.median(times):.3f} s/step "
                f"({', '.join(f'{t:.2f}' for t in times)})",
                flush=True,
            )
    profiles = profile_steps(args, trainers) if args.profile else {}
    trainers.clear()
    shutil.rmtree(out_root, ignore_errors=True)
    return {"rounds": rounds, "params": params, "caches": caches, "cache_paths": cache_paths, "profiles": profiles}


def profile_steps(args, trainers: dict) -> dict:
    """torch.profiler over one short run of `sft` and of the first cache variant: the ops that take the time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    sort_by = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    tables = {}
    for variant in [v for v in trainers if v == "sft" or v.startswith("cache")][:2]:
        trainer, callback, _ = trainers[variant]
        callback.times, callback.losses = [], []
        with profile(activities=activities) as prof:
            trainer.train()
        steps = args.warmup_steps + args.steps
        table = prof.key_averages().table(sort_by=sort_by, row_limit=args.profile_rows)
        tables[variant] = table
        print(f"\nProfile of {variant} ({steps} steps, the first a warm-up):\n{table}", flush=True)
    return tables


# Parent ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_size_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64, help="Tokens per sequence (all sequences equal).")
    parser.add_argument("--prompt-len", type=int, default=4, help="User words per sequence (not trained on).")
    parser.add_argument("--beta", type=float, default=0.5, help="Generalized JSD beta (ours).")
    parser.add_argument("--ks", default="64,16", help="Comma-separated top-k values: one cache (and variant) each.")
    parser.add_argument("--logprob-bits", type=int, default=8, help="Bits per stored log-prob (32, 16, 8, 4).")
    common.add_round_arguments(parser, rounds=4)
    common.add_device_arguments(
        parser,
        threads_help="torch.set_num_threads for the timing and memory runs (default: torch's choice; 1 with --quick).",
    )
    parser.add_argument(
        "--profile", action="store_true", help="Print torch.profiler tables of an sft and a cache run."
    )
    parser.add_argument("--profile-rows", type=int, default=25, help="Rows of each profiler table.")
    parser.add_argument(
        "--dataloader-workers",
        type=int,
        default=None,
        help="DataLoader worker processes of every variant (`dataloader_num_workers`; default: 2 with --device cuda, "
        "else 0). The collator's cache lookup is timed only with 0 (calls in worker processes are not seen).",
    )
    common.add_write_arguments(
        parser, SECTION, section_help=f"Marker name of the docs/benchmarks.md section (default {SECTION!r})."
    )
    common.add_worker_arguments(parser)
    args = parser.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    if args.dataloader_workers is None:
        args.dataloader_workers = 2 if args.device.startswith("cuda") else 0
    if args.quick:
        args.vocab, args.teacher_hidden, args.teacher_layers = 2048, 64, 2
        args.student_hidden, args.student_layers = 64, 1
        args.batch_size, args.seq_len, args.prompt_len = 4, 32, 4
    common.finish_round_arguments(args)
    return args


def ratio_line(rounds: dict, stats: dict, a: str, b: str, labels: dict, target: float | None) -> str:
    paired = common.paired_ratios(rounds, a, b)
    r_paired = common.median(paired)
    r_med = stats[a]["median"] / stats[b]["median"]
    r_mean = stats[a]["mean"] / stats[b]["mean"]
    line = (
        f"- {labels[a]} / {labels[b]}: **{r_paired:.3f}** (median of the per-round ratios "
        f"{', '.join(f'{x:.3f}' for x in paired)}); pooled medians {r_med:.3f}, pooled means {r_mean:.3f}."
    )
    if target is not None:
        line += f" Target <= {target:.2f}: {'meets' if r_paired <= target else 'MISSES'}."
    return line


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        common.emit_result(run_variant(json.loads(args.worker)))
        return
    common.quiet_transformers()
    wall_start = time.perf_counter()
    variants = ["sft", *[f"cache{k}" for k in args.ks], "live"]
    labels = {v: variant_label(v, args.logprob_bits) for v in variants}
    short = {"sft": "SFT", "live": "live", **{f"cache{k}": f"cache k={k}" for k in args.ks}}
    machine = common.machine_description(args.device, args.threads)
    print(f"Command: {common.command_line()}")
    print(f"Machine: {machine}")
    keys = (
        "vocab", "teacher_hidden", "teacher_layers", "student_hidden", "student_layers", "batch_size", "seq_len",
        "prompt_len", "beta", "warmup_steps", "steps", "device", "threads", "seed", "dataloader_workers",
    )  # fmt: skip
    base = {key: getattr(args, key) for key in keys}
    base["data_steps"] = args.warmup_steps + args.steps  # the rows every trainer (and the caches) cover

    cache_root = tempfile.mkdtemp(prefix="hf_distill_cache_bench_")
    try:
        timing = timing_phase(args, base, variants, cache_root)
        load_after_timing = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        base["cache_paths"] = timing["cache_paths"]
        isolated = memory_phase(args, base, variants) if args.memory_steps > 0 else {}
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    rounds, caches = timing["rounds"], timing["caches"]

    summaries = {v: rounds[v][0]["first_batch"] for v in variants}
    same_ids = len({s["input_ids_sha1"] for s in summaries.values()}) == 1
    same_trained = len({s["trained_tokens"] for s in summaries.values()}) == 1
    first = summaries["sft"]

    stats = {}
    for variant in variants:
        times = [t for r in rounds[variant] for t in r["times"]]
        losses = rounds[variant][0]["losses"]
        if isolated:
            memory = isolated[variant]["memory"]
            peak_above, peak = memory["peak_above_mib"], memory["peak_mib"]
            setup = (
                isolated[variant]["setup_rss_mib"] if not args.device.startswith("cuda") else memory["baseline_mib"]
            )
            tensor_peak = isolated[variant]["tensor_peak_mib"]
        else:
            peak_above = max(r["memory"]["peak_above_mib"] for r in rounds[variant])
            peak = max(r["memory"]["peak_mib"] for r in rounds[variant])
            setup = float("nan")
            tensor_peak = None
        section_times = {
            name: [t for r in rounds[variant] for t in r["sections"][name]] for name in SectionTimer.NAMES
        }
        stats[variant] = {
            "median": common.median(times),
            "mean": common.mean(times),
            "min": min(times),
            "max": max(times),
            "per_round": [common.median(r["times"]) for r in rounds[variant]],
            "peak_above": peak_above,
            "peak": peak,
            "setup": setup,
            "tensor_peak": float("nan") if tensor_peak is None else tensor_peak,
            "first_loss": losses[0] if losses else float("nan"),
            "lookup_ms": 1000 * common.median(section_times["fetch_cached_targets"]),
            "to_device_ms": 1000 * common.median(section_times["to_teacher"]),
            "loss_ms": 1000 * common.median(section_times["chunked_distillation_loss"]),
            "teacher_params": isolated[variant]["teacher_params"] if isolated else None,
            "params_in_process": isolated[variant]["params_in_process"] if isolated else None,
        }
    cuda = args.device.startswith("cuda")
    unit = "MiB allocated" if cuda else "MiB RSS"
    mem_where = "fresh process" if isolated else "in-process, indicative"

    def ms(value: float) -> str:
        return "–" if value != value else f"{value:.0f}" if value >= 10 else f"{value:.2g}"

    def mib(value: float) -> str:
        return "–" if value != value else f"{value:.3g}" if value < 1000 else f"{value:.0f}"

    main_process_loader = args.dataloader_workers == 0

    headers = [
        "variant",
        "median s/step",
        "mean s/step",
        "min / max",
        "median per round",
        f"peak above setup ({unit}, {mem_where})",
        f"setup ({unit})",
        f"peak ({unit})",
        "peak tensor allocation above setup (MiB, CPU profiler)",
        "parameters in the process (teacher's)",
        "cache lookup + decode in the collator (ms/batch)",
        "targets to device in the step (ms/step)",
        "chunked loss (ms/step)",
        "step-1 loss",
    ]
    rows = [
        [
            labels[v],
            s["median"],
            s["mean"],
            f"{s['min']:.3f} / {s['max']:.3f}",
            ", ".join(f"{x:.3f}" for x in s["per_round"]),
            s["peak_above"],
            s["setup"],
            s["peak"],
            mib(s["tensor_peak"]),
            "–"
            if s["teacher_params"] is None
            else f"{s['params_in_process'] / 1e6:.1f}M ({s['teacher_params'] / 1e6:.1f}M)",
            ms(s["lookup_ms"]) if main_process_loader or not v.startswith("cache") else "– (in workers)",
            ms(s["to_device_ms"]),
            ms(s["loss_ms"]),
            f"{s['first_loss']:.5f}",
        ]
        for v, s in stats.items()
    ]
    table = common.markdown_table(headers, rows)

    ratio_lines = [ratio_line(rounds, stats, f"cache{k}", "sft", short, TARGET) for k in args.ks]
    ratio_lines.append(ratio_line(rounds, stats, "live", "sft", short, None) + " (reference)")
    ratio_lines += [ratio_line(rounds, stats, f"cache{k}", "live", short, None) for k in args.ks]
    mem_parts = [
        f"{short[v]} {100 * stats[v]['peak_above'] / stats['sft']['peak_above']:.0f}%" for v in variants if v != "sft"
    ]
    ratio_lines.append(f"- Peak memory above setup ({unit}) relative to SFT only: {', '.join(mem_parts)}.")
    if not cuda and isolated:
        tensor_parts = [
            f"{short[v]} {100 * stats[v]['tensor_peak'] / stats['sft']['tensor_peak']:.0f}%"
            for v in variants
            if v != "sft"
        ]
        ratio_lines.append(
            f"- Peak tensor allocation above setup (CPU profiler) relative to SFT only: {', '.join(tensor_parts)}."
        )

    def share(k: int, key: str) -> float:
        return 100 * stats[f"cache{k}"][key] / 1000 / stats[f"cache{k}"]["median"]

    shares = ", ".join(
        f"k={k}: targets to device {share(k, 'to_device_ms'):.1f}%, chunked loss {share(k, 'loss_ms'):.0f}%"
        for k in args.ks
    )
    ratio_lines.append(f"- Share of a cache step (medians per step / median step): {shares}.")
    if main_process_loader:
        lookups = ", ".join(f"k={k} {share(k, 'lookup_ms'):.1f}%" for k in args.ks)
        ratio_lines.append(
            "- Collator lookup + decode per batch (main process, between steps, outside the timed step) relative to "
            f"the median cache step: {lookups}."
        )
    else:
        ratio_lines.append(
            f"- Collator lookup + decode: in the {args.dataloader_workers} DataLoader worker processes, overlapping "
            "the steps; not timed (calls in worker processes are not seen)."
        )
    losses_text = ", ".join(
        f"k={k} {stats[f'cache{k}']['first_loss']:.6f} "
        f"({100 * (stats[f'cache{k}']['first_loss'] / stats['live']['first_loss'] - 1):+.1f}% vs live)"
        for k in args.ks
    )
    ratio_lines.append(
        f"- Step-1 loss (same initial student, same batch): live {stats['live']['first_loss']:.6f}, from cache "
        f"{losses_text}; SFT's is the student's cross-entropy {stats['sft']['first_loss']:.4f}."
    )
    ratio_lines.append(
        f"- Tokens: first batch {first['shape']} for every trainer, identical `input_ids`: "
        f"{'yes' if same_ids else 'NO'}; trained tokens per step "
        + ", ".join(f"{short[v]} {s['trained_tokens']}" for v, s in summaries.items())
        + f" ({'equal' if same_trained else 'NOT equal'})."
    )

    cache_headers = [
        "k",
        "log-prob bits",
        "rows",
        "scored tokens",
        "bytes on disk (all files)",
        "payload bytes",
        "bytes on disk / scored token",
        "payload bytes / scored token",
        "payload bytes / kept logit",
        "upper bound (any ids)",
        "disk bytes / kept logit",
        "vs float32 full logits",
        "teacher mass in the top k",
        "write time (s)",
    ]
    full_row_bytes = 4 * args.vocab
    cache_rows = [
        [
            k,
            args.logprob_bits,
            c["rows"],
            c["scored_positions"],
            c["disk_bytes"],
            c["payload_bytes"],
            f"{c['disk_bytes_per_token']:.1f}",
            f"{c['payload_bytes_per_token']:.1f}",
            f"{c['bytes_per_logit']:.3f}",
            f"{c['expected_bytes_per_logit']:.3f}",
            f"{c['disk_bytes_per_logit']:.3f}",
            f"1/{full_row_bytes / c['disk_bytes_per_token']:.0f}",
            f"{c['top_k_mass']:.4f}",
            f"{c['write_s']:.2f}",
        ]
        for k, c in caches.items()
    ]
    cache_table = common.markdown_table(cache_headers, cache_rows)
    any_cache = next(iter(caches.values()))
    files_note = ", ".join(f"`{name}` {size}" for name, size in sorted(any_cache["files"].items()))
    cache_notes = (
        f"Each cache covers the {any_cache['rows']} training rows ({any_cache['tokens']} tokens, "
        f"{any_cache['scored_positions']} scored) and is written by the live trainer's `write_teacher_cache` (teacher "
        f"forward over the prepared set with the trainer's collator, top-k, encoding, sha256, atomic writes); the "
        f"write time includes fingerprinting the teacher's weights (sha256, {any_cache['fingerprint_s']:.2f} s on "
        f"its own). Files of the k={args.ks[0]} cache (bytes): {files_note}. 'vs float32 full logits': disk bytes "
        f"per scored token against {full_row_bytes} bytes (4 x V). 'Teacher mass in the top k': mean over the "
        "scored tokens of the teacher's probability on its k kept ids; the random-init teacher is nearly uniform, "
        "so the 'bucket' targets hide most of its divergence from the student and the cached step-1 loss is far "
        "below the live one (this benchmark measures speed, not fidelity; see `docs/teacher_cache.md` for the loss "
        "gap on a peaked teacher)."
    )

    params = timing["params"]
    wall = time.perf_counter() - wall_start
    import importlib.util

    import trl

    sft_note = (
        f" With TRL {trl.__version__}, SFTTrainer's loss goes through `trl.kernels.chunked_logprob` (seen with "
        "`--profile`), whose backward recomputes the logits."
        if importlib.util.find_spec("trl.kernels.chunked_logprob") is not None
        else ""
    )
    setup_text = (
        f"Same models, data and settings as `benchmarks/train_step.py`: Qwen2-style random-init models, vocab "
        f"{args.vocab}: teacher {args.teacher_layers} layers x {args.teacher_hidden} ({params['teacher'] / 1e6:.1f}M "
        f"parameters), student {args.student_layers} layers x {args.student_hidden} ({params['student'] / 1e6:.1f}M "
        f"parameters; built first from the seed, so every variant starts from the same weights), float32. Batch "
        f"{args.batch_size} x {args.seq_len} tokens ({args.prompt_len + PROMPT_OVERHEAD} prompt tokens, not trained), "
        f"AdamW, no packing, device `{args.device}`, DataLoader workers: {args.dataloader_workers} "
        f"(`dataloader_num_workers`, every variant). Ours: generalized JSD (beta {args.beta}), temperature 1, alpha "
        f"0; from a cache with `sparse_targets='bucket'` and no teacher model.{sft_note} Timing: one process, "
        f"{args.rounds} turns per variant (order rotated each round), each {args.warmup_steps} warm-up + "
        f"{args.steps} measured steps. The cache lookup runs in the data collator (`CacheTargetsCollator`), not in "
        "the step: 'cache lookup + decode in the collator' is the median per measured batch of "
        "`hf_distill.teachers.cached_batches.fetch_cached_targets` (row keys, lookup, decode on the CPU; timed only "
        "when the DataLoader runs in the main process, i.e. with 0 workers, and then between steps, outside the timed "
        "step); 'targets to device in the step' is `CachedBatchTargets.to_teacher` (non-blocking copies, device "
        "synchronized around it) and 'chunked loss' is `chunked_distillation_loss` (loss and its gradient, computed "
        "in the forward), medians per measured step."
        + (
            f" Memory: each variant in a fresh process, {args.memory_steps} steps after the trainer is built; the "
            "cache variants' processes never build the teacher ('parameters in the process': every `nn.Parameter` "
            "alive there, found with `gc`); 'setup' is the RSS once the trainer exists (the live teacher's weights "
            "are there)."
            + (
                " 'Peak tensor allocation': on CPU, the peak of the bytes held by tensors in a second run of the same "
                "steps after the RSS measurement (the profiler's buffers would inflate the RSS), above what they held "
                "at its start (`TensorAllocationPeak`: PyTorch profiler memory events, the CPU "
                "analogue of `torch.cuda.max_memory_allocated`; RSS hides short-lived logit tiles served from pages "
                "the allocator already holds)"
                + (
                    "."
                    if main_process_loader
                    else "; allocations in the DataLoader worker processes (the lookup) are counted by neither."
                )
                if not cuda
                else " On cuda, the allocated-bytes columns are already the tensors' peak (no profiler column)."
            )
            if isolated
            else " Memory: measured in the timing process (indicative only)."
        )
    )
    body = common.report_body(
        f"## Training step from a teacher cache vs SFT only, batch {args.batch_size} x {args.seq_len} "
        "(`benchmarks/cache_step.py`)",
        setup_text,
        table,
        ratio_lines,
        "Cache size:",
        cache_table,
        cache_notes,
        common.timing_machine_line(machine, load_after_timing, wall),
    )
    common.print_summary([setup_text, table, "\n".join(ratio_lines), cache_table, cache_notes], wall)
    common.maybe_update_docs(args, body)
    if not (same_ids and same_trained):
        print("WARNING: the trainers did not see the same tokens.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

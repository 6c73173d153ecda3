"""Helpers shared by the benchmark scripts: machine description, peak-memory probes, worker subprocesses and the
Markdown report in `docs/benchmarks.md`.

Every measured variant runs in a fresh Python subprocess (`<script> --worker '<json>'`), so that its peak resident
memory is not inflated by what an earlier variant allocated (glibc and PyTorch keep freed memory around), and so that
monkey-patches applied by one trainer (TRL patches the student's `forward`) cannot leak into another.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
RESULT_MARKER = "@@BENCH_RESULT@@ "

DOC_INTRO = """# Benchmarks

The scripts in `benchmarks/` compare hf_distill with TRL (the naive full-logit distillation of GKD, the on-policy
`DistillationTrainer`, plain SFT):

- `benchmarks/loss_memory.py`: the loss alone (forward + backward from last hidden states), our token-chunked
  `chunked_distillation_loss` against `GKDTrainer.generalized_jsd_loss` on full `hidden @ W.T` logits.
- `benchmarks/train_step.py`: whole optimizer steps of `DistillationTrainer`, TRL's `GKDTrainer` and a floor (an
  `SFTTrainer` student step plus one teacher forward), on a tiny random-init Qwen2 teacher/student pair.

Each measured variant runs in a fresh subprocess, so its peak memory is its own. On CPU, memory is the resident set
size (RSS) read from `/proc/self/status`: the peak-RSS counter (`VmHWM`) is reset once the inputs (or the trainer)
exist, so "peak above setup" is what the measured work itself adds on top; "peak RSS" is the absolute high-water mark.
On CUDA, memory is `torch.cuda.max_memory_allocated`. Timings on a shared machine are noisy: the load average at the
start of each run is recorded next to its table.

## How to reproduce

```bash
source .venv/bin/activate
export HF_HUB_OFFLINE=1
python benchmarks/loss_memory.py            # N=2048 tokens, H=896, V=151936, fp32 (several minutes on 2 CPU cores)
python benchmarks/train_step.py             # Qwen2-style 4-layer/512 teacher, 2-layer/256 student, V=32000
python benchmarks/loss_memory.py --quick    # smoke runs at small sizes (< 1 min each); they do not touch this file
python benchmarks/train_step.py --quick
python benchmarks/cache_step.py --threads 1    # ~5 min
python benchmarks/cache_quality.py             # ~7-12 min (trains a teacher and six students)
python benchmarks/on_policy_step.py --threads 1  # ~5 min
python benchmarks/cache_lookup.py              # ~1 min: random row lookups in a 16-shard cache
python benchmarks/loss_memory.py --device cuda   # on a GPU; memory is then torch.cuda.max_memory_allocated
```

Each full run replaces its own section below (between its `BEGIN`/`END` markers); `--no-write` skips that,
`--write` forces it for other sizes.
"""


# Machine description ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: str, threads: int | None = None) -> str:
    """One line: CPU model and cores, torch threads used by the measured runs, RAM, GPU, versions, load, date."""
    import torch

    parts = [
        f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch threads {threads or torch.get_num_threads()}",
        f"RAM: {total_ram_gib():.0f} GiB",
    ]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name(0)}")
    versions = [f"torch {torch.__version__}"]
    for name in ("transformers", "trl"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except Exception:  # noqa: BLE001 - a version string is informative only
            pass
    parts.append(", ".join(versions))
    parts.append(f"Python {platform.python_version()}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load is not None:
        parts.append(f"load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)")
    parts.append(f"date {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}")
    return "; ".join(parts)


def total_ram_gib() -> float:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


# Memory probes ----------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryProbe:
    """Peak memory of a stretch of work: CPU RSS (Linux) or CUDA allocated bytes.

    `start()` marks the baseline (current RSS, and resets the kernel's peak-RSS counter when `/proc/self/clear_refs`
    accepts it); `stop()` returns `{"baseline_mib", "peak_mib", "peak_above_mib", "method"}`.
    """

    def __init__(self, device: str):
        self.device = device
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
            return
        self.baseline = (_status_kib("VmRSS") or 0) * 1024
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM (peak RSS) to the current RSS, Linux >= 4.0
            self.method = "VmHWM (reset after setup)"
        except OSError:
            import resource

            # Without the reset, the peak is the process's high-water mark, which setup may have set already
            self.method = "ru_maxrss (not reset)"
            self.setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> dict:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            import resource

            hwm = _status_kib("VmHWM")
            if self.method.startswith("VmHWM") and hwm is not None:
                peak = hwm * 1024
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "baseline_mib": self.baseline / 2**20,
            "peak_mib": peak / 2**20,
            "peak_above_mib": (peak - self.baseline) / 2**20,
            "method": self.method,
        }


class TensorAllocationPeak:
    """Peak bytes held by tensors during a block, on the CPU: the analogue of `torch.cuda.max_memory_allocated`.

    RSS mixes in the allocator's retained pages and glibc's arenas, and hides short-lived tiles; this counts each
    tensor allocation and free, read from the PyTorch profiler's raw memory events (`profile_memory=True`) in time
    order. Use as a context manager; `peak_mib` is then the peak above what was allocated when the block started.
    Profiling slows the block down: use it for memory runs, not timed ones.
    """

    def __enter__(self) -> TensorAllocationPeak:
        from torch._C._autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        self._cpu = DeviceType.CPU
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)
        events = [e for e in self._profile.profiler.kineto_results.events() if e.name() == "[memory]"]
        current = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            if event.device_type() == self._cpu:
                current += event.nbytes()
                peak = max(peak, current)
        self.peak_mib = peak / 2**20


def process_peak_rss_mib() -> float:
    """Absolute peak RSS of this process so far (`ru_maxrss`, KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# Worker subprocesses ----------------------------------------------------------------------------------------------


def emit_result(result: dict) -> None:
    """Print a worker's result as one marked JSON line (the parent reads the last one)."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


def run_worker(script: str, spec: dict, timeout: float | None = None, verbose: bool = False) -> dict:
    """Run `python <script> --worker '<spec json>'` in a fresh process and return the result it emits."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, script, "--worker", json.dumps(spec)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)
    wall = time.perf_counter() - start
    results = [line[len(RESULT_MARKER) :] for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if verbose or proc.returncode != 0 or not results:
        sys.stderr.write(proc.stdout[-4000:])
        sys.stderr.write(proc.stderr[-6000:])
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"worker {spec.get('name', spec)} failed with exit code {proc.returncode}")
    result = json.loads(results[-1])
    result["process_wall_s"] = wall
    return result


# Reporting --------------------------------------------------------------------------------------------------------


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    script = os.path.relpath(sys.argv[0], REPO_ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return shlex.join(["python", script, *sys.argv[1:]])


def update_docs(section: str, body: str, path: Path = DOCS_PATH) -> None:
    """Replace (or append) the `<!-- BEGIN section -->`...`<!-- END section -->` block of `docs/benchmarks.md`."""
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else DOC_INTRO
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    print(f"Updated {os.path.relpath(path, Path.cwd())} (section {section!r}).")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def paired_ratios(rounds: dict, a: str, b: str) -> list[float]:
    """Per-round ratios of the median step times of variants `a` and `b` (same round, same load)."""
    return [median(x["times"]) / median(y["times"]) for x, y in zip(rounds[a], rounds[b])]


def report_body(*blocks: str | list[str]) -> str:
    """The Markdown of a docs section: the blocks (a list is spliced in line by line) separated by blank lines, then
    the command that produced it."""
    lines: list[str] = []
    for block in blocks:
        if lines:
            lines.append("")
        lines.extend(block if isinstance(block, list) else [block])
    lines += ["", "Command:", "", "```bash", command_line(), "```"]
    return "\n".join(lines)


def timing_machine_line(machine: str, load_after_timing: float, wall: float) -> str:
    return (
        f"Machine: {machine}; load average after the timing phase {load_after_timing:.1f}. "
        f"Total benchmark wall time {wall:.0f} s."
    )


def print_summary(blocks: list[str], wall: float) -> None:
    """Print each block after a blank line, then the command line and the total wall time."""
    for block in blocks:
        print()
        print(block)
    print()
    print(f"Command: {command_line()}  (total {wall:.0f} s)")


def maybe_update_docs(args, body: str) -> None:
    """Write the section unless `--no-write`, or `--quick` without `--write`."""
    if (not args.quick or args.write) and not args.no_write:
        update_docs(args.doc_section, body)


# Command line -----------------------------------------------------------------------------------------------------

THREADS_HELP = (
    "torch.set_num_threads for the timing and memory runs (default: torch's choice; 1 with --quick). On a "
    "machine shared with other jobs, 1 avoids threads waiting on each other at every operation."
)
QUICK_HELP = "Tiny models, few steps, no memory subprocesses."


def doc_section_help(section: str) -> str:
    return (
        f"Marker name of the docs/benchmarks.md section to replace (default {section!r}); use another name to "
        "keep a run at other settings next to the default one."
    )


def add_model_size_arguments(parser) -> None:
    """--vocab and the teacher/student width and depth of the random-init Qwen2 pair."""
    parser.add_argument("--vocab", type=int, default=32000, help="Vocabulary size (tokenizer and both models).")
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--student-layers", type=int, default=2)


def add_round_arguments(parser, rounds: int = 4) -> None:
    """--rounds, --warmup-steps, --steps and --memory-steps of the timing scripts."""
    parser.add_argument("--rounds", type=int, default=rounds, help="Turns per variant (order rotated every round).")
    parser.add_argument("--warmup-steps", type=int, default=1, help="Steps discarded at the start of every turn.")
    parser.add_argument("--steps", type=int, default=4, help="Measured steps per turn.")
    parser.add_argument(
        "--memory-steps", type=int, default=3, help="Steps of each fresh-process memory run (0: skip them)."
    )


def add_device_arguments(parser, threads_help: str = THREADS_HELP) -> None:
    """--device, --threads and --seed."""
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i].")
    parser.add_argument("--threads", type=int, default=None, help=threads_help)
    parser.add_argument("--seed", type=int, default=0)


def add_write_arguments(parser, section: str, quick_help: str = QUICK_HELP, section_help: str | None = None) -> None:
    """--quick, --write, --no-write and --doc-section (the docs/benchmarks.md section a run replaces)."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--write", action="store_true", help="Update docs/benchmarks.md even with --quick.")
    parser.add_argument("--no-write", action="store_true", help="Do not update docs/benchmarks.md.")
    parser.add_argument(
        "--doc-section", default=section, help=section_help if section_help is not None else doc_section_help(section)
    )


def add_worker_arguments(
    parser,
    timeout: float = 1800,
    timeout_help: str = "Seconds allowed per memory subprocess.",
    verbose_help: str = "Show the memory subprocesses' output.",
) -> None:
    """--timeout, --verbose and the hidden --worker of the fresh-process runs."""
    import argparse

    parser.add_argument("--timeout", type=float, default=timeout, help=timeout_help)
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def finish_round_arguments(args) -> None:
    """--quick's rounds and steps (2 turns of 1 warm-up + 2 steps, no memory runs, 1 thread unless given); a memory
    run needs one warm-up step and at least one more."""
    if args.quick:
        args.rounds, args.warmup_steps, args.steps, args.memory_steps = 2, 1, 2, 0
        if args.threads is None:
            args.threads = 1  # tiny ops: thread barriers would dominate on a busy machine
    if args.memory_steps == 1:
        args.memory_steps = 2  # one warm-up step and at least one more


def quiet_transformers() -> None:
    """Offline hub, no tokenizer fork warnings, transformers logging at error level."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def parse_variants(text: str, known: tuple | list) -> list[str]:
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = set(variants) - set(known)
    if unknown:
        raise SystemExit(f"Unknown variants {sorted(unknown)}; choose from {known}.")
    return variants


def memory_phase(script: str, args, base: dict, variants: list[str], **extra) -> dict:
    """Each variant in a fresh subprocess: build, reset the peak counter, train a few steps, read the peak."""
    results = {}
    for variant in variants:
        spec = {
            **base,
            "variant": variant,
            **extra,
            "name": f"{variant} (memory)",
            "warmup_steps": 1,
            "steps": args.memory_steps - 1,
        }
        print(f"Memory run (fresh process): {variant} ...", flush=True)
        results[variant] = run_worker(script, spec, timeout=args.timeout, verbose=args.verbose)
        m = results[variant]["memory"]
        print(f"  {variant}: peak above setup {m['peak_above_mib']:.0f} MiB, peak {m['peak_mib']:.0f} MiB", flush=True)
    return results

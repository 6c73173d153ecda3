"""Loss-only benchmark: peak memory and time of one forward + backward of the distillation loss.

Compares, from the last hidden states of `N` tokens:

- ours: `hf_distill.losses.chunked_distillation_loss` with a `HiddenStateTeacher` (both LM heads applied a chunk of
  tokens at a time; the full `[N, V]` logits never exist);
- naive: full logits `hidden @ W.T` for the student (with grad) and the teacher (no grad), as a trainer computes
  them, then `trl.experimental.gkd.GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta=...)`.

Gradients flow to the student hidden states and the student LM-head weight in both. Every variant runs in a fresh
subprocess; inside, the inputs are allocated, a small warm-up call runs, the peak-memory counter is reset, then the
measured repetitions run (memory from the first one, time = median of all). The script checks that ours and naive give
the same loss and gradients.

Usage:
    python benchmarks/loss_memory.py                 # N=2048, H=896, V=151936, fp32 (Qwen2-0.5B-like head)
    python benchmarks/loss_memory.py --quick         # smoke run at small sizes
    python benchmarks/loss_memory.py --device cuda --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common  # noqa: E402

SECTION = "loss_memory"
NAIVE_BETA_FOR = {"generalized_jsd": None, "forward_kl": 0.0, "reverse_kl": 1.0}
"""Divergences the naive GKD loss can express (`None`: use `--beta`): beta=0 is forward KL, beta=1 reverse KL."""


# Worker ----------------------------------------------------------------------------------------------------------


def make_inputs(spec: dict):
    import torch

    n, h, v = spec["tokens"], spec["hidden"], spec["vocab"]
    dtype = getattr(torch, spec["dtype"])
    g = torch.Generator().manual_seed(spec["seed"])
    scale = 2.0 / h**0.5  # logits with a standard deviation of about 2

    def randn(*shape, std=1.0):
        x = torch.randn(*shape, generator=g)
        if std != 1.0:
            x.mul_(std)  # in place: no second full-size temporary during setup
        return x.to(device=spec["device"], dtype=dtype)

    student_hidden = randn(n, h).requires_grad_(True)
    student_weight = randn(v, h, std=scale).requires_grad_(True)
    teacher_hidden = randn(n, h)
    teacher_weight = randn(v, h, std=scale)
    return student_hidden, student_weight, teacher_hidden, teacher_weight


def loss_fn(spec: dict):
    """`f(student_hidden, student_weight, teacher_hidden, teacher_weight) -> scalar loss` for the variant."""
    import torch
    import torch.nn.functional as F

    if spec["impl"] == "ours":
        from hf_distill.losses import HiddenStateTeacher, LMHead, chunked_distillation_loss

        def ours(hs, ws, ht, wt):
            out = chunked_distillation_loss(
                hs,
                LMHead(ws),
                HiddenStateTeacher(ht, LMHead(wt)),
                divergence=spec["divergence"],
                beta=spec["beta"],
                chunk_size=spec["chunk_size"],
            )
            return out.loss

        return ours

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    def naive(hs, ws, ht, wt):
        student_logits = F.linear(hs, ws)  # [N, V], as a trainer's forward returns them
        with torch.no_grad():
            teacher_logits = F.linear(ht, wt)
        # 2-D logits: "batchmean" divides by N, like ours (mean over tokens)
        return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta=spec["beta"])

    return naive


def worker(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    fn = loss_fn(spec)
    hs, ws, ht, wt = make_inputs(spec)

    # Warm-up on a few tokens (thread pools, kernels, allocator) before the measured runs
    k = min(spec["warmup_tokens"], spec["tokens"])
    if k > 0:
        fn(hs[:k], ws, ht[:k], wt).backward()
        hs.grad = ws.grad = None
        common.synchronize(device)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    probe = common.MemoryProbe(device)
    probe.start()
    times, memory, loss_value = [], None, None
    for rep in range(spec["reps"]):
        common.synchronize(device)
        start = time.perf_counter()
        loss = fn(hs, ws, ht, wt)
        loss.backward()
        common.synchronize(device)
        times.append(time.perf_counter() - start)
        if rep == 0:
            memory = probe.stop()
            loss_value = loss.item()
            if spec.get("dump"):
                g = torch.Generator().manual_seed(1234)
                rows = torch.randperm(spec["vocab"], generator=g)[: spec["grad_rows"]]
                torch.save(
                    {
                        "loss": loss_value,
                        "grad_hidden": hs.grad.detach().float().cpu(),
                        "grad_weight_rows": ws.grad.detach()[rows.to(ws.grad.device)].float().cpu(),
                        "grad_weight_norm": ws.grad.detach().double().norm().item(),
                    },
                    spec["dump"],
                )
        del loss
        hs.grad = ws.grad = None
    common.emit_result(
        {
            "name": spec["name"],
            "times_s": times,
            "memory": memory,
            "process_peak_rss_mib": common.process_peak_rss_mib(),
            "loss": loss_value,
            "load_1min": load,
        }
    )


# Parent ----------------------------------------------------------------------------------------------------------


def naive_bytes_estimate(args) -> float:
    """Memory the naive variant needs: inputs, 17 `[N, V]` float32 tensors (measured above inputs at N=2048,
    V=151936 on CPU: 20184 MiB = 17.0 x 1187 MiB, the student LM-head gradient included) and ~0.5 GiB of process."""
    element = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    inputs = (2 * args.tokens * args.hidden + 2 * args.vocab * args.hidden) * element
    return inputs + 17.0 * args.tokens * args.vocab * 4 + 0.5 * 2**30


def available_bytes(device: str) -> float | None:
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return float(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


def compare(dump_a: str, dump_b: str) -> dict:
    import torch

    a, b = torch.load(dump_a), torch.load(dump_b)

    def rel(x, y):
        return ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()

    return {
        "loss_abs_diff": abs(a["loss"] - b["loss"]),
        "grad_hidden_rel": rel(a["grad_hidden"], b["grad_hidden"]),
        "grad_weight_rel": rel(a["grad_weight_rows"], b["grad_weight_rows"]),
        "grad_weight_norm_ratio": a["grad_weight_norm"] / max(b["grad_weight_norm"], 1e-30),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", "-N", type=int, default=2048, help="Tokens N (rows of the hidden states).")
    parser.add_argument("--hidden", "-H", type=int, default=896, help="Hidden size H (both models).")
    parser.add_argument("--vocab", "-V", type=int, default=151936, help="Vocabulary size V (LM-head rows).")
    parser.add_argument(
        "--divergences",
        default="generalized_jsd,forward_kl",
        help="Comma-separated divergences for ours (any of hf_distill's). The naive GKD loss runs for the first one "
        "it can express (generalized_jsd, forward_kl = beta 0, reverse_kl = beta 1), or for all with --naive-all.",
    )
    parser.add_argument("--naive-all", action="store_true", help="Run the naive loss for every divergence.")
    parser.add_argument("--beta", type=float, default=0.5, help="Generalized JSD beta (GKD's default 0.5).")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="Our loss_chunk_size (default: ~16 MiB tiles, >= 64 tokens)."
    )
    parser.add_argument("--reps", type=int, default=1, help="Measured repetitions per variant (time = median).")
    parser.add_argument("--warmup-tokens", type=int, default=64, help="Tokens of the warm-up call (0: none).")
    common.add_device_arguments(parser, threads_help="torch.set_num_threads in the workers.")
    parser.add_argument("--grad-rows", type=int, default=4096, help="LM-head gradient rows compared.")
    common.add_write_arguments(
        parser, SECTION, quick_help="Small sizes (N=256, H=64, V=8192, 3 reps) for a smoke run."
    )
    parser.add_argument(
        "--force-naive",
        action="store_true",
        help="Run the naive loss even when it is estimated not to fit in the available memory.",
    )
    common.add_worker_arguments(
        parser,
        timeout=3600,
        timeout_help="Seconds allowed per worker process.",
        verbose_help="Show the workers' output.",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.vocab = 256, 64, 8192
        args.reps = 3
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return
    wall_start = time.perf_counter()
    divergences = [d.strip() for d in args.divergences.split(",") if d.strip()]
    machine = common.machine_description(args.device, args.threads)
    print(f"Command: {common.command_line()}")
    print(f"Machine: {machine}")

    naive_for = [d for d in divergences if d in NAIVE_BETA_FOR]
    if not args.naive_all:
        naive_for = naive_for[:1]
    base = {
        "tokens": args.tokens,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "device": args.device,
        "seed": args.seed,
        "reps": args.reps,
        "warmup_tokens": args.warmup_tokens,
        "chunk_size": args.chunk_size,
        "threads": args.threads,
        "grad_rows": min(args.grad_rows, args.vocab),
    }
    naive_need = naive_bytes_estimate(args)
    available = available_bytes(args.device)
    if naive_for and not args.force_naive and available is not None and naive_need > available:
        print(
            f"Skipping the naive loss: it needs about {naive_need / 2**30:.1f} GiB and only "
            f"{available / 2**30:.1f} GiB are available (--force-naive runs it anyway).",
            file=sys.stderr,
        )
        naive_for = []
    tmp = tempfile.mkdtemp(prefix="hf_distill_bench_")
    results = {}
    for divergence in divergences:
        impls = ["ours", "naive"] if divergence in naive_for else ["ours"]
        for impl in impls:
            beta = args.beta if impl == "ours" or NAIVE_BETA_FOR[divergence] is None else NAIVE_BETA_FOR[divergence]
            name = f"{impl}/{divergence}"
            spec = {
                **base,
                "name": name,
                "impl": impl,
                "divergence": divergence,
                "beta": beta,
                "dump": os.path.join(tmp, f"{impl}_{divergence}.pt"),
            }
            print(f"Running {name} ...", flush=True)
            result = common.run_worker(__file__, spec, timeout=args.timeout, verbose=args.verbose)
            result["dump"] = spec["dump"]
            results[name] = result
            m = result["memory"]
            print(
                f"  {name}: loss {result['loss']:.6f}, time {common.median(result['times_s']):.2f} s, peak above "
                f"inputs {m['peak_above_mib']:.0f} MiB, peak {m['peak_mib']:.0f} MiB "
                f"(process {result['process_wall_s']:.0f} s)",
                flush=True,
            )

    logits_mib = args.tokens * args.vocab * 4 / 2**20
    unit = "MiB allocated" if args.device.startswith("cuda") else "MiB RSS"
    headers = [
        "variant",
        "divergence",
        f"peak above inputs ({unit})",
        f"peak ({unit})",
        f"fwd+bwd time (s, median of {args.reps})",
        "loss",
        "load avg (1 min) at start",
    ]
    rows = []
    for name, r in results.items():
        impl, divergence = name.split("/")
        label = "ours (chunked_distillation_loss)" if impl == "ours" else "naive (full logits + GKD loss)"
        if impl == "naive" and NAIVE_BETA_FOR[divergence] is not None:
            divergence = f"{divergence} (GKD beta={NAIVE_BETA_FOR[divergence]:g})"
        rows.append(
            [
                label,
                divergence,
                r["memory"]["peak_above_mib"],
                r["memory"]["peak_mib"],
                common.median(r["times_s"]),
                f"{r['loss']:.6f}",
                f"{r['load_1min']:.1f}",
            ]
        )
    table = common.markdown_table(headers, rows)

    ratio_rows = []
    for divergence in naive_for:
        ours, naive = results[f"ours/{divergence}"], results[f"naive/{divergence}"]
        check = compare(ours["dump"], naive["dump"])
        mem_ratio = ours["memory"]["peak_above_mib"] / naive["memory"]["peak_above_mib"]
        time_ratio = common.median(ours["times_s"]) / common.median(naive["times_s"])
        ok = (
            check["loss_abs_diff"] <= 1e-4 * max(1.0, abs(naive["loss"]))
            and max(check["grad_hidden_rel"], check["grad_weight_rel"]) <= 1e-3
        )
        ratio_rows.append(
            [
                divergence,
                f"{100 * mem_ratio:.1f}% ({'meets' if mem_ratio <= 0.25 else 'misses'} <= 25%)",
                f"{time_ratio:.2f}",
                f"{ours['loss']:.6f} / {naive['loss']:.6f}",
                f"{check['loss_abs_diff']:.1e}",
                f"{check['grad_hidden_rel']:.1e} / {check['grad_weight_rel']:.1e}",
                "yes" if ok else "NO",
            ]
        )
    ratio_table = common.markdown_table(
        [
            "divergence",
            "memory ours/naive (peak above inputs)",
            "time ours/naive",
            "loss ours / naive",
            "abs loss diff",
            "grad max rel diff (hidden / head rows)",
            "match",
        ],
        ratio_rows,
    )
    for r in results.values():
        os.remove(r["dump"])
    os.rmdir(tmp)

    wall = time.perf_counter() - wall_start
    inputs_mib = (2 * args.tokens * args.hidden + 2 * args.vocab * args.hidden) * 4 / 2**20
    body = "\n".join(
        [
            "## Loss only: chunked vs full logits (`benchmarks/loss_memory.py`)",
            "",
            f"One forward + backward of the distillation loss from last hidden states: N={args.tokens} tokens, "
            f"H={args.hidden}, V={args.vocab}, {args.dtype}, device `{args.device}`. Gradients flow to the student "
            f"hidden states and LM-head weight. Inputs (hidden states and both LM heads) take {inputs_mib:.0f} MiB; "
            f"one `[N, V]` float32 logits tensor is {logits_mib:.0f} MiB, and the student head's gradient "
            f"{args.vocab * args.hidden * 4 / 2**20:.0f} MiB (both variants produce it). Memory is measured in a "
            "fresh process per variant, after the inputs exist and a warm-up call on "
            f"{min(args.warmup_tokens, args.tokens)} tokens ran; time is wall clock of forward + backward.",
            "",
            table,
            "",
            ratio_table,
            "",
            f"Machine: {machine}. Total benchmark wall time {wall:.0f} s.",
            "",
            "Command:",
            "",
            "```bash",
            common.command_line(),
            "```",
        ]
    )
    common.print_summary([table, ratio_table], wall)
    common.maybe_update_docs(args, body)
    if any(row[-1] != "yes" for row in ratio_rows):
        print("WARNING: ours and naive disagree beyond tolerance.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

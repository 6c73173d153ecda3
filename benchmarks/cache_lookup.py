"""Random-access lookups in a teacher cache of many shards: time and bytes read per training batch.

A training run visits the cache's rows in shuffled order, so the rows of one batch sit in different shards. This
writes a synthetic cache (random top-k targets, `TeacherCacheWriter`, `--rows` rows of `--positions` scored
positions, `--rows-per-shard` rows per shard) and times batches of `--batch-size` random rows looked up the way the
trainer's collator does (`TeacherCache.open(path)`, as `DistillationConfig(teacher_cache=...)` opens it, then one
`lookup` per row). Reported per batch: the median and first-batch time, and the bytes this process read with `read`
calls (`rchar` in `/proc/self/io`; pages of a memory-mapped file are not counted there, so the resident memory growth
is reported too). The page cache is warm (the cache was just written): on a cold disk, reading whole shards costs
more still.

Usage:
    python benchmarks/cache_lookup.py          # 16384 rows x 128 positions, k=64, 8-bit, 16 shards
    python benchmarks/cache_lookup.py --quick  # small, does not touch docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common  # noqa: E402


def _rchar() -> int:
    with open("/proc/self/io") as handle:
        for line in handle:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def write_cache(folder: str, args) -> tuple[list[str], float]:
    import numpy as np

    from hf_distill.teachers.cache_keys import row_key
    from hf_distill.teachers.cache_writer import TeacherCacheWriter

    rng = np.random.default_rng(args.seed)
    writer = TeacherCacheWriter(folder, {"benchmark": "cache_lookup"}, vocab_size=args.vocab, k=args.k,
                                logprob_bits=8, rows_per_shard=args.rows_per_shard)  # fmt: skip
    keys, start = [], time.perf_counter()
    for row in range(args.rows):
        ids = np.stack([rng.choice(args.vocab, size=args.k, replace=False) for _ in range(args.positions)])
        log_probs = np.sort(np.log(rng.dirichlet(np.ones(args.k + 1), size=args.positions)[:, : args.k]), axis=1)
        rest = np.log1p(-np.exp(log_probs).sum(1))
        key = row_key([row, *range(args.positions)], [True] * (args.positions + 1))
        writer.add(key, ids, log_probs[:, ::-1], rest, args.positions + 1)
        keys.append(key)
        if (row + 1) % args.rows_per_shard == 0:
            writer.end_shard()
    writer.finish()
    return keys, time.perf_counter() - start


def time_lookups(folder: str, keys: list[str], args) -> dict:
    from hf_distill.teachers.cache import TeacherCache

    rng = random.Random(args.seed)
    cache = TeacherCache.open(
        folder, **({} if args.max_loaded_shards is None else {"max_loaded_shards": args.max_loaded_shards})
    )
    anon_before, file_before = common._status_kib("RssAnon") or 0, common._status_kib("RssFile") or 0
    times, reads = [], []
    for _ in range(args.batches):
        batch = rng.sample(keys, args.batch_size)
        read_before, start = _rchar(), time.perf_counter()
        for key in batch:
            cache.lookup(key)
        times.append(time.perf_counter() - start)
        reads.append(_rchar() - read_before)
    return {
        "first_ms": 1000 * times[0],
        "median_ms": 1000 * common.median(times[1:]),
        "read_mib": common.median(reads[1:]) / 2**20,
        "anon_growth_mib": ((common._status_kib("RssAnon") or 0) - anon_before) / 1024,
        "file_growth_mib": ((common._status_kib("RssFile") or 0) - file_before) / 1024,
        "manifest": cache.manifest,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--positions", type=int, default=128, help="Scored positions per row.")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--rows-per-shard", type=int, default=1024, help="The writer's default.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=41, help="Batches timed (the first one is reported apart).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-loaded-shards", type=int, default=None, help="Passed to `TeacherCache.open` (default: its default)."
    )
    parser.add_argument("--work-dir", default=None, help="Where to write the cache (default: a temporary folder).")
    common.add_write_arguments(parser, "cache_lookup", quick_help="128 rows of 64 positions, 16 rows per shard.")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.positions, args.rows_per_shard, args.batches = 128, 64, 16, 11
    common.quiet_transformers()
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hf_distill_lookup_", dir=args.work_dir) as folder:
        keys, write_s = write_cache(folder, args)
        result = time_lookups(folder, keys, args)
    manifest = result["manifest"]
    shards = len(manifest["shards"])
    shard_mib = sum(s["bytes"] for s in manifest["shards"]) / shards / 2**20
    row_kib = manifest["payload_bytes"] / manifest["num_rows"] / 1024
    describe = (
        f"Synthetic cache: {args.rows} rows x {args.positions} scored positions, k={args.k}, 8-bit log-probs, vocab "
        f"{args.vocab}; {args.rows_per_shard} rows per shard ({shards} shards of {shard_mib:.1f} MiB, "
        f"{row_kib:.0f} KiB per row; written in {write_s:.0f} s). Timed: {args.batches} batches of {args.batch_size} "
        "random rows, each row looked up with `TeacherCache.lookup` after `TeacherCache.open(path)` (as the trainer "
        f"opens it{'' if args.max_loaded_shards is None else f', max_loaded_shards={args.max_loaded_shards}'}); warm "
        "page cache. 'read' is the bytes read by `read` calls per batch (`rchar`); memory-mapped "
        "pages are not counted there, so the growth of the resident set over all batches is given too: anonymous "
        "memory (`RssAnon`: what the process holds) and file pages (`RssFile`: mapped shard pages, which the kernel "
        "can drop)."
    )
    table = common.markdown_table(
        ["format version", "first batch (ms)", "median batch (ms)", "read per batch (MiB)",
         "RssAnon growth (MiB)", "RssFile growth (MiB)"],
        [[manifest["format_version"], result["first_ms"], result["median_ms"], result["read_mib"],
          result["anon_growth_mib"], result["file_growth_mib"]]],
    )  # fmt: skip
    machine = common.machine_description("cpu")
    blocks = [describe, table, f"Machine: {machine}. Total wall time {time.perf_counter() - wall:.0f} s."]
    common.print_summary(blocks, time.perf_counter() - wall)
    common.maybe_update_docs(args, common.report_body(*blocks))


if __name__ == "__main__":
    main()

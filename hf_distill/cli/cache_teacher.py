"""`hf-distill cache-teacher`: run the teacher once over a training set and store its top-k log-probs.

It takes the same flags as `hf-distill distill` (the student's tokenizer, the dataset, `max_length`, masks, packing and
the temperature decide what is cached, exactly as training will see it) plus the cache settings:

    hf-distill cache-teacher --config recipe.yaml --cache_dir caches --cache_top_k 64
    hf-distill distill --config recipe.yaml --teacher_cache caches/<key hash>

The cache lands in `<cache_dir>/<key hash>/`; a second run with the same inputs does no teacher forward, an interrupted
one resumes, and the folder to train from is printed at the end.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from .common import CliError, print_error, read_recipe, split_equals
from .distill import _check_required, build_trainer, make_parser

__all__ = ["CacheTeacherArguments", "add_parser", "run"]

PROG = "hf-distill cache-teacher"


@dataclass
class CacheTeacherArguments:
    """The cache settings of `hf-distill cache-teacher`."""

    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder holding teacher caches, one sub-folder per key (required)."},
    )
    cache_top_k: int = field(default=64, metadata={"help": "Tokens kept per scored position (k)."})
    cache_logprob_bits: int = field(
        default=8,
        metadata={
            "help": "Bits per stored log-prob: 32 (exact), 16, 8 or 4 (quantised; see docs/teacher_cache.md).",
            "choices": [32, 16, 8, 4],
        },
    )
    cache_rows_per_shard: int = field(
        default=1024, metadata={"help": "Rows per shard (the unit an interrupted run resumes)."}
    )
    cache_batch_size: int | None = field(
        default=None, metadata={"help": "Rows per teacher forward (default: per_device_train_batch_size)."}
    )
    cache_tail_samples: int = field(
        default=0,
        metadata={
            "help": "Of the cache_top_k ids per position, how many to sample from the teacher's tail (0 <= N < "
            "cache_top_k; 0: the exact top k). An unbiased target for divergence=forward_kl only; see "
            "docs/teacher_cache.md."
        },
    )
    cache_seed: int = field(default=0, metadata={"help": "Seed of the tail sampling (with --cache_tail_samples)."})


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `cache-teacher` sub-command; its flags are parsed by TRL's parser (see [`run`])."""
    parser = subparsers.add_parser(
        "cache-teacher",
        help="Run the teacher once over a dataset and store its top-k log-probs (train later with --teacher_cache).",
        description="See `hf-distill cache-teacher --help`.",
        add_help=False,
    )
    parser.set_defaults(handler=run, raw_arguments=True)
    return parser


def run(argv: list[str]) -> int:
    """Run `hf-distill cache-teacher` with `argv`; bad input prints one line on stderr and returns 2."""
    try:
        return _run(list(argv))
    except CliError as error:
        print_error(str(error), PROG)
        return 2


def _run(argv: list[str]) -> int:
    argv = split_equals(argv, "--config")
    recipe_path, recipe = read_recipe(argv)
    parser = make_parser(
        PROG,
        extra_types=(CacheTeacherArguments,),
        description="Run the teacher of a distillation recipe once over its training set and store the top-k "
        "teacher log-probs per scored token, tokenised exactly as `hf-distill distill` would. Takes every flag of "
        "`hf-distill distill` plus the cache settings below.",
        launch=False,
    )
    known = {action.dest for action in parser._actions} | {"env"}
    unknown = [key for key in recipe if key not in known]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise CliError(f"unknown key{plural} in {recipe_path}: {', '.join(map(str, unknown))}")
    try:
        script_args, training_args, model_args, dataset_args, cache_args, *_ = parser.parse_args_and_config(argv)
    except ValueError as error:
        raise CliError(str(error)) from None
    if not cache_args.cache_dir:
        raise CliError("the following arguments are required: --cache_dir (the folder that holds the caches)")
    if training_args.teacher_cache:
        raise CliError("--teacher_cache reads a cache; cache-teacher writes one: drop --teacher_cache")
    if cache_args.cache_top_k <= 0:
        raise CliError(f"argument --cache_top_k: must be a positive integer, got {cache_args.cache_top_k}")
    if not 0 <= cache_args.cache_tail_samples < cache_args.cache_top_k:
        raise CliError(
            f"argument --cache_tail_samples: must be between 0 and --cache_top_k - 1 ({cache_args.cache_top_k - 1}), "
            f"got {cache_args.cache_tail_samples}"
        )
    if cache_args.cache_tail_samples and training_args.divergence != "forward_kl":
        raise CliError(
            f"--cache_tail_samples: a cache with a sampled tail trains only with --divergence forward_kl (an unbiased "
            f"target for it alone), but this recipe uses divergence={training_args.divergence!r}"
        )
    _check_required(script_args, training_args, model_args, dataset_args)
    trainer = build_trainer(script_args, training_args, model_args, dataset_args)
    try:
        cache = trainer.write_teacher_cache(
            cache_args.cache_dir,
            k=cache_args.cache_top_k,
            logprob_bits=cache_args.cache_logprob_bits,
            batch_size=cache_args.cache_batch_size,
            rows_per_shard=cache_args.cache_rows_per_shard,
            tail_samples=cache_args.cache_tail_samples,
            seed=cache_args.cache_seed,
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    manifest = cache.manifest
    print(
        f"Teacher cache: {cache.path}\n"
        f"  {len(cache)} rows, {manifest.get('scored_positions')} scored positions, k={cache.k}, "
        f"{cache.logprob_bits}-bit log-probs, {cache.bytes_per_logit:.3f} bytes per kept logit"
        + (f", {cache.tail_samples} of the k ids sampled from the tail" if cache.tail_samples else "")
        + "\n"
        f"Train from it with the same flags plus: --teacher_cache {cache.path}"
    )
    return 0

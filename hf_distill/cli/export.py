"""`hf-distill export`: write a trained BitNet student as a QAT checkpoint, packed 1.58-bit safetensors, or GGUF.

    hf-distill export --model runs/student --output exports/qat --format qat
    hf-distill export --model runs/student --output exports/packed --format packed --linear_class bitlinear
    hf-distill export --model runs/student --output exports/student.gguf --format gguf --ternary_type TQ2_0

`--model` is a checkpoint saved by a BitNet training run (or an earlier `--format qat` export). The tokenizer saved
with it is copied into the `qat` and `packed` folders and used for the GGUF vocabulary. Bad input ends the command
with one line on stderr (`hf-distill export: error: ...`) and exit code 2; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .common import CliError, print_error

__all__ = ["FORMATS", "add_parser", "run"]

PROG = "hf-distill export"

FORMATS = ("qat", "packed", "gguf")
"""`--format` choices: latent-weight QAT checkpoint, packed 1.58-bit safetensors, llama.cpp GGUF."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `export` sub-command to `subparsers`."""
    parser = subparsers.add_parser(
        "export",
        help="Export a BitNet student: QAT checkpoint, packed 1.58-bit safetensors, or GGUF.",
        description="Export a student trained with BitNet (ternary BitLinear layers) from its checkpoint folder. "
        "qat: latent weights + BitNetQuantConfig (autobitlinear, online), stock transformers trains it further. "
        "packed: 2-bit ternary codes (4 per byte) + scales, stock transformers runs it (quantization_mode offline). "
        "gguf: one file for llama.cpp with TQ2_0/TQ1_0 ternary tensors. See docs/bitnet_export.md.",
    )
    _add_arguments(parser)
    parser.set_defaults(handler=run)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="BitNet QAT checkpoint folder (a BitNet training output).")
    parser.add_argument(
        "--output", required=True, help="Folder to write (qat, packed) or .gguf file (gguf); refused if not empty."
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="What to write.")
    parser.add_argument(
        "--linear_class",
        choices=("bitlinear", "autobitlinear"),
        default=None,
        help="packed only: transformers class that loads the packed layers (default: bitlinear).",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="packed only: dtype of the scales and of every non-ternary tensor (default: bfloat16).",
    )
    parser.add_argument(
        "--ternary_type",
        choices=("TQ2_0", "TQ1_0", "F16"),
        default=None,
        help="gguf only: llama.cpp type of the ternary tensors (default: TQ2_0; F16: unpacked, a baseline).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty output.")


def _check_options(args: argparse.Namespace) -> None:
    allowed = {"qat": (), "packed": ("linear_class", "dtype"), "gguf": ("ternary_type",)}[args.format]
    for option in ("linear_class", "dtype", "ternary_type"):
        if getattr(args, option) is not None and option not in allowed:
            raise CliError(f"argument --{option}: does not apply to --format {args.format}")
    if not os.path.isdir(args.model):
        raise CliError(f"argument --model: {args.model!r} is not a folder (expected a BitNet checkpoint folder)")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise CliError(f"argument --model: {args.model!r} has no config.json (expected a BitNet checkpoint folder)")


def _load_tokenizer(path: str) -> Any:
    """The tokenizer saved in `path`, or `None` when there is none."""
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot load the tokenizer saved in {path}: {error}") from None


def run(args: argparse.Namespace) -> int:
    """Run `hf-distill export`; bad input prints one line on stderr and returns 2."""
    try:
        return _run(args)
    except CliError as error:
        print_error(str(error), PROG)
        return 2


def _run(args: argparse.Namespace) -> int:
    _check_options(args)
    tokenizer = _load_tokenizer(args.model)
    try:
        if args.format == "gguf":
            from hf_distill.export.gguf import export_gguf

            report = export_gguf(
                args.model,
                args.output,
                tokenizer=tokenizer,
                ternary_type=args.ternary_type or "TQ2_0",
                overwrite=args.overwrite,
            )
            print(_gguf_summary(report))
            return 0
        if args.format == "qat":
            from hf_distill.export.qat import export_qat

            report = export_qat(args.model, args.output, tokenizer=tokenizer, overwrite=args.overwrite)
        else:
            from hf_distill.export.packed import export_packed

            report = export_packed(
                args.model,
                args.output,
                tokenizer=tokenizer,
                linear_class=args.linear_class or "bitlinear",
                dtype=args.dtype or "bfloat16",
                overwrite=args.overwrite,
            )
    except (ValueError, FileExistsError, ImportError) as error:
        raise CliError(str(error)) from None
    print(report.summary())
    if tokenizer is None:
        print(f"  note: no tokenizer in {args.model}: none was copied")
    return 0


def _gguf_summary(report: Any) -> str:
    path = getattr(report, "path", None)
    size = getattr(report, "file_size", 0) or (os.path.getsize(path) if path and os.path.isfile(path) else 0)
    lines = [f"Exported (gguf) to {path}", f"  file: {size / 2**20:.2f} MiB"]
    for label, attr in (
        ("llama.cpp arch", "arch"),
        ("ternary type", "ternary_type"),
        ("bits/weight of the ternary layers", "bits_per_ternary_weight"),
        ("tensor types", "tensor_types"),
        ("stored as F16 (rows not a multiple of 256)", "fallback_tensors"),
    ):
        value = getattr(report, attr, None)
        if value not in (None, [], {}):
            lines.append(f"  {label}: {value:.3f}" if isinstance(value, float) else f"  {label}: {value}")
    return "\n".join(lines)

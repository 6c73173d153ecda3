"""Entry point of the `hf-distill` console script: builds the parser from the command modules and dispatches."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = ("hf_distill.cli.demo",)
"""Modules that each define one sub-command through `add_parser(subparsers)`."""


def build_parser() -> argparse.ArgumentParser:
    """Top-level parser with one sub-parser per module in [`COMMANDS`]."""
    from hf_distill import __version__

    parser = argparse.ArgumentParser(
        prog="hf-distill",
        description="Knowledge distillation for Hugging Face transformers and TRL.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `hf-distill` with `argv` (defaults to `sys.argv[1:]`).

    Args:
        argv (`Sequence[str]`, *optional*): Command line arguments, without the program name.

    Returns:
        `int`: Exit code (0 on success).
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

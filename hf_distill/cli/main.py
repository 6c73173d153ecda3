"""Entry point of the `hf-distill` console script: builds the parser from the command modules and dispatches."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = (
    "hf_distill.cli.demo",
    "hf_distill.cli.distill",
    "hf_distill.cli.cache_teacher",
    "hf_distill.cli.export",
    "hf_distill.cli.env",
)
"""Modules that each define one sub-command through `add_parser(subparsers)`."""


class _TopLevelParser(argparse.ArgumentParser):
    """The `hf-distill` parser: a usage error (an unknown command) is one line on stderr, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """Top-level parser with one sub-parser per module in [`COMMANDS`]."""
    from hf_distill import __version__

    parser = _TopLevelParser(
        prog="hf-distill",
        description="Knowledge distillation for Hugging Face transformers and TRL.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=argparse.ArgumentParser)
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
    argv = list(sys.argv[1:] if argv is None else [str(a) for a in argv])
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "raw_arguments", False):  # the command parses its own flags (`distill`: TRL's parser)
        return int(args.handler(argv[argv.index(args.command) + 1 :]) or 0)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

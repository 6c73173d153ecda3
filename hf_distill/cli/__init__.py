"""Command line interface: `hf-distill <command> ...` (or `python -m hf_distill.cli.main <command> ...`).

Each command lives in its own module of this package, which defines `add_parser(subparsers)`: it adds the command's
sub-parser and sets its `handler`, a function of the parsed arguments returning the exit code. Register a new module
in `hf_distill.cli.main.COMMANDS`. Heavy imports (torch, transformers) belong inside handlers, so that `--help` is
fast.
"""

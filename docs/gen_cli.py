"""Render the `hf-distill` command line reference from the parsers themselves.

`render_cli_reference()` returns Markdown with the `--help` output of `hf-distill` and of every sub-command, taken
from `hf_distill.cli.main.build_parser()` and `main([command, "--help"])` (so a command that parses its own flags, like
`distill` with TRL's parser, shows its real help). The docs build calls it through `docs/hooks.py`; run this file to
print the Markdown:

    python docs/gen_cli.py > /tmp/cli_reference.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os

MARKER = "<!-- cli-reference -->"
"""Where the generated reference goes in docs/cli.md; without it, it is appended at the end of the page."""


def _capture_help(argv: list[str]) -> str:
    from hf_distill.cli.main import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
        main(argv)
    return buffer.getvalue().rstrip()


def commands() -> list[str]:
    """The sub-commands of `hf-distill`, in the order the parser lists them."""
    from hf_distill.cli.main import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


def render_cli_reference() -> str:
    """Markdown: a section with one sub-section per command holding its `--help` output (wrapped at 100 columns)."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps the help to this width
    try:
        parts = [
            "## Reference: every command's `--help`",
            "",
            "Generated from the parsers when this site is built, so it is always the installed version's.",
            "",
            "### `hf-distill --help`",
            "",
            "```text",
            _capture_help(["--help"]),
            "```",
        ]
        for command in commands():
            help_text = _capture_help([command, "--help"])
            parts += ["", f"### `hf-distill {command} --help`", "", "```text", help_text, "```"]
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(render_cli_reference())

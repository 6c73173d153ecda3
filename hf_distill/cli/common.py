"""Pieces shared by the `hf-distill` commands that parse TRL-style flags: one-line errors and YAML recipes."""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["CliError", "print_error", "read_recipe", "split_equals"]


class CliError(Exception):
    """Bad input to a `hf-distill` command: printed as one line on stderr, exit code 2."""


def print_error(message: str, prog: str) -> None:
    """Print `message` as one line on stderr, prefixed with the command."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)


def split_equals(argv: list[str], flag: str) -> list[str]:
    """`--flag=value` as two tokens (TRL's parser only finds `--config value`)."""
    out: list[str] = []
    for token in argv:
        if token.startswith(flag + "="):
            out += [flag, token[len(flag) + 1 :]]
        else:
            out.append(token)
    return out


def read_recipe(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Path and content of the `--config` recipe (before any heavy import), with its `env:` block applied."""
    if "--config" not in argv:
        return None, {}
    index = argv.index("--config")
    if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
        raise CliError("argument --config: expected a YAML file")
    path = argv[index + 1]
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            recipe = yaml.safe_load(f)
    except FileNotFoundError:
        raise CliError(f"config file {path!r} does not exist") from None
    except OSError as error:
        raise CliError(f"cannot read config file {path!r}: {error}") from None
    except yaml.YAMLError as error:
        raise CliError(f"config file {path!r} is not valid YAML: {error}") from None
    if recipe is None:
        recipe = {}
    if not isinstance(recipe, dict):
        raise CliError(f"config file {path!r} must be a YAML mapping of flag names to values")
    env = recipe.get("env", {})
    if not isinstance(env, dict):
        raise CliError(f"config file {path!r}: `env` must be a mapping of variable names to values")
    for key, value in env.items():
        os.environ[str(key)] = str(value)
    return path, recipe

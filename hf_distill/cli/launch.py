"""`--accelerate_config`: relaunch a `hf-distill` command under `accelerate launch` with one of TRL's presets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .common import CliError, print_error

__all__ = ["ACCELERATE_PRESETS_PACKAGE", "LAUNCHED_ENV", "launch", "resolve_accelerate_config"]

PROG = "hf-distill distill"

LAUNCHED_ENV = "HF_DISTILL_ACCELERATE_LAUNCHED"
"""Environment variable set for the processes that `--accelerate_config` starts, so that they do not relaunch."""

ACCELERATE_PRESETS_PACKAGE = "trl.accelerate_configs"
"""Package whose `<name>.yaml` files are the `--accelerate_config` presets (TRL's own, reused as they are)."""


def resolve_accelerate_config(name_or_path: str) -> str:
    """Path of an accelerate config: an existing file, or the name of one of TRL's presets (`multi_gpu`, ...)."""
    import importlib.resources as resources

    if Path(name_or_path).is_file():
        return name_or_path
    presets = resources.files(ACCELERATE_PRESETS_PACKAGE)
    candidate = presets.joinpath(f"{name_or_path}.yaml")
    if not candidate.is_file():
        names = sorted(p.name[: -len(".yaml")] for p in presets.iterdir() if p.name.endswith(".yaml"))
        raise CliError(
            f"argument --accelerate_config: {name_or_path!r} is neither a file nor a preset ({', '.join(names)})"
        )
    return str(candidate)


def _recipe_to_flags(keys: dict[str, Any]) -> list[str]:
    """Recipe keys for `accelerate launch` as flags (`true` is a bare switch, `false` is left out)."""
    flags: list[str] = []
    for key, value in keys.items():
        if value is True:
            flags.append(f"--{key}")
        elif value is not False and value is not None:
            flags += [f"--{key}", str(value)]
    return flags


def _without(argv: list[str], removed: list[str]) -> list[str]:
    """`argv` without the ordered subsequence `removed` (the tokens `accelerate launch` takes)."""
    it = iter(removed)
    current = next(it, None)
    kept = []
    for token in argv:
        if current is not None and token == current:
            current = next(it, None)
        else:
            kept.append(token)
    return kept


def _drop_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == flag:
            skip = True
        else:
            out.append(token)
    return out


def launch(argv: list[str], accelerate_config: str, recipe_extras: dict[str, Any], cli_remaining: list[str]) -> int:
    import subprocess

    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_args = ["--config_file", resolve_accelerate_config(accelerate_config)]
    launch_args += _recipe_to_flags(recipe_extras) + cli_remaining
    script_args = _drop_flag(_without(argv, cli_remaining), "--accelerate_config")
    launch_parser = launch_command_parser()

    def launch_error(message: str):
        raise CliError(f"accelerate launch: {message}")

    launch_parser.error = launch_error
    accelerate_args = launch_parser.parse_args(
        [*launch_args, "--module", "hf_distill.cli.main", "distill", *script_args]
    )
    previous = os.environ.get(LAUNCHED_ENV)
    os.environ[LAUNCHED_ENV] = "1"
    try:
        launch_command(accelerate_args)
    except subprocess.CalledProcessError as error:
        print_error(
            prog=PROG, message=f"the launched training exited with code {error.returncode} (its output is above)"
        )
        return error.returncode or 1
    except ValueError as error:  # accelerate's own checks of the launch configuration
        raise CliError(f"accelerate launch: {error}") from None
    except Exception as error:  # torch.distributed's ChildFailedError and friends: the workers printed the cause
        from hf_distill.callbacks import PREEMPTED_EXIT_CODE

        codes = {getattr(failure, "exitcode", None) for failure in getattr(error, "failures", {}).values()}
        if codes == {PREEMPTED_EXIT_CODE}:  # every failed worker was preempted and saved: pass the code through
            print_error(
                prog=PROG, message="training was preempted and a checkpoint saved; rerun the same command to resume"
            )
            return PREEMPTED_EXIT_CODE
        print_error(
            prog=PROG, message=f"the launched training failed ({type(error).__name__}; the workers' output is above)"
        )
        return 1
    finally:
        if previous is None:
            os.environ.pop(LAUNCHED_ENV, None)
        else:
            os.environ[LAUNCHED_ENV] = previous
    return 0

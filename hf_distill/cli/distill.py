"""`hf-distill distill`: distil a teacher into a student from the command line, TRL style (`trl sft` conventions).

Every field of [`DistillationConfig`] (so every `SFTConfig` / `TrainingArguments` field), of TRL's `ScriptArguments`
(`--dataset_name`, splits), `ModelConfig` (`--model_name_or_path`, PEFT/LoRA, quantization) and
`DatasetMixtureConfig` (a `datasets:` mixture in YAML) is a flag, parsed by TRL's own `TrlParser`:

    hf-distill distill --config recipe.yaml --temperature 2.0

`--config` reads a YAML recipe (keys are flag names; an optional `env:` block sets environment variables first);
flags given on the command line override the recipe. `--accelerate_config NAME|PATH` relaunches the same command
under `accelerate launch` with one of TRL's presets (`single_gpu`, `multi_gpu`, `fsdp1`, `fsdp2`, `zero1`, `zero2`,
`zero3`) or a config file; other `accelerate launch` flags (`--num_processes 2`, `--mixed_precision no`, ...) pass
through. Bad input ends the command with one line on stderr (`hf-distill distill: error: ...`) and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .common import CliError, print_error, read_recipe, split_equals
from .launch import LAUNCHED_ENV, launch

__all__ = ["add_parser", "build_trainer", "make_parser", "run", "train"]

PROG = "hf-distill distill"
"""Program name used in help and error messages."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `distill` sub-command to `subparsers`. Its flags are parsed later, by TRL's parser (see [`run`])."""
    parser = subparsers.add_parser(
        "distill",
        help="Distil a teacher into a student: every DistillationConfig field is a flag; --config recipe.yaml.",
        description="See `hf-distill distill --help`.",
        add_help=False,
    )
    # The flags come from the dataclasses, which need torch to import: `main` hands over the raw arguments instead.
    parser.set_defaults(handler=run, raw_arguments=True)
    return parser


def _dataclass_types() -> tuple:
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    from hf_distill import DistillationConfig

    return (ScriptArguments, DistillationConfig, ModelConfig, DatasetMixtureConfig)


def make_parser(prog: str = PROG, extra_types: tuple = (), description: str | None = None, launch: bool = True):
    """The `TrlParser` of `hf-distill distill`: `(ScriptArguments, DistillationConfig, ModelConfig,
    DatasetMixtureConfig)` plus `extra_types`, with `--config` (and `--accelerate_config` when `launch`); its errors
    raise [`CliError`]. Other commands that take the same flags (`cache-teacher`) build theirs with it."""
    from trl import TrlParser

    class DistillParser(TrlParser):
        def error(self, message: str):  # argparse prints usage and exits; one line is enough here
            raise CliError(message)

    launch_usage = " [--accelerate_config NAME|PATH]" if launch else ""
    parser = DistillParser(
        (*_dataclass_types(), *extra_types),
        prog=prog,
        usage=f"{prog} [--config YAML]{launch_usage} [--FLAG VALUE ...]",
        allow_abbrev=False,
        description=description
        or (
            "Distil a teacher into a student with DistillationTrainer (an SFTTrainer). Every field of "
            "DistillationConfig/SFTConfig/TrainingArguments, TRL's ScriptArguments and ModelConfig is a flag. "
            'Dict fields take JSON strings, e.g. --teacher_model_init_kwargs \'{"dtype": "bfloat16"}\'.'
        ),
        epilog=(
            "Precedence: flags > --config recipe.yaml > defaults. Unknown flags and unknown recipe keys are errors, "
            "except with --accelerate_config, where they go to `accelerate launch` (e.g. --num_processes 2)."
        ),
    )
    group = parser.add_argument_group("recipe and launch")
    group.add_argument(
        "--config",
        metavar="YAML",
        default=None,
        help="YAML recipe: keys are flag names; an optional `env:` mapping sets environment variables. Flags given "
        "on the command line override it.",
    )
    if launch:
        group.add_argument(
            "--accelerate_config",
            metavar="NAME|PATH",
            default=None,
            help="Relaunch this command under `accelerate launch` with a preset (single_gpu, multi_gpu, fsdp1, "
            "fsdp2, zero1, zero2, zero3: TRL's) or an accelerate config file. Unknown flags are passed to "
            "`accelerate launch`.",
        )
    for action in parser._actions:
        if action.dest == "dataset_name":
            action.help = (
                "Hub dataset id, or a local directory or .json/.jsonl/.parquet/.csv/.txt/.arrow file (a single file "
                "is the `train` split). If `datasets` is provided, this is ignored."
            )
        elif action.dest == "teacher_model_name_or_path":
            action.help = "Name or local path of the teacher model (required)."
        elif action.dest == "model_name_or_path":
            action.help = "Name or local path of the student model (required)."
    return parser


def _check_required(script_args, training_args, model_args, dataset_args) -> None:
    from hf_distill.data import looks_like_local_path

    if not model_args.model_name_or_path:
        raise CliError("the following arguments are required: --model_name_or_path (the student)")
    if not training_args.teacher_model_name_or_path and not training_args.teacher_cache:
        raise CliError(
            "the following arguments are required: --teacher_model_name_or_path (the teacher), or --teacher_cache"
        )
    if not script_args.dataset_name and not dataset_args.datasets:
        raise CliError("the following arguments are required: --dataset_name (or a `datasets:` list in the recipe)")
    name = script_args.dataset_name
    if (
        name
        and not dataset_args.datasets
        and looks_like_local_path(name)
        and not os.path.exists(os.path.expanduser(name))
    ):
        raise CliError(f"argument --dataset_name: dataset path {name!r} does not exist (no such file or directory)")


def run(argv: list[str]) -> int:
    """Run `hf-distill distill` with `argv` (the arguments after `distill`); returns the exit code.

    `--help` prints every flag with its default and exits (`SystemExit(0)`); bad input prints one line on stderr
    and returns 2. Errors raised while training itself runs keep their traceback.
    """
    try:
        return _run(list(argv))
    except CliError as error:
        print_error(str(error), PROG)
        return 2


def _run(argv: list[str]) -> int:
    argv = split_equals(split_equals(argv, "--config"), "--accelerate_config")
    recipe_path, recipe = read_recipe(argv)  # env: block first, before torch or the Hub client are imported
    from hf_distill.bitnet.arguments import BitNetArguments

    parser = make_parser(extra_types=(BitNetArguments,))
    known = {action.dest for action in parser._actions} | {"env"}
    recipe_extras = {key: value for key, value in recipe.items() if key not in known}
    try:
        *outputs, namespace, _, cli_remaining = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except ValueError as error:  # a dataclass's __post_init__ refused a value
        raise CliError(str(error)) from None
    script_args, training_args, model_args, dataset_args, bitnet_args = outputs
    # started by our own relaunch, or by `accelerate launch` / `torchrun` directly: never launch again
    launched = os.environ.get(LAUNCHED_ENV) == "1" or "LOCAL_RANK" in os.environ or "ACCELERATE_USE_CPU" in os.environ
    accelerate_config = namespace.accelerate_config
    if not launched and not accelerate_config:
        if recipe_extras:
            raise CliError(
                f"unknown key{'s' if len(recipe_extras) > 1 else ''} in {recipe_path}: "
                f"{', '.join(map(str, recipe_extras))} (see `{PROG} --help` for the valid ones)"
            )
        if cli_remaining:
            raise CliError(f"unrecognized arguments: {' '.join(cli_remaining)}")
    elif launched and cli_remaining:
        raise CliError(f"unrecognized arguments: {' '.join(cli_remaining)}")
    _check_required(script_args, training_args, model_args, dataset_args)
    if accelerate_config and not launched:
        return launch(argv, accelerate_config, recipe_extras, cli_remaining)
    train(script_args, training_args, model_args, dataset_args, callbacks=[c for c in [bitnet_args.callback()] if c])
    return 0


def _load_dataset(script_args, dataset_args):
    from trl import get_dataset

    from hf_distill.data import load_dataset_by_name

    if dataset_args.datasets:
        if script_args.dataset_name:
            print(f"{PROG}: the recipe's `datasets` list is used; --dataset_name is ignored", file=sys.stderr)
        return get_dataset(dataset_args)
    return load_dataset_by_name(
        script_args.dataset_name, config=script_args.dataset_config, streaming=script_args.dataset_streaming
    )


def _split(dataset, split: str, flag: str):
    if split not in dataset:
        raise CliError(
            f"argument {flag}: the dataset has no split {split!r} (its splits: {', '.join(map(str, dataset))})"
        )
    return dataset[split]


def build_trainer(
    script_args, training_args, model_args, dataset_args, with_teacher: bool = True, callbacks: list | None = None
):
    """Load the dataset, the student and the teacher (or the teacher cache) into a `DistillationTrainer`.

    Args:
        script_args (`trl.ScriptArguments`): dataset name, configuration and splits.
        training_args ([`DistillationConfig`]): the training and distillation configuration.
        model_args (`trl.ModelConfig`): the student (`model_name_or_path`, dtype, PEFT, quantization).
        dataset_args (`trl.DatasetMixtureConfig`): a mixture of datasets; when set, `dataset_name` is ignored.
        with_teacher (`bool`, *optional*, defaults to `True`): Load the teacher model (no teacher with a cache).
        callbacks (`list[TrainerCallback]`, *optional*): Extra callbacks (`--bitnet`'s [`BitNetCallback`]).

    Returns:
        [`DistillationTrainer`]

    Raises:
        CliError: For bad input found while loading (dataset, splits, models, a teacher that does not fit, a cache
            that does not match).
    """
    from trl import get_peft_config, get_quantization_config

    from hf_distill import DistillationTrainer
    from hf_distill.teachers.cache_keys import TeacherCacheError

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    try:  # set-up: bad input is reported in one line; errors while training keep their traceback
        dataset = _load_dataset(script_args, dataset_args)
        train_dataset = _split(dataset, script_args.dataset_train_split, "--dataset_train_split")
        eval_dataset = None
        if training_args.eval_strategy != "no":
            eval_dataset = _split(dataset, script_args.dataset_test_split, "--dataset_test_split")
        return DistillationTrainer(
            model=model_args.model_name_or_path,
            teacher_model=training_args.teacher_model_name_or_path if with_teacher else None,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            quantization_config=get_quantization_config(model_args),
            peft_config=get_peft_config(model_args),
            callbacks=callbacks,
        )
    except (ValueError, OSError, ImportError, TeacherCacheError) as error:
        raise CliError(str(error)) from None


def train(script_args, training_args, model_args, dataset_args, callbacks: list | None = None):
    """Load the dataset, student and teacher, distil, save: the body of TRL's `sft.py`, for `DistillationTrainer`.

    Args:
        script_args (`trl.ScriptArguments`): dataset name, configuration and splits.
        training_args ([`DistillationConfig`]): the training and distillation configuration.
        model_args (`trl.ModelConfig`): the student (`model_name_or_path`, dtype, PEFT, quantization).
        dataset_args (`trl.DatasetMixtureConfig`): a mixture of datasets; when set, `dataset_name` is ignored.
        callbacks (`list[TrainerCallback]`, *optional*): Extra callbacks (`--bitnet`'s [`BitNetCallback`]).

    Returns:
        [`DistillationTrainer`]: the trainer, after training and saving.

    Raises:
        CliError: For bad input found while loading (dataset, splits, models, a teacher that does not fit), or a
            `--resume_from_checkpoint` that does not exist, is incomplete or does not fit the student.
        SystemExit: With code `PREEMPTED_EXIT_CODE` (75) after SIGTERM/SIGINT/SIGUSR1 stopped training and a
            checkpoint was saved: rerun the same command with `--resume_from_checkpoint auto` to continue.
    """
    import transformers
    from packaging.version import Version

    from hf_distill.callbacks import PREEMPTED_EXIT_CODE, TrainingPreempted

    with_teacher = training_args.teacher_cache is None
    trainer = build_trainer(
        script_args, training_args, model_args, dataset_args, with_teacher=with_teacher, callbacks=callbacks
    )
    resume = training_args.resume_from_checkpoint
    try:
        checkpoint = trainer.resolve_resume_checkpoint(resume)  # bad input: one line, before any training
    except ValueError as error:
        raise CliError(f"argument --resume_from_checkpoint: {error}") from None
    try:
        trainer.train(resume_from_checkpoint=checkpoint if checkpoint is not None else False)
    except TrainingPreempted as stop:
        if trainer.accelerator.is_main_process:
            rerun = "Rerun the same command" + ("" if resume == "auto" else " with `--resume_from_checkpoint auto`")
            print(
                f"{PROG}: training stopped by {stop.signal_name} after step {stop.global_step}; checkpoint saved to "
                f"{stop.checkpoint}. {rerun} to continue from it (exit code {PREEMPTED_EXIT_CODE}).",
                file=sys.stderr,
            )
        sys.stdout.flush()
        sys.stderr.flush()
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    trainer.accelerator.print("✅ Training completed.")
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.accelerator.print(f"💾 Model saved to {training_args.output_dir}.")

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"🤗 Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")

    if Version(transformers.__version__) >= Version("5.18.0"):
        # every process waits for the main one to finish saving first: a process group torn down while its peer
        # has already exited can hang in gloo's destructor
        trainer.accelerator.wait_for_everyone()
        trainer.end()  # finish the trackers and destroy the process group
    return trainer

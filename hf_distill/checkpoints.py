"""Finding, validating and rotating `checkpoint-N` folders: which checkpoint a run can resume from.

A checkpoint is *complete* when every file `Trainer` wrote into it is present and whole:

- `trainer_state.json` parses (and has a `global_step`);
- `training_args.bin` is a whole `torch.save` archive;
- the weights: `model.safetensors`, or `model.safetensors.index.json` and every shard it names, or
  `adapter_model.safetensors` (PEFT), or the `pytorch_model.bin` / `adapter_model.bin` equivalents; a safetensors file
  must be as long as its header says (a truncated file is caught without reading the tensors);
- unless the run saved the model only (`save_only_model`): `optimizer.pt`, `scheduler.pt` and the RNG state
  (`rng_state.pth`, or `rng_state_0.pth` ... one per process), each a whole `torch.save` archive.

Incomplete folders are reported and skipped, never deleted. `DistillationTrainer` writes new checkpoints atomically
(see `docs/resume.md`), so incomplete folders only come from crashes of runs without that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import warnings
import zipfile
from dataclasses import dataclass, field

from transformers.utils import logging

from .fs import fsync_dir

__all__ = [
    "STAGING_DIR",
    "IncompleteCheckpointWarning",
    "ResumePoint",
    "SkippedCheckpoint",
    "check_checkpoint_matches_model",
    "checkpoint_problem",
    "clear_staging",
    "find_resumable_checkpoint",
    "publish_checkpoint",
    "rotate_complete_checkpoints",
]

logger = logging.get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
"""Names of the checkpoint folders `Trainer` writes into `output_dir`."""


class IncompleteCheckpointWarning(UserWarning):
    """A `checkpoint-N` folder was skipped because a file is missing, truncated or unreadable (it is left on disk)."""


@dataclass
class SkippedCheckpoint:
    """A checkpoint folder that cannot be resumed from.

    Attributes:
        path (`str`): The folder.
        reason (`str`): What is wrong, naming the missing, truncated or unreadable file.
    """

    path: str
    reason: str


@dataclass
class ResumePoint:
    """The result of [`find_resumable_checkpoint`].

    Attributes:
        path (`str` or `None`): The newest complete checkpoint, or `None` when there is none (start fresh).
        step (`int` or `None`): Its global step.
        skipped (`list[SkippedCheckpoint]`): Newer folders that were skipped, newest first, with the reason.
    """

    path: str | None
    step: int | None = None
    skipped: list[SkippedCheckpoint] = field(default_factory=list)


def _safetensors_problem(path: str) -> str | None:
    """Why the safetensors file at `path` is not whole (missing, header unreadable, shorter than its header says)."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"`{name}` is truncated ({size} bytes, no safetensors header)"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                return f"`{name}` is truncated ({size} bytes, its header alone needs {header_len + 8})"
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        return f"`{name}` is missing"
    except (OSError, ValueError) as error:
        return f"`{name}` cannot be read ({error})"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if size < 8 + header_len + end:
        return f"`{name}` is truncated ({size} bytes, expected {8 + header_len + end})"
    return None


def _torch_file_problem(path: str) -> str | None:
    """Why the `torch.save` file at `path` is not whole: `torch.save` writes a zip archive, whose directory is at its
    end, so a truncated file fails `zipfile.is_zipfile`."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        return f"`{name}` is missing"
    if os.path.getsize(path) == 0:
        return f"`{name}` is empty"
    if not zipfile.is_zipfile(path):
        return f"`{name}` is truncated or not a torch.save archive"
    return None


def _weights_problem(folder: str) -> str | None:
    def exists(name: str) -> bool:
        return os.path.isfile(os.path.join(folder, name))

    for name in ("model.safetensors", "adapter_model.safetensors"):
        if exists(name):
            return _safetensors_problem(os.path.join(folder, name))
    if exists("model.safetensors.index.json"):
        try:
            with open(os.path.join(folder, "model.safetensors.index.json"), encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            return f"`model.safetensors.index.json` cannot be read ({error})"
        for shard in shards:
            problem = _safetensors_problem(os.path.join(folder, shard))
            if problem:
                return problem
        return None
    for name in ("pytorch_model.bin", "adapter_model.bin"):
        if exists(name):
            return _torch_file_problem(os.path.join(folder, name))
    return "no model weights (`model.safetensors`, a sharded index, or `adapter_model.safetensors`) are present"


def _rng_problem(folder: str) -> str | None:
    if os.path.isfile(os.path.join(folder, "rng_state.pth")):
        return _torch_file_problem(os.path.join(folder, "rng_state.pth"))
    ranks = sorted(int(m.group(1)) for m in (re.match(r"^rng_state_(\d+)\.pth$", n) for n in os.listdir(folder)) if m)
    if not ranks:
        return "`rng_state.pth` is missing"
    for rank in range(max(ranks) + 1):
        problem = _torch_file_problem(os.path.join(folder, f"rng_state_{rank}.pth"))
        if problem:
            return problem
    return None


def _saved_training_state(folder: str) -> bool:
    """Whether the run that wrote `folder` saved its optimizer / scheduler / RNG state (it did unless it ran with
    `save_only_model`). `Trainer` writes `trainer_state.json` after those files, so a folder with a whole
    `trainer_state.json` and none of them was saved model-only, not interrupted."""
    names = os.listdir(folder)
    return any(n in ("optimizer.pt", "scheduler.pt") or re.match(r"^rng_state(_\d+)?\.pth$", n) for n in names)


def checkpoint_problem(folder: str, save_only_model: bool | None = None) -> str | None:
    """Why `folder` is not a complete checkpoint, or `None` when it is (see the module docstring for the rules).

    Args:
        folder (`str`): A `checkpoint-N` folder.
        save_only_model (`bool`, *optional*): Whether the run saved the model only (no optimizer, scheduler, RNG
            state). Default: inferred from the folder (a model-only checkpoint has none of those files).

    Returns:
        `str` or `None`: A sentence naming the missing, truncated or unreadable file.
    """
    if not os.path.isdir(folder):
        return "it is not a folder"
    state_file = os.path.join(folder, "trainer_state.json")
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
        int(state["global_step"])
    except FileNotFoundError:
        return "`trainer_state.json` is missing"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"`trainer_state.json` is truncated or unreadable ({type(error).__name__}: {error})"
    problem = _torch_file_problem(os.path.join(folder, "training_args.bin")) or _weights_problem(folder)
    if problem:
        return problem
    if save_only_model is None:
        save_only_model = not _saved_training_state(folder)
    if not save_only_model:
        for name in ("optimizer.pt", "scheduler.pt"):
            problem = _torch_file_problem(os.path.join(folder, name))
            if problem:
                return problem
        return _rng_problem(folder)
    return None


def _numbered_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """`(step, path)` of the `checkpoint-N` folders in `output_dir`, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found, reverse=True)


def find_resumable_checkpoint(output_dir: str, save_only_model: bool | None = None, warn: bool = True) -> ResumePoint:
    """The newest complete `checkpoint-N` in `output_dir`; newer incomplete ones are skipped (and left on disk).

    Args:
        output_dir (`str`): The run's output folder (a missing folder has no checkpoint).
        save_only_model (`bool`, *optional*): Whether the run saved the model only; default: inferred from each
            folder (see [`checkpoint_problem`]).
        warn (`bool`, *optional*, defaults to `True`): Emit an [`IncompleteCheckpointWarning`] for each skipped
            folder, naming the file at fault.

    Returns:
        [`ResumePoint`]: `path=None` when no complete checkpoint exists.
    """
    skipped: list[SkippedCheckpoint] = []
    for step, path in _numbered_checkpoints(output_dir):
        problem = checkpoint_problem(path, save_only_model)
        if problem is None:
            return ResumePoint(path, step, skipped)
        skipped.append(SkippedCheckpoint(path, problem))
        if warn:
            warnings.warn(
                f"Skipping incomplete checkpoint {path}: {problem}. It is left on disk; delete it yourself once you "
                "no longer need it.",
                IncompleteCheckpointWarning,
                stacklevel=2,
            )
    return ResumePoint(None, None, skipped)


def rotate_complete_checkpoints(
    output_dir: str,
    save_total_limit: int | None,
    keep: tuple[str | None, ...] = (),
    save_only_model: bool | None = None,
) -> list[str]:
    """Delete the oldest *complete* checkpoints beyond `save_total_limit` (`Trainer`'s rotation, made safe).

    The newest complete checkpoint and the folders in `keep` (the best model's) are never deleted; incomplete folders
    and staging folders are neither counted nor touched.

    Returns:
        `list[str]`: The folders deleted.
    """
    if not save_total_limit or save_total_limit <= 0:
        return []
    folders = _numbered_checkpoints(output_dir)
    complete = [path for _, path in folders if checkpoint_problem(path, save_only_model) is None]
    protected = {os.path.abspath(p) for p in keep if p} | {os.path.abspath(p) for p in complete[:1]}
    num_to_keep = max(save_total_limit, len(protected & {os.path.abspath(p) for p in complete}))
    deleted = []
    remaining = len(complete)
    for path in reversed(complete):  # oldest first
        if remaining <= num_to_keep:
            break
        if os.path.abspath(path) not in protected:
            logger.info(f"Deleting older checkpoint {path} (save_total_limit={save_total_limit}).")
            shutil.rmtree(path)
            deleted.append(path)
            remaining -= 1
    return deleted


def check_checkpoint_matches_model(folder: str, model) -> None:
    """Raise a clear error when the full-model weights in `folder` have other shapes than `model`'s.

    Only `model.safetensors` (single or sharded) is checked, from the headers; adapter checkpoints are checked by PEFT
    when they load.

    Raises:
        ValueError: Naming the first tensor whose shape differs (or that `model` does not have).
    """
    files = []
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    elif os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        with open(os.path.join(folder, "model.safetensors.index.json"), encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    if not files:
        return
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    for name in files:
        with open(os.path.join(folder, name), "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for key, entry in header.items():
            if key == "__metadata__" or key not in expected:
                continue
            if tuple(entry["shape"]) != expected[key]:
                raise ValueError(
                    f"The checkpoint {folder} does not fit this model: tensor `{key}` has shape "
                    f"{tuple(entry['shape'])} in `{name}` but {expected[key]} in the model. It was saved by another "
                    "model or config; resume with the same student and settings, or pick another "
                    "`resume_from_checkpoint` (nothing was deleted)."
                )


STAGING_DIR = ".hf_distill-staging"
"""Hidden folder inside `output_dir` where `DistillationTrainer` writes a checkpoint before renaming it into place."""


def _fsync_tree(folder: str) -> None:
    """Flush every file under `folder`, then the folders themselves, to disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    for root, _dirs, _ in os.walk(folder, topdown=False):
        fsync_dir(root)


def clear_staging(staging_root: str) -> None:
    """Remove what a crashed save left in the staging folder: partial writes, never a visible checkpoint."""
    if os.path.isdir(staging_root) and os.listdir(staging_root):
        logger.info(f"Removing the partial checkpoint write(s) left in {staging_root} by an interrupted save.")
        shutil.rmtree(staging_root)


def publish_checkpoint(staged: str, final: str) -> None:
    """Make the complete checkpoint `staged` visible as `final`: fsync it, rename it, fsync the parent folder.

    A folder already at `final` (an incomplete checkpoint of an earlier run, say) is renamed aside to
    `<final>.replaced-<n>` with a warning, never deleted.
    """
    _fsync_tree(staged)
    if os.path.exists(final):
        n = 0
        while os.path.exists(f"{final}.replaced-{n}"):
            n += 1
        os.rename(final, f"{final}.replaced-{n}")
        warnings.warn(
            f"{final} already existed and was replaced by the new checkpoint of that step; the old folder was kept "
            f"as {final}.replaced-{n}.",
            IncompleteCheckpointWarning,
            stacklevel=2,
        )
    os.rename(staged, final)
    parent = os.path.dirname(os.path.abspath(final))
    fsync_dir(parent)
    staging_root = os.path.dirname(os.path.abspath(staged))
    if os.path.isdir(staging_root) and not os.listdir(staging_root):
        os.rmdir(staging_root)
    fsync_dir(parent)

"""`hf-distill env`: the versions and devices to paste into a bug report (like `trl env`)."""

from __future__ import annotations

import argparse
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["add_parser", "collect_env", "run"]

PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "tokenizers",
    "safetensors",
    "bitsandbytes",
    "deepspeed",
    "liger_kernel",
    "vllm",
)
"""Distributions whose versions `hf-distill env` reports (`not installed` when absent)."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `env` sub-command to `subparsers`."""
    parser = subparsers.add_parser(
        "env",
        help="Print versions and devices for bug reports.",
        description="Print the versions of hf_distill, Python, torch, transformers, TRL, PEFT, accelerate, datasets "
        "and friends, the platform and the accelerators torch sees. Paste the output into bug reports.",
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a list.")
    parser.set_defaults(handler=run)
    return parser


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def _git_commit() -> str | None:
    """Commit of the checkout hf_distill runs from, if it is a git checkout (editable install)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    repo = os.path.dirname(root)
    if not os.path.exists(os.path.join(repo, ".git")):
        return None
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (result.stdout.strip() or None) if result.returncode == 0 else None


def _devices() -> dict[str, str]:
    try:
        import torch
    except ImportError:
        return {"accelerators": "unknown (torch is not installed)"}
    info: dict[str, str] = {}
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        runtime = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}"
        info["CUDA available"] = f"yes ({runtime}, {len(names)} device{'s' if len(names) != 1 else ''})"
        info["GPUs"] = ", ".join(names)
        info["bf16 supported"] = "yes" if torch.cuda.is_bf16_supported() else "no"
    else:
        info["CUDA available"] = "no"
    mps = getattr(torch.backends, "mps", None)
    info["MPS available"] = "yes" if mps is not None and mps.is_available() else "no"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        info["XPU devices"] = ", ".join(xpu.get_device_name(i) for i in range(xpu.device_count()))
    info["CPU threads (torch)"] = str(torch.get_num_threads())
    return info


def _accelerate_config() -> str:
    try:
        from accelerate.commands.config import default_config_file, load_config_from_file
    except ImportError:
        return "accelerate not installed"
    if not os.path.isfile(default_config_file):
        return "not found"
    config = load_config_from_file(default_config_file).to_dict()
    return f"{default_config_file} ({', '.join(f'{k}={v}' for k, v in config.items())})"


def collect_env() -> dict[str, str]:
    """Versions, platform and devices, as ordered `name: value` strings."""
    from hf_distill import __version__

    commit = _git_commit()
    info = {
        "hf_distill version": f"{__version__}+{commit}" if commit else __version__,
        "Platform": platform.platform(),
        "Python version": platform.python_version(),
    }
    info.update({f"{name} version": _version(name) for name in PACKAGES})
    try:  # the build tag (+cu130, +cpu) tells which build a bug report is about; metadata may leave it out
        import torch

        info["torch version"] = torch.__version__
    except ImportError:
        pass
    info.update(_devices())
    info["Accelerate default config"] = _accelerate_config()
    info["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE", "unset")
    return info


def run(args: argparse.Namespace) -> int:
    """Print [`collect_env`] (a `- name: value` list, or JSON with `--json`)."""
    info = collect_env()
    if getattr(args, "json", False):
        print(json.dumps(info, indent=2))
    else:
        lines = "\n".join(f"- {name}: {value}" for name, value in info.items())
        print(f"Copy-paste the following information when reporting an issue:\n\n{lines}")
    return 0

"""The documentation site builds with MkDocs in strict mode (every warning is an error): nav, links, anchors,
the API reference from the docstrings (mkdocstrings) and the CLI reference rendered from the parsers."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    missing = [name for name in ("mkdocs", "material", "mkdocstrings_handlers.python") if not _importable(name)]
    if missing:
        pytest.skip(f"docs toolchain not installed ({', '.join(missing)}): pip install -e '.[dev]'")
    site = tmp_path / "site"
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_MKDOCS_2_WARNING="1", DISABLE_MKDOCS_2_WARNING="true")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    api = (site / "api" / "index.html").read_text()
    for name in ("DistillationTrainer", "DistillationConfig", "chunked_distillation_loss", "token_divergence"):
        assert name in api, f"{name} missing from the API reference"
    cli = (site / "cli" / "index.html").read_text()
    assert "usage: hf-distill" in cli and "hf-distill demo" in cli, "the CLI reference was not generated"
    usage = (site / "distillation_trainer" / "index.html").read_text()
    assert "https://github.com/hf-distill/hf-distill/blob/main/examples/sft_distill.py" in usage


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False

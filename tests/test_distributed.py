"""Two processes (DDP over gloo, CPU) train exactly like one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import subprocess_env

HERE = Path(__file__).parent


def _run(cmd: list[str]) -> None:
    env = subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # DDP over gloo on CPUs
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("teacher", ["live", "cache"])
def test_ddp_matches_single_process(tmp_path, teacher):
    """With a cache, each rank's collator looks up its own rows (written by the single-process run first)."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    cache = [str(tmp_path / "cache")] if teacher == "cache" else []
    _run([sys.executable, str(HERE / "ddp_worker.py"), str(single), "4", *cache])
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(HERE / "ddp_worker.py"), str(ddp), "2", *cache]
    )  # fmt: skip
    losses_single = json.loads((single / "losses.json").read_text())
    losses_ddp = json.loads((ddp / "losses.json").read_text())
    assert len(losses_single) == 3
    torch.testing.assert_close(torch.tensor(losses_ddp), torch.tensor(losses_single), rtol=1e-4, atol=1e-6)
    weights_single, weights_ddp = load_file(single / "model.safetensors"), load_file(ddp / "model.safetensors")
    for key, value in weights_single.items():
        torch.testing.assert_close(weights_ddp[key], value, rtol=1e-4, atol=1e-5)

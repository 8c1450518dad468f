"""Launch tests/dist/<script> under torchrun (gloo ranks), once per test module.

A plain module rather than conftest.py, so test modules can import it whatever conftest.py files
other test folders add.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lcl.runtime.distributed import free_port

DIST_DIR = Path(__file__).parent / "dist"


def run_torchrun(script: str, nproc: int, out_dir: Path, timeout_s: int = 900) -> Path:
    """Run tests/dist/<script> on `nproc` gloo ranks; fail with its output if it does not finish."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(DIST_DIR / script), "--out", str(out_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0 or not (out_dir / "done").exists():
        pytest.fail(f"{script} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return out_dir


def process_running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False

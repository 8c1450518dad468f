"""Launching: a ONE-process run under torchrun starts and trains (it used to wait forever on a
rendezvous of its own), and a plain `python` process still initialises without a launcher."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lcl.checkpoint import read_metrics
from megatron_lcl.checkpoint.run_dir import complete_checkpoints
from megatron_lcl.runtime.distributed import free_port
from test_training import argv, build_corpus

ROOT = Path(__file__).resolve().parent.parent
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and not k.startswith("TORCHELASTIC_")}
    return dict(env, OMP_NUM_THREADS="1")


def test_one_process_torchrun_trains(tmp_path):
    build_corpus(tmp_path / "data")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "pretrain_lcl.py"),
           *argv(tmp_path / "data", run_dir, "train.train_steps=3", "checkpoint.save_at_exit=true")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=clean_env(), cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"a one-process torchrun launch did not finish in 240 s (a rendezvous hang?):\n"
                    f"{(e.stdout or b'')[-3000:]}\n{(e.stderr or b'')[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["step"] for r in read_metrics(str(run_dir))] == [1, 2, 3]
    assert [os.path.basename(c) for c in complete_checkpoints(str(run_dir / "checkpoints"))] == ["step_00000003"]


def test_plain_process_ignores_a_stale_master_port():
    """Outside torchrun one process picks a fresh port: a MASTER_PORT left by some earlier launcher
    (nothing listens there) must not make it wait."""
    code = ("import torch.distributed as dist\n"
            "from megatron_lcl.config import ParallelConfig\n"
            "from megatron_lcl.runtime import initialize_distributed, destroy_distributed\n"
            "layout = initialize_distributed(ParallelConfig())\n"
            "print('world', dist.get_world_size(), 'dp', layout.dp_size)\n"
            "destroy_distributed()\n")
    env = dict(clean_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 1 dp 1" in proc.stdout


def test_free_port_draws_below_the_ephemeral_range_and_ignores_the_runs_seed():
    """A rendezvous port is chosen where the kernel never hands out ports for outgoing connections
    (a concurrent gloo mesh took one from the ephemeral range before torchrun bound it: EADDRINUSE),
    and seeding `random` as every run does must not make two processes draw the same port."""
    import random
    import socket

    from megatron_lcl.runtime.distributed import _ephemeral_range

    low, _ = _ephemeral_range()
    drawn = []
    for _ in range(8):
        random.seed(1234)
        drawn.append(free_port())
    assert all(1024 <= port < low for port in drawn), (drawn, low)
    assert len(set(drawn)) > 1, drawn
    with socket.socket() as s:
        s.bind(("127.0.0.1", drawn[-1]))

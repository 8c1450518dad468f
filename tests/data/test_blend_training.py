"""A blend in training, on 2 data-parallel ranks (torchrun): per-source sample counters in metrics.jsonl,
and resuming from a mid-run checkpoint gives exactly the rows of the uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lcl.data.prepare import prepare
from megatron_lcl.runtime.distributed import free_port
from data_helpers import write_laion_shard
from test_training import TIMING_KEYS, build_corpus

ROOT = Path(__file__).resolve().parents[2]


def _train(run_dir: Path, data_root: Path, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "pretrain_lcl.py"), "--config", str(ROOT / "examples" / "configs" / "tiny_cpu.yaml"),
           f"run_dir={run_dir}", f"data.path=[0.4, {data_root / 'laion'}, 0.6, {data_root / 'shards'}]",
           f"data.tokenizer={data_root / 'tokenizer' / 'lcl.model'}", "data.seq_length=64",
           "data.micro_batch_size=2", "data.num_workers=0", "data.shuffle_buffer=8", "train.global_batch_size=8",
           "train.train_steps=4", "optimizer.warmup_steps=2", "logging.log_interval=1", "logging.console=false",
           "logging.tensorboard=false", *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        pytest.fail(f"training failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _rows(run_dir: Path) -> list:
    with open(run_dir / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend_train")
    build_corpus(root)  # synthetic MMC4 -> tokenizer + prepared shards (root/shards)
    (root / "laion_src").mkdir()
    for i in range(4):
        write_laion_shard(root / "laion_src" / f"{i:05d}.tar", 10)
    prepare("laion", [str(root / "laion_src")], str(root / "laion"), progress=False)
    straight, resumed = root / "straight", root / "resumed"
    _train(straight, root, "checkpoint.save_interval=2")
    _train(resumed, root, f"checkpoint.load={straight / 'checkpoints' / 'step_00000002'}")
    return _rows(straight), _rows(resumed)


def test_per_source_counters_are_logged(runs):
    straight, _ = runs
    for row in straight:
        counts = {k: v for k, v in row.items() if k.startswith("source_samples/")}
        assert set(counts) == {"source_samples/laion", "source_samples/shards"}, row
        assert sum(counts.values()) == row["consumed_samples"] == 8 * row["step"]  # both DP ranks
    assert straight[-1]["source_samples/laion"] > 0 and straight[-1]["source_samples/shards"] > 0


def test_blend_resume_equals_no_resume_on_two_ranks(runs):
    straight, resumed = runs
    assert [r["step"] for r in resumed] == [3, 4]
    assert resumed == straight[2:]

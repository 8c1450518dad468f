"""Background (asynchronous) checkpoint saves on one rank, in-process: the same checkpoints as saves
written at once (every tensor, bitwise), a resume from one equals the uninterrupted run, and no save
starts a process (the writer is started at set-up). Faults with background saves at DP=2 (SIGKILL
during the write, ENOSPC in it, a stop signal while one is in flight) are in test_checkpoint_faults.py.
"""

import json
import multiprocessing.process
import os
import shutil
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatron_lcl import train as pretrain_lcl
from megatron_lcl.checkpoint import writer
from megatron_lcl.training.trainer import Trainer
from test_checkpoint_writer import named_semaphores
from test_training import argv, build_corpus, read_rows, without_timing

pytestmark = pytest.mark.usefixtures("restore_rendezvous_env")
SAVES = ["step_00000002", "step_00000004", "step_00000006"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("async_data")
    build_corpus(root)
    return root


REAL_WRITE = writer.write_buckets  # the writer process imports this module: there too


def slow_write(buckets, results_queue) -> None:
    """A background write that takes a while: training runs on while it is in flight."""
    time.sleep(0.5)
    REAL_WRITE(buckets, results_queue)


def checkpoint_tensors(ckpt, tmp_path) -> dict:
    """Every entry of a checkpoint folder (data files via dcp_to_torch_save, and common.pt where
    megatron-core < 0.19 wrote one: 0.19 keeps the common state in rank 0's data file)."""
    out = tmp_path / f"{ckpt.parent.parent.name}_{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    common = ckpt / "common.pt"
    return {"sharded": torch.load(out, weights_only=False),
            "common": torch.load(common, weights_only=False) if common.exists() else None}


def assert_identical(a, b, where=""):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif hasattr(a, "getvalue"):  # io.BytesIO of a sharded object (RNG, data-loader state)
        assert a.getvalue() == b.getvalue(), where
    else:
        assert a == b, where


def train_state(ckpt) -> dict:
    return json.loads((ckpt / "meta.json").read_text())["train_state"]


def test_background_saves_equal_saves_at_once_and_resume_exactly(data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(writer, "write_buckets", slow_write)
    runs = {}
    for mode in ("true", "false"):
        runs[mode] = tmp_path / f"async_{mode}"
        assert pretrain_lcl.main(argv(data_root, runs[mode], "checkpoint.save_interval=2", "checkpoint.keep_last=5",
                                      "model.vision.drop_path_rate=0.3", f"checkpoint.async_save={mode}")) == 0
    log = capsys.readouterr().out
    assert log.count("saving step 2 in the background") == 1 and log.count("saving step 4 in the background") == 1
    for name in SAVES:
        a, b = runs["true"] / "checkpoints" / name, runs["false"] / "checkpoints" / name
        assert_identical(checkpoint_tensors(a, tmp_path), checkpoint_tensors(b, tmp_path), name)
        assert train_state(a) == train_state(b)
    assert without_timing(read_rows(runs["true"])) == without_timing(read_rows(runs["false"]))

    # Resume from step 4, written in the background: the same steps 5-6 as the uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["true"], resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    (resumed / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (runs["true"] / "metrics.jsonl").read_text().splitlines()[:4]))
    (resumed / "checkpoints" / "latest").write_text("step_00000004\n")
    assert pretrain_lcl.main(argv(data_root, resumed, "checkpoint.save_interval=2", "model.vision.drop_path_rate=0.3",
                                  "checkpoint.keep_last=5")) == 0
    assert without_timing(read_rows(resumed)) == without_timing(read_rows(runs["true"]))


def test_no_save_starts_a_process(data_root, tmp_path, monkeypatch):
    """Count the processes of this rank after set-up: sampled every few ms during saves (background and
    at once), and every multiprocessing start and fork; none appears."""
    started, forks = [], []
    os.register_at_fork(before=lambda: forks and forks[0] == "armed" and forks.append("fork"))
    real_setup = Trainer.setup
    seen, at_setup, done = set(), set(), threading.Event()

    def children() -> set:
        return {p.pid for p in psutil.Process().children(recursive=True)}

    def sample():
        while not done.is_set():
            seen.update(children())
            time.sleep(0.002)

    def setup(self):
        real_setup(self)
        at_setup.update(children())
        forks.append("armed")  # from now on every fork is counted
        monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", lambda p: started.append(p.name))
        threading.Thread(target=sample, daemon=True).start()
        return self

    monkeypatch.setattr(Trainer, "setup", setup)
    monkeypatch.setattr(writer, "write_buckets", slow_write)
    try:
        assert pretrain_lcl.main(argv(data_root, tmp_path / "run", "checkpoint.save_interval=1",
                                      "checkpoint.async_save=true")) == 0
    finally:
        done.set()
        forks.insert(0, "disarmed")
    assert writer._writer is not None and writer._writer.process.pid in at_setup
    assert started == [] and forks == ["disarmed", "armed"]
    assert seen <= at_setup, f"processes started after set-up: {seen - at_setup}"
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints"))[-1] == "step_00000006"


def test_a_run_holds_no_named_semaphore(data_root, tmp_path, monkeypatch):
    """A SIGKILLed run leaves its named POSIX semaphores in /dev/shm (`sem.mp-*`: a spawn context's locks
    and queues; the writer's queues made four). Probed after every save, in the rank and each of its
    processes (its background writer, a DataLoader worker, multiprocessing's resource tracker): none."""
    found, probed = set(), []
    real_save = Trainer.save

    def save(self, blocking=True):
        real_save(self, blocking)
        pids = [os.getpid()] + [p.pid for p in psutil.Process().children(recursive=True)]
        probed.append(len(pids))
        found.update(named_semaphores(pids))

    monkeypatch.setattr(Trainer, "save", save)
    monkeypatch.setattr(writer, "write_buckets", slow_write)  # probed while a write is in flight too
    assert pretrain_lcl.main(argv(data_root, tmp_path / "run", "checkpoint.save_interval=2", "data.num_workers=1",
                                  "checkpoint.async_save=true")) == 0
    assert len(probed) >= 3 and min(probed) >= 3, probed  # saves at steps 2, 4 and 6
    assert found == set()


def test_async_save_is_a_validated_setting(data_root, tmp_path, monkeypatch, capsys):
    from megatron_lcl.config import validate

    monkeypatch.setattr(validate, "BACKGROUND_SAVES_SUPPORTED", False)
    assert pretrain_lcl.main(argv(data_root, tmp_path / "run", "checkpoint.async_save=true")) == 2
    assert "checkpoint.async_save=true needs Linux" in capsys.readouterr().err


def test_too_little_shared_memory_writes_the_save_at_once(data_root, tmp_path, monkeypatch, capsys):
    """A container's 64 MiB /dev/shm cannot hold a large model's copies (copying into a full tmpfs dies
    of SIGBUS): the save is written at once, said once, and the run goes on saving."""
    monkeypatch.setattr(writer, "SHARED_MEMORY", str(tmp_path / "no_shm"))  # 0 bytes free
    run = tmp_path / "run"
    assert pretrain_lcl.main(argv(data_root, run, "checkpoint.save_interval=2", "checkpoint.keep_last=5",
                                  "checkpoint.async_save=true")) == 0
    log = capsys.readouterr().out
    assert log.count("checkpoint.async_save: rank 0: a background save needs ") == 1, log
    assert "this save and the later ones are written at once" in log and "in the background" not in log
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", *SAVES]

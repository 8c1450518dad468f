"""Run settings changed on resume (megatron_lcl/checkpoint/resume.py), through the driver
(`megatron_lcl.train.main`, what pretrain_lcl.py runs) on one rank.

One 6-step run (LR schedule: warmup 2, cosine to min_lr over 6 steps) is resumed with:
- another schedule (train.train_steps 6 -> 12, optimizer.lr): refused with one line naming each field
  and both values, nothing trained (before: the checkpoint's schedule won silently, steps 7-12 at min_lr);
- optimizer.override_scheduler=true: the run extends to 12 steps and its learning rates from step 7 on
  are exactly those of a run planned for 12 steps from the start;
- model.lm.num_attention_heads 4 -> 8 (the same tensor shapes): refused naming the field (before:
  loaded and trained another model); a changeable model field (drop-path rate) resumes;
- a shard of the saved data position missing: one line naming it and `checkpoint.load_data_state=false`;
- data.num_readers or data.seq_length changed (the saved data position is per logical reader, over
  windows of seq_length): refused before the load with one line naming the field, both values and
  `checkpoint.load_data_state=false`, exit 2 like every config mismatch (before: exit 1, as a
  checkpoint error); with that setting the run resumes;
- another data.tokenizer than the one the run keeps (RUN_DIR/tokenizer.model): refused, exit 2.
"""

import shutil
from pathlib import Path

import pytest

from megatron_lcl import train as pretrain_lcl
from test_training import argv, build_corpus, read_rows

pytestmark = pytest.mark.usefixtures("restore_rendezvous_env")  # in-process runs set RANK, MASTER_*...


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_settings_data")
    build_corpus(root)
    return root


@pytest.fixture(scope="module")
def six_steps(data_root, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("resume_settings") / "six"
    assert pretrain_lcl.main(argv(data_root, run, "optimizer.min_lr=1e-4")) == 0
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_changed_lr_schedule_is_refused_naming_each_field(six_steps, data_root, tmp_path, capsys):
    run = copy_of(six_steps, tmp_path)
    capsys.readouterr()
    assert pretrain_lcl.main(argv(data_root, run, "optimizer.min_lr=1e-4", "train.train_steps=12",
                                  "optimizer.lr=5e-4")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "was saved with another LR schedule: optimizer.lr 0.001 -> 0.0005, train.train_steps 6 -> 12" in line
    assert "set optimizer.override_scheduler=true to apply the new values from step 6 on" in line
    assert [r["step"] for r in read_rows(run)] == list(range(1, 7))  # nothing trained


def test_train_steps_extended_with_override_follows_the_longer_schedule(six_steps, data_root, tmp_path, capsys):
    straight = tmp_path / "straight"
    assert pretrain_lcl.main(argv(data_root, straight, "optimizer.min_lr=1e-4", "train.train_steps=12")) == 0
    run = copy_of(six_steps, tmp_path)
    capsys.readouterr()
    assert pretrain_lcl.main(argv(data_root, run, "optimizer.min_lr=1e-4", "train.train_steps=12",
                                  "optimizer.override_scheduler=true")) == 0
    assert "optimizer.override_scheduler=true: the LR schedule continues from step 6 with train.train_steps " \
           "6 -> 12" in capsys.readouterr().out
    extended, planned = read_rows(run), read_rows(straight)
    assert [r["step"] for r in extended] == list(range(1, 13))
    assert [r["lr"] for r in extended[6:]] == [r["lr"] for r in planned[6:]]
    assert extended[6]["lr"] > 5 * 1e-4  # mid-cosine, not min_lr


def test_a_changed_architecture_is_refused_naming_the_field(six_steps, data_root, tmp_path, capsys):
    run = copy_of(six_steps, tmp_path)
    capsys.readouterr()
    assert pretrain_lcl.main(argv(data_root, run, "optimizer.min_lr=1e-4", "model.lm.num_attention_heads=8")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "holds another model: model.lm.num_attention_heads 4 -> 8;" in line, line
    # Regularisation is not architecture: a new drop-path rate resumes (at step 6 = train_steps: done).
    assert pretrain_lcl.main(argv(data_root, run, "optimizer.min_lr=1e-4", "model.vision.drop_path_rate=0.3")) == 0
    assert "resumed from" in capsys.readouterr().out


def test_a_missing_shard_of_the_saved_data_position_is_named(six_steps, data_root, tmp_path, capsys):
    """The data the checkpoint's loader position refers to lost a shard: one line naming it and the
    way on (before: the loader's whole shard lists, cut at 300 characters); then the way on works."""
    run = copy_of(six_steps, tmp_path)
    shards = tmp_path / "shards"
    shutil.copytree(data_root / "shards", shards)
    (shards / "shard-000003.tar").unlink()
    capsys.readouterr()
    assert pretrain_lcl.main(argv(data_root, run, "optimizer.min_lr=1e-4", f"data.path={shards}")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "data-loader position does not fit this data (shard(s) of the saved position missing now: " \
           "shard-000003.tar); checkpoint.load_data_state=false continues without it" in line, line
    assert pretrain_lcl.main(argv(data_root, run, "optimizer.min_lr=1e-4", f"data.path={shards}",
                                  "checkpoint.load_data_state=false")) == 0


@pytest.mark.parametrize("override, change", [("data.num_readers=4", "data.num_readers 8 -> 4"),
                                              ("data.seq_length=48", "data.seq_length 64 -> 48")])
def test_a_changed_data_stream_is_refused_with_exit_2(six_steps, data_root, tmp_path, capsys, override, change):
    run = copy_of(six_steps, tmp_path)
    capsys.readouterr()
    assert pretrain_lcl.main(argv(data_root, run, "optimizer.min_lr=1e-4", override)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"holds a data-loader position for another data stream: {change}; set checkpoint.load_data_state=false " \
           "to continue with a fresh data stream, or restore the saved value(s)" in line, line
    assert pretrain_lcl.main(argv(data_root, run, "optimizer.min_lr=1e-4", override,
                                  "checkpoint.load_data_state=false")) == 0
    assert "resumed from" in capsys.readouterr().out


def test_another_tokenizer_for_the_run_is_refused_with_exit_2(six_steps, data_root, tmp_path, capsys):
    from megatron_lcl.data.tokenizer import train_tokenizer

    run = copy_of(six_steps, tmp_path)
    other = train_tokenizer(["another corpus, another vocabulary"] * 50, str(tmp_path / "other"), 60)
    capsys.readouterr()
    assert pretrain_lcl.main(argv(data_root, run, "optimizer.min_lr=1e-4", f"data.tokenizer={other}")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"data.tokenizer ({other}) is not the tokenizer this run was trained with ({run}/tokenizer.model)" in line

"""HF export of a real run, as users run it: from another folder after the data folder moved (the run
directory keeps its tokenizer), and written atomically (a failed or killed export leaves no folder that
looks complete, and an older export untouched; `--overwrite` replaces one, nothing else is replaced).

One 2-step training run in this process (the driver, relative paths as `make demo` gives them) serves
every test of the module.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lcl import train as pretrain_lcl
from megatron_lcl.checkpoint.run_dir import TOKENIZER, checkpoint_tokenizer, keep_tokenizer
from megatron_lcl.hf import export, publish
from test_training import argv, build_corpus

pytestmark = pytest.mark.usefixtures("restore_rendezvous_env")  # in-process runs set RANK, MASTER_*...
REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a red circle on a striped background", " Hello, World 123!", "the blue square"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`root/run`, trained from `root` with relative paths (data/shards, data/tokenizer/lcl.model); the
    data folder is then moved to `root/moved` (as a cluster's clean-up would)."""
    root = tmp_path_factory.mktemp("export_run")
    build_corpus(root / "data")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert pretrain_lcl.main(argv(Path("data"), Path("run"), "train.train_steps=2")) == 0
    finally:
        os.chdir(cwd)
    shutil.move(str(root / "data"), str(root / "moved"))
    (root / "elsewhere").mkdir()
    return root


@pytest.fixture
def elsewhere(trained, monkeypatch) -> Path:
    monkeypatch.chdir(trained / "elsewhere")
    return trained / "elsewhere"


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree_digest(folder: Path) -> dict:
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_run_keeps_its_tokenizer_and_records_absolute_paths(trained):
    run = trained / "run"
    config = (run / "config.yaml").read_text()
    assert f"tokenizer: {run / TOKENIZER}" in config, config
    assert str(trained / "data" / "shards") in config  # data.path absolute too (the folder as it was then)
    kept = (run / TOKENIZER).read_bytes()
    assert kept == (trained / "moved" / "tokenizer" / "lcl.model").read_bytes()
    meta = json.loads(next((run / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["config"]["data"]["tokenizer"] == str(run / TOKENIZER)


def test_export_from_another_folder_after_the_data_moved(trained, elsewhere, capsys):
    """Before: `FileNotFoundError` traceback (data.tokenizer recorded relative to the training folder)."""
    from transformers import AutoTokenizer

    from megatron_lcl.data.tokenizer import LCLTokenizer
    from megatron_lcl.hf import verify

    assert export.main(["--load", "../run/checkpoints", "--save", "hf"]) == 0
    hf = AutoTokenizer.from_pretrained(str(elsewhere / "hf" / "tokenizer"))
    ours = LCLTokenizer(str(trained / "moved" / "tokenizer" / "lcl.model"))
    for text in TEXTS:
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    figures = verify.main(["--load", "../run/checkpoints", "--hf", "hf"])
    assert figures["tokenizer_ids_equal"] is True
    assert sorted(p.name for p in elsewhere.iterdir()) == ["hf"]  # no temporary folder left beside it


def test_a_missing_tokenizer_is_one_line_and_exit_2_then_given(trained, elsewhere, capsys):
    """A step folder copied out of its run directory whose config names its tokenizer as older runs did
    (relative to the training folder): one line naming it and `--tokenizer`; then that works."""
    from megatron_lcl.hf import verify

    step = next((trained / "run" / "checkpoints").glob("step_*"))
    lone = elsewhere / "lone" / step.name
    shutil.copytree(step, lone)
    meta = json.loads((lone / "meta.json").read_text())
    meta["config"]["data"]["tokenizer"] = "data/tokenizer/lcl.model"
    (lone / "meta.json").write_text(json.dumps(meta))
    assert checkpoint_tokenizer(str(lone), "data/tokenizer/lcl.model") is None
    capsys.readouterr()
    assert export.main(["--load", str(lone), "--save", "hf_lone"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"checkpoint {lone} was trained with data.tokenizer data/tokenizer/lcl.model, which is not there" in line
    assert "give --tokenizer PATH" in line and not (elsewhere / "hf_lone").exists()
    given = str(trained / "moved" / "tokenizer" / "lcl.model")
    assert export.main(["--load", str(lone), "--save", "hf_lone", "--tokenizer", given]) == 0
    assert (elsewhere / "hf_lone" / "tokenizer" / "tokenizer.json").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as verified:  # the verifier cannot compare tokenizers without it either
        verify.main(["--load", str(lone), "--hf", "hf_lone"])
    err = capsys.readouterr().err  # after transformers' progress bars of the HF loads
    assert verified.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"error: the tokenizer of {lone}, data/tokenizer/lcl.model, is not there")


def test_an_existing_export_is_refused_unless_overwrite(trained, elsewhere, capsys, monkeypatch):
    ckpts = str(trained / "run" / "checkpoints")
    assert export.main(["--load", ckpts, "--save", "hf_twice"]) == 0
    before = tree_digest(elsewhere / "hf_twice")
    capsys.readouterr()
    assert export.main(["--load", ckpts, "--save", "hf_twice"]) == 2
    assert "hf_twice already holds an export; --overwrite replaces it" in one_line(capsys.readouterr().err)
    assert tree_digest(elsewhere / "hf_twice") == before
    for atomic_exchange in (True, False):  # renameat2(RENAME_EXCHANGE), and the two renames without it
        (elsewhere / "hf_twice" / "stale.txt").write_text("from the older export")
        if not atomic_exchange:
            monkeypatch.setattr(publish, "exchange", lambda a, b: False)
        assert export.main(["--load", ckpts, "--save", "hf_twice", "--overwrite"]) == 0
        assert tree_digest(elsewhere / "hf_twice") == before  # replaced whole: stale.txt gone
    assert sorted(p.name for p in elsewhere.iterdir() if p.name.startswith(".")) == []


def test_a_folder_that_is_not_an_export_is_never_replaced(trained, elsewhere, capsys):
    run = trained / "run"
    before = tree_digest(run)
    assert export.main(["--load", str(run / "checkpoints"), "--save", str(run), "--overwrite"]) == 2
    assert f"--save {run} exists and is not a megatron_lcl export (no lcl_heads.safetensors)" in \
        one_line(capsys.readouterr().err)
    assert tree_digest(run) == before


def test_an_export_failing_part_way_leaves_no_folder_and_the_older_export_untouched(trained, elsewhere,
                                                                                   monkeypatch):
    """The LM's save raises after the vision tower was written (before: a folder with vision/ and no lm/
    under the target's name; over an older export, the new vision tower beside the old LM)."""
    from transformers import OPTForCausalLM

    ckpts = str(trained / "run" / "checkpoints")
    written = []

    def failing_save(self, path, *args, **kwargs):
        written.extend(os.listdir(os.path.dirname(path)))
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(OPTForCausalLM, "save_pretrained", failing_save)
        with pytest.raises(OSError, match="No space left"):
            export.export_to_hf(ckpts, "hf_fresh", log=lambda *a: None)
    assert written == ["vision"] and not (elsewhere / "hf_fresh").exists()
    export.export_to_hf(ckpts, "hf_old", log=lambda *a: None)
    (elsewhere / "hf_old" / "marker.txt").write_text("the older export")
    before = tree_digest(elsewhere / "hf_old")
    with monkeypatch.context() as patch:
        patch.setattr(OPTForCausalLM, "save_pretrained", failing_save)
        with pytest.raises(OSError, match="No space left"):
            export.export_to_hf(ckpts, "hf_old", log=lambda *a: None, overwrite=True)
    assert tree_digest(elsewhere / "hf_old") == before
    assert not [p for p in elsewhere.iterdir() if p.name.startswith(".")]  # the partial folder removed


KILLED_EXPORT = """
import os, signal, sys
from transformers import OPTForCausalLM
from megatron_lcl.hf import export
OPTForCausalLM.save_pretrained = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
export.main(sys.argv[1:])
"""


def test_an_export_killed_part_way_leaves_the_older_export_untouched(trained, elsewhere):
    """SIGKILL during the write (after the vision tower): the older export is bitwise as it was, the
    partial folder is hidden (`.hf_killed.PID.tmp`), and the next export removes it."""
    ckpts = str(trained / "run" / "checkpoints")
    assert export.main(["--load", ckpts, "--save", "hf_killed"]) == 0
    before = tree_digest(elsewhere / "hf_killed")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # this process's in-process run set them
    killed = subprocess.run([sys.executable, "-c", KILLED_EXPORT, "--load", ckpts, "--save", "hf_killed",
                             "--overwrite"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert tree_digest(elsewhere / "hf_killed") == before
    partial = [p for p in elsewhere.iterdir() if p.name.startswith(".hf_killed.")]
    assert len(partial) == 1 and partial[0].name.endswith(".tmp") and (partial[0] / "vision").is_dir()
    assert export.main(["--load", ckpts, "--save", "hf_killed", "--overwrite"]) == 0
    assert not partial[0].exists()


def test_keep_tokenizer_keeps_one_tokenizer_per_run(tmp_path):
    """The same bytes again: kept as they are; another tokenizer for the same run directory: refused
    naming both (what a resume with another data.tokenizer gets, exit 2 through the driver)."""
    a, b = tmp_path / "a.model", tmp_path / "b.model"
    a.write_bytes(b"first model")
    b.write_bytes(b"second model")
    kept = keep_tokenizer(str(tmp_path / "run"), str(a))
    assert kept == str(tmp_path / "run" / TOKENIZER) and Path(kept).read_bytes() == b"first model"
    assert keep_tokenizer(str(tmp_path / "run"), str(a)) == kept
    assert keep_tokenizer(str(tmp_path / "run"), kept) == kept  # the run's own config.yaml given back
    with pytest.raises(ValueError, match=f"data.tokenizer \\({b}\\) is not the tokenizer this run was trained"):
        keep_tokenizer(str(tmp_path / "run"), str(b))
    assert Path(kept).read_bytes() == b"first model"


def test_the_run_resumes_from_its_own_config_after_the_data_moved(trained, elsewhere):
    """`--config RUN_DIR/config.yaml run_dir=RUN_DIR data.path=NEW_PLACE` from another folder: the
    tokenizer comes from the run directory (as recorded), the data position continues on the moved
    shards (its fingerprint names shard files, not folders), one more step is trained."""
    from megatron_lcl.checkpoint import read_metrics

    run = trained / "run"
    assert pretrain_lcl.main(["--config", str(run / "config.yaml"), f"run_dir={run}",
                              f"data.path={trained / 'moved' / 'shards'}", "train.train_steps=3",
                              "optimizer.override_scheduler=true"]) == 0
    assert [r["step"] for r in read_metrics(str(run))] == [1, 2, 3]

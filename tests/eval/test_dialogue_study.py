"""tools/dialogue_study.py at a tiny size (two encoders, two seeds, frozen, a few steps): every arm's
benchmark metrics land in the CSV once, a rerun trains nothing and appends nothing, and the report's
cells are the mean ± sd over the seeds of the CSV's values."""

import csv
import importlib.util
import os
import statistics
from pathlib import Path

from dialogue_fixtures import write_clip

TOOL = Path(__file__).resolve().parents[2] / "tools" / "dialogue_study.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("dialogue_study", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_is_recorded_once_and_reported_as_mean_and_sd(tmp_path):
    study = load_tool()
    clips = [write_clip(tmp_path / f"clip{seed}", seed=seed) for seed in (0, 1)]
    argv = ["--out", str(tmp_path / "study"), "--encoder", f"a={clips[0]}", f"b={clips[1]}", "--seeds", "0", "1",
            "--modes", "frozen", "--train-images", "16", "--eval-images", "4", "--stage1-steps", "1",
            "--stage2-steps", "2", "--batch-size", "4"]
    assert study.main(argv) == 0
    csv_path = tmp_path / "study" / "results.csv"
    rows = list(csv.DictReader(open(csv_path)))
    metrics = sum(len(m) for m in study.METRICS.values())
    assert len(rows) == 2 * 2 * metrics  # encoders x seeds x metrics
    assert {(r["encoder"], r["seed"]) for r in rows} == {("a", "0"), ("a", "1"), ("b", "0"), ("b", "1")}
    assert all(r["num_answered"] == r["num_questions"] for r in rows)
    before = csv_path.read_bytes()
    stage2 = tmp_path / "study" / "runs" / "a-s0" / "frozen" / "stage2.json"
    stamp = os.stat(stage2).st_mtime_ns
    assert study.main(argv) == 0  # restart: nothing runs again, nothing is appended
    assert csv_path.read_bytes() == before and os.stat(stage2).st_mtime_ns == stamp
    values = [float(r["value"]) for r in rows if (r["encoder"], r["benchmark"], r["metric"]) == ("b", "pope", "f1")]
    line = next(x for x in study.report(str(csv_path)).splitlines() if x.startswith("| pope f1 |"))
    assert line.rstrip(" |").split(" | ")[2] == f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} (n=2)"


def test_a_bad_encoder_argument_is_refused_before_the_corpus_is_built(tmp_path, capsys):
    """A missing `NAME=` ran into a traceback after the corpus and LM were built; now each --encoder is
    checked first: one line, status 2, nothing written."""
    import pytest

    study = load_tool()
    out = tmp_path / "study"
    for encoder, expected in (([str(tmp_path)], "give NAME=CHECKPOINT"),
                              ([f"a={tmp_path / 'missing'}"], "no such file or directory"),
                              ([f"a={tmp_path}", f"a={tmp_path}"], "each NAME once")):
        with pytest.raises(SystemExit) as stop:
            study.main(["--out", str(out), "--encoder", *encoder])
        assert stop.value.code == 2 and expected in capsys.readouterr().err.splitlines()[-1]
    assert not out.exists()

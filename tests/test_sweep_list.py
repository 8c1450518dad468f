"""`lcl-sweep SPEC --list`: every pass a point's config runs is in its FLOPs (the step-wide L_con's
feature pass when contrastive_batch=step spans several micro-batches), GPU-hours at several assumed
MFUs, the paper's main run as their anchor, and hours at the throughput finished points measured."""

from pathlib import Path

import pytest
import yaml

from megatron_lcl.config import load_config
from megatron_lcl.models.flops import PEAK_FLOPS_PER_S, flops_per_sample, step_flops
from megatron_lcl.scaling import run_sweep, sweep

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = str(ROOT / "examples" / "configs" / "tiny_cpu.yaml")
MODEL = {"name": "s", "lm": {"hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64}}


def write_spec(tmp_path: Path) -> str:
    """Two points at one size: step-wide L_con over 4 micro-batches of 2 (feature pass), and
    per-micro-batch L_con (none). One rank: global batch 8 = 4 x micro-batch 2."""
    spec = dict(name="t", base_config=TINY_CONFIG, output_dir=str(tmp_path / "out"), nproc=1,
                overrides=["data.seq_length=64", "data.micro_batch_size=2"], models=[MODEL],
                arms=[{"name": "step", "overrides": ["loss.contrastive_batch=step"]},
                      {"name": "micro", "overrides": ["loss.contrastive_batch=micro_batch"]}],
                budgets=[{"name": "b", "train_steps": 3, "global_batch_size": 8}])
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def listed_flops(listing: str, point: str) -> tuple:
    """(est. FLOPs, feature pass column) of `point`'s row."""
    row = next(line.split() for line in listing.splitlines() if f" {point} " in line)
    return float(row[9]), row[10]


def test_list_counts_the_feature_pass(tmp_path, capsys):
    spec = sweep.load_spec(write_spec(tmp_path))
    run_sweep.list_points(spec, assume_mfu=(0.15, 0.2, 0.35))
    listing = capsys.readouterr().out
    points = {p.arm: p for p in sweep.expand_points(spec)}
    step_cfg = load_config(spec.base_config, points["step"].overrides)
    assert sweep.flops_kwargs(step_cfg, 1)["feature_pass"] is True  # 4 micro-batches of one rank
    per_sample = step_flops(step_cfg.model, 64, spec.images_per_sample, samples=1, feature_pass=True)
    assert per_sample["feature_pass"] > 0.2 * per_sample["total"]  # a forward pass: not a rounding error
    with_pass, column = listed_flops(listing, points["step"].name)
    assert column == "yes"
    assert with_pass == pytest.approx(per_sample["total"] * 8 * 3, rel=1e-2)  # printed to 3 digits
    without_pass, column = listed_flops(listing, points["micro"].name)
    assert column == "no"
    assert without_pass == pytest.approx((per_sample["total"] - per_sample["feature_pass"]) * 8 * 3, rel=1e-2)
    for mfu in ("15%", "20%", "35%"):
        assert f"GPU-h@{mfu}" in listing and f"GPU-hours at {mfu} MFU" in listing
    assert "anchor: the paper's main run" in listing and "ESTIMATE" in listing


def test_one_rank_of_one_micro_batch_runs_no_feature_pass(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path))
    step_point = next(p for p in sweep.expand_points(spec) if p.arm == "step")
    cfg = load_config(spec.base_config, step_point.overrides + ["data.micro_batch_size=8"])
    assert sweep.flops_kwargs(cfg, 1)["feature_pass"] is False  # global batch 8 = one micro-batch
    assert sweep.flops_kwargs(cfg, 4)["feature_pass"] is False  # DP 4 with micro-batch 8: still one (or none)


def test_paper_anchor_is_the_main_runs_flops_over_its_a800_hours():
    anchor = run_sweep.paper_main_run_anchor()
    assert anchor["gpu_hours"] == 512 * 5 * 24  # App. A.4: 512 A800s, 5 days
    assert anchor["peak_tflops"] == PEAK_FLOPS_PER_S["a800-bf16"] / 1e12 == 312
    assert anchor["implied_mfu"] == pytest.approx(anchor["flops"] / (61_440 * 3600 * 312e12))
    cfg = load_config(str(ROOT / "examples" / "configs" / "vit_l14_opt125m_laion_mmc4.yaml"))
    per_sample = flops_per_sample(cfg.model, cfg.data.seq_length, 6.4)  # the example config is the same model
    assert anchor["flops"] == pytest.approx(per_sample * cfg.train.global_batch_size * cfg.train.train_steps)
    assert 0.10 < anchor["implied_mfu"] < 0.25  # what a 2024 run of this size achieves, not 1.3x off


def test_assume_mfu_takes_several_and_rejects_out_of_range(tmp_path, capsys):
    path = write_spec(tmp_path)
    assert run_sweep.main([path, "--list", "--assume-mfu", "0.15", "0.35"]) == 0
    assert "GPU-hours at 15% MFU" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_sweep.main([path, "--list", "--assume-mfu", "0.2", "1.5"])
    assert "each MFU must be in (0, 1], got [1.5]" in capsys.readouterr().err


def test_list_estimates_what_remains_at_the_throughput_finished_points_measured(tmp_path, capsys):
    """Once points have finished, `--list` gives each point's hours of one process at the model FLOP/s the
    finished points of the same model and arm measured (else of the same model), and the hours to do."""
    spec = sweep.load_spec(write_spec(tmp_path))
    run_sweep.list_points(spec)
    assert "h@measured" not in capsys.readouterr().out  # nothing measured yet: no column, no guess
    points = {p.arm: p for p in sweep.expand_points(spec)}
    row = dict.fromkeys(sweep.CSV_COLUMNS, "")
    row.update(point=points["step"].name, arm="step", model="s", status="ok", model_flops_per_s=2e5)
    sweep.append_row(spec.results_csv, row)
    assert run_sweep.measured_rates(spec.results_csv) == {("s", "step"): 2e5}
    run_sweep.list_points(spec)
    listing = capsys.readouterr().out
    for arm, status in (("step", "done"), ("micro", "todo")):  # micro has no rate of its own: the model's
        fields = next(line.split() for line in listing.splitlines() if f" {points[arm].name} " in line)
        flops, hours = listed_flops(listing, points[arm].name)[0], float(fields[-2])
        assert fields[-1] == status and hours == pytest.approx(flops / 2e5 / 3600, abs=0.006)
    todo = float(listing.split("to do: 1 point(s), about ")[1].split(" h")[0])
    micro_flops = listed_flops(listing, points["micro"].name)[0]
    assert todo == pytest.approx(micro_flops / 2e5 / 3600, abs=0.06)


def test_list_keeps_long_names_as_their_own_columns(tmp_path, capsys):
    """An arm, point or budget name longer than its column's default width does not run into the next."""
    path = write_spec(tmp_path)
    spec = yaml.safe_load(open(path))
    spec["arms"] = [{"name": "lcl_lr3e-4_with_a_long_name", "overrides": ["loss.contrastive_batch=step"]}]
    spec["budgets"][0]["name"] = "a_budget_named_at_length"
    open(path, "w").write(yaml.safe_dump(spec))
    run_sweep.list_points(sweep.load_spec(path))
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("0 "))
    assert row[2:5] == ["lcl_lr3e-4_with_a_long_name", "s", "a_budget_named_at_length"] and row[-1] == "todo"


@pytest.mark.parametrize("text, expected", [
    (None, "No such file or directory"),
    ("name: x\nbase_config: c.yaml\noutput_dir: o\nmodels: [{name: s}]\nbudgets: 3\n",
     "`budgets` is a list of mappings, got 3"),
    ("name: x\nbase_config: c.yaml\n", "missing sweep keys ['output_dir', 'models', 'budgets']"),
    ("- a list\n", "a sweep spec is a mapping of keys, got list"),
    ("name: [unclosed\n", "while parsing"),
])
def test_a_spec_that_cannot_work_gives_one_line_and_status_2(tmp_path, capsys, text, expected):
    path = tmp_path / "spec.yaml"
    if text is not None:
        path.write_text(text)
    assert run_sweep.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sweep spec error: ") and expected in err and "Traceback" not in err, err


def test_an_index_the_spec_does_not_have_is_refused_before_anything_runs(tmp_path, capsys):
    spec = write_spec(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_sweep.main([spec, "--index", "1", "7"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--index [7]: " in err and "has points 0-1 (see --list)" in err, err
    assert not (tmp_path / "out" / "results.csv").exists()


@pytest.mark.parametrize("extra, expected", [
    ({"eval_command": "{python} -m x --encoder {run_dir}/checkpoints --out {rundir}/eval.json"},
     "eval_command '{python} -m x --encoder {run_dir}/checkpoints --out {rundir}/eval.json' uses {rundir}"),
    ({"overrides": ["data.path={output_dir}/shards", "data.tokenizer={data_dir}/lcl.model"]}, "uses {data_dir}"),
    ({"setup": [{"creates": "{output_dir}/x", "run": "touch {output_dir}/x {}"}]},
     "setup.run 'touch {output_dir}/x {}' uses {}"),
    ({"setup": [{"creates": "{output_dir}/x", "command": "touch x"}]},
     "every `setup` step is {creates: PATH, run: COMMAND}"),
    ({"eval_command": "echo {run_dir"}, "expected '}' before end of string"),
])
def test_a_placeholder_no_field_fills_is_refused_when_the_spec_loads(tmp_path, extra, expected):
    """A typo in a template used to surface as a KeyError when it was filled: for eval_command, after
    the first point had trained."""
    spec = yaml.safe_load(open(write_spec(tmp_path)))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**spec, **extra}))
    with pytest.raises(ValueError) as error:
        sweep.load_spec(str(path))
    assert expected in str(error.value)

"""Objectives compared at matched compute: the arms x models x budgets x seeds grid of a sweep, every
evaluation metric as a CSV column, fits of E = a (C + b)^c + d that recover known parameters with
intervals covering them, the crossover finder, the comparison report, and a 2-arm sweep end to end
with the real driver and the real transfer evaluation."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from megatron_lcl.scaling import arms, fit, sweep

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = str(ROOT / "examples" / "configs" / "tiny_cpu.yaml")
MODELS = [{"name": "s", "lm": {"hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64}},
          {"name": "m", "lm": {"hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 128}}]
ARMS = [{"name": "lcl", "overrides": ["loss.mode=lcl"]}, {"name": "con", "overrides": ["loss.mode=con"]}]


def write_spec(tmp_path: Path, **extra) -> str:
    spec = dict(name="t", base_config=TINY_CONFIG, output_dir=str(tmp_path / "out"),
                overrides=["data.seq_length=64", "data.micro_batch_size=2"], models=MODELS,
                budgets=[{"name": "b1", "train_steps": 2, "global_batch_size": 2},
                         {"name": "b2", "train_steps": 4, "global_batch_size": 2}], arms=ARMS, seeds=[1, 2])
    spec.update(extra)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def fake_runner(calls, metrics=None):
    """test_scaling's fake driver (metrics.jsonl reaching train_steps), plus what an eval command
    would write: RUN_DIR/eval.json with `metrics(point name)`."""
    from test_scaling import fake_runner as fake_driver

    driver = fake_driver(calls)

    def run(config_path, overrides, run_dir, nproc):
        code = driver(config_path, overrides, run_dir, nproc)
        if metrics is not None:
            Path(run_dir, "eval.json").write_text(json.dumps({"metrics": metrics(os.path.basename(run_dir)),
                                                              "details": {"ignored": {"nested": 1}}}))
        return code
    return run


# ------------------------------------------------------------------------------ the grid

def test_grid_of_arms_models_budgets_seeds(tmp_path, capsys):
    from megatron_lcl.config import load_config

    spec = sweep.load_spec(write_spec(tmp_path, budgets=[
        {"name": "b1", "train_steps": 2, "global_batch_size": 2},
        {"name": "b2", "train_steps": 4, "global_batch_size": 2},
        {"name": "b2c1", "train_steps": 4, "global_batch_size": 2, "contrastive_batch": 1, "models": ["m"],
         "arms": ["lcl"]}]))
    points = sweep.expand_points(spec)
    per_seed = ["lcl-s-b1", "con-s-b1", "lcl-m-b1", "con-m-b1", "lcl-s-b2", "con-s-b2", "lcl-m-b2", "con-m-b2",
                "lcl-m-b2c1"]
    assert [p.name for p in points] == [f"{n}-s{s}" for s in (1, 2) for n in per_seed]
    assert [p.index for p in points] == list(range(18))
    assert len({p.run_dir for p in points}) == 18 and len({p.config_path for p in points}) == 18
    by_name = {p.name: p for p in points}
    con = load_config(spec.base_config, by_name["con-m-b2-s2"].overrides)
    assert (con.loss.mode, con.train.seed, con.train.train_steps, con.model.lm.hidden_size) == ("con", 2, 4, 64)
    side = load_config(spec.base_config, by_name["lcl-m-b2c1-s1"].overrides)
    assert (side.loss.mode, side.loss.contrastive_batch, side.data.micro_batch_size) == ("lcl", "micro_batch", 1)
    p = by_name["lcl-s-b1-s1"]
    assert (p.arm, p.model, p.budget, p.seed) == ("lcl", "s", "b1", 1)
    import sweep as sweep_tool

    assert sweep_tool.main([spec.spec_path, "--list", "--assume-mfu", "0.35"]) == 0
    listing = capsys.readouterr().out
    assert "con-m-b2-s2" in listing and "18 points (2 arm(s)" in listing and "GPU-hours" in listing
    assert "ESTIMATE" in listing and "35%" in listing


@pytest.mark.parametrize("bad, message", [
    ({"arms": [{"name": "a", "overrides": []}, {"name": "a", "overrides": []}]}, "unique name"),
    ({"arms": [{"name": "a", "override": []}]}, "arms"),
    ({"seeds": [1, 1]}, "seeds"),
    ({"budgets": [{"train_steps": 2, "global_batch_size": 2, "arms": ["nope"]}]}, "names arms"),
    ({"budgets": [{"train_steps": 2, "samples": 8, "global_batch_size": 2}]}, "one of train_steps, flops, samples"),
])
def test_bad_arms_seeds_and_budgets_are_refused(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        sweep.load_spec(write_spec(tmp_path, **bad))


def test_samples_budget_sets_steps(tmp_path):
    from megatron_lcl.config import load_config

    spec = sweep.load_spec(write_spec(tmp_path, arms=[], seeds=[], models=MODELS[:1],
                                      budgets=[{"samples": 20, "global_batch_size": 4}]))
    (point,) = sweep.expand_points(spec)
    assert point.name == "s-20samples" and load_config(spec.base_config, point.overrides).train.train_steps == 5


def test_restart_skips_finished_points_and_reruns_failed_ones(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path, seeds=[1]))
    names = [p.name for p in sweep.expand_points(spec)]
    assert names == ["lcl-s-b1-s1", "con-s-b1-s1", "lcl-m-b1-s1", "con-m-b1-s1",
                     "lcl-s-b2-s1", "con-s-b2-s1", "lcl-m-b2-s1", "con-m-b2-s1"]
    calls = []
    good = fake_runner(calls)

    def fails_on_con_m_b2(config_path, overrides, run_dir, nproc):
        return 3 if os.path.basename(run_dir) == "con-m-b2-s1" else good(config_path, overrides, run_dir, nproc)
    sweep.run_sweep(spec, runner=fails_on_con_m_b2, log=lambda *a: None)
    rows = {r["point"]: r for r in sweep.read_results(spec.results_csv)}
    assert rows["con-m-b2-s1"]["status"] == "failed(3)" and len(calls) == 7
    assert (rows["con-s-b1-s1"]["arm"], rows["con-s-b1-s1"]["seed"]) == ("con", "1")
    again = []
    sweep.run_sweep(spec, runner=fake_runner(again), log=lambda *a: None)
    assert again == ["con-m-b2-s1"]
    assert {r["status"] for r in sweep.read_results(spec.results_csv)} == {"ok"}


def test_every_eval_metric_becomes_a_column(tmp_path):
    """Each metric of RUN_DIR/eval.json is a column; a metric first seen on a later point widens the
    header (earlier rows: empty); --eval-only evaluates points without an evaluation."""
    spec = sweep.load_spec(write_spec(tmp_path, seeds=[1], models=MODELS[:1],
                                      budgets=[{"name": "b1", "train_steps": 2, "global_batch_size": 2}]))

    def metrics(name):
        return {"retrieval_tr1": 0.25, "probe_mean": 0.5} if name.startswith("lcl") else \
            {"retrieval_tr1": 0.125, "probe_mean": 0.75, "probe_count": 0.625}
    sweep.run_sweep(spec, runner=fake_runner([], metrics), log=lambda *a: None)
    with open(spec.results_csv) as f:
        header = f.readline().strip().split(",")
    assert header[:6] == ["point", "arm", "model", "budget", "seed", "status"]
    assert header[-3:] == ["retrieval_tr1", "probe_mean", "probe_count"] and len(set(header)) == len(header)
    rows = {r["point"]: r for r in sweep.read_results(spec.results_csv)}
    assert float(rows["lcl-s-b1-s1"]["retrieval_tr1"]) == 0.25 and rows["lcl-s-b1-s1"]["probe_count"] == ""
    assert float(rows["con-s-b1-s1"]["probe_count"]) == 0.625
    os.remove(Path(rows["lcl-s-b1-s1"]["run_dir"]) / "eval.json")  # e.g. its evaluation failed
    spec.eval_command = ("{python} -c \"import json, sys; json.dump({{'metrics': {{'retrieval_tr1': 0.5, "
                         "'probe_count': 0.25}}}}, open(sys.argv[1] + '/eval.json', 'w'))\" {run_dir}")
    assert [r["point"] for r in sweep.backfill_eval(spec, log=lambda *a: None)] == ["lcl-s-b1-s1"]
    rows = {r["point"]: r for r in sweep.read_results(spec.results_csv)}
    assert float(rows["lcl-s-b1-s1"]["retrieval_tr1"]) == 0.5 and float(rows["lcl-s-b1-s1"]["probe_count"]) == 0.25
    assert sweep.backfill_eval(spec, log=lambda *a: None) == []


def test_retrieve_and_classify_outputs_are_read_as_metrics(tmp_path):
    """What the streaming evaluation tools write (percent) becomes fractions in the CSV columns."""
    (tmp_path / "retrieval.json").write_text(json.dumps({"recall_pct": {"TR@1": 48.5, "IR@1": 30.0, "TR@5": 75.0,
                                                                        "IR@5": 60.0, "TR@10": 80.0}}))
    (tmp_path / "probe.json").write_text(json.dumps({"accuracy_pct": {"acc-1": 62.5}}))
    assert sweep.read_eval_metrics(str(tmp_path)) == pytest.approx(
        {"retrieval_tr1": 0.485, "retrieval_ir1": 0.3, "retrieval_tr5": 0.75, "retrieval_ir5": 0.6,
         "probe_accuracy": 0.625})


# ------------------------------------------------------------------------------ fits

def synthetic_configs(arm, law, computes, seeds=3, noise=0.03, rng=None):
    rng = rng or np.random.default_rng(0)
    return [arms.Config(arm, f"m{i}", f"b{i}", float(c), law(c) * np.exp(rng.normal(0, noise, seeds)))
            for i, c in enumerate(computes)]


def test_saturating_fit_recovers_known_parameters_and_intervals_cover_them():
    a, b, c, d = 3000.0, 2e10, -0.35, 0.05  # E from 0.72 at 1e10 to 0.13 at 1e13 FLOPs
    truth = lambda x: a * (x + b) ** c + d  # noqa: E731
    computes = np.geomspace(1e10, 1e13, 14)
    p = fit.fit_saturating(computes, truth(computes)).params()  # noiseless: exact
    for name, value in dict(a=a, b=b, c=c, d=d).items():
        assert p[name] == pytest.approx(value, rel=1e-3), name
    configs = synthetic_configs("lcl", truth, computes, noise=0.01)
    arm = arms.fit_arm(configs, "lcl", "m", num_samples=200, seed=1)
    ci = arms.parameter_intervals(arm, 0.95)
    assert arm.saturating is not None and len(arm.front) >= 10
    assert ci["sat_c"][0] <= c <= ci["sat_c"][1] and ci["sat_d"][0] <= d <= ci["sat_d"][1]
    assert ci["sat_d"][1] - ci["sat_d"][0] < 0.1  # informative: errors span 0.13-0.72
    held = arm.heldout  # fit without the largest compute, predict it
    assert abs(held["saturating"]["relative_error"]) < 0.15 and abs(held["power"]["relative_error"]) < 0.3


def test_power_law_exponent_difference_detects_a_real_difference_only():
    computes = np.geomspace(1e10, 1e13, 9)
    steep = arms.fit_arm(synthetic_configs("a", lambda x: 50 * x ** -0.2, computes), "a", "m", 200)
    flat = arms.fit_arm(synthetic_configs("b", lambda x: 5 * x ** -0.1, computes, rng=np.random.default_rng(1)),
                        "b", "m", 200)
    twin = arms.fit_arm(synthetic_configs("c", lambda x: 50 * x ** -0.2, computes, rng=np.random.default_rng(2)),
                        "c", "m", 200)
    diff = arms.exponent_difference(steep, flat, 0.9)
    assert diff["delta"] == pytest.approx(-0.1, abs=0.02) and diff["hi"] < 0
    same = arms.exponent_difference(steep, twin, 0.9)
    assert same["lo"] <= 0 <= same["hi"]


def test_crossover_finder():
    f = lambda x: 10 * np.asarray(x, dtype=float) ** -0.2  # noqa: E731
    g = lambda x: 2 * np.asarray(x, dtype=float) ** -0.1  # noqa: E731  crosses where 5 = x^0.1
    (x,) = fit.crossovers(f, g, 1e3, 1e10)
    assert x == pytest.approx(5 ** 10, rel=1e-6)
    assert fit.crossovers(f, g, 1e8, 1e12) == []  # f stays below g there
    h = lambda x: 0.5 + 0 * np.asarray(x, dtype=float)  # noqa: E731  a flat line crosses f once
    assert len(fit.crossovers(f, h, 1.0, 1e12)) == 1


def test_crossover_inside_the_measured_range():
    f = lambda x: 10 * np.asarray(x, dtype=float) ** -0.2  # noqa: E731
    g = lambda x: 2 * np.asarray(x, dtype=float) ** -0.1  # noqa: E731  cross at 5^10 = 9.77e6
    computes = np.geomspace(1e5, 1e9, 9)
    a = arms.fit_arm(synthetic_configs("a", f, computes, noise=0.01), "a", "m", 100)
    b = arms.fit_arm(synthetic_configs("b", g, computes, noise=0.01, rng=np.random.default_rng(3)), "b", "m", 100)
    x = arms.crossover(a, b, 0.9)
    assert len(x["in_range"]) == 1 and x["in_range"][0] == pytest.approx(5 ** 10, rel=0.5)
    assert x["a_lower_at_max"] and x["boot_fraction"] > 0.9
    lo, hi = x["boot_interval"]
    assert lo <= 5 ** 10 <= hi
    no = arms.crossover(a, arms.fit_arm(synthetic_configs("c", lambda v: 2 * f(v), computes, noise=0.01),
                                        "c", "m", 50), 0.9)
    assert no["in_range"] == [] and no["a_lower_at_max"]


def test_report_on_synthetic_arms_results(tmp_path):
    """A CSV of two arms x 3 sizes x 3 budgets x 2 seeds -> the comparison report, plots and JSON."""
    from megatron_lcl.scaling import report as scaling_report

    rng = np.random.default_rng(0)
    csv_path = str(tmp_path / "results.csv")
    laws = {"lcl": lambda c: 40 * c ** -0.15, "con": lambda c: 8 * c ** -0.08}
    for seed in (1, 2):
        for budget, steps in (("b1", 100), ("b2", 300), ("b3", 900)):
            for model, size in (("s", 1.0), ("m", 3.0), ("l", 9.0)):
                for arm, law in laws.items():
                    c = 1e9 * steps * size
                    err = min(law(c) * math.exp(rng.normal(0, 0.03)), 0.99)
                    sweep.append_row(csv_path, dict(
                        point=f"{arm}-{model}-{budget}-s{seed}", arm=arm, model=model, budget=budget, seed=seed,
                        status="ok", train_flops=c, train_steps=steps, global_batch_size=16, step_time_s=0.1,
                        loss=3.0, lm_loss=2.0, con_loss=1.0, retrieval_tr1=1 - err, probe_mean=1 - err / 2,
                        probe_count=0.5, contrastive_batch=16))
    # the contrastive-batch side points: one size and budget, another contrastive batch
    for arm in laws:
        sweep.append_row(csv_path, dict(point=f"{arm}-m-b2c4-s1", arm=arm, model="m", budget="b2c4", seed=1,
                                        status="ok", train_flops=9e11, train_steps=300, retrieval_tr1=0.2,
                                        probe_mean=0.6, probe_count=0.4, contrastive_batch=4))
    out = tmp_path / "report"
    assert scaling_report.main([csv_path, "--out", str(out), "--metrics", "retrieval_tr1", "probe_mean",
                                "--bootstrap", "60"]) == 0
    text = (out / "report.md").read_text()
    assert "### retrieval_tr1" in text and "lcl vs con: c_lcl - c_con" in text
    assert "interval excludes 0: lcl's error falls faster" in text
    assert "held out: fit without budget b3" in text
    assert "| lcl | m | 300 | b2c4 | 4 |" in text and "| lcl | m | 300 | b2 | 16 |" in text
    for metric in ("retrieval_tr1", "probe_mean"):
        assert (out / f"error_vs_compute_{metric}.png").stat().st_size > 0
    summary = json.loads((out / "report.json").read_text())
    assert summary["retrieval_tr1"]["lcl"]["exponent"] == pytest.approx(-0.15, abs=0.03)
    lo, hi = summary["retrieval_tr1"]["lcl-con"]["exponent_difference"]["lo"], \
        summary["retrieval_tr1"]["lcl-con"]["exponent_difference"]["hi"]
    assert lo <= -0.07 <= hi
    assert scaling_report.main([csv_path, "--out", str(out), "--metrics", "nope"]) == 2


# ------------------------------------------------------------------------------ end to end

def test_budget_order_runs_every_seed_of_a_budget_before_the_next(tmp_path):
    """`order: budget`: the same points (names, overrides, run directories), numbered budget-major, so
    a study stopped part-way has whole budgets with every seed; an unknown order is named."""
    by_seed = sweep.expand_points(sweep.load_spec(write_spec(tmp_path)))
    by_budget = sweep.expand_points(sweep.load_spec(write_spec(tmp_path, order="budget")))
    per_budget = ["lcl-s", "con-s", "lcl-m", "con-m"]
    assert [p.name for p in by_budget] == [f"{n}-{b}-s{s}" for b in ("b1", "b2") for s in (1, 2) for n in per_budget]
    assert [p.index for p in by_budget] == list(range(16))
    assert sorted((p.name, p.overrides, p.run_dir) for p in by_budget) == \
        sorted((p.name, p.overrides, p.run_dir) for p in by_seed)
    with pytest.raises(ValueError, match="`order` is one of seed, budget, got 'size'"):
        sweep.load_spec(write_spec(tmp_path, order="size"))


def test_two_arm_sweep_end_to_end_with_transfer_metrics(tmp_path):
    """2 arms x 1 size x 1 budget x 1 seed through the real driver, each point evaluated by
    megatron_lcl.eval.transfer on a held-out scenes corpus; every metric lands in results.csv; a rerun
    runs nothing; the report runs on the result."""
    out = tmp_path / "out"
    setup = [
        {"creates": "{output_dir}/corpus/.done",
         "run": "{python} -m megatron_lcl.data.synthetic --output {output_dir}/corpus --kind scenes --num-docs 40 "
                "--image-size 32 --seed 3 && touch {output_dir}/corpus/.done"},
        {"creates": "{output_dir}/eval/.done",
         "run": "{python} -m megatron_lcl.data.synthetic --output {output_dir}/eval --kind scenes --split heldout "
                "--num-docs 30 --image-size 32 --seed 4 && touch {output_dir}/eval/.done"},
        {"creates": "{output_dir}/tok/lcl.model",
         "run": "mkdir -p {output_dir}/tok && {python} tools/train_tokenizer.py --format mmc4 "
                "--input {output_dir}/corpus --output {output_dir}/tok/lcl --vocab-size 200 --character-coverage 1.0"},
        {"creates": "{output_dir}/shards/summary.json",
         "run": "{python} tools/prepare_data.py --format mmc4 --input {output_dir}/corpus "
                "--output {output_dir}/shards --shard-size 10 --no-progress"},
    ]
    overrides = ["data.path={output_dir}/shards", "data.tokenizer={output_dir}/tok/lcl.model",
                 "data.seq_length=64", "data.micro_batch_size=4", "data.shuffle_buffer=8", "data.num_workers=0",
                 "logging.log_interval=1", "logging.console=false", "logging.tensorboard=false",
                 "checkpoint.save_interval=null"]
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(dict(
        name="e2e", base_config=TINY_CONFIG, output_dir=str(out), setup=setup, overrides=overrides,
        models=[{"name": "m"}], arms=ARMS, seeds=[5],
        budgets=[{"name": "b1", "train_steps": 2, "global_batch_size": 4}],
        eval_command="{python} -m megatron_lcl.eval.transfer --encoder {run_dir}/checkpoints --data "
                     "{output_dir}/eval --probes label count --epochs 1 --seed {seed} --output {run_dir}/eval.json")))
    import sweep as sweep_tool

    cwd = os.getcwd()
    os.chdir(ROOT)  # setup commands name tools/ relative to the repository root
    try:
        assert sweep_tool.main([str(spec_path)]) == 0
        rows = {r["point"]: r for r in sweep.read_results(str(out / "results.csv"))}
        assert sorted(rows) == ["con-m-b1-s5", "lcl-m-b1-s5"]
        for name, row in rows.items():
            assert row["status"] == "ok" and row["arm"] == name[:3] and row["seed"] == "5", row
            for metric in ("probe_label", "probe_count", "probe_mean", "retrieval_tr1", "retrieval_ir1",
                           "retrieval_tr5"):
                assert 0.0 <= float(row[metric]) <= 1.0, (name, metric, row[metric])
            evaluated = json.loads(Path(row["run_dir"], "eval.json").read_text())
            assert evaluated["seed"] == 5 and float(row["retrieval_tr1"]) == pytest.approx(
                evaluated["metrics"]["retrieval_tr1"])
        assert float(rows["con-m-b1-s5"]["lm_loss"]) == 0.0 and float(rows["lcl-m-b1-s5"]["lm_loss"]) > 0
        assert float(rows["con-m-b1-s5"]["train_flops"]) < float(rows["lcl-m-b1-s5"]["train_flops"])  # no logits
        assert sweep_tool.main([str(spec_path)]) == 0  # all finished: nothing runs
        assert len(sweep.read_results(str(out / "results.csv"))) == 2
    finally:
        os.chdir(cwd)


def test_paper_ladder_lists_flops_and_estimated_gpu_hours(capsys):
    """The paper-scale plan: B/16, L/14, H/14 x 1.3B / 3.9B / 13B images seen x {lcl, con}; 13B images
    at ~64k per step is Sec. 4.1's ~200k steps; GPU-hours labelled as an estimate."""
    import sweep as sweep_tool

    spec = sweep.load_spec(str(ROOT / "examples" / "scaling" / "paper_ladder.yaml"))
    points = sweep.expand_points(spec)
    assert len(points) == 18 and {p.arm for p in points} == {"lcl", "con"}
    from megatron_lcl.config import load_config

    big = load_config(spec.base_config, next(p for p in points if p.name == "lcl-H14-13B-s1").overrides)
    assert (big.model.vision.hidden_size, big.model.vision.num_layers, big.model.lm.hidden_size) == (1280, 32, 768)
    assert big.train.train_steps == pytest.approx(200_000, rel=0.01)
    assert sweep_tool.main([spec.spec_path, "--list", "--assume-mfu", "0.35"]) == 0
    out = capsys.readouterr().out
    assert "lcl-L14-13B-s1" in out and "GPU-hours" in out and "ESTIMATE" in out

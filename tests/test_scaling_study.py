"""The scaling-study analysis (megatron_lcl.scaling.study, .power) and the sweep's untrained baseline:
per-item loading, the paired item x seed bootstrap, the Pareto front chosen inside every replicate,
the identifiability rule of the four-parameter form, the naive held-out predictor, the crossover rule
(significant on both sides) and the power calculation."""

import csv
import gzip
import json
import math
import os

import numpy as np
import pytest
import yaml

from megatron_lcl.scaling import arms, fit, power, study, sweep
from megatron_lcl.scaling.study import Run, Study

N_ITEMS = 600


def hits_for(accuracy: float, uniform: np.ndarray, difficulty: np.ndarray) -> np.ndarray:
    """0/1 per item: items differ in difficulty (shared by every run, as a fixed test set's items do);
    `uniform` [n_items] is the run's randomness, shared by the arms of one (size, budget, seed) as the
    initialisation, data order and heads' seed are."""
    logit = math.log(accuracy / (1 - accuracy)) - difficulty
    return (uniform < 1 / (1 + np.exp(-logit))).astype(float)


def synthetic_study(accuracy, budgets=(("b1", 1.0), ("b2", 3.0), ("b3", 9.0)), models=(("s", 1e9), ("m", 3e9)),
                    seeds=("1", "2", "3"), arm_names=("a", "b"), seed_shift=0.03, rng_seed=0) -> Study:
    """accuracy(arm, compute) -> expected accuracy; each seed shifts every arm's accuracy alike (a
    shared seed effect, which pairing by seed removes)."""
    rng = np.random.default_rng(rng_seed)
    difficulty = rng.normal(0, 1.0, N_ITEMS)
    shift = {s: rng.normal(0, seed_shift) for s in seeds}
    runs, baselines = [], {}
    for model, size in models:
        for s in seeds:
            baselines[(model, s)] = Run("a", model, "untrained", s, 0.0,
                                        {"m": hits_for(0.3, rng.random(N_ITEMS), difficulty)})
        for budget, steps in budgets:
            c = size * steps
            for s in seeds:
                uniform = rng.random(N_ITEMS)
                for arm in arm_names:
                    acc = float(np.clip(accuracy(arm, c) + shift[s], 0.02, 0.98))
                    runs.append(Run(arm, model, budget, s, c, {"m": hits_for(acc, uniform, difficulty)}, 0.5))
    return Study(runs, baselines, [f"i{k}" for k in range(N_ITEMS)], ["m"])


# ------------------------------------------------------------------------------ the bootstrap

def test_replicate_zero_is_the_data_and_pairing_is_by_size_budget_and_seed():
    s = synthetic_study(lambda arm, c: 0.5)
    for r in s.runs:  # arm b = arm a, item for item, seed for seed
        if r.arm == "b":
            r.hits["m"] = next(x for x in s.runs if (x.arm, x.model, x.budget, x.seed) ==
                               ("a", r.model, r.budget, r.seed)).hits["m"].copy()
    reps = study.draw_replicates(s, 300, seed=1)
    configs = study.config_values(s, reps, "m")
    by = {(c.arm, c.model, c.budget): c for c in configs}
    for (arm, model, budget), c in by.items():
        runs = [r for r in s.runs if (r.arm, r.model, r.budget) == (arm, model, budget)]
        assert c.error[0] == pytest.approx(1 - np.mean([r.hits["m"].mean() for r in runs]))
        base = np.mean([s.baselines[(model, r.seed)].hits["m"].mean() for r in runs])
        assert c.gain[0] == pytest.approx(np.mean([r.hits["m"].mean() for r in runs]) - base)
        # the same item and seed draws for both arms: identical arms differ by exactly 0 in every replicate
        assert np.array_equal(c.error, by[("b", model, budget)].error)
    assert np.std(by[("a", "s", "b1")].error[1:]) > 0.005  # the draws do move the error


def test_paired_bootstrap_sees_a_small_difference_that_seed_noise_hides_unpaired():
    # b is 3 points better everywhere; each seed moves both arms by ~8 points (shared)
    s = synthetic_study(lambda arm, c: 0.55 + (0.03 if arm == "b" else 0.0), seed_shift=0.08, rng_seed=3)
    a_fit, b_fit = (study.fit_arm([c for c in study.config_values(s, study.draw_replicates(s, 2000), "m")
                                   if c.arm == arm], arm, "m") for arm in ("a", "b"))
    diffs = study.budget_differences(a_fit, b_fit, ["b1", "b2", "b3"])
    assert all(d["significant"] == 1 for d in diffs)  # a's error is higher, significantly, at every budget
    # unpaired (b's seeds drawn independently of a's) the same data give intervals that include 0
    reps_a, reps_b = study.draw_replicates(s, 2000, seed=0), study.draw_replicates(s, 2000, seed=99)
    ca = [c for c in study.config_values(s, reps_a, "m") if c.arm == "a"]
    cb = [c for c in study.config_values(s, reps_b, "m") if c.arm == "b"]
    unpaired = study.budget_differences(study.fit_arm(ca, "a", "m"), study.fit_arm(cb, "b", "m"), ["b1", "b2", "b3"])
    assert sum(d["significant"] == 0 for d in unpaired) >= 2


def test_a_seed_is_one_cluster_across_budgets_and_sizes():
    """Every cell with the same seeds shares one seed draw, so the step from one budget to the next pairs
    out a seed's effect: 6 points per budget is seen through a per-seed shift of +-10 points."""
    law = lambda arm, c: 0.3 + 0.06 * math.log(c / 1e9, 3)  # noqa: E731  (+0.06 per budget at each size)
    s = synthetic_study(law, seed_shift=0.1, rng_seed=4)
    reps = study.draw_replicates(s, 2000, seed=0)
    draws = list(reps.seed_draws.values())
    assert len(draws) == 6 and all(d is draws[0] for d in draws)
    result = study.fit_arm([c for c in study.config_values(s, reps, "m") if c.arm == "a"], "a", "m")
    steps = study.more_steps(result, ["b1", "b2", "b3"])
    assert len(steps) == 4 and all(e["hi"] < 0 and not e["worse"] for e in steps)  # better, significantly
    ragged = Study([r for r in s.runs if not (r.budget == "b3" and r.seed == "3")], s.baselines, s.items, s.metrics)
    reps = study.draw_replicates(ragged, 10, seed=0)  # cells with other seeds draw their own
    assert reps.seed_draws[("s", "b3")].shape == (11, 2) and reps.seed_draws[("s", "b1")].shape == (11, 3)
    assert reps.seed_draws[("s", "b3")] is reps.seed_draws[("m", "b3")]


# ------------------------------------------------------------------------------ front inside the bootstrap

def test_front_and_fit_are_recomputed_inside_every_replicate():
    # size m at b1 and size s at b3 nearly tie: which of them is on the front depends on the draw
    law = lambda arm, c: 0.2 + 0.1 * math.log10(c / 1e9)  # noqa: E731
    s = synthetic_study(law, rng_seed=5)
    reps = study.draw_replicates(s, 400, seed=2)
    configs = [c for c in study.config_values(s, reps, "m") if c.arm == "a"]
    result = study.fit_arm(configs, "a", "m")
    compute = np.array([c.compute for c in configs])
    for b in (0, 1, 17, 400):  # each replicate's exponent is the fit on that replicate's own front
        errors = np.array([c.error[b] for c in configs])
        front = fit.pareto_frontier(compute, errors)
        slope = np.polyfit(np.log(compute[front]), np.log(errors[front]), 1)[0]
        assert result.exponent[b] == pytest.approx(slope)
    assert result.front == fit.pareto_frontier(compute, np.array([c.error[0] for c in configs])).tolist()
    assert ((result.front_share > 0) & (result.front_share < 1)).any()  # membership varies between replicates
    assert result.front_share[np.argmin(compute)] == 1.0  # the cheapest configuration is always on the front


# ------------------------------------------------------------------------------ the identifiability rule

def test_four_parameter_form_only_with_eight_front_points():
    law = lambda x: 3000.0 * (x + 2e10) ** -0.35 + 0.05  # noqa: E731
    seven, eight = np.geomspace(1e10, 1e13, 7), np.geomspace(1e10, 1e13, 8)
    assert "not_identified" in study.saturating_fit(seven, law(seven))
    params = study.saturating_fit(eight, law(eight))
    assert params["c"] == pytest.approx(-0.35, rel=1e-2) and params["d"] == pytest.approx(0.05, rel=1e-2)
    configs = [arms.Config("a", f"m{i}", f"b{i}", float(c), np.array([law(c)])) for i, c in enumerate(seven)]
    fitted = arms.fit_arm(configs, "a", "m", num_samples=5)
    assert fitted.saturating is None and any("not identified" in n for n in fitted.notes)


def test_exponent_difference_needs_a_fit_on_the_data_and_in_nearly_every_replicate():
    def fitted(exponents, front=(0, 1, 2), budgets=2):
        return study.ArmResult("x", "m", [], list(front), np.asarray(exponents, float), np.zeros(len(exponents)),
                               np.zeros(0), front_budgets=budgets)

    rng = np.random.default_rng(0)
    a = fitted(np.concatenate([[-0.2], -0.2 + 0.01 * rng.standard_normal(4000)]))
    b = fitted(np.concatenate([[-0.1], -0.1 + 0.01 * rng.standard_normal(4000)]))
    d = study.exponent_difference(a, b)
    assert d["identified"] and d["significant"] == -1 and d["n"] == d["of"] == 4000
    # one front point on the data (no fit), though a few hundred replicates happen to have two: no interval
    lone = fitted(np.concatenate([[np.nan], np.where(rng.random(4000) < 0.07, -0.3, np.nan)]))
    d = study.exponent_difference(a, lone)
    assert not d["identified"] and np.isnan(d["lo"]) and d["significant"] == 0 and "x" in d["why"]
    # a fit on the data but in only 90 % of the replicates: not identified either
    patchy = fitted(np.concatenate([[-0.3], np.where(rng.random(4000) < 0.9, -0.3, np.nan)]))
    d = study.exponent_difference(a, patchy)
    assert not d["identified"] and "replicates" in d["why"]
    # a fit in every replicate, but on a front of two points, or of three sizes at one budget: not identified
    for front, budgets in (((0, 1), 2), ((0, 1, 2), 1)):
        d = study.exponent_difference(a, fitted(b.exponent, front, budgets))
        assert not d["identified"] and np.isnan(d["lo"]) and d["significant"] == 0
        assert f"x's holds {len(front)} point(s) from {budgets} budget(s)" in d["why"]


# ------------------------------------------------------------------------------ held out, crossover

def test_heldout_prediction_is_scored_against_the_naive_predictor():
    s = synthetic_study(lambda arm, c: min(0.2 + 0.15 * math.log10(c / 1e9), 0.95), rng_seed=7)
    result = study.fit_arm([c for c in study.config_values(s, study.draw_replicates(s, 10), "m") if c.arm == "a"],
                           "a", "m")
    held = result.heldout
    assert held["budget"] == "b3" and held["naive"] > held["observed"]  # still improving: naive is too pessimistic
    assert abs(held["power_rel_error"]) < abs(held["naive_rel_error"])


def test_crossover_claimed_only_when_significant_on_both_sides():
    # a starts better and falls slower: b better at b3 by a wide margin -> claimed
    def cross(arm, c):
        return 0.5 + 0.05 * math.log10(c / 1e9) if arm == "a" else 0.35 + 0.2 * math.log10(c / 1e9)

    s = synthetic_study(cross, seed_shift=0.01, rng_seed=11)
    reps = study.draw_replicates(s, 1000)
    configs = study.config_values(s, reps, "m")
    fa, fb = (study.fit_arm([c for c in configs if c.arm == arm], arm, "m") for arm in ("a", "b"))
    x = study.crossover(fa, fb, ["b1", "b2", "b3"])
    assert x["claimed"] == {"between": ("b1", "b3"), "lower_first": "a"} or \
        x["claimed"] == {"between": ("b1", "b2"), "lower_first": "a"}
    # the same start, but b only draws level at the largest compute (9e9): no significant lead for b -> no claim
    def level(arm, c):
        return 0.5 + 0.05 * math.log10(c / 1e9) if arm == "a" else 0.35 + 0.2075 * math.log10(c / 1e9)

    s2 = synthetic_study(level, budgets=(("b1", 1.0), ("b2", 3.0)), seed_shift=0.01, rng_seed=11)
    configs2 = study.config_values(s2, study.draw_replicates(s2, 1000), "m")
    ga, gb = (study.fit_arm([c for c in configs2 if c.arm == arm], arm, "m") for arm in ("a", "b"))
    y = study.crossover(ga, gb, ["b1", "b2"])
    assert y["claimed"] is None and y["by_budget"][0]["significant"] == -1  # a lower at b1, significantly
    assert y["by_budget"][1]["significant"] == 0


def test_more_steps_scoring_worse_is_flagged_per_size():
    """Issue 33's b2 < b1 anomaly as a check: per arm and size, the error at each budget minus the next
    smaller one, flagged when more steps are significantly worse. Here arm a at size m drifts at its
    largest budget (accuracy 0.54 -> 0.30); every other step improves (a) or stays level (b)."""
    def drift(arm, c):
        if arm == "b":
            return 0.5
        return 0.3 if c > 2e10 else 0.4 + 0.15 * math.log10(c / 1e9)  # m-b3 is the only point above 2e10

    s = synthetic_study(drift, rng_seed=5)
    analysis = study.analyse(s, num_samples=1000)
    steps = {(e["model"], e["from"], e["to"]): e for e in analysis.steps[("a", "m")]}
    assert set(steps) == {(m, lo, hi) for m in ("s", "m") for lo, hi in (("b1", "b2"), ("b2", "b3"))}
    assert [k for k, e in steps.items() if e["worse"]] == [("m", "b2", "b3")]
    assert steps[("m", "b2", "b3")]["delta"] == pytest.approx(0.24, abs=0.05) and steps[("m", "b2", "b3")]["lo"] > 0
    assert all(e["delta"] < 0 and not e["worse"] for k, e in steps.items() if k[0] == "s")  # s improves each time
    assert not any(e["worse"] for e in analysis.steps[("b", "m")])  # level: no step is worse
    from megatron_lcl.scaling.study_report import step_lines
    line = next(x for x in step_lines(analysis, "m") if x.startswith("- more steps, a "))
    assert "**significantly worse: m b2->b3**" in line
    assert next(x for x in step_lines(analysis, "m") if x.startswith("- more steps, b ")).endswith(
        "never significantly worse")


def test_best_size_per_budget_says_when_it_sits_at_an_end_of_the_ladder():
    """Three sizes: at b1 the middle size is best (inside the ladder), at b2 the largest (an end: the
    ladder may not hold the best size), each with its share of replicates."""
    sizes = (("s", 1e9), ("m", 3e9), ("l", 9e9))
    def acc(arm, c):  # b1 (x1): m best; b2 (x30): l best
        return {1e9: 0.40, 3e9: 0.60, 9e9: 0.45, 3e10: 0.50, 9e10: 0.55, 2.7e11: 0.75}[round(c, -8)]

    s = synthetic_study(acc, budgets=(("b1", 1.0), ("b2", 30.0)), models=sizes, rng_seed=2)
    analysis = study.analyse(s, num_samples=500)
    best = {e["budget"]: e for e in study.best_sizes(analysis.arms[("a", "m")])}
    assert (best["b1"]["model"], best["b1"]["edge"]) == ("m", None) and best["b1"]["share"] > 0.9
    assert (best["b2"]["model"], best["b2"]["edge"]) == ("l", "largest") and best["b2"]["share"] > 0.9
    assert sum(best["b1"]["shares"].values()) == pytest.approx(1.0)
    from megatron_lcl.scaling.study_report import best_size_lines
    line = next(x for x in best_size_lines(analysis, "m") if x.startswith("- best size, a: "))
    assert "b1 m (" in line and "inside the ladder" in line and "b2 l (" in line
    assert line.endswith("at an end of the ladder at 1 budget(s): the ladder may not hold the best size there")


# ------------------------------------------------------------------------------ power

def test_power_calculation():
    xs = np.log(np.geomspace(1.0, 1000.0, 7))
    assert power.sxx(7, 1000.0) == pytest.approx(((xs - xs.mean()) ** 2).sum())
    noise = power.Noise("m", run_var=0.05 ** 2, run_dof=3, item_var=0.2, error=0.5, configurations=3)
    se = power.exponent_difference_se(noise, 4, 7, 1000.0, 1000)
    assert se == pytest.approx(math.sqrt(0.05 ** 2 / 4 + 0.2 / 1000) / 0.5 / math.sqrt(power.sxx(7, 1000.0)))
    assert power.power(0.02, 0.02 / (power.Z_INTERVAL + power.Z_POWER)) == pytest.approx(0.8, abs=1e-3)
    assert (power.power(0.02, 0.0), power.power(0.0, 0.0)) == (1.0, 0.0)  # noiseless runs: no division by 0
    need = power.seeds_needed(noise, 0.02, 7, 1000.0, 1000)
    assert need > 0 and power.exponent_difference_se(noise, need, 7, 1000.0, 1000) <= 0.02 / 2.486
    # by hand: (0.02 / 2.486 * 0.5 * sqrt(Sxx))^2 - 0.2 / 1000 = 4.0e-4 >= 0.05^2 / S  ->  S >= 6.25
    assert need == 7 and power.exponent_difference_se(noise, 6, 7, 1000.0, 1000) > 0.02 / 2.486
    assert power.seeds_needed(noise, 0.0005, 3, 10.0, 100) == 0  # the item term alone is too large


def test_pilot_noise_pools_seed_variance_of_paired_differences():
    s = synthetic_study(lambda arm, c: 0.5, seed_shift=0.0, rng_seed=13)
    noise = power.pilot_noise(s, "m")
    assert noise.configurations == 6 and noise.run_dof == 6 * 2
    # equal arms sharing each run's randomness: the paired difference has no run variance at all
    assert noise.run_var == 0.0 and noise.item_var == 0.0
    # a pilot still running: arm b has seed 1 only -> 2 x arm a's variance over seeds (an upper bound)
    s.runs = [r for r in s.runs if r.arm == "a" or r.seed == "1"]
    rough = power.pilot_noise(s, "m")
    acc = {}
    for r in s.runs:
        if r.arm == "a":
            acc.setdefault((r.model, r.budget), []).append(r.hits["m"].mean())
    expected = 2 * np.mean([np.var(v, ddof=1) for v in acc.values()])
    assert not rough.paired and rough.run_dof == 12 and rough.run_var == pytest.approx(expected)


# ------------------------------------------------------------------------------ loading and the sweep

def write_run(root, point, row, items):
    run_dir = os.path.join(root, "runs", point)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "per_item.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["item", "probe_count", "tr_rank", "ir_rank"])
        w.writeheader()
        w.writerows(items)
    sweep.append_row(os.path.join(root, "results.csv"), dict(point=point, status="ok", run_dir=run_dir, **row))


def test_load_study_reads_per_item_files_baselines_and_the_chance_flag(tmp_path):
    root = str(tmp_path)
    items = lambda hit, rank: [{"item": f"x{k}.jpg", "probe_count": hit, "tr_rank": rank, "ir_rank": 0}  # noqa: E731
                               for k in range(4)]
    write_run(root, "lcl-m-untrained-s1", dict(arm="lcl", model="m", budget="untrained", seed=1, train_steps=0,
                                               train_flops=0), items(0, 9))
    write_run(root, "lcl-m-b1-s1", dict(arm="lcl", model="m", budget="b1", seed=1, train_steps=10, train_flops=1e9,
                                        con_loss=3.0, con_batch=22.0), items(1, 3))
    write_run(root, "con-m-b1-s1", dict(arm="con", model="m", budget="b1", seed=1, train_steps=10, train_flops=8e8,
                                        con_loss=1.5, con_batch=22.0), items(1, 0))
    sweep.append_row(os.path.join(root, "results.csv"), dict(point="gen-m-b1-s1", status="ok", arm="gen", model="m",
                                                             budget="b1", seed=1, train_steps=10))  # no per_item.csv
    s = study.load_study(os.path.join(root, "results.csv"))
    assert s.metrics == ["probe_count", "retrieval_tr1", "retrieval_tr5", "retrieval_ir1", "retrieval_ir5"]
    assert list(s.baselines) == [("m", "1")] and len(s.runs) == 2 and "1 ok run(s) without" in s.notes[0]
    lcl, con = s.runs
    assert lcl.near_chance and lcl.con_ratio == pytest.approx(3.0 / math.log(22)) and not con.near_chance
    assert lcl.hits["retrieval_tr1"].tolist() == [0, 0, 0, 0] and lcl.hits["retrieval_tr5"].tolist() == [1, 1, 1, 1]


def test_a_study_and_its_side_check_are_one_study(tmp_path):
    """`study_report A.csv B.csv`: a side check (another sweep, its own arm name, the same items) joins the
    study's points and baselines in one analysis; the merged results.csv and per_item.csv.gz rebuild it;
    the same (arm, model, budget, seed) in two rows is refused by name."""
    from megatron_lcl.scaling import study_report

    items = lambda hit: [{"item": f"x{k}.jpg", "probe_count": (k + hit) % 2, "tr_rank": 0, "ir_rank": k}  # noqa: E731
                         for k in range(6)]
    main, side = str(tmp_path / "main"), str(tmp_path / "side")
    for seed in (1, 2):
        write_run(main, f"lcl-m-untrained-s{seed}", dict(arm="lcl", model="m", budget="untrained", seed=seed,
                                                        train_steps=0, train_flops=0), items(0))
        for arm, hit in (("lcl", 1), ("con", 0)):
            write_run(main, f"{arm}-m-b1-s{seed}", dict(arm=arm, model="m", budget="b1", seed=seed,
                                                        train_steps=10, train_flops=1e9), items(hit))
        write_run(side, f"lcl_lr3e-4-m-b1-s{seed}", dict(arm="lcl_lr3e-4", model="m", budget="b1", seed=seed,
                                                         train_steps=10, train_flops=1e9), items(1))
    both = study.load_study([os.path.join(main, "results.csv"), os.path.join(side, "results.csv")])
    assert both.arms == ["lcl", "con", "lcl_lr3e-4"] and len(both.runs) == 6 and len(both.baselines) == 2
    out = tmp_path / "report"
    assert study_report.main([os.path.join(main, "results.csv"), os.path.join(side, "results.csv"), "--out",
                              str(out), "--bootstrap", "50"]) == 0
    assert "lcl_lr3e-4 vs" in (out / "report.md").read_text() or "vs lcl_lr3e-4" in (out / "report.md").read_text()
    os.rename(main, main + ".moved"), os.rename(side, side + ".moved")  # the merged files alone rebuild it
    again = study.load_study(str(out / "results.csv"))
    assert [(r.arm, r.seed) for r in again.runs] == [(r.arm, r.seed) for r in both.runs]
    assert all(np.array_equal(a.hits["probe_count"], b.hits["probe_count"]) for a, b in zip(again.runs, both.runs))
    with pytest.raises(ValueError, match="more than one row"):
        study.load_study([str(out / "results.csv"), str(out / "results.csv")])


def test_arms_still_running_can_be_left_out_of_the_comparisons():
    """A budget one arm has not finished is dropped for every arm (ragged cells), unless the report is
    restricted to the arms that have it (`--arms`); an arm the study lacks is refused by name."""
    from megatron_lcl.scaling.study_report import restrict

    full = synthetic_study(lambda arm, c: 0.5, arm_names=("a", "b", "c"), seeds=("1", "2"))
    ragged = Study([r for r in full.runs if not (r.arm == "c" and r.budget == "b3")], full.baselines,
                   full.items, full.metrics)
    every = restrict(ragged, None)
    assert {r.budget for r in every.runs} == {"b1", "b2"} and any("left out" in n for n in every.notes)
    two = restrict(ragged, None, ["a", "b"])
    assert {(r.arm, r.budget) for r in two.runs} == {(a, b) for a in "ab" for b in ("b1", "b2", "b3")}
    assert len(two.runs) == 2 * 3 * 2 * 2 and not any("left out" in n for n in two.notes)
    assert any("arms a, b only" in n for n in two.notes)
    with pytest.raises(ValueError, match="--arms gen: not in the study"):
        restrict(ragged, None, ["a", "gen"])
    with pytest.raises(ValueError, match=r"--budgets b9: not in the study's trained runs \(its budgets: b1, b2, b3\)"):
        restrict(ragged, ["b1", "b9"])


def test_a_seed_still_running_at_some_budgets_is_named_in_the_notes():
    """Cells with different seed lists (seed 3 finished at b1 only) draw their seeds apart: the report
    says which cells have which seeds; a study whose cells all ran the same seeds says nothing."""
    from megatron_lcl.scaling.study_report import restrict

    full = synthetic_study(lambda arm, c: 0.5, seeds=("1", "2", "3"))
    assert not any("different seeds" in n for n in restrict(full, None).notes)
    ragged = Study([r for r in full.runs if r.seed != "3" or r.budget == "b1"], full.baselines, full.items,
                   full.metrics)
    note = [n for n in restrict(ragged, None).notes if "different seeds" in n]
    assert len(note) == 1 and "seeds 1, 2, 3 at m-b1, s-b1" in note[0] and "seeds 1, 2 at m-b2, m-b3, s-b2" in note[0]
    reps = study.draw_replicates(restrict(ragged, None), 8)
    assert reps.seed_draws[("s", "b1")].shape[1] == 3 and reps.seed_draws[("s", "b2")].shape[1] == 2


def test_untrained_budget_points(tmp_path):
    spec = dict(name="t", base_config=os.path.join(os.path.dirname(__file__), "..", "examples", "configs",
                                                    "tiny_cpu.yaml"),
                output_dir=str(tmp_path / "out"), models=[{"name": "s"}], seeds=[1, 2],
                arms=[{"name": "lcl", "overrides": ["loss.mode=lcl"]}, {"name": "con", "overrides": ["loss.mode=con"]}],
                budgets=[{"name": "untrained", "untrained": True, "arms": ["lcl"]},
                         {"name": "b1", "train_steps": 3, "global_batch_size": 8, "seeds": [1]}])
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    points = sweep.expand_points(sweep.load_spec(str(path)))
    assert [p.name for p in points] == ["lcl-s-untrained-s1", "lcl-s-b1-s1", "con-s-b1-s1", "lcl-s-untrained-s2"]
    assert points[0].untrained and not points[1].untrained
    spec["budgets"][0]["train_steps"] = 5
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="is untrained"):
        sweep.load_spec(str(path))


def test_study_report_end_to_end_on_a_synthetic_sweep(tmp_path):
    """results.csv + per_item.csv + configs/ of 2 arms x 2 rates x 3 budgets x 2 seeds -> the report."""
    from megatron_lcl.scaling import study_report

    rng = np.random.default_rng(0)
    root, n = str(tmp_path / "sweep"), 300
    os.makedirs(os.path.join(root, "configs"))
    difficulty = rng.normal(0, 1, n)
    row = lambda k, arm, steps, lr, seed, flops, loss: dict(  # noqa: E731
        arm=arm, model="m", budget=k, seed=seed, train_steps=steps, train_flops=flops, loss=loss,
        con_loss=3.0 if steps < 200 and arm != "gen" else 1.0, con_batch=22.0)
    for seed in (1, 2):
        write_run(root, f"lcl-m-untrained-s{seed}", dict(arm="lcl", model="m", budget="untrained", seed=seed,
                                                        train_steps=0, train_flops=0),
                  [{"item": f"i{k}", "probe_count": int(h), "tr_rank": 0 if h else 5, "ir_rank": 1}
                   for k, h in enumerate(hits_for(0.3, rng.random(n), difficulty))])
        for steps in (100, 300, 900):
            for lr in (1e-3, 3e-3):
                uniform = rng.random(n)
                for arm, gain in (("lcl", 0.1), ("gen", 0.05)):
                    point = f"{arm}-m-p{steps}-lr{lr:g}-s{seed}"
                    acc = 0.3 + gain * np.log10(steps / 30) * (1.0 if lr == 1e-3 else 0.5)
                    with open(os.path.join(root, "configs", f"{point}.yaml"), "w") as f:
                        yaml.safe_dump({"optimizer": {"lr": lr}}, f)
                    items = [{"item": f"i{k}", "probe_count": int(h), "tr_rank": 0 if h else 3, "ir_rank": 0}
                             for k, h in enumerate(hits_for(acc, uniform, difficulty))]
                    # the higher rate lowers the training loss but gains less: the gain decides
                    write_run(root, point, row(f"p{steps}-lr{lr:g}", arm, steps, lr, seed, 1e9 * steps,
                                               2.0 - acc - (0.5 if lr == 3e-3 else 0.0)), items)
    out = tmp_path / "report"
    assert study_report.main([os.path.join(root, "results.csv"), "--out", str(out), "--bootstrap", "200",
                              "--budgets", "p100-lr0.001", "p300-lr0.001", "p900-lr0.001"]) == 0
    text = (out / "report.md").read_text()
    assert "## probe_count" in text and "gain over untrained" in text
    assert "naive (no further improvement)" in text and "crossover:" in text
    assert "not identified" in text  # 3 front points at most
    assert "| lcl | m | 900 | 0.001 | 2 |" in text and "## Power" in text and "Seeds needed" in text
    lr_rows = [line for line in text.splitlines() if line.startswith("| lcl | m | 900 |")]
    assert any(line.endswith("| yes |") and "| 0.001 |" in line for line in lr_rows)  # the larger gain
    with gzip.open(out / "per_item.csv.gz", "rt") as f:
        assert sum(1 for _ in f) == 1 + n * (2 + 2 * 3 * 2 * 2)
    summary = json.loads((out / "report.json").read_text())
    assert summary["replicates"] == 200 and "lcl-gen" in summary["metrics"]["probe_count"]
    assert [(e["from"], e["to"]) for e in summary["metrics"]["probe_count"]["lcl"]["more_steps"]] == \
        [("p100-lr0.001", "p300-lr0.001"), ("p300-lr0.001", "p900-lr0.001")]
    assert "- more steps, lcl (error at the larger budget - the smaller; + is worse): m p100-lr0.001->p300" in text
    # the committed files alone (results.csv + per_item.csv.gz, the run directories gone) give the same report
    os.rename(root, root + ".moved")
    again = tmp_path / "again"
    assert study_report.main([str(out / "results.csv"), "--out", str(again), "--bootstrap", "200",
                              "--budgets", "p100-lr0.001", "p300-lr0.001", "p900-lr0.001"]) == 0
    assert json.loads((again / "report.json").read_text()) == summary
    assert (again / "report.md").read_text().splitlines()[3:] == text.splitlines()[3:]
    assert (again / "per_item.csv.gz").read_bytes() == (out / "per_item.csv.gz").read_bytes()  # no time stamp


def test_eval_only_replaces_a_reevaluated_point_and_untrained_points_run_no_driver(tmp_path):
    """An untrained point writes its initial weights (no driver run, FLOPs 0) and is evaluated like the
    rest; removing a point's eval.json and running --eval-only again appends a row with the new values."""
    from test_scaling_arms import fake_runner

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(dict(
        name="t", output_dir=str(tmp_path / "out"), models=[{"name": "s"}], seeds=[1],
        base_config=os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "tiny_cpu.yaml"),
        arms=[{"name": "lcl", "overrides": ["loss.mode=lcl"]}],
        budgets=[{"name": "untrained", "untrained": True}, {"name": "b1", "train_steps": 2, "global_batch_size": 2}],
        eval_command="{python} -c \"import json, sys; json.dump({{'metrics': {{'probe_count': 0.5}}}}, "
                     "open(sys.argv[1] + '/eval.json', 'w'))\" {run_dir}")))
    spec = sweep.load_spec(str(spec_path))
    calls = []
    sweep.run_sweep(spec, runner=fake_runner(calls), log=lambda *a: None)
    rows = {r["point"]: r for r in sweep.read_results(spec.results_csv)}
    assert calls == ["lcl-s-b1-s1"]  # the untrained point never ran the driver
    untrained = rows["lcl-s-untrained-s1"]
    assert untrained["status"] == "ok" and float(untrained["train_flops"]) == 0 and untrained["train_steps"] == "0"
    assert os.path.exists(os.path.join(untrained["run_dir"], "checkpoints", "meta.json"))
    assert float(untrained["probe_count"]) == 0.5
    os.remove(os.path.join(rows["lcl-s-b1-s1"]["run_dir"], "eval.json"))
    spec.eval_command = spec.eval_command.replace("0.5", "0.75")  # e.g. a fixed evaluation
    assert [r["point"] for r in sweep.backfill_eval(spec, log=lambda *a: None)] == ["lcl-s-b1-s1"]
    assert float(sweep.read_results(spec.results_csv)[-1]["probe_count"]) == 0.75
    assert sweep.backfill_eval(spec, log=lambda *a: None) == []


def test_exit_code_one_is_diverged_only_when_the_driver_says_so(tmp_path):
    """A traceback exits 1 too: without the driver's exit-status file it is a failure (run again), not a
    finished `diverged` point (a concurrent edit's import error once passed for divergence)."""
    run_dir = str(tmp_path)
    assert sweep.point_status(0, run_dir) == "ok" and sweep.point_status(1, run_dir) == "failed(1)"
    with open(sweep.exit_status_path(run_dir), "w") as f:
        f.write("1 diverged\n")
    assert sweep.point_status(1, run_dir) == "diverged"
    with open(sweep.exit_status_path(run_dir), "w") as f:
        f.write("1 checkpoint_error\n")
    assert sweep.point_status(1, run_dir) == "failed(1 checkpoint_error)"

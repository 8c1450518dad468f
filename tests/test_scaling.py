"""Scaling tooling: the FLOPs/parameter model against built models, power-law fits against known
exponents, sweep restarts (fake runner), the report on synthetic results, and a 2-point sweep end to
end through the real driver."""

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from megatron_lcl.checkpoint import read_metrics
from megatron_lcl.config import HeadsConfig, LMConfig, LossConfig, ModelConfig, ParallelConfig, VisionConfig
from megatron_lcl.scaling import fit, sweep
from megatron_lcl.models.flops import (PEAK_FLOPS_PER_S, mfu, parameter_counts, step_flops, throughput_metrics,
                                        training_flops)

ROOT = Path(__file__).resolve().parent.parent


def model_config(vit_h=32, vit_layers=2, image=16, patch=8, lm_h=32, lm_layers=2, vocab=192,
                 layer_scale=0.5, embed_dim=16) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(image_size=image, patch_size=patch, hidden_size=vit_h, num_layers=vit_layers,
                            num_attention_heads=4, ffn_hidden_size=2 * vit_h, layer_scale_init=layer_scale),
        lm=LMConfig(hidden_size=lm_h, num_layers=lm_layers, num_attention_heads=4, ffn_hidden_size=4 * lm_h,
                    max_position_embeddings=96, vocab_size=vocab, make_vocab_size_divisible_by=16),
        heads=HeadsConfig(embed_dim=embed_dim, pool_num_heads=4), transformer_impl="local")


CONFIGS = {
    "tiny": model_config(),
    "wide-vit-no-layer-scale": model_config(vit_h=64, image=32, patch=8, lm_h=48, lm_layers=3, vocab=200,
                                            layer_scale=None, embed_dim=24),
    "deep-lm-small-patch": model_config(vit_h=32, vit_layers=1, image=16, patch=4, lm_h=64, lm_layers=4, vocab=300),
}


def _build(cfg):
    from megatron_lcl.models.lcl_model import LCLModel
    from megatron_lcl.runtime import set_seed

    set_seed(0)
    return LCLModel(cfg, ParallelConfig())


# ------------------------------------------------------------------------------ FLOPs and params

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_counts_equal_built_model(single_rank, name):
    from megatron_lcl.models.flops import count_parameters_by_group

    cfg = CONFIGS[name]
    measured = dict(count_parameters_by_group(_build(cfg)))
    predicted = dict(parameter_counts(cfg))
    predicted.pop("lm_embedding")
    assert predicted == measured


def _visible_attention():
    """SDPA's math kernel: its matmuls are what torch's FlopCounterMode counts (it does not see inside
    the fused CPU kernel that `model.attention=sdpa` and the pooling head otherwise run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _measured_flops(model, batch, mode="lcl", backward=True):
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_lcl.losses import LCLLoss
    from megatron_lcl.training.pipeline import forward_loss

    model.zero_grad(set_to_none=True)
    counter = FlopCounterMode(display=False)
    with counter, _visible_attention():
        terms = forward_loss(model, batch, LCLLoss(LossConfig(mode=mode)))
        if backward:
            terms.total.backward()
    return counter


@pytest.mark.parametrize("name,mode", [("tiny", "lcl"), ("wide-vit-no-layer-scale", "lcl"),
                                       ("deep-lm-small-patch", "con")])
def test_flops_model_matches_torch_flop_counter(single_rank, name, mode):
    """Forward + backward of a real step under FlopCounterMode vs `step_flops` (within 2%), and the
    forward pass group by group (within 5%)."""
    from megatron_lcl.testing import random_batch

    cfg = CONFIGS[name]
    model = _build(cfg).train()
    seq, m = 80, cfg.vision.num_image_tokens
    positions = [[3, 3 + m + 6], [10]]  # 3 images in 2 samples
    assert positions[0][1] + m + 2 < seq
    batch = random_batch(positions, seq_length=seq, num_image_tokens=m, image_size=cfg.vision.image_size,
                         vocab_size=cfg.lm.vocab_size)
    n_img = batch.num_images
    predicted = step_flops(cfg, seq, n_img / 2, samples=2, contrastive_negatives=n_img, loss_mode=mode,
                           attention_count="full")  # the counter sees the full square
    measured = _measured_flops(model, batch, mode).get_total_flops()
    assert measured > 0
    assert predicted["total"] == pytest.approx(measured, rel=0.02), (predicted, measured)

    forward = _measured_flops(model, batch, mode, backward=False).get_flop_counts()
    fwd = step_flops(cfg, seq, n_img / 2, samples=2, contrastive_negatives=n_img, loss_mode=mode, backward=False,
                     attention_count="full")
    by_module = {k: sum(v.values()) for k, v in forward.items()}
    pairs = {"LCLModel.vision": fwd["vit"], "LCLModel.projector": fwd["projector"],
             "LCLModel.lm.decoder": fwd["lm"], "LCLModel.lm.output_layer": fwd["output"],
             "LCLModel.image_head": None}
    for module, value in pairs.items():
        if value is not None and value > 0:
            assert by_module[module] == pytest.approx(value, rel=0.05), module
    heads = by_module["LCLModel.image_head"] + by_module.get("LCLModel.text_head", 0)
    assert heads == pytest.approx(fwd["heads"], rel=0.05)
    if mode == "con":
        assert "LCLModel.lm.output_layer" not in by_module and fwd["output"] == 0


def test_feature_pass_flops_match_a_forward_without_logits(single_rank):
    """contrastive_batch=step's extra pass (forward, no output layer) as torch's counter sees it."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_lcl.testing import random_batch

    cfg = CONFIGS["tiny"]
    model = _build(cfg).train()
    seq, m = 80, cfg.vision.num_image_tokens
    batch = random_batch([[3, 3 + m + 6], [10]], seq_length=seq, num_image_tokens=m,
                         image_size=cfg.vision.image_size, vocab_size=cfg.lm.vocab_size)
    counter = FlopCounterMode(display=False)
    with counter, _visible_attention():
        model(batch.tokens, batch.position_ids, batch.images, batch.image_sample_index, batch.boi_positions,
              with_logits=False)
    flops = step_flops(cfg, seq, batch.num_images / 2, samples=2, feature_pass=True, attention_count="full")
    assert flops["feature_pass"] == pytest.approx(counter.get_total_flops(), rel=0.05)
    assert step_flops(cfg, seq, 1.5, samples=2)["feature_pass"] == 0  # micro_batch: no extra pass
    assert flops["total"] == pytest.approx(step_flops(cfg, seq, 1.5, samples=2, attention_count="full")["total"]
                                           + flops["feature_pass"])


def test_flops_at_paper_scale_and_mfu():
    """ViT-B/16 + OPT-125M at 2048 positions: the LM dominates; training FLOPs ~ 6 N D for the LM."""
    from megatron_lcl.config import LM_PRESETS, VISION_PRESETS, apply_preset

    cfg = ModelConfig(vision=apply_preset(VisionConfig(preset="B/16"), VISION_PRESETS),
                      lm=apply_preset(LMConfig(preset="opt-125m", vocab_size=50272, make_vocab_size_divisible_by=8),
                                      LM_PRESETS), heads=HeadsConfig(embed_dim=512, pool_num_heads=8))
    flops = step_flops(cfg, 2048, images_per_sample=3)
    params = parameter_counts(cfg)
    lm_dense = params["lm"] - params["lm_embedding"]
    six_nd = 6 * (lm_dense + 768 * 50272) * 2048  # 6 N D with the (tied) output layer as parameters
    assert (flops["lm"] + flops["output"]) / six_nd == pytest.approx(1.0, abs=0.35)  # + attention s^2 terms
    assert flops["vit"] == pytest.approx(3 * 6 * params["vit"] * 197, rel=0.15)  # 3 images x 6 N x 197 tokens
    assert training_flops(cfg, 2048, samples=10, images=30) == pytest.approx(10 * flops["total"])
    assert mfu(0.5 * PEAK_FLOPS_PER_S["h100-sxm-bf16"], PEAK_FLOPS_PER_S["h100-sxm-bf16"]) == 0.5
    assert mfu(989e12, 989e12, num_devices=4) == 0.25
    step = training_flops(cfg, 2048, samples=256, images=768)
    metrics = throughput_metrics(cfg, 2048, 256, 768, step_time_s=2.0, peak_flops_per_s=989e12, num_devices=8)
    assert metrics["model_flops_per_s"] == pytest.approx(step / 2.0)
    assert metrics["mfu"] == pytest.approx(step / 2.0 / (8 * 989e12))
    assert "mfu" not in throughput_metrics(cfg, 2048, 256, 768, step_time_s=2.0)


# ------------------------------------------------------------------------------ fits

def test_fit_recovers_known_exponents_from_noisy_power_laws():
    rng = np.random.default_rng(0)
    c = np.geomspace(1e15, 1e20, 30)
    # pure power law, 3% multiplicative noise
    loss = 40.0 * c ** -0.095 * np.exp(rng.normal(0, 0.03, c.size))
    law = fit.fit_with_ci(c, loss, num_samples=300)
    assert law.alpha == pytest.approx(0.095, abs=0.006)
    lo, hi = law.ci["alpha"]
    assert lo < 0.095 < hi and hi - lo < 0.02
    # with an irreducible loss
    loss = (1.8 + 300.0 * c ** -0.15) * np.exp(rng.normal(0, 0.005, c.size))
    law = fit.fit_with_ci(c, loss, irreducible=True, num_samples=60)
    assert law.alpha == pytest.approx(0.15, abs=0.03) and law.e == pytest.approx(1.8, abs=0.15)
    assert law.ci["e"][0] <= law.e <= law.ci["e"][1]
    # an increasing law: N_opt = 0.1 C^0.5
    n_opt = 0.1 * c ** 0.5 * np.exp(rng.normal(0, 0.05, c.size))
    assert fit.fit_power_law(n_opt * 0 + c, n_opt, increasing=True).alpha == pytest.approx(-0.5, abs=0.03)


def test_isoflop_optima_recover_the_optimal_size():
    """Chinchilla approach 2 on synthetic L(N, D) = E + A/N^a + B/D^b with D = C / (6N)."""
    E, A, B, a, b = 1.7, 400.0, 800.0, 0.34, 0.28
    budgets, compute, params, loss = [], [], [], []
    for c in (1e17, 1e18, 1e19):
        for n in np.geomspace(1e6, 1e9, 13):
            budgets.append(f"{c:.0e}"), compute.append(c), params.append(n)
            loss.append(E + A / n ** a + B / (c / (6 * n)) ** b)
    optima = fit.isoflop_optima(budgets, compute, params, loss)
    assert [o.from_parabola for o in optima] == [True, True, True]
    law = fit.fit_power_law([o.compute for o in optima], [o.params_opt for o in optima])
    assert -law.alpha == pytest.approx(b / (a + b), abs=0.06)  # the analytic exponent of N_opt(C)


def test_pareto_frontier():
    assert fit.pareto_frontier([4, 1, 2, 3, 5], [3.0, 5.0, 6.0, 4.0, 3.5]).tolist() == [1, 3, 0]


# ------------------------------------------------------------------------------ sweeps

TINY_CONFIG = str(ROOT / "examples" / "configs" / "tiny_cpu.yaml")


def write_spec(tmp_path: Path, models, budgets, **extra) -> str:
    spec = dict(name="t", base_config=TINY_CONFIG, output_dir=str(tmp_path / "out"),
                overrides=["data.seq_length=64", "data.micro_batch_size=2"], models=models, budgets=budgets,
                warmup_fraction=0.1, **extra)
    path = tmp_path / "spec.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return str(path)


TWO_MODELS = [{"name": "a", "lm": {"hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64}},
              {"name": "b", "lm": {"hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 128}}]


def fake_runner(calls, interrupt_after=None):
    """Writes what the driver would: a metrics.jsonl reaching train_steps (loss falls with size)."""
    def run(config_path, overrides, run_dir, nproc):
        from megatron_lcl.config import load_config

        if interrupt_after is not None and len(calls) == interrupt_after:
            raise KeyboardInterrupt
        calls.append(os.path.basename(run_dir))
        cfg = load_config(config_path, overrides)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            for step in range(1, cfg.train.train_steps + 1):
                samples = step * cfg.train.global_batch_size
                loss = 10.0 / math.log(samples * cfg.model.lm.hidden_size)
                f.write(json.dumps(dict(step=step, consumed_samples=samples, consumed_images=2 * samples,
                                        consumed_tokens=64 * samples, consumed_text_tokens=40 * samples,
                                        loss=loss, lm_loss=loss - 0.1, con_loss=1.0, con_top1=0.5,
                                        step_time_s=0.01)) + "\n")
        return 0
    return run


def test_interrupted_sweep_reruns_only_missing_points(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path, TWO_MODELS, [{"train_steps": 4, "global_batch_size": 2},
                                                             {"train_steps": 8, "global_batch_size": 2}]))
    names = [p.name for p in sweep.expand_points(spec)]
    assert names == ["a-2x4", "b-2x4", "a-2x8", "b-2x8"]
    calls = []
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(spec, runner=fake_runner(calls, interrupt_after=2), log=lambda *a: None)
    assert calls == names[:2] and sweep.finished_points(spec.results_csv) == set(names[:2])
    again = []
    rows = sweep.run_sweep(spec, runner=fake_runner(again), log=lambda *a: None)
    assert again == names[2:]  # only the missing points
    assert [r["point"] for r in rows] == names[2:]
    assert sweep.run_sweep(spec, runner=fake_runner(again), log=lambda *a: None) == []
    results = sweep.read_results(spec.results_csv)
    assert sorted(r["point"] for r in results) == sorted(names) and {r["status"] for r in results} == {"ok"}
    row = next(r for r in results if r["point"] == "b-2x8")
    cfg = sweep.write_point_config(sweep.expand_points(spec)[3], spec)
    assert int(row["samples"]) == 16 and int(row["images"]) == 32 and int(row["train_steps"]) == 8
    assert float(row["train_flops"]) == pytest.approx(training_flops(cfg.model, 64, 16, 32), rel=1e-5)
    assert int(row["params_total"]) == parameter_counts(cfg.model)["total"]
    assert row["probe_accuracy"] == ""
    assert cfg.optimizer.warmup_steps == 1 and cfg.model.lm.hidden_size == 64


def test_point_locked_by_another_process_is_skipped(tmp_path):
    import fcntl

    spec = sweep.load_spec(write_spec(tmp_path, TWO_MODELS, [{"train_steps": 2, "global_batch_size": 2}]))
    os.makedirs(Path(spec.output_dir) / "locks")
    calls = []
    with open(Path(spec.output_dir) / "locks" / "a-2x2.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # flock locks are per open file: this excludes run_sweep's open
        sweep.run_sweep(spec, runner=fake_runner(calls), log=lambda *a: None)
    assert calls == ["b-2x2"]
    sweep.run_sweep(spec, runner=fake_runner(calls), log=lambda *a: None)
    assert calls == ["b-2x2", "a-2x2"]


def test_failed_point_is_retried_and_probe_json_is_read(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path, TWO_MODELS[:1], [{"train_steps": 3, "global_batch_size": 2}]))
    sweep.run_sweep(spec, runner=lambda *a: 7, log=lambda *a: None)
    assert sweep.read_results(spec.results_csv)[0]["status"] == "failed(7)"
    calls = []
    runner = fake_runner(calls)

    def with_probe(config_path, overrides, run_dir, nproc):
        code = runner(config_path, overrides, run_dir, nproc)
        Path(run_dir, "probe.json").write_text(json.dumps({"probe_accuracy": 0.625}))
        return code
    sweep.run_sweep(spec, runner=with_probe, log=lambda *a: None)
    (row,) = sweep.read_results(spec.results_csv)
    assert calls == ["a-2x3"] and row["status"] == "ok" and float(row["probe_accuracy"]) == 0.625


def test_eval_only_fills_in_probe_accuracy_of_finished_points(tmp_path):
    """Points trained before an eval_command existed get it run once; classify's JSON format is read."""
    spec_path = write_spec(tmp_path, TWO_MODELS, [{"train_steps": 2, "global_batch_size": 2}])
    spec = sweep.load_spec(spec_path)
    sweep.run_sweep(spec, runner=fake_runner([]), log=lambda *a: None)
    assert {r["probe_accuracy"] for r in sweep.read_results(spec.results_csv)} == {""}
    spec.eval_command = ("{python} -c \"import json, sys; json.dump({{'accuracy_pct': {{'acc-1': 37.5}}}}, "
                         "open(sys.argv[1] + '/probe.json', 'w'))\" {run_dir}")
    assert len(sweep.backfill_eval(spec, log=lambda *a: None)) == 2
    rows = sweep.read_results(spec.results_csv)
    assert [float(r["probe_accuracy"]) for r in rows] == [0.375, 0.375] and {r["status"] for r in rows} == {"ok"}
    assert sweep.backfill_eval(spec, log=lambda *a: None) == []  # nothing left to evaluate


def test_flops_budget_sets_steps_list_and_slurm_array(tmp_path, capsys):
    from megatron_lcl.models.flops import flops_per_sample
    from megatron_lcl.config import load_config

    spec = sweep.load_spec(write_spec(tmp_path, TWO_MODELS, [{"flops": 1e11, "global_batch_size": 4}],
                                      images_per_sample=2.0, slurm={"partition": "gpu", "max_parallel": 2,
                                                                    "gpus_per_node": 8}))
    points = sweep.expand_points(spec)
    for p in points:
        cfg = load_config(spec.base_config, p.overrides)
        per_step = flops_per_sample(cfg.model, 64, 2.0) * 4
        assert cfg.train.train_steps == round(1e11 / per_step)
    assert points[0].name == "a-1e11"
    import sweep as sweep_tool

    assert sweep_tool.main([spec.spec_path, "--list"]) == 0
    listing = capsys.readouterr().out
    assert "a-1e11" in listing and "todo" in listing
    text = sweep.write_slurm_array(spec, str(tmp_path / "jobs" / "s.sbatch"))
    assert "#SBATCH --array=0-1%2" in text and "#SBATCH --partition=gpu" in text
    assert "--index \"$SLURM_ARRAY_TASK_ID\"" in text
    assert os.access(tmp_path / "jobs" / "s.sbatch", os.X_OK)  # its folder made too


def test_budget_can_restrict_model_sizes(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path, TWO_MODELS, [{"train_steps": 2, "global_batch_size": 2},
                                                             {"train_steps": 4, "global_batch_size": 2,
                                                              "models": ["b"], "overrides": ["optimizer.lr=1e-4"]}]))
    points = sweep.expand_points(spec)
    assert [p.name for p in points] == ["a-2x2", "b-2x2", "b-2x4"] and [p.index for p in points] == [0, 1, 2]
    assert "optimizer.lr=1e-4" in points[2].overrides and "optimizer.lr=1e-4" not in points[1].overrides
    with pytest.raises(ValueError, match="names models"):
        sweep.load_spec(write_spec(tmp_path, TWO_MODELS, [{"train_steps": 2, "global_batch_size": 2,
                                                           "models": ["c"]}]))


def test_contrastive_batch_is_a_sweep_axis(tmp_path):
    """`contrastive_batch` (samples per InfoNCE over all DP ranks) = the global batch -> step-wide
    negatives; smaller -> per-micro-batch negatives with that micro-batch size (DP 2 here)."""
    from megatron_lcl.config import load_config

    budgets = [{"train_steps": 2, "global_batch_size": 8, "contrastive_batch": c} for c in (8, 4, 2)]
    spec = sweep.load_spec(write_spec(tmp_path, TWO_MODELS[:1], budgets, nproc=2))
    points = sweep.expand_points(spec)
    assert [p.name for p in points] == ["a-8x2-c8", "a-8x2-c4", "a-8x2-c2"]
    cfgs = [load_config(spec.base_config, p.overrides) for p in points]
    assert [(c.loss.contrastive_batch, c.data.micro_batch_size) for c in cfgs] == [
        ("step", 2), ("micro_batch", 2), ("micro_batch", 1)]
    assert [sweep.contrastive_batch_samples(c, spec.nproc) for c in cfgs] == [8, 4, 2]
    bad = sweep.load_spec(write_spec(tmp_path, TWO_MODELS[:1], [dict(budgets[0], contrastive_batch=3)], nproc=2))
    with pytest.raises(ValueError, match="contrastive_batch"):
        sweep.expand_points(bad)


def test_report_of_a_missing_csv_is_one_line_and_status_2(tmp_path, capsys):
    """It said "0 finished run(s); a fit needs at least 2" for a mistyped path."""
    from megatron_lcl.scaling import report as scaling_report

    with pytest.raises(SystemExit) as stop:
        scaling_report.main([str(tmp_path / "results.csv"), "--out", str(tmp_path / "report")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"{tmp_path / 'results.csv'}: no such file")
    assert not (tmp_path / "report").exists()


def test_report_on_synthetic_isoflop_results(tmp_path):
    """A CSV of synthetic IsoFLOP results -> the report recovers N_opt ~ C^(b/(a+b)) and writes plots."""
    from megatron_lcl.scaling import report as scaling_report

    E, A, B, a, b = 1.7, 400.0, 800.0, 0.34, 0.28
    csv_path = tmp_path / "results.csv"
    rng = np.random.default_rng(0)
    for c in (1e17, 1e18, 1e19, 1e20):
        for i, n in enumerate(np.geomspace(1e6, 1e9, 9)):
            loss = (E + A / n ** a + B / (c / (6 * n)) ** b) * math.exp(rng.normal(0, 0.002))
            row = dict(point=f"m{i}-{c:.0e}", model=f"m{i}", budget=f"{c:.0e}", status="ok", train_flops=c,
                       params_total=n * 1.1, params_non_embedding=n, loss=loss, lm_loss=loss - 0.1,
                       con_loss=0.5, con_top1=0.3, train_steps=100, global_batch_size=8, step_time_s=0.1,
                       images=100, tokens=1000)
            sweep.append_row(str(csv_path), row)
    out = tmp_path / "report"
    assert scaling_report.main([str(csv_path), "--out", str(out), "--bootstrap", "100"]) == 0
    for name in ("report.md", "loss_vs_compute.png", "loss_vs_params.png", "optimal_params.png"):
        assert (out / name).stat().st_size > 0
    analysis = scaling_report.analyse(scaling_report.load_rows(str(csv_path)), num_samples=50)
    assert analysis.isoflop and len(analysis.optima) == 4
    assert -analysis.optimal_params.alpha == pytest.approx(b / (a + b), abs=0.06)
    text = (out / "report.md").read_text()
    assert "Compute-optimal size" in text and "IsoFLOP" in text and "| m0-1e+17 |" in text


# ------------------------------------------------------------------------------ end to end

def test_two_point_sweep_end_to_end_with_the_real_driver(tmp_path):
    """Setup (synthetic corpus, tokenizer, shards) + 2 points trained by pretrain_lcl.py in subprocesses,
    results appended to the CSV; a rerun skips both."""
    out = tmp_path / "out"
    setup = [
        {"creates": "{output_dir}/corpus/.done",
         "run": "{python} -m megatron_lcl.data.synthetic --output {output_dir}/corpus --num-docs 60 "
                "--image-size 40 && touch {output_dir}/corpus/.done"},
        {"creates": "{output_dir}/tok/lcl.model",
         "run": "mkdir -p {output_dir}/tok && {python} tools/train_tokenizer.py --format mmc4 "
                "--input {output_dir}/corpus --output {output_dir}/tok/lcl --vocab-size 300"},
        {"creates": "{output_dir}/shards/summary.json",
         "run": "{python} tools/prepare_data.py --format mmc4 --input {output_dir}/corpus "
                "--output {output_dir}/shards --shard-size 15 --no-progress"},
    ]
    overrides = ["data.path={output_dir}/shards", "data.tokenizer={output_dir}/tok/lcl.model",
                 "data.seq_length=64", "data.micro_batch_size=2", "data.shuffle_buffer=8",
                 "logging.log_interval=1", "logging.console=false", "logging.tensorboard=false",
                 "checkpoint.save_interval=null"]
    models = [{"name": "s", "vision": {"hidden_size": 32, "num_layers": 1, "num_attention_heads": 2,
                                       "ffn_hidden_size": 64},
               "lm": {"hidden_size": 32, "num_layers": 1, "num_attention_heads": 2, "ffn_hidden_size": 64}},
              {"name": "m"}]  # the tiny_cpu model
    import yaml

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(dict(
        name="e2e", base_config=TINY_CONFIG, output_dir=str(out), setup=setup, overrides=overrides,
        models=models, budgets=[{"train_steps": 4, "global_batch_size": 4}], warmup_fraction=0.25,
        final_loss_window=0.5)))
    import sweep as sweep_tool

    cwd = os.getcwd()
    os.chdir(ROOT)  # setup commands name tools/ relative to the repository root
    try:
        assert sweep_tool.main([str(spec_path)]) == 0
        rows = {r["point"]: r for r in sweep.read_results(str(out / "results.csv"))}
        assert sorted(rows) == ["m-4x4", "s-4x4"]
        for name, row in rows.items():
            assert row["status"] == "ok", row
            assert int(row["samples"]) == 16 and int(row["tokens"]) == 16 * 64
            assert math.isfinite(float(row["loss"])) and float(row["train_flops"]) > 0
            metrics = read_metrics(row["run_dir"])
            assert [m["step"] for m in metrics] == [1, 2, 3, 4]
            tail = [m["loss"] for m in metrics[-2:]]
            assert float(row["loss"]) == pytest.approx(sum(tail) / 2, rel=1e-5)
            assert int(row["images"]) == metrics[-1]["consumed_images"]
        assert int(rows["m-4x4"]["params_total"]) > int(rows["s-4x4"]["params_total"])
        assert float(rows["m-4x4"]["train_flops"]) > float(rows["s-4x4"]["train_flops"])
        assert sweep_tool.main([str(spec_path)]) == 0  # everything finished: nothing runs
        with open(out / "results.csv") as f:
            assert len(list(csv.DictReader(f))) == 2
    finally:
        os.chdir(cwd)


def test_a_point_stopped_by_a_config_error_is_config_error_not_a_crash(tmp_path):
    """The driver writes its exit status into the point's run dir even when a config error stops it
    before it made that dir (missing shards: the seed-3 sweep in a new checkout without the v2 study's
    data). It used to crash writing that file: exit 1, a traceback, the point `failed(1)`."""
    run_dir = tmp_path / "runs" / "p"
    code = sweep.run_point(TINY_CONFIG, [f"data.path={tmp_path / 'absent'}"], str(run_dir))
    assert code == 2
    assert sweep.point_status(code, str(run_dir)) == "config_error"
    assert (run_dir / "exit_status").read_text() == "2 config_error\n"

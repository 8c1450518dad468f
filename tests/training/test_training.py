"""The training driver: config, resume == no resume, non-finite steps, atomic saves, signals, resharding,
and the demo at a small size.

In-process tests call `megatron_lcl.train.main([...])` (what pretrain_lcl.py runs) on one rank (world size 1). The 2-rank checks
(SIGTERM on one rank + resume, TP=2 / PP=2 checkpoints loaded at TP=PP=1) run in ONE torchrun launch
of tests/dist/train_checks.py. Every test trains the tiny model from examples/configs/tiny_cpu.yaml
on a small synthetic MMC4 corpus built once per module.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_lcl import train as pretrain_lcl
from megatron_lcl.checkpoint import read_metrics
from megatron_lcl.config import ConfigError
from multirank import run_torchrun
from megatron_lcl.config import load_config, save_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "examples" / "configs" / "tiny_cpu.yaml")
TIMING_KEYS = {"step_time_s", "tokens_per_s", "images_per_s", "model_flops_per_s", "mfu"}


def build_corpus(root: Path) -> None:
    """Synthetic MMC4 docs -> tokenizer -> prepared shards under `root` (what examples/demo.sh does)."""
    from megatron_lcl.data.prepare import PrepareOptions, prepare
    from megatron_lcl.data.skips import SkipCounter
    from megatron_lcl.data.sources import read_mmc4
    from megatron_lcl.data.synthetic import write_corpus
    from megatron_lcl.data.tokenizer import train_tokenizer

    corpus = root / "corpus"
    paths = write_corpus(str(corpus), num_docs=60, image_size=40, seed=0, docs_per_shard=30)
    texts = [t for p in paths for doc in read_mmc4(p, str(corpus), SkipCounter()) for t in doc.texts]
    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    train_tokenizer(texts, str(root / "tokenizer" / "lcl"), vocab_size=300, character_coverage=1.0)
    prepare("mmc4", [str(corpus)], str(root / "shards"), options=PrepareOptions(shard_size=15), progress=False)


pytestmark = pytest.mark.usefixtures("restore_rendezvous_env")  # in-process runs set RANK, MASTER_*...


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_data")
    build_corpus(root)
    return root


def argv(data_root: Path, run_dir: Path, *overrides: str) -> list:
    return ["--config", TINY, f"run_dir={run_dir}", f"data.path={data_root / 'shards'}",
            f"data.tokenizer={data_root / 'tokenizer' / 'lcl.model'}", "data.seq_length=64",
            "data.micro_batch_size=2", "data.num_workers=0", "data.shuffle_buffer=8",
            "train.global_batch_size=4", "train.train_steps=6", "train.drop_path_ramp_steps=4",
            "optimizer.warmup_steps=2", "logging.log_interval=1", "logging.console=false",
            "checkpoint.save_interval=null", *overrides]


def read_rows(run_dir: Path) -> list:
    return read_metrics(str(run_dir))


def without_timing(rows: list) -> list:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


# ------------------------------------------------------------------------------------------ config

def test_yaml_overrides_and_presets():
    overrides = ["optimizer.lr=3e-4", "model.vision.preset=B/16", "model.vision.image_size=224",
                 "checkpoint.save_interval=null", "train.exit_after_steps=5"]
    cfg = load_config(TINY, overrides)
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
    assert (cfg.model.vision.hidden_size, cfg.model.vision.num_layers, cfg.model.vision.patch_size) == (768, 12, 16)
    assert cfg.checkpoint.save_interval is None and cfg.train.exit_after_steps == 5
    # Every other value of the flat sections is what the YAML file says (data.path: one path -> a list).
    overridden = {o.split("=")[0] for o in overrides}
    with open(TINY) as f:
        raw = yaml.safe_load(f)
    untouched = {f"{section}.{key}": value for section in ("data", "train", "optimizer", "loss", "parallel",
                                                          "precision", "logging", "checkpoint")
                 for key, value in raw[section].items() if f"{section}.{key}" not in overridden}
    assert len(untouched) > 20
    for name, value in untouched.items():
        section, key = name.split(".")
        assert getattr(getattr(cfg, section), key) == ([value] if name == "data.path" else value), name
    # Keys given explicitly win over the preset, wherever they come from.
    cfg = load_config(TINY, ["model.vision.preset=B/16", "model.vision.patch_size=32"])
    assert (cfg.model.vision.hidden_size, cfg.model.vision.patch_size) == (768, 32)


# test_paper_configs: tests/test_paper_configs.py (reads the paper facts from tests/paper_facts.py)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TINY, ["model.lm.preset=opt-125m", "loss.mode=con"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == cfg


@pytest.mark.parametrize("override, message", [
    (["optimizer.lrr=1"], "unknown key 'optimizer.lrr' (did you mean 'optimizer.lr'?)"),
    (["modle.lm.hidden_size=8"], "unknown key 'modle' (did you mean 'model'?)"),
    (["optimizer.lr=fast"], "optimizer.lr: expected a float, got 'fast' (str)"),
    (["train.train_steps=1.5"], "train.train_steps: expected an integer, got 1.5"),
    (["model.vision.preset=G/14"], "model.vision.preset: unknown preset 'G/14'"),
    (["optimizer.lr"], "must look like section.key=value"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, override)
    assert message in str(e.value)


def test_validation_lists_every_problem():
    cfg = load_config(TINY, ["model.lm.num_attention_heads=3", "optimizer.decay_style=cosin",
                             "data.seq_length=1024", "parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, world_size=3)
    msg = str(e.value)
    for expected in ("model.lm.hidden_size (64) must be divisible by model.lm.num_attention_heads (3)",
                     "optimizer.decay_style ('cosin')",
                     "data.seq_length (1024) exceeds model.lm.max_position_embeddings (256)",
                     "world size (3) must be divisible by parallel.tensor_model_parallel_size (2)"):
        assert expected in msg


def test_global_batch_must_split_over_micro_batches_and_dp():
    cfg = load_config(TINY, ["train.global_batch_size=6"])
    with pytest.raises(ConfigError, match=r"train.global_batch_size \(6\) must be a multiple of "
                                          r"data.micro_batch_size \(4\) x data-parallel size \(1\)"):
        validate_config(cfg, world_size=1)


def test_main_reports_config_errors_and_exits_2(capsys):
    assert pretrain_lcl.main(["--config", TINY, "optimizer.beta=0.9"]) == 2
    assert "unknown key 'optimizer.beta'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ training

def test_resume_equals_no_resume(data_root, tmp_path):
    """6 steps in one run == 3 steps, exit, resume for 3: every logged metric bitwise (CPU).

    A high drop-path rate makes the comparison sensitive to the RNG state, not just the weights.
    """
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    drop = "model.vision.drop_path_rate=0.5"
    assert pretrain_lcl.main(argv(data_root, straight, drop)) == 0
    assert pretrain_lcl.main(argv(data_root, resumed, drop, "train.exit_after_steps=3")) == 0
    assert [r["step"] for r in read_rows(resumed)] == [1, 2, 3]
    assert pretrain_lcl.main(argv(data_root, resumed, drop)) == 0
    a, b = without_timing(read_rows(straight)), without_timing(read_rows(resumed))
    assert [r["step"] for r in b] == list(range(1, 7))
    assert a == b
    last = a[-1]
    assert last["consumed_samples"] == 24 and last["consumed_images"] > 0 and last["skipped_steps"] == 0
    for key in ("loss", "lm_loss", "con_loss", "con_top1", "lr", "grad_norm", "logit_scale", "effective_rank",
                "consumed_tokens", "consumed_text_tokens"):
        assert key in last and math.isfinite(last[key]), key
    assert sorted(os.listdir(resumed / "checkpoints")) == ["latest", "step_00000003", "step_00000006"]
    assert (resumed / "config.yaml").exists() and list((resumed / "tensorboard").glob("events.*"))


def test_nonfinite_steps_are_skipped_then_the_run_stops(data_root, tmp_path, monkeypatch, capsys):
    """From step 3 on the loss is NaN: steps are skipped (weights untouched), 2 in a row stop the run."""
    from megatron_lcl.training import trainer as trainer_mod

    real = trainer_mod.step_forward_backward
    calls = []

    def nan_from_step_3(*args, **kwargs):
        metrics = real(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 3:
            for m in metrics:
                m["loss"] = m["loss"] * float("nan")
        return metrics

    monkeypatch.setattr(trainer_mod, "step_forward_backward", nan_from_step_3)
    run = tmp_path / "nan"
    assert pretrain_lcl.main(argv(data_root, run, "train.max_consecutive_nonfinite=2")) == 1
    out = capsys.readouterr().out
    assert "loss was not finite for 2 steps in a row (train.max_consecutive_nonfinite = 2)" in out
    rows = read_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["skipped_steps"] == 2 and math.isnan(rows[-1]["grad_norm"])
    assert rows[2]["lr"] == rows[1]["lr"]  # the schedule did not advance on a skipped step
    meta = json.loads((run / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["train_state"]["skipped_steps"] == 2
    # The checkpoint is intact: a resumed run (real losses again) picks up at step 4.
    monkeypatch.setattr(trainer_mod, "step_forward_backward", real)
    assert pretrain_lcl.main(argv(data_root, run)) == 0
    assert [r["step"] for r in read_rows(run)][-2:] == [5, 6]


def test_latest_naming_a_missing_checkpoint_falls_back_to_the_newest_complete(data_root, tmp_path, capsys):
    run = tmp_path / "dangling"
    assert pretrain_lcl.main(argv(data_root, run, "train.exit_after_steps=2", "checkpoint.save_interval=1")) == 0
    ckpts = run / "checkpoints"
    (ckpts / "latest").write_text("step_00000099\n")  # e.g. deleted by hand, or a copy gone wrong
    capsys.readouterr()
    assert pretrain_lcl.main(argv(data_root, run, "train.exit_after_steps=1")) == 0
    out = capsys.readouterr().out
    assert "names 'step_00000099', which is missing or incomplete: skipped; using the newest complete " \
           "checkpoint, step_00000002" in out
    assert [r["step"] for r in read_rows(run)] == [1, 2, 3]
    assert (ckpts / "step_00000001").exists() is False and (ckpts / "step_00000002").exists()  # keep_last


def test_an_unloadable_named_checkpoint_ends_with_one_line_and_exit_1(data_root, tmp_path, capsys):
    """`--load` naming one step_* folder whose files are broken: no fallback (the user chose it), one
    line naming the folder, the file and the reason, exit status 1, no traceback."""
    run = tmp_path / "broken"
    assert pretrain_lcl.main(argv(data_root, run, "train.exit_after_steps=2")) == 0
    step = run / "checkpoints" / "step_00000002"
    meta = step / "meta.json"
    meta.write_text(meta.read_text()[: len(meta.read_text()) // 2])  # truncated
    capsys.readouterr()
    assert pretrain_lcl.main(argv(data_root, tmp_path / "other", "--load", str(step))) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("checkpoint error: ")]
    assert len(lines) == 1 and str(step) in lines[0] and "meta.json" in lines[0], err
    assert "Traceback" not in err


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(data_root, tmp_path, monkeypatch):
    from megatron_lcl.checkpoint import state as checkpointing

    run = tmp_path / "crash"
    assert pretrain_lcl.main(argv(data_root, run, "train.exit_after_steps=2")) == 0
    real_save = checkpointing.dist_checkpointing.save

    def crash_mid_save(state, directory, *args, **kwargs):
        real_save(state, directory, *args, **kwargs)  # shards on disk, then the job dies
        (Path(directory) / "half_written.distcp").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt("simulated crash during checkpoint save")

    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", crash_mid_save)
    with pytest.raises(KeyboardInterrupt):
        pretrain_lcl.main(argv(data_root, run, "train.exit_after_steps=2"))
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert (ckpts / "step_00000004.tmp").exists() and not (ckpts / "step_00000004").exists()
    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", real_save)
    assert pretrain_lcl.main(argv(data_root, run)) == 0  # resumes from step 2, cleans the stale .tmp
    assert [r["step"] for r in read_rows(run)] == list(range(1, 7))
    assert sorted(os.listdir(ckpts)) == ["latest", "step_00000002", "step_00000006"]


def test_keep_last_and_explicit_load(data_root, tmp_path):
    run = tmp_path / "keep"
    assert pretrain_lcl.main(argv(data_root, run, "checkpoint.save_interval=2", "checkpoint.keep_last=2")) == 0
    ckpts = run / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["latest", "step_00000004", "step_00000006"]
    other = tmp_path / "other"
    assert pretrain_lcl.main(argv(data_root, other, "train.train_steps=7", "optimizer.override_scheduler=true", "--load",
                                  str(ckpts / "step_00000004"))) == 0
    assert [r["step"] for r in read_rows(other)] == [5, 6, 7]


def test_training_starts_from_a_weights_only_checkpoint(data_root, tmp_path, capsys):
    """What convert_from_hf writes (model weights + config, no optimizer/RNG/data state) starts a
    fresh run from those weights at step 1."""
    from megatron_lcl.checkpoint import load_pretrained, save_weights

    trained = tmp_path / "trained"
    assert pretrain_lcl.main(argv(data_root, trained, "train.train_steps=3")) == 0
    lcl = load_pretrained(str(trained / "checkpoints"))
    save_weights(lcl.model, lcl.cfg, str(tmp_path / "weights"))
    fresh, warm = tmp_path / "fresh", tmp_path / "warm"
    assert pretrain_lcl.main(argv(data_root, fresh, "train.train_steps=2")) == 0
    assert pretrain_lcl.main(argv(data_root, warm, "train.train_steps=2", "checkpoint.load_optimizer=false",
                                  f"checkpoint.load={tmp_path / 'weights'}")) == 0
    assert "holds weights only" in capsys.readouterr().out
    rows_fresh, rows_warm = read_rows(fresh), read_rows(warm)
    assert [r["step"] for r in rows_warm] == [1, 2]
    assert rows_warm[0]["lm_loss"] < rows_fresh[0]["lm_loss"]  # same first batch, trained weights
    assert rows_warm[0]["model_flops_per_s"] > 0 and "mfu" not in rows_warm[0]  # no peak configured
    assert "logit_bias" not in rows_warm[0]  # InfoNCE has no bias


def test_a_sigmoid_run_logs_its_bias_and_counts_its_own_contrastive_flops(data_root, tmp_path):
    """loss.contrastive_loss=sigmoid: the log carries the learnable bias b (from its init, moving), and
    `model_flops_per_s` is the sigmoid count of the step (1 logit matrix, x4 with the ring's backward),
    not InfoNCE's (2 matrices, x3): what `models.flops.step_flops` gives for the run's options."""
    from megatron_lcl.config.model import SIGMOID_OVERRIDES
    from megatron_lcl.models.flops import run_flops_options, training_flops

    run = tmp_path / "sigmoid"
    assert pretrain_lcl.main(argv(data_root, run, "train.train_steps=3", "optimizer.lr=1e-2",
                                  *SIGMOID_OVERRIDES)) == 0
    rows, cfg = read_rows(run), load_config(str(run / "config.yaml"))
    assert all("logit_bias" in r for r in rows) and rows[0]["logit_bias"] != rows[-1]["logit_bias"]
    assert abs(rows[0]["logit_bias"] + 10.0) < 0.1  # SigLIP's init b = -10, one step in
    assert rows[0]["con_batch"] > 0
    options = run_flops_options(cfg, micro_batches=2)  # global batch 4 of micro-batches of 2, one rank
    assert options["contrastive_loss"] == "sigmoid"
    previous = 0
    for r in rows:
        images, previous = r["consumed_images"] - previous, r["consumed_images"]
        count = {loss: training_flops(cfg.model, cfg.data.seq_length, 4, images,
                                      **(options | {"contrastive_loss": loss}),
                                      contrastive_negatives=int(r["con_batch"]))
                 for loss in ("sigmoid", "infonce")}
        assert (count["sigmoid"] != count["infonce"]) == (r["con_batch"] > 0)  # no images, no L_con
        assert r["model_flops_per_s"] == pytest.approx(count["sigmoid"] / r["step_time_s"], rel=1e-9)


def test_bf16_mixed_precision_training_tracks_fp32(data_root, tmp_path):
    """bf16 params with megatron-core's mixed-precision optimizer (fp32 main params) run on CPU and
    follow the fp32 run's losses up to bf16 rounding."""
    runs = {}
    for dtype in ("fp32", "bf16"):
        run = tmp_path / dtype
        assert pretrain_lcl.main(argv(data_root, run, "train.train_steps=4", "model.vision.drop_path_rate=0",
                                      f"precision.params_dtype={dtype}")) == 0
        runs[dtype] = read_rows(run)
    for fp32, bf16 in zip(runs["fp32"], runs["bf16"]):
        assert bf16["lm_loss"] == pytest.approx(fp32["lm_loss"], rel=2e-2)
        assert bf16["con_loss"] == pytest.approx(fp32["con_loss"], rel=5e-2, abs=5e-2)


# ------------------------------------------------------------------------------------------ 2 ranks

@pytest.fixture(scope="module")
def dist_results(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_dist")
    for name in ("shards", "tokenizer"):
        os.symlink(data_root / name, out / name)
    run_torchrun("train_checks.py", 2, out)
    return json.loads((out / "train_checks.json").read_text())


def test_sigterm_on_one_rank_saves_and_the_run_resumes(dist_results):
    r = dist_results["preempt"]
    assert r["statuses"] == ["preempted", "completed"]
    assert r["saved_after_signal"] == ["latest", "step_00000002"]
    # DP=2 with the distributed optimizer: interrupted + resumed == straight, bitwise.
    assert without_timing(r["preempted"]) == without_timing(r["straight"])


@pytest.mark.parametrize("layout", ["tensor_model_parallel_size", "pipeline_model_parallel_size"])
def test_checkpoint_saved_at_2_way_model_parallel_loads_at_1(dist_results, layout):
    r = dist_results[layout]
    assert r["resumed_step"] == 2 and r["status"] == "completed"
    assert r["loss_loaded"] == pytest.approx(r["loss_saved"], rel=1e-5, abs=1e-6)
    assert [row["step"] for row in r["rows"]] == [3] and math.isfinite(r["rows"][0]["loss"])


# ------------------------------------------------------------------------------------------ demo

def test_demo_runs_end_to_end_at_a_small_size(tmp_path):
    env = dict(os.environ, DEMO_OUT=str(tmp_path / "demo"), DEMO_DOCS="60", DEMO_STEPS="4",
               DEMO_EVAL_DOCS="40", DEMO_EVAL_EPOCHS="1",
               DEMO_EXTRA="logging.log_interval=2 data.seq_length=64", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "examples" / "demo.sh")], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "demo" / "loss_curve.png").stat().st_size > 1000
    assert [r["step"] for r in read_rows(tmp_path / "demo" / "run")] == [2, 4]
    assert "demo finished in" in proc.stdout
    assert "OK" in proc.stdout.split("7/7 summary")[0]  # verify_hf: the HF export matches
    for name in ("classify.json", "retrieve.json"):
        assert (tmp_path / "demo" / "eval" / name).exists()
    assert (tmp_path / "demo" / "hf" / "vision" / "config.json").exists()


def test_sequence_length_boundary_is_one_rule(data_root, tmp_path, capsys):
    """The shortest sequence holding one image (min_seq_length: context, <BoI>, M, <EoI>) validates and
    trains with images in it; one position less is rejected at validation, naming the fields."""
    from megatron_lcl.config import min_seq_length

    m = load_config(TINY).model.vision.num_image_tokens  # 17
    shortest = min_seq_length(m)
    run = tmp_path / "boundary"
    assert pretrain_lcl.main(argv(data_root, run, f"data.seq_length={shortest}", "train.train_steps=3",
                                  "checkpoint.save_at_exit=false")) == 0
    rows = read_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["consumed_images"] > 0
    capsys.readouterr()
    assert pretrain_lcl.main(argv(data_root, tmp_path / "too_short", f"data.seq_length={shortest - 1}")) == 2
    err = capsys.readouterr().err
    assert f"one image needs model.vision.num_image_tokens + 3 = {shortest} positions" in err
    assert f"data.seq_length ({shortest - 1})" in err

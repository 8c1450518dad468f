"""Config validation messages and backend selection (no distributed state needed)."""

from pathlib import Path

import pytest

from megatron_lcl.config import (ConfigError, LMConfig, ModelConfig, ParallelConfig, PrecisionConfig,
                                 VisionConfig, VISION_PRESETS, apply_preset, config_errors, load_config,
                                 padded_vocab_size, validate_model_config)
from megatron_lcl.models.specs import LOCAL, TRANSFORMER_ENGINE, select_transformer_impl


def test_valid_default_config_passes():
    validate_model_config(ModelConfig(), ParallelConfig(), PrecisionConfig(), seq_length=128)


def test_heads_not_divisible_by_tp_names_fields():
    cfg = ModelConfig(lm=LMConfig(hidden_size=60, num_attention_heads=12, ffn_hidden_size=120))
    with pytest.raises(ConfigError) as e:
        validate_model_config(cfg, ParallelConfig(tensor_model_parallel_size=5))
    assert "model.lm.num_attention_heads (12) must be divisible by parallel.tensor_model_parallel_size (5)" in str(e.value)


def test_image_not_divisible_by_patch_names_fields():
    with pytest.raises(ConfigError, match=r"model.vision.image_size \(30\) must be divisible by model.vision.patch_size \(8\)"):
        validate_model_config(ModelConfig(vision=VisionConfig(image_size=30)), ParallelConfig())


def test_pipeline_split_must_add_up():
    lm = LMConfig(num_layers=12)
    ok = ParallelConfig(pipeline_model_parallel_size=4, num_layers_in_first_pipeline_stage=2,
                        num_layers_in_last_pipeline_stage=4)  # 2 + 4 + 3 + 3
    validate_model_config(ModelConfig(lm=lm), ok)
    bad = ParallelConfig(pipeline_model_parallel_size=4, num_layers_in_first_pipeline_stage=2,
                         num_layers_in_last_pipeline_stage=5)  # 5 left over 2 stages
    with pytest.raises(ConfigError, match="pipeline split does not add up"):
        validate_model_config(ModelConfig(lm=lm), bad)


def test_virtual_pipeline_is_a_clear_error():
    with pytest.raises(ConfigError, match="virtual_pipeline_model_parallel_size"):
        validate_model_config(ModelConfig(), ParallelConfig(virtual_pipeline_model_parallel_size=2))


def test_sequence_too_short_for_an_image():
    with pytest.raises(ConfigError, match="one image needs"):
        validate_model_config(ModelConfig(), ParallelConfig(), seq_length=8)


def test_several_errors_reported_together():
    cfg = ModelConfig(vision=VisionConfig(image_size=30, hidden_size=66), transformer_impl="bogus")
    with pytest.raises(ConfigError) as e:
        validate_model_config(cfg, ParallelConfig())
    msg = str(e.value)
    assert "image_size" in msg and "model.vision.hidden_size (66)" in msg and "transformer_impl" in msg


def test_presets_have_published_sizes():
    b16 = apply_preset(VisionConfig(preset="B/16"), VISION_PRESETS)
    assert (b16.hidden_size, b16.num_layers, b16.num_image_tokens) == (768, 12, 197)
    with pytest.raises(ValueError, match="unknown preset"):
        apply_preset(VisionConfig(preset="H/99"), VISION_PRESETS)


def test_padded_vocab():
    assert padded_vocab_size(LMConfig(vocab_size=50265, make_vocab_size_divisible_by=128), 2) == 50432


@pytest.mark.parametrize("requested,cuda,te,expected", [
    ("auto", False, False, LOCAL), ("auto", True, False, LOCAL), ("auto", True, True, TRANSFORMER_ENGINE),
    ("local", True, True, LOCAL), ("transformer_engine", True, True, TRANSFORMER_ENGINE)])
def test_backend_selection(requested, cuda, te, expected):
    assert select_transformer_impl(requested, cuda=cuda, te=te) == expected


def test_forcing_te_without_cuda_is_a_clear_error():
    with pytest.raises(ConfigError, match="needs CUDA and an importable transformer_engine"):
        select_transformer_impl("transformer_engine", cuda=False, te=False)


def test_sequence_parallel_with_pipeline_is_rejected():
    with pytest.raises(ConfigError, match="sequence_parallel with parallel.pipeline_model_parallel_size > 1"):
        validate_model_config(ModelConfig(), ParallelConfig(tensor_model_parallel_size=2,
                                                            pipeline_model_parallel_size=2,
                                                            sequence_parallel=True))


# ------------------------------------------------- run-config mistakes: one message, exit status 2

TINY = str(Path(__file__).resolve().parent.parent / "examples" / "configs" / "tiny_cpu.yaml")


@pytest.fixture
def run_files(tmp_path):
    """A tokenizer file and a folder with one shard: enough for the file checks (nothing is read)."""
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(b"")
    (tmp_path / "lcl.model").write_bytes(b"")
    return [f"data.path={tmp_path / 'shards'}", f"data.tokenizer={tmp_path / 'lcl.model'}"]


@pytest.mark.parametrize("world_size, tp, pp, message", [
    (3, 2, 1, "world size (3) must be divisible by parallel.tensor_model_parallel_size (2) x "
              "parallel.pipeline_model_parallel_size (1)"),
    (6, 2, 2, "world size (6) must be divisible by parallel.tensor_model_parallel_size (2) x "
              "parallel.pipeline_model_parallel_size (2)"),
    (2, 4, 1, "parallel.tensor_model_parallel_size (4) x parallel.pipeline_model_parallel_size (1) = 4 "
              "ranks per model replica, more than the world size (2)"),
])
def test_world_size_rules_name_the_parallel_fields(world_size, tp, pp, message):
    cfg = load_config(TINY, [f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
                             "model.lm.num_attention_heads=8", "model.lm.num_layers=4"])
    assert config_errors(cfg, world_size) == [message]
    assert config_errors(cfg) == []  # the heads/FFN/layer split themselves are fine


@pytest.mark.parametrize("world_size, overrides, message", [
    ("1", ["parallel.tensor_model_parallel_size=2"],
     "parallel.tensor_model_parallel_size (2) x parallel.pipeline_model_parallel_size (1) = 2 ranks per "
     "model replica, more than the world size (1)"),
    ("3", ["parallel.tensor_model_parallel_size=2"],
     "world size (3) must be divisible by parallel.tensor_model_parallel_size (2)"),
    ("1", ["data.path=[]"], "data.path is required, got []"),
    ("1", ["data.path="], "data.path is required, got None"),
    ("1", ["data.path=/nonexistent/shards"], "data.path: no prepared shards (*.tar) at /nonexistent/shards"),
    ("1", ["data.path=[1.0, /nonexistent/a]"], "data.path: no prepared shards (*.tar) at /nonexistent/a"),
    ("1", ["data.tokenizer="], "data.tokenizer is required"),
    ("1", ["data.tokenizer=/nonexistent/lcl.model"], "data.tokenizer (/nonexistent/lcl.model) does not exist"),
])
def test_driver_reports_run_config_mistakes_once_with_status_2(world_size, overrides, message, run_files,
                                                              tmp_path, monkeypatch, capsys):
    """The driver stops before any process group or model exists: one message, no traceback, status 2."""
    from megatron_lcl import train

    monkeypatch.setenv("WORLD_SIZE", world_size)  # what torchrun sets; nothing is initialised from it here
    assert train.main(["--config", TINY, f"run_dir={tmp_path / 'run'}", *run_files, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error ({TINY}): invalid configuration:\n  - {message}"), err
    assert err.count("\n  - ") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_file_checks_pass_for_existing_files_and_are_opt_in(run_files):
    cfg = load_config(TINY, run_files)
    assert config_errors(cfg, 1, check_files=True) == []
    missing = load_config(TINY, ["data.path=/nonexistent", "data.tokenizer=/nonexistent.model"])
    assert config_errors(missing) == []  # tools validating a config for another machine do not look for files
    assert len(config_errors(missing, check_files=True)) == 2


# ------------------------------------------------------------------------- the driver's start-up errors

@pytest.mark.parametrize("config_text, overrides, message", [
    ("optimizer:\n  lr: 1e-3\n warmup_steps: 3\n", [],
     "invalid YAML: line 3, column 2: expected <block end>, but found '<block mapping start>'"),
    (None, [], "--config {missing}: No such file or directory"),
    ("", ["optimizer.lr=[1,"], "override 'optimizer.lr=[1,': the value is not valid YAML (line 1, column 4: "
                               "expected the node content, but found '<stream end>'"),
])
def test_unreadable_config_and_overrides_give_one_line_and_status_2(config_text, overrides, message, tmp_path,
                                                                     capsys):
    """A YAML syntax error, a missing --config file, an override value that is not YAML: one line naming
    the file (line, column) or the override, no traceback, status 2 (before: a traceback and status 1)."""
    from megatron_lcl import train

    path = tmp_path / "exp.yaml"
    if config_text is not None:
        path.write_text(config_text)
    assert train.main(["--config", str(path), f"run_dir={tmp_path / 'run'}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message.format(missing=path) in err, err


def test_overrides_may_follow_the_options(run_files, tmp_path, capsys):
    """`pretrain_lcl.py --config C --load X key=value`: overrides before, between and after options."""
    from megatron_lcl import train

    args = train.parse_args(["optimizer.lr=1e-3", "--config", TINY, "train.seed=7", "--load", "/ckpt",
                             "train.train_steps=9", "--print-config"])
    assert (args.config, args.load, args.print_config) == (TINY, "/ckpt", True)
    assert args.overrides == ["optimizer.lr=1e-3", "train.seed=7", "train.train_steps=9"]
    assert train.main(["--config", TINY, "--print-config", "train.train_steps=9", *run_files]) == 0
    assert "train_steps: 9" in capsys.readouterr().out


def test_an_unwritable_run_dir_gives_one_line_and_status_2_before_any_process_group(tmp_path):
    """pretrain_lcl.py as a launch runs it, on a read-only run directory (as root: run as `nobody`,
    root writes anywhere): one line naming the directory, status 2, nothing started."""
    import os
    import shutil
    import subprocess
    import sys
    import sysconfig
    import tempfile

    root = Path(__file__).resolve().parent.parent
    shared = Path(tempfile.mkdtemp(prefix="lcl-readonly-"))  # pytest's tmp_path is private to its user
    try:
        (shared / "shards").mkdir()
        (shared / "shards" / "shard-000000.tar").write_bytes(b"")
        (shared / "lcl.model").write_bytes(b"")
        (shared / "run").mkdir()
        for path in (shared / "run", shared / "shards", shared):
            path.chmod(0o555)
        (shared / "lcl.model").chmod(0o444)
        cmd = [sys.executable, str(root / "pretrain_lcl.py"), "--config", TINY, f"run_dir={shared / 'run'}",
               f"data.path={shared / 'shards'}", f"data.tokenizer={shared / 'lcl.model'}"]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("as root a read-only directory needs setpriv to drop privileges")
            drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            needed = [root / "pretrain_lcl.py", Path(TINY).resolve(), Path(sysconfig.get_paths()["purelib"])]
            readable = [arg for path in needed for arg in ("-a", "-r", str(path))][1:]
            if subprocess.run([*drop, "test", *readable]).returncode:
                pytest.skip(f"user nobody cannot read this checkout or its venv ({root}: a private parent "
                            "folder, e.g. from mktemp -d), so the run cannot drop root's privileges")
            cmd = [*drop, *cmd]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", HOME=str(shared), MPLCONFIGDIR=str(shared))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=shared)
    finally:
        for path in (shared, shared / "run", shared / "shards"):
            path.chmod(0o755)
        shutil.rmtree(shared)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"config error ({TINY}): run_dir {shared / 'run'}: cannot write in {shared / 'run'} "
                     "(Permission denied)"], proc.stderr[-3000:]


def test_a_tokenizer_larger_than_the_lm_vocabulary_is_refused(tmp_path):
    from megatron_lcl.config.validate import tokenizer_errors
    from megatron_lcl.data.tokenizer import LCLTokenizer, train_tokenizer

    texts = [f"document {i} about cats and dogs and the weather in town number {i % 7}" for i in range(200)]
    model = train_tokenizer(texts, str(tmp_path / "lcl"), vocab_size=120, character_coverage=1.0)
    vocab = LCLTokenizer(model).vocab_size
    cfg = load_config(TINY, [f"data.tokenizer={model}", f"model.lm.vocab_size={vocab - 1}"])
    assert tokenizer_errors(cfg.data, cfg.model.lm) == [
        f"data.tokenizer ({model}) has {vocab} tokens, more than model.lm.vocab_size ({vocab - 1})"]
    assert tokenizer_errors(cfg.data, LMConfig(vocab_size=vocab)) == []

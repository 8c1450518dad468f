"""The example paper configs against the paper's facts, read from ONE table (tests/paper_facts.py),
and the LR schedule's first steps against Megatron-LM's convention."""

import re
from pathlib import Path

import pytest
import torch

from megatron_lcl.config import LM_PRESETS, VISION_PRESETS, load_config, validate_config
from paper_facts import PAPER_FACTS, PAPER_RUNS, fact_value

ROOT = Path(__file__).resolve().parent.parent


def _config_path(name: str) -> Path:
    return ROOT / "examples" / "configs" / f"{name}.yaml"


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name", sorted(PAPER_RUNS))
def test_paper_configs(name):
    """Every key a paper config takes from the paper equals the fact; the architecture is the paper's."""
    cfg = load_config(str(_config_path(name)), ["data.path=[/data/a, /data/b]", "data.tokenizer=/data/tok.model"])
    wrong = {key: (_get(cfg, key), fact_value(ref)) for key, ref in PAPER_RUNS[name].items()
             if _get(cfg, key) != fact_value(ref)}
    assert not wrong, f"{name}: config vs paper {wrong}"
    v, lm = cfg.model.vision, cfg.model.lm
    preset = VISION_PRESETS[v.preset]
    assert (v.hidden_size, v.num_layers, v.patch_size) == (preset["hidden_size"], preset["num_layers"],
                                                           preset["patch_size"])
    assert {k: getattr(lm, k) for k in LM_PRESETS["opt-125m"]} == LM_PRESETS["opt-125m"]  # OPT-125M
    assert cfg.loss.contrastive_batch == "step"  # the paper's negatives: the whole step
    assert cfg.data.path == ["/data/a", "/data/b"]
    validate_config(cfg, world_size=8)


@pytest.mark.parametrize("name", sorted(PAPER_RUNS))
def test_contradicted_facts_cite_every_place_in_the_config(name):
    """Where the paper contradicts itself, the config line says which places say what."""
    text = _config_path(name).read_text()
    for key, ref in PAPER_RUNS[name].items():
        fact = PAPER_FACTS[ref[0] if isinstance(ref, tuple) else ref]
        if not fact.alternatives:
            continue
        leaf = key.rsplit(".", 1)[1]
        line = re.search(rf"^\s*{leaf}:.*$", text, re.MULTILINE)
        assert line, f"{name}: no {key} line"
        for place in (*fact.where, *fact.alternatives):
            assert place in line.group(0), f"{name}: {key} line does not cite {place}: {line.group(0)!r}"
            assert place in text.split("run_dir:")[0], f"{name}: the header comment does not cite {place}"


def test_main_run_length_matches_the_images_seen():
    """The chosen step count is the one consistent with "13B images seen" at 64k images per step."""
    steps, per_step = fact_value("main.train_steps"), fact_value("main.images_per_step")
    assert abs(steps * per_step / fact_value("main.images_seen") - 1) < 0.05
    for place, alternative in PAPER_FACTS["main.train_steps"].alternatives.items():
        assert abs(alternative * per_step / fact_value("main.images_seen") - 1) > 0.5, place


def test_first_steps_lr_follows_megatron_lm():
    """Megatron-LM builds OptimizerParamScheduler (which calls step(0): lr = lr_warmup_init, default 0),
    runs optimizer.step() and only then opt_param_scheduler.step(increment): iteration k (1-based) uses
    lr * (k - 1) / warmup, so iteration 1 uses lr_warmup_init = 0 and the peak is reached at
    iteration warmup + 1. Our trainer steps the scheduler after the optimizer in the same order."""
    from megatron_lcl.config import OptimizerConfig, TrainConfig
    from megatron_lcl.training.optim import build_scheduler, current_lr

    lr, warmup = 1e-3, 4
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    scheduler = build_scheduler(optimizer, OptimizerConfig(lr=lr, warmup_steps=warmup), TrainConfig(train_steps=20))
    used = []
    for _ in range(warmup + 2):  # one training iteration: optimizer.step() with the current lr, then the schedule
        used.append(current_lr(optimizer))
        scheduler.step(increment=1)
    assert used[:warmup + 1] == pytest.approx([lr * k / warmup for k in range(warmup + 1)])
    assert used[0] == 0.0 and used[warmup] == pytest.approx(lr) and used[warmup + 1] < lr


def test_trainer_steps_the_schedule_after_the_optimizer():
    """The order the test above assumes, read from the trainer's source (a full run is in test_training)."""
    import inspect

    from megatron_lcl.training.trainer import Trainer

    source = inspect.getsource(Trainer.train_step)
    assert source.index("self.optimizer.step()") < source.index("self.scheduler.step(increment=1)")

"""`model.vision.image_tokens` as a sweep arm: one override set per setting, each point priced by the
FLOPs model of its own configuration (an IsoFLOP budget gives each arm the steps its cost allows)."""

from pathlib import Path

import yaml

from megatron_lcl.config import load_config
from megatron_lcl.models.flops import flops_per_sample, step_flops
from megatron_lcl.scaling import sweep

TINY_CONFIG = str(Path(__file__).resolve().parent.parent / "examples" / "configs" / "tiny_cpu.yaml")
ARMS = [{"name": "paper", "overrides": ["model.vision.image_tokens=latents"]},
        {"name": "released", "overrides": ["model.vision.image_tokens=pooled_values"]}]


def test_flops_budget_prices_each_arm_by_its_own_model(tmp_path):
    budget = 4e11
    spec = dict(name="t", base_config=TINY_CONFIG, output_dir=str(tmp_path / "out"), images_per_sample=2,
                overrides=["data.seq_length=64", "data.micro_batch_size=2"], models=[{"name": "t", "lm": {}}],
                budgets=[{"name": "c", "flops": budget, "global_batch_size": 4}], arms=ARMS)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    points = sweep.expand_points(sweep.load_spec(str(tmp_path / "spec.yaml")))
    assert [p.arm for p in points] == ["paper", "released"]
    configs = {p.arm: load_config(TINY_CONFIG, p.overrides) for p in points}
    paper, released = configs["paper"], configs["released"]
    assert (paper.model.vision.num_image_tokens, released.model.vision.num_image_tokens) == (17, 16)
    for cfg in configs.values():
        per_step = flops_per_sample(cfg.model, 64, 2, loss_mode=cfg.loss.mode) * 4
        assert cfg.train.train_steps == max(1, round(budget / per_step))
    # the arms differ in cost where the model says: no projector, the pooling block's value path instead
    a, b = (step_flops(c.model, 64, 2) for c in (paper, released))
    assert a["vit"] == b["vit"] and a["lm"] == b["lm"] and a["projector"] != b["projector"]
    assert flops_per_sample(paper.model, 64, 2) != flops_per_sample(released.model, 64, 2)

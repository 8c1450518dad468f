"""The ring sigmoid loss (`megatron_lcl.losses.sigmoid`) against a single-process reference of the whole
batch's pairwise loss: values, top-1 and gradients, at 1 rank and on 3 gloo ranks with ragged and empty
blocks. (The model-level equivalence at DP2, TP2 x DP2 and PP2 is in tests/dist/loss_compare_checks.py.)"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import pytest

from megatron_lcl.losses.sigmoid import gathered_sigmoid_loss_sum, sigmoid_loss_sum
from megatron_lcl.runtime.distributed import free_port

E = 8


def features(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(n, E, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(v + 0.5 * torch.randn(n, E, generator=g, dtype=torch.float64), dim=-1)
    return v, t, torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)


def reference(v, t, s, b):
    """Every image against every text: per-image loss `[N]` and the top-1 mask `[N]`."""
    logits = s * v @ t.t() + b  # [N, N]
    labels = 2 * torch.eye(len(v), dtype=v.dtype) - 1
    per_image = -F.logsigmoid(labels * logits).sum(1)
    neg = logits.masked_fill(labels > 0, -float("inf"))
    pos = logits.diagonal()
    top1 = (pos > neg.max(1).values) & (pos > neg.max(0).values)
    return per_image, top1


def leaves(*xs):
    return [x.clone().requires_grad_() for x in xs]


def test_one_rank_equals_reference():
    v, t, s, b = leaves(*features(5))
    loss, num, correct = sigmoid_loss_sum(v, t, s, b)
    loss.backward()
    rv, rt, rs, rb = leaves(*features(5))
    per_image, top1 = reference(rv, rt, rs, rb)
    per_image.sum().backward()
    assert num == 5 and int(correct) == int(top1.sum()) > 0
    torch.testing.assert_close(loss, per_image.sum().detach())
    for got, want in ((v, rv), (t, rt), (s, rs), (b, rb)):
        torch.testing.assert_close(got.grad, want.grad)


COUNTS = [3, 0, 2]  # ragged, one rank empty


def _rank(rank: int, port: int, out: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(COUNTS))
    start, n = sum(COUNTS[:rank]), COUNTS[rank]
    weight = float(rank + 1)  # each rank's loss enters the objective with its own factor
    full = features(sum(COUNTS), seed=1)
    v, t, s, b = leaves(full[0][start:start + n], full[1][start:start + n], full[2], full[3])
    loss, num, correct = sigmoid_loss_sum(v, t, s, b, dist.group.WORLD, COUNTS)
    (weight * loss).backward()
    gathered, _ = gathered_sigmoid_loss_sum(v.detach(), t.detach(), s.detach(), b.detach(), dist.group.WORLD,
                                            COUNTS)
    # the reference, in this process: the whole batch, each rank's rows weighted as the ring's were
    rv, rt, rs, rb = leaves(*full)
    per_image, top1 = reference(rv, rt, rs, rb)
    weights = torch.cat([torch.full((c,), float(r + 1), dtype=torch.float64) for r, c in enumerate(COUNTS)])
    (weights * per_image).sum().backward()
    mine = slice(start, start + n)
    rs_local, rb_local = leaves(full[2], full[3])  # this rank's own share of the scale/bias gradient
    (weight * reference(full[0], full[1], rs_local, rb_local)[0][mine].sum()).backward()
    torch.save({"loss": loss.detach(), "ref_loss": per_image[mine].sum().detach(), "gathered": gathered,
                "num": num, "correct": int(correct), "ref_correct": int(top1[mine].sum()),
                "grads": [v.grad, t.grad, s.grad, b.grad],
                "ref_grads": [rv.grad[mine], rt.grad[mine], rs_local.grad, rb_local.grad]},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ring_on_three_ranks_equals_reference(tmp_path):
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=len(COUNTS), join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(len(COUNTS))]
    assert sum(r["ref_correct"] for r in results) > 0  # the top-1 comparison is not 0 == 0
    for r in results:
        assert r["num"] == sum(COUNTS) and r["correct"] == r["ref_correct"]
        torch.testing.assert_close(r["loss"], r["ref_loss"])
        torch.testing.assert_close(r["gathered"], r["ref_loss"])
        for got, want in zip(r["grads"], r["ref_grads"]):
            torch.testing.assert_close(got, want)


def test_config_rules_pair_the_sigmoid_loss_with_its_bias():
    from megatron_lcl.config import LCLConfig, config_errors, load_config
    from megatron_lcl.config.model import SIGMOID_OVERRIDES

    cfg = LCLConfig()
    cfg.loss.contrastive_loss = "sigmoid"
    assert any("needs model.heads.logit_bias_init" in e for e in config_errors(cfg))
    cfg.model.heads.logit_bias_init = -10.0
    assert not any("logit_bias_init" in e or "contrastive_loss" in e for e in config_errors(cfg))
    cfg.loss.contrastive_loss = "infonce"
    assert any("only used by loss.contrastive_loss=sigmoid" in e for e in config_errors(cfg))
    cfg.loss.contrastive_loss = "softmax"
    assert any("loss.contrastive_loss ('softmax') must be infonce or sigmoid" in e for e in config_errors(cfg))
    arm = load_config(None, SIGMOID_OVERRIDES)  # the sweep / ablation arm
    assert (arm.loss.contrastive_loss, arm.model.heads.logit_scale_init, arm.model.heads.logit_bias_init) == \
        ("sigmoid", 10.0, -10.0)


def test_the_bias_is_a_head_parameter_and_travels_with_the_hf_heads():
    import math

    from megatron_lcl.config import HeadsConfig
    from megatron_lcl.hf.convert import lcl_heads_state
    from megatron_lcl.models.heads import TextHead

    assert TextHead(16, HeadsConfig()).logit_bias is None  # InfoNCE: no bias parameter
    head = TextHead(16, HeadsConfig(logit_scale_init=10.0, logit_bias_init=-10.0))
    assert float(head.logit_bias.detach()) == -10.0 and float(head.scale().detach()) == pytest.approx(10.0)
    assert float(head.logit_scale.detach()) == pytest.approx(math.log(10.0))
    heads = lcl_heads_state({f"text_head.{k}": v for k, v in head.state_dict().items()} | {"lm.w": torch.zeros(1)})
    assert float(heads["text_head.logit_bias"]) == -10.0 and "lm.w" not in heads


def test_flops_model_counts_the_sigmoid_loss_and_its_bias(single_rank):
    from dataclasses import replace

    from megatron_lcl.config import ParallelConfig
    from megatron_lcl.models.flops import count_parameters_by_group, parameter_counts, step_flops
    from megatron_lcl.models.lcl_model import LCLModel
    from common import tiny_model_config

    cfg = tiny_model_config()
    sigmoid = replace(cfg, heads=replace(cfg.heads, logit_scale_init=10.0, logit_bias_init=-10.0))
    assert parameter_counts(sigmoid)["heads"] == parameter_counts(cfg)["heads"] + 1
    predicted = dict(parameter_counts(sigmoid))
    predicted.pop("lm_embedding")
    assert predicted == dict(count_parameters_by_group(LCLModel(sigmoid, ParallelConfig())))
    e, n, negatives = cfg.heads.embed_dim, 2 * 3, 24  # 2 samples of 3 images, 24 images per row
    infonce = step_flops(cfg, 48, 3, samples=2, contrastive_negatives=negatives)
    ring = step_flops(sigmoid, 48, 3, samples=2, contrastive_negatives=negatives, contrastive_loss="sigmoid")
    assert infonce["contrastive"] == 3 * 2 * (2 * n * negatives * e)  # 2 logit matrices, forward + backward
    assert ring["contrastive"] == 4 * (2 * n * negatives * e)  # 1 matrix: forward, recompute, 2 gradients
    forward = step_flops(sigmoid, 48, 3, samples=2, contrastive_negatives=negatives, contrastive_loss="sigmoid",
                         backward=False)
    assert forward["contrastive"] == 2 * n * negatives * e


def test_the_sigmoid_loss_is_a_sweep_arm(tmp_path):
    from megatron_lcl.config import config_errors, load_config
    from megatron_lcl.config.model import SIGMOID_OVERRIDES
    from megatron_lcl.scaling import sweep
    from test_scaling_arms import write_spec

    arms = [{"name": "lcl", "overrides": ["loss.mode=lcl"]},
            {"name": "sig", "overrides": ["loss.mode=lcl", *SIGMOID_OVERRIDES]}]
    spec = sweep.load_spec(write_spec(tmp_path, arms=arms))
    point = next(p for p in sweep.expand_points(spec) if p.arm == "sig")
    cfg = load_config(spec.base_config, point.overrides)
    assert (cfg.loss.contrastive_loss, cfg.model.heads.logit_bias_init) == ("sigmoid", -10.0)
    assert not [e for e in config_errors(cfg) if "contrastive" in e or "logit" in e]

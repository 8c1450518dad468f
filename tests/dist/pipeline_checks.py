"""Vision-language pipeline equivalences on 8 gloo ranks (run by tests/training/test_pipeline_parallel.py).

Reference: TP=PP=DP=1 in one process on the global batch, the step objective written out by hand
(L_gen over the step's text targets, each image's InfoNCE against its micro-batch, averaged over the
step's images). Compared: TP1 x PP2 x DP4, TP2 x PP2 x DP2 (losses, gradients incl. the ViT through the
carried rows), and one distributed-optimizer step at TP2 x PP2 x DP2 against the same step done by hand.
4 micro-batches of 4 samples each; in micro-batch 2 the second half of the samples has no image.
Every compared step runs under `host_syncs.HostSyncRecorder` (the ops that would make the host wait for
a GPU, with their call sites), saved per layout for tests/training/test_pipeline_parallel.py.

contrastive_batch=step: TP2 x PP2 x DP2 with the feature cache against a single-process reference
that computes L_con over ALL images of the step at once (STEP_GLOBAL: micro-batch 3 holds no image at
all, micro-batch 2 none on half the ranks, and images at position 0 are left out of L_con).

loss.contrastive_loss=sigmoid (the DP ring of `megatron_lcl.losses.sigmoid`) on the same STEP_GLOBAL
micro-batches, against a single-process reference that scores every image of the step against every
`<BoI>` feature of the step (step) or of its micro-batch (micro_batch), written out by hand: TP2 x PP2 x
DP2 (step and micro_batch), TP1 x PP2 x DP4 and TP2 x PP1 x DP4 (step: a ring of 4, one sample a rank,
so most ranks hold no image in some micro-batch).
"""

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.distributed.param_and_grad_buffer import shard_buffer

from common import collect_full, load_full_weights, mark_done, parse_out_dir, save_rank0, tiny_model_config
from host_syncs import HostSyncRecorder
from megatron_lcl.config import LossConfig, OptimizerConfig, ParallelConfig, PrecisionConfig
from megatron_lcl.losses import LCLLoss, contrastive_loss_sum, generation_loss_sum
from megatron_lcl.models.lcl_model import LCLModel
from megatron_lcl.models.factory import build_model
from megatron_lcl.runtime import ParallelLayout, initialize_distributed, initialize_model_parallel, set_seed
from megatron_lcl.testing import random_batch, slice_batch
from megatron_lcl.training.optim import build_optimizer
from megatron_lcl.training.pipeline import (PipelineShape, forward_backward, forward_loss, step_forward_backward,
                                            wrap_ddp)

SEED, NUM_MB, MB_SAMPLES, SEQ = 1234, 4, 4, 48
CFG = tiny_model_config()
M = CFG.vision.num_image_tokens
LAYOUTS = [  # <BoI> positions per sample, for each global micro-batch
    [[3, 20], [0], [9, 30], [14]],
    [[5], [], [12, 25], [33]],
    [[2, 18], [7], [], []],  # DP ranks holding the second half see no image at all
    [[11], [4, 22], [6], [0, 17]],
]
GLOBAL = [random_batch(layout, SEQ, M, 16, 192, seed=10 + k) for k, layout in enumerate(LAYOUTS)]
STEP_GLOBAL = GLOBAL[:3] + [random_batch([[], [], [], []], SEQ, M, 16, 192, seed=13)]
CON_WEIGHT = 0.1
# s = 10 (SigLIP's init) and b = -2 rather than SigLIP's -10: at -10 the negatives' gradients are ~1e-5,
# below what the comparison could tell apart from a missing term.
SIGMOID_CFG = replace(CFG, heads=replace(CFG.heads, logit_scale_init=10.0, logit_bias_init=-2.0))
SIGMOID_LAYOUTS = {"sigmoid_tp2_pp2_dp2_step": (2, 2, "step"), "sigmoid_tp2_pp2_dp2_micro": (2, 2, "micro_batch"),
                   "sigmoid_tp1_pp2_dp4_step": (1, 2, "step"), "sigmoid_tp2_pp1_dp4_step": (2, 1, "step")}
OPT = dict(lr=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0)


def reference(out):
    set_seed(SEED)
    model = LCLModel(CFG, ParallelConfig())
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # each micro-batch's own values (a step of one micro-batch)
        terms = [{k: v.detach().clone() for k, v in forward_loss(model, batch, LCLLoss(LossConfig())).metrics().items()}
                 for batch in GLOBAL]
    targets = sum(b.loss_mask.sum() for b in GLOBAL)  # the step's text targets
    images = sum(b.image_has_context.sum() for b in GLOBAL)  # the step's L_con images
    for batch in GLOBAL:
        o = model(batch.tokens, batch.position_ids, batch.images, batch.image_sample_index, batch.boi_positions)
        gen_sum, _ = generation_loss_sum(o.logits, batch.labels, batch.loss_mask)
        has = batch.image_has_context
        con_sum, _, _ = contrastive_loss_sum(o.image_features[has], o.text_features[has], o.logit_scale)
        (gen_sum / targets + CON_WEIGHT * con_sum / images).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    # The step megatron-core's optimizer should take: clip to global norm 1, AdamW, no decay on
    # biases and on params with fewer than 2 dims (norms, layer-scale, logit_scale).
    params = dict(model.named_parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), OPT["clip_grad"])  # the norm before clipping
    decayed = {n for n, p in params.items() if p.dim() >= 2 and not n.endswith(".bias")}
    decay = [p for n, p in params.items() if n in decayed]
    no_decay = [p for n, p in params.items() if n not in decayed]
    adam = torch.optim.AdamW([{"params": decay, "weight_decay": OPT["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}], lr=OPT["lr"],
                             betas=(OPT["adam_beta1"], OPT["adam_beta2"]), eps=OPT["adam_eps"])
    adam.step()
    updated = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_rank0({"terms": terms, "grads": grads, "updated": updated, "grad_norm": grad_norm}, out, "reference.pt")
    return weights


def gather_reduced_grad_shards(ddp) -> None:
    """With the distributed optimizer, megatron-core reduce-scatters each bucket's gradients: a DP rank
    holds the reduced values of its own shard only. All-gather the shards so main_grad is whole."""
    for group in ddp.bucket_groups:
        pg, size = group.intra_distributed_optimizer_instance_group, group.intra_distributed_optimizer_instance_size
        for bucket in group.buckets:
            shards = list(shard_buffer(bucket.grad_data, size))
            dist.all_gather(shards, shards[pg.rank()].clone(), group=pg)


def reference_step_contrastive(out):
    """L_gen over the step's text targets + lambda x ONE InfoNCE over the step's images."""
    set_seed(SEED)
    model = LCLModel(CFG, ParallelConfig())
    gen, image_features, text_features, lm_losses = 0.0, [], [], []
    targets = sum(b.loss_mask.sum() for b in STEP_GLOBAL)
    for batch in STEP_GLOBAL:
        o = model(batch.tokens, batch.position_ids, batch.images, batch.image_sample_index, batch.boi_positions)
        gen_sum, count = generation_loss_sum(o.logits, batch.labels, batch.loss_mask)
        gen = gen + gen_sum / targets
        lm_losses.append((gen_sum / count).detach())
        image_features.append(o.image_features[batch.image_has_context])
        text_features.append(o.text_features[batch.image_has_context])
    v, t = torch.cat(image_features), torch.cat(text_features)  # [N, e], every image of the step
    logits = o.logit_scale * v @ t.T  # [N, N]
    target = torch.arange(len(v))
    con = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    (gen + CON_WEIGHT * con).backward()
    top1 = ((logits.argmax(1) == target) & (logits.argmax(0) == target)).float().mean()
    terms = [{"lm_loss": lm, "con_loss": con.detach(), "con_top1": top1, "con_batch": torch.tensor(float(len(v))),
              "num_images": b.image_has_context.sum().float(), "loss": lm + CON_WEIGHT * con.detach()}
             for lm, b in zip(lm_losses, STEP_GLOBAL)]
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    save_rank0({"terms": terms, "grads": grads}, out, "reference_step_contrastive.pt")


def pairwise_sigmoid(v, t, scale, bias):
    """Every image against every text of `[N, e]` v, t: the loss sum and the count whose positive beats
    every negative of its row and of its column."""
    logits = scale * v @ t.T + bias  # [N, N]
    labels = 2 * torch.eye(len(v)) - 1
    negatives = logits.masked_fill(labels > 0, -float("inf"))
    positive = logits.diagonal()
    correct = ((positive > negatives.max(1).values) & (positive > negatives.max(0).values)).sum()
    return -F.logsigmoid(labels * logits).sum(), correct


def reference_sigmoid(out, contrastive_batch):
    """L_gen over the step's text targets + lambda x the pairwise sigmoid loss of the step's images
    (every image against every <BoI> feature of the step, or of its micro-batch), / the step's images."""
    set_seed(SEED)
    model = LCLModel(SIGMOID_CFG, ParallelConfig())
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = sum(b.loss_mask.sum() for b in STEP_GLOBAL)
    images = sum(b.image_has_context.sum() for b in STEP_GLOBAL)
    gen, v, t = 0.0, [], []
    for batch in STEP_GLOBAL:
        o = model(batch.tokens, batch.position_ids, batch.images, batch.image_sample_index, batch.boi_positions)
        gen = gen + generation_loss_sum(o.logits, batch.labels, batch.loss_mask)[0] / targets
        v.append(o.image_features[batch.image_has_context])
        t.append(o.text_features[batch.image_has_context])
    blocks = [(torch.cat(v), torch.cat(t))] if contrastive_batch == "step" else list(zip(v, t))
    sums = [pairwise_sigmoid(bv, bt, o.logit_scale, o.logit_bias) for bv, bt in blocks if len(bv)]
    con_sum, correct = sum(s for s, _ in sums), sum(c for _, c in sums)
    (gen + CON_WEIGHT * con_sum / images).backward()
    save_rank0({"con_loss": (con_sum / images).detach(), "con_top1": correct / images, "images": images,
                "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()}},
               out, f"reference_sigmoid_{contrastive_batch}.pt")
    return weights


def run_layout(weights, tp, pp, distributed_optimizer, out, name, first_stage_layers=None,
               contrastive_batch="micro_batch", contrastive_loss="infonce"):
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              num_layers_in_first_pipeline_stage=first_stage_layers,
                              use_distributed_optimizer=distributed_optimizer)
    initialize_model_parallel(parallel, SEED)
    layout = ParallelLayout.current()
    sigmoid = contrastive_loss == "sigmoid"
    model = build_model(SIGMOID_CFG if sigmoid else CFG, parallel, first_stage=layout.is_first_stage,
                        last_stage=layout.is_last_stage)
    load_full_weights(model, weights, ps.get_tensor_model_parallel_rank(), tp)
    ddp = wrap_ddp(model, parallel)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mbs = MB_SAMPLES // dp
    step = contrastive_batch == "step"
    local = [slice_batch(b, slice(dp_rank * mbs, (dp_rank + 1) * mbs))
             for b in (STEP_GLOBAL if step or sigmoid else GLOBAL)]
    shape = PipelineShape.for_model(CFG, SEQ, mbs)  # room for 2 images per sample
    optimizer = None
    if distributed_optimizer:
        optimizer = build_optimizer(ddp, OptimizerConfig(**OPT), parallel, PrecisionConfig())
        # The scheduler is what applies the per-group wd_mult (as in training).
        OptimizerParamScheduler(optimizer, init_lr=OPT["lr"], max_lr=OPT["lr"], min_lr=OPT["lr"],
                                lr_warmup_steps=0, lr_decay_steps=1, lr_decay_style="constant",
                                start_wd=OPT["weight_decay"], end_wd=OPT["weight_decay"],
                                wd_incr_steps=1, wd_incr_style="constant")
        optimizer.zero_grad()
    else:
        ddp.zero_grad_buffer()
    loss_fn = LCLLoss(LossConfig(contrastive_batch=contrastive_batch, con_weight=CON_WEIGHT,
                                 contrastive_loss=contrastive_loss), layout.dp_group)
    with HostSyncRecorder() as syncs:
        if step:
            metrics = step_forward_backward(ddp, local, NUM_MB, loss_fn, shape, layout)
        else:
            metrics = forward_backward(ddp, iter(local), NUM_MB, loss_fn, shape, layout)
    tp_group = ps.get_tensor_model_parallel_group()
    result = {}
    result["first_stage_lm_layers"] = len(model.lm.decoder.layers) if ps.is_pipeline_first_stage() else None
    if optimizer is not None:
        gather_reduced_grad_shards(ddp)
        result["grads"] = collect_full(ddp, tp_group, "main_grad")  # what the step is taken with
        ok, grad_norm, _ = optimizer.step()
        result["updated"] = collect_full(ddp, tp_group, "param")
        result["grad_norm"] = grad_norm
    else:
        result["grads"] = collect_full(ddp, tp_group, "main_grad")
    # losses live on the last stage: ship them to rank 0
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, metrics)
    result["terms"] = next(m for m in gathered if m)
    result["step"] = LCLLoss(LossConfig(contrastive_batch=contrastive_batch, con_weight=CON_WEIGHT)
                             ).step_metrics(result["terms"])  # the step's logged values
    layers = [None] * dist.get_world_size()
    dist.all_gather_object(layers, result.pop("first_stage_lm_layers"))
    result["first_stage_lm_layers"] = next(n for n in layers if n is not None)
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, sorted(syncs.events))
    result["host_syncs"] = sorted({tuple(e) for events in every_rank for e in events})
    save_rank0(result, out, f"{name}.pt")


def main():
    out = parse_out_dir()
    initialize_distributed(ParallelConfig(), SEED)
    weights = reference(out)
    reference_step_contrastive(out)
    # before any run_layout: the references need the TP=PP=1 parallel state
    sigmoid_weights = [reference_sigmoid(out, batch) for batch in ("step", "micro_batch")][0]  # same seed
    # uneven split: the first stage (which also holds the ViT) gets 1 of the 4 LM layers
    run_layout(weights, tp=1, pp=2, distributed_optimizer=False, out=out, name="tp1_pp2_dp4",
               first_stage_layers=1)
    run_layout(weights, tp=2, pp=2, distributed_optimizer=False, out=out, name="tp2_pp2_dp2")
    run_layout(weights, tp=2, pp=2, distributed_optimizer=True, out=out, name="tp2_pp2_dp2_step")
    run_layout(weights, tp=2, pp=2, distributed_optimizer=False, out=out, name="tp2_pp2_dp2_stepcon",
               contrastive_batch="step")
    for name, (tp, pp, batch) in SIGMOID_LAYOUTS.items():
        run_layout(sigmoid_weights, tp=tp, pp=pp, distributed_optimizer=False, out=out, name=name,
                   contrastive_batch=batch, contrastive_loss="sigmoid")
    mark_done(out)


if __name__ == "__main__":
    main()

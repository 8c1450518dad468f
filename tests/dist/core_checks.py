"""Core-engine equivalences on 2 gloo ranks: TP=2 == TP=1, DP=2 == DP=1, ragged L_con gather, and
`model.vision.image_tokens=pooled_values` at TP=2 and at PP=2 against its single-process reference.

Run by tests/training/test_core_parallel.py and tests/training/test_image_tokens_parallel.py; writes
result files that the tests compare.
"""

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from common import (collect_full, gather_cat, load_full_weights, mark_done, named_full, parse_out_dir, save_rank0,
                    tiny_model_config)
from megatron_lcl.config import LossConfig, ParallelConfig
from megatron_lcl.checkpoint import save_weights
from megatron_lcl.config import LCLConfig
from megatron_lcl.losses import LCLLoss, contrastive_loss_sum, generation_loss_sum
from megatron_lcl.models.factory import build_model
from megatron_lcl.models.lcl_model import LCLModel
from megatron_lcl.runtime import ParallelLayout, initialize_distributed, initialize_model_parallel, set_seed
from megatron_lcl.testing import random_batch, slice_batch
from megatron_lcl.training.pipeline import PipelineShape, forward_loss, step_forward_backward, wrap_ddp

SEED = 1234
CFG = tiny_model_config()
M = CFG.vision.num_image_tokens  # 5
# 4 samples, ragged images: rank 0 gets samples 0-1 (3 images, one at position 0), rank 1 gets 2-3 (1).
IMAGES = [[0, 20], [9], [30], []]
BATCH = random_batch(IMAGES, seq_length=48, num_image_tokens=M, image_size=16, vocab_size=192, seed=7,
                     pad_from=[None, 40, None, 44])


def build(parallel):
    set_seed(SEED)
    return LCLModel(CFG, parallel)


def terms_dict(terms):
    return {k: v.detach().clone() for k, v in terms.metrics().items()}


def run_reference(out):
    """TP=1, one process, whole batch: the ground truth (every rank computes it; rank 0 saves)."""
    model = build(ParallelConfig())
    terms = forward_loss(model, BATCH, LCLLoss(LossConfig()))
    terms.total.backward()
    save_rank0({"terms": terms_dict(terms), "params": named_full(model, None),
                "grads": named_full(model, None, "grad")}, out, "reference.pt")


def run_tp2(out):
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    initialize_model_parallel(parallel, SEED)
    model = build(parallel)
    tp = ps.get_tensor_model_parallel_group()
    terms = forward_loss(model, BATCH, LCLLoss(LossConfig(), ps.get_data_parallel_group()))
    terms.total.backward()
    save_rank0({"terms": terms_dict(terms), "params": named_full(model, tp),
                "grads": named_full(model, tp, "grad")}, out, "tp2.pt")
    # A TP=2 checkpoint for the HF-conversion round trip (tests/test_hf_convert.py), with the
    # full-vocabulary logits of this TP=2 model on BATCH to compare against.
    model.eval()
    with torch.no_grad():
        logits = model(BATCH.tokens, BATCH.position_ids, BATCH.images, BATCH.image_sample_index,
                       BATCH.boi_positions).logits
    full_logits = gather_cat(logits, tp, dim=-1).transpose(0, 1)  # [s, b, v/tp] -> [b, s, v]
    save_weights(model, LCLConfig(model=CFG), f"{out}/tp2_checkpoint")
    save_rank0({"logits": full_logits, "batch": BATCH}, out, "tp2_checkpoint_outputs.pt")



def run_dp2(out):
    parallel = ParallelConfig()
    initialize_model_parallel(parallel, SEED)
    model = build(parallel)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  model)
    rank = ps.get_data_parallel_rank()
    local = slice_batch(BATCH, slice(2 * rank, 2 * rank + 2))
    ddp.zero_grad_buffer()
    terms = forward_loss(ddp, local, LCLLoss(LossConfig(), ps.get_data_parallel_group()))
    terms.total.backward()
    ddp.finish_grad_sync()
    save_rank0({"terms": terms_dict(terms), "grads": named_full(ddp, None, "main_grad")}, out, "dp2.pt")


def run_ragged_contrastive(out):
    """Random features, ragged counts (rank 0: 3 rows, rank 1: 0 rows then 2 rows)."""
    group = ps.get_data_parallel_group()
    rank = dist.get_rank(group)
    g = torch.Generator().manual_seed(0)
    results = {}
    for case, counts in {"ragged": [3, 2], "empty_rank": [3, 0]}.items():
        feats = torch.nn.functional.normalize(torch.randn(sum(counts), 2, 8, generator=g), dim=-1)
        start = sum(counts[:rank])
        v = feats[start:start + counts[rank], 0].clone().requires_grad_(True)
        t = feats[start:start + counts[rank], 1].clone().requires_grad_(True)
        scale = torch.tensor(10.0, requires_grad=True)
        loss_sum, n_global, _ = contrastive_loss_sum(v, t, scale, group)
        # This rank's share of the global mean; the sum over ranks is the global mean.
        (loss_sum / n_global).backward()
        gv = [torch.zeros(max(counts), 8) for _ in counts]
        pad = torch.zeros(max(counts), 8)
        pad[:counts[rank]] = v.grad
        dist.all_gather(gv, pad, group=group)
        total = loss_sum.detach() / n_global
        dist.all_reduce(total, group=group)
        scale_grad = scale.grad.clone()
        dist.all_reduce(scale_grad, group=group)
        results[case] = {"features": feats, "loss": total, "scale_grad": scale_grad,
                         "v_grad": torch.cat([b[:c] for b, c in zip(gv, counts)])}
    save_rank0(results, out, "ragged_contrastive.pt")


# ---- model.vision.image_tokens=pooled_values: 2 micro-batches, L_con over the whole step (the default)
POOLED = replace(tiny_model_config(image_tokens="pooled_values"),
                 heads=replace(CFG.heads, embed_dim=CFG.lm.hidden_size))  # no W1: v has the LM width
M_POOLED = POOLED.vision.num_image_tokens  # 4: the patches (no class token)
POOLED_MBS = [random_batch([[0, 20], [9]], 48, M_POOLED, 16, 192, seed=21),  # the image at 0: no context
              random_batch([[30], [5, 26]], 48, M_POOLED, 16, 192, seed=22)]
POOLED_CON_WEIGHT = 0.1


def run_pooled_values_reference(out):
    """TP=PP=1, one process, written out: L_gen over the step's text targets + lambda x one InfoNCE over
    the step's images with context. Returns the initial weights for the parallel runs."""
    set_seed(SEED)
    model = LCLModel(POOLED, ParallelConfig())
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = sum(b.loss_mask.sum() for b in POOLED_MBS)
    gen, lm_losses, image_features, text_features = 0.0, [], [], []
    for b in POOLED_MBS:
        o = model(b.tokens, b.position_ids, b.images, b.image_sample_index, b.boi_positions)
        gen_sum, count = generation_loss_sum(o.logits, b.labels, b.loss_mask)
        gen, lm_losses = gen + gen_sum / targets, lm_losses + [(gen_sum / count).detach()]
        image_features.append(o.image_features[b.image_has_context])
        text_features.append(o.text_features[b.image_has_context])
    v, t = torch.cat(image_features), torch.cat(text_features)  # [N, e]: every image of the step
    logits, target = o.logit_scale * v @ t.T, torch.arange(len(v))  # [N, N]
    con = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    (gen + POOLED_CON_WEIGHT * con).backward()
    save_rank0({"lm_loss": torch.stack(lm_losses), "con_loss": con.detach(), "num_con_images": len(v),
                "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()}},
               out, "pooled_values_reference.pt")
    return weights


def run_pooled_values(weights, tp, pp, out, name):
    """The same step through the training path (`step_forward_backward`: feature pass, 1F1B) at TP x PP."""
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    initialize_model_parallel(parallel, SEED)
    layout = ParallelLayout.current()
    model = build_model(POOLED, parallel, first_stage=layout.is_first_stage, last_stage=layout.is_last_stage)
    load_full_weights(model, weights, ps.get_tensor_model_parallel_rank(), tp)
    ddp = wrap_ddp(model, parallel)
    ddp.zero_grad_buffer()
    loss_fn = LCLLoss(LossConfig(contrastive_batch="step", con_weight=POOLED_CON_WEIGHT), layout.dp_group)
    metrics = step_forward_backward(ddp, POOLED_MBS, len(POOLED_MBS), loss_fn,
                                    PipelineShape.for_model(POOLED, 48, 2), layout)
    grads = collect_full(ddp, ps.get_tensor_model_parallel_group(), "main_grad")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, metrics)  # the losses live on the last stage
    save_rank0({"terms": next(m for m in gathered if m), "grads": grads}, out, f"{name}.pt")


def main():
    out = parse_out_dir()
    initialize_distributed(ParallelConfig(), SEED)
    run_ragged_contrastive(out)
    run_reference(out)
    run_tp2(out)
    run_dp2(out)
    weights = run_pooled_values_reference(out)
    run_pooled_values(weights, tp=2, pp=1, out=out, name="pooled_values_tp2")
    run_pooled_values(weights, tp=1, pp=2, out=out, name="pooled_values_pp2")
    mark_done(out)


if __name__ == "__main__":
    main()

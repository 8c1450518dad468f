"""Performance knobs == their defaults, on 2 gloo ranks (DP=2), through the trainer's own `train_step`.

Every variant trains the same tiny model (dropout 0.1 in ViT and LM, drop-path 0.2) from the same
weights for 2 steps of 2 micro-batches per rank, with `loss.contrastive_batch=step` (a no-grad feature
pass, the RNG put back, then the training pass): the recomputed layers must redraw the masks of both.
Step 2 is the one that matters for overlap_grad_reduce: megatron-core reduces synchronously in the
first step and from the backward hooks after it.

    reference             every knob at its default (DDP, all-reduce after backward)
    selective             recompute_granularity=selective (core_attn)
    full_uniform          full, uniform, 2 layers per chunk (ViT 2 layers, LM 4)
    full_block            full, block, the first layer of each block
    overlap_grad          overlap_grad_reduce, bucket_size 3000 (several buckets)
    distopt_overlap_grad  distributed optimizer + overlap_grad_reduce, bucket_size 3000
    distopt_overlap_param ... + overlap_param_gather
    pp2_reference         PP=2 (DP=1): v_i carried between stages through megatron-core's 1F1B schedule
    pp2_knobs             PP=2 with full uniform recompute and overlap_grad_reduce (bucket_size 3000)

Writes OUT/<variant>.pt (rank 0) for tests/training/test_perf_knobs.py to compare.
"""

import os
from dataclasses import replace

import torch
import torch.distributed as dist
from megatron.core.transformer.transformer_layer import TransformerLayer

from common import mark_done, parse_out_dir, save_rank0, tiny_model_config
from megatron_lcl.config import (DataConfig, LCLConfig, LoggingConfig, LossConfig, OptimizerConfig,
                                 ParallelConfig, TrainConfig)
from megatron_lcl.testing import random_batch
from megatron_lcl.training.optim import sync_params
from megatron_lcl.training.trainer import Trainer

DROPOUT = dict(attention_dropout=0.1, hidden_dropout=0.1)
CFG = tiny_model_config(drop_path_rate=0.2, **DROPOUT)
CFG = replace(CFG, lm=replace(CFG.lm, **DROPOUT))
M = CFG.vision.num_image_tokens  # 5
STEPS, MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ = 2, 2, 2, 48
IMAGES = [[[0, 20], [9]], [[30], [5, 25]]]  # <BoI> positions per sample, per micro-batch

BUCKET = dict(overlap_grad_reduce=True, bucket_size=3000)
DISTOPT = dict(use_distributed_optimizer=True, **BUCKET)
VARIANTS = {
    "reference": {},
    "selective": dict(recompute_granularity="selective"),
    "full_uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full_block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "overlap_grad": BUCKET,
    "distopt_overlap_grad": DISTOPT,
    "distopt_overlap_param": dict(overlap_param_gather=True, **DISTOPT),
    "pp2_reference": dict(pipeline_model_parallel_size=2),
    "pp2_knobs": dict(pipeline_model_parallel_size=2, recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=2, **BUCKET),
}


def local_batches(dp_rank: int) -> list:
    """This rank's micro-batches of every step, in order (different per step, micro-batch and rank).

    DP rank 1's last micro-batch of the last step holds no image: the image path then gets no real
    gradient there, yet every rank must run the same backward (the L_con gather, the DDP buckets)."""
    def images(step, mb):
        return [[], []] if (dp_rank, step, mb) == (1, STEPS - 1, MICRO_BATCHES - 1) else IMAGES[mb]
    return [random_batch(images(step, mb), seq_length=SEQ, num_image_tokens=M, image_size=CFG.vision.image_size,
                         vocab_size=CFG.lm.vocab_size, seed=100 * step + 10 * mb + dp_rank)
            for step in range(STEPS) for mb in range(MICRO_BATCHES)]


class InMemoryBatches(list):
    """Fixed batches as the trainer's loader. Both pipeline stages hold the same list and drop nothing,
    so the stages' reader positions (`slots_consumed`, compared every step under PP) agree."""

    slots_consumed = 0


class InMemoryTrainer(Trainer):
    """The real trainer (setup, DDP, optimizer, `train_step`) reading fixed batches instead of shards."""

    def build_loader(self):
        return InMemoryBatches(local_batches(self.layout.dp_rank))


def run_config(out: str, name: str, knobs: dict) -> LCLConfig:
    dp_size = 2 // knobs.get("pipeline_model_parallel_size", 1)
    return LCLConfig(
        model=CFG, parallel=ParallelConfig(**knobs), loss=LossConfig(contrastive_batch="step"),
        data=DataConfig(path=["in-memory"], tokenizer="in-memory", seq_length=SEQ,
                        micro_batch_size=MICRO_BATCH_SIZE),
        train=TrainConfig(global_batch_size=MICRO_BATCH_SIZE * MICRO_BATCHES * dp_size, train_steps=STEPS,
                          drop_path_ramp_steps=0),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0),
        logging=LoggingConfig(console=False, tensorboard=False),
        run_dir=os.path.join(out, name))


def count_forward_calls(model) -> dict:
    """{module name: forward calls} for every transformer layer, its core attention and MLP."""
    counts, names = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, TransformerLayer):
            for part, sub in (("layer", module), ("core_attn", module.self_attention.core_attention),
                              ("mlp", module.mlp)):
                names[sub] = f"{name}:{part}"
    for sub, key in names.items():
        counts[key] = 0
        sub.register_forward_pre_hook(lambda m, _args, key=key: counts.__setitem__(key, counts[key] + 1))
    return counts


def on_every_rank(local: dict) -> dict:
    """{"rank<r>/<name>": tensor} of every rank (DP replicas, or the pipeline stages' own parameters)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return {f"rank{r}/{n}": t for r, d in enumerate(everyone) for n, t in d.items()}


def params(model) -> dict:
    return on_every_rank({n: p.detach().clone() for n, p in model.named_parameters()})


def main_grads(model) -> dict:
    return on_every_rank({n: p.main_grad.detach().clone() for n, p in model.named_parameters()})


def max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def run_variant(out: str, name: str, knobs: dict) -> dict:
    trainer = InMemoryTrainer(run_config(out, name, knobs)).setup()
    try:
        initial = params(trainer.model)
        counts = count_forward_calls(trainer.model)
        stats = [trainer.train_step(trainer.next_batches()) for _ in range(STEPS)]
        grads = main_grads(trainer.model)
        before_sync = params(trainer.model)
        sync_params(trainer.ddp)
        final = params(trainer.model)
        stale = max((before_sync[n] - final[n]).abs().max().item() for n in final)
        return {"stats": [{k: s[k] for k in ("loss", "lm_loss", "con_loss", "con_top1", "grad_norm")}
                          for s in stats],
                "initial": initial, "params": final, "main_grads": grads, "forward_calls": dict(counts),
                "bucket_groups": len(trainer.ddp.bucket_groups), "stale_before_sync": max_over_ranks(stale)}
    finally:
        trainer.close()


def main():
    out = parse_out_dir()
    for name, knobs in VARIANTS.items():
        save_rank0(run_variant(out, name, knobs), out, f"{name}.pt")
    mark_done(out)


if __name__ == "__main__":
    main()

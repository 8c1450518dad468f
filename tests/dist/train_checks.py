"""Training-driver checks on 2 gloo ranks (run once by tests/training/test_training.py; it prepares the data).

- preempt:  DP=2 + distributed optimizer. 4 steps straight vs SIGTERM delivered to rank 1 only
            during step 2 -> both ranks stop after step 2, save, and a resumed run finishes steps 3-4.
- reshard:  a checkpoint saved at TP=2 (resp. PP=2) loads at TP=1 x DP=2 (resp. PP=1 x DP=2) with
            the same loss on the same global batch, then trains on (optimizer state resharded too).
Results go to OUT/*.json for the tests to compare.
"""

import json
import os
import signal

import torch.distributed as dist
from megatron.core import parallel_state as ps

from common import mark_done, parse_out_dir, save_json_rank0, tiny_run_config
from megatron_lcl.losses import LCLLoss
from megatron_lcl.testing import random_batch, slice_batch
from megatron_lcl.training.pipeline import forward_backward
from megatron_lcl.training.trainer import Trainer



config = tiny_run_config


def run(cfg, trainer_cls=Trainer) -> str:
    trainer = trainer_cls(cfg).setup()
    try:
        return trainer.train()
    finally:
        trainer.close()


def rows(cfg) -> list:
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


class SigtermDuringStep2(Trainer):
    """Rank 1 receives a real SIGTERM in the middle of step 2; rank 0 never does."""

    def train_step(self, batches, collect_features=False):
        if self.state.step == 1 and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().train_step(batches, collect_features)


def check_preempt(out: str) -> dict:
    extra = ("parallel.use_distributed_optimizer=true",)
    straight = config(out, "straight", *extra)
    run(straight)
    preempted = config(out, "preempted", *extra)
    first = run(preempted, SigtermDuringStep2)
    saved = sorted(os.listdir(os.path.join(preempted.run_dir, "checkpoints")))
    second = run(preempted)
    return {"statuses": [first, second], "saved_after_signal": saved,
            "straight": rows(straight), "preempted": rows(preempted)}


def global_batch():
    return random_batch([[2, 25], [10], [30], [0, 40]], seq_length=64, num_image_tokens=17, image_size=32,
                        vocab_size=200, seed=3)


def eval_loss(trainer) -> float:
    """Loss of the model on `global_batch()`, split over the DP ranks (forward only)."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = 4 // dp
    local = slice_batch(global_batch(), slice(rank * per_rank, (rank + 1) * per_rank))
    shape = trainer.shape.__class__(trainer.shape.seq_length, per_rank, trainer.shape.carry_rows)
    metrics = forward_backward(trainer.ddp, iter([local, local]), 1,
                               LCLLoss(trainer.cfg.loss, ps.get_data_parallel_group()), shape, trainer.layout,
                               forward_only=True)
    value = [float(metrics[0]["loss"]) if metrics and ps.get_tensor_model_parallel_rank() == 0 and rank == 0
             else 0.0]
    obj = [None] * dist.get_world_size()
    dist.all_gather_object(obj, value[0])
    return sum(obj)


def check_reshard(out: str, layout: str) -> dict:
    """Save at `layout` (TP=2 or PP=2), load at TP=PP=1 x DP=2, same loss on the same batch."""
    saved_cfg = config(out, f"{layout}_saved", f"parallel.{layout}=2", "train.train_steps=2",
                       "data.micro_batch_size=4")
    trainer = Trainer(saved_cfg).setup()
    trainer.train()
    loss_saved = eval_loss(trainer)
    trainer.close()
    loaded_cfg = config(out, f"{layout}_loaded", "train.train_steps=3", "optimizer.override_scheduler=true",
                        f"checkpoint.load={os.path.join(saved_cfg.run_dir, 'checkpoints')}")
    trainer = Trainer(loaded_cfg).setup()
    loss_loaded = eval_loss(trainer)
    resumed_step = trainer.state.step
    status = trainer.train()
    trainer.close()
    return {"loss_saved": loss_saved, "loss_loaded": loss_loaded, "resumed_step": resumed_step,
            "status": status, "rows": rows(loaded_cfg)}


def main():
    out = parse_out_dir()
    results = {"preempt": check_preempt(out)}
    for layout in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        results[layout] = check_reshard(out, layout)
    save_json_rank0(results, out, "train_checks.json")
    mark_done(out)


if __name__ == "__main__":
    main()

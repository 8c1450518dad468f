"""Data-parallel size changes on 2 gloo ranks, run by tests/training/test_dp_resume.py (which runs the DP=1 halves
in its own process before and after this launch).

- up:    the DP=1 run `dp1` (3 steps, saved) continues here at DP=2 to step 6.
- down:  a DP=2 run `dp2` of 3 steps, saved, for the test to continue at DP=1.
Both record the documents each step consumed ("shard:key", over all DP ranks) and fingerprints of
the model and optimizer state right after the load / right before the save. Results: OUT/dp_checks.json.
"""

import os
import shutil

import torch
import torch.distributed as dist

from common import mark_done, parse_out_dir, save_json_rank0, tiny_run_config
from megatron_lcl.config import ParallelConfig
from megatron_lcl.runtime import initialize_distributed
from megatron_lcl.runtime.mcore_compat import chained_optimizers
from megatron_lcl.training.trainer import Trainer



def dp_resume_config(out: str, run: str, *overrides: str):
    # The resumed runs extend train.train_steps (3 -> 6): the new LR schedule is asked for explicitly.
    return tiny_run_config(out, run, "parallel.use_distributed_optimizer=true", "optimizer.override_scheduler=true",
                           *overrides)


def fingerprints(trainer) -> dict:
    """Layout-independent sums of the model's parameters and of the optimizer's Adam moments."""
    params = sum(float(p.detach().double().sum()) for p in trainer.model.parameters())
    moments = torch.zeros(1, dtype=torch.float64)
    for opt in chained_optimizers(trainer.optimizer):
        for state in opt.optimizer.state.values():
            moments += state["exp_avg"].double().sum() + state["exp_avg_sq"].double().sum()
    dist.all_reduce(moments, group=trainer.layout.dp_group)  # the distributed optimizer shards them over DP
    return {"params": params, "moments": float(moments)}


def recorded_run(cfg) -> dict:
    """Resume (if saved), train, save; the documents each loader handed out, over all DP ranks."""
    trainer = Trainer(cfg).setup()
    start = {"step": trainer.state.step, **fingerprints(trainer)}
    consumed, inner = [], trainer.data_iter

    def recording():
        for batch in inner:
            consumed.extend(o for sample in trainer.loader.last_batch_origins for o in sample)
            yield batch

    trainer.data_iter = recording()
    try:
        trainer.train()
        end = fingerprints(trainer)
    finally:
        trainer.close()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, consumed)
    return {"start": start, "end": end, "consumed": [o for c in everyone for o in c]}


def main():
    out = parse_out_dir()
    initialize_distributed(ParallelConfig())  # the trainers below reuse this process group
    if dist.get_rank() == 0:
        shutil.copytree(os.path.join(out, "dp1"), os.path.join(out, "up"))
    dist.barrier()
    results = {"up": recorded_run(dp_resume_config(out, "up", "train.train_steps=6")),
               "down": recorded_run(dp_resume_config(out, "dp2", "train.train_steps=3"))}
    save_json_rank0(results, out, "dp_checks.json")
    mark_done(out)


if __name__ == "__main__":
    main()

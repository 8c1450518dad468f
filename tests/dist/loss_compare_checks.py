"""Loss compare across parallel layouts and micro-batch splits (run by tests/training/test_loss_compare.py,
which runs the world-size-1 runs in its own process): the whole driver (loader, model, schedule,
optimizer) trains the same however a step is laid out over ranks and split into micro-batches.

Every run trains 12 steps of the same global batch (8 samples) from the same initial weights (OUT/init,
saved by the test at DP=1: pipeline stages seed their layers by stage, so "the same seed" alone would
not give PP=2 the same model), with dropout and drop-path 0 and the step's negatives
(`loss.contrastive_batch=step`). L_gen is normalised over the step's text targets, so the split into
micro-batches (micro-batch size x DP) changes nothing either: the runs below split a step into 1, 2 or 4
global micro-batches on purpose. Worker counts differ too: the data order depends on none of this.

One launch of 4 ranks runs every multi-rank layout in turn (one process start for all of them):
- dp4:     DP 4, micro-batch 2, 1 micro-batch a step (checkpoints at step 6, which the test resumes at DP 1)
- tp2_dp2: TP 2 x DP 2, micro-batch 4, 1 micro-batch a step
- pp2_dp2: PP 2 x DP 2, micro-batch 1, 4 micro-batches a step (the last stage's loader is labels-only)
- tp2_pp2: TP 2 x PP 2, micro-batch 4, 2 micro-batches a step
Each run's metrics.jsonl (written by rank 0) is what the test compares.
"""

import os

import torch.distributed as dist

from common import mark_done, parse_out_dir, tiny_run_config
from megatron_lcl.config import ParallelConfig
from megatron_lcl.runtime import initialize_distributed
from megatron_lcl.training.trainer import Trainer

STEPS = 12
SAVE_STEP = 6  # dp4 saves here; the test resumes it at DP 1
GLOBAL_BATCH = 8

# run name -> (micro-batch size, overrides); by world size (world size 1: in the test's process)
LAYOUTS = {
    1: {"dp1": (4, ["data.num_workers=0"]),  # the reference: 2 micro-batches of 4
        "dp1_mb8": (8, ["data.num_workers=1"])},  # differs in the micro-batch size only: 1 of 8
    4: {"dp4": (2, ["data.num_workers=2", f"checkpoint.save_interval={SAVE_STEP}"]),
        "tp2_dp2": (4, ["parallel.tensor_model_parallel_size=2", "data.num_workers=1"]),
        "pp2_dp2": (1, ["parallel.pipeline_model_parallel_size=2", "data.num_workers=0"]),
        "tp2_pp2": (4, ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
                        "data.num_workers=1"])},
}


def layout_config(out: str, run: str, micro_batch_size: int, *overrides: str, weights: str = "init"):
    """The compared run `run`; `weights`: the checkpoint it starts from (under OUT)."""
    load = [f"checkpoint.load={os.path.join(out, weights)}"] + (["checkpoint.load_optimizer=false"]
                                                                 if weights == "init" else [])
    return tiny_run_config(
        out, run, f"train.train_steps={STEPS}", f"train.global_batch_size={GLOBAL_BATCH}",
        f"data.micro_batch_size={micro_batch_size}", "model.vision.drop_path_rate=0",
        "train.drop_path_ramp_steps=0", "loss.contrastive_batch=step", *load, *overrides)


def train(cfg) -> str:
    trainer = Trainer(cfg).setup()
    try:
        return trainer.train()
    finally:
        trainer.close()


def main():
    out = parse_out_dir()
    initialize_distributed(ParallelConfig())  # the trainers below reuse this process group
    for run, (micro_batch_size, overrides) in LAYOUTS[dist.get_world_size()].items():
        status = train(layout_config(out, run, micro_batch_size, *overrides))
        assert status == "completed", f"{run}: {status}"
    mark_done(out)


if __name__ == "__main__":
    main()

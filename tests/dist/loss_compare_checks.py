"""Loss compare across parallel layouts (run by tests/training/test_loss_compare.py, which runs the DP=1 runs in its
own process): the whole driver (loader, model, schedule, optimizer) at another layout trains the same.

Every layout trains 20 steps of the same global batch (8 samples: 2 global micro-batches of 4, so
micro_batch_size = 4 / DP) from the same initial weights (OUT/init, saved by the test at DP=1: pipeline
stages seed their layers by stage, so "the same seed" alone would not give PP=2 the same model), with
dropout and drop-path 0 and the step's negatives (`loss.contrastive_batch=step`). Layouts and worker
counts differ on purpose: the data order depends on neither.

- 2 ranks: dp2 (2 workers per rank; checkpoints at step 10, which the test resumes at DP=1), tp2, pp2
- 4 ranks: tp2_dp2
Each run's metrics.jsonl (written by rank 0) is what the test compares.
"""

import os

import torch.distributed as dist

from common import mark_done, parse_out_dir, tiny_run_config
from megatron_lcl.config import ParallelConfig
from megatron_lcl.runtime import initialize_distributed
from megatron_lcl.training.trainer import Trainer

STEPS = 20
GLOBAL_BATCH = 8
GLOBAL_MICRO_BATCH = 4  # samples of one micro-batch over all DP ranks: the same at every layout

# run name -> (DP size, overrides); by world size
LAYOUTS = {
    1: {"dp1": (1, ["data.num_workers=0"])},
    2: {"dp2": (2, ["data.num_workers=2", "checkpoint.save_interval=10"]),
        "tp2": (1, ["parallel.tensor_model_parallel_size=2", "data.num_workers=1"]),
        "pp2": (1, ["parallel.pipeline_model_parallel_size=2", "data.num_workers=0"])},
    4: {"tp2_dp2": (2, ["parallel.tensor_model_parallel_size=2", "data.num_workers=1"])},
}


def layout_config(out: str, run: str, dp: int, *overrides: str, weights: str = "init"):
    """The compared run `run` at DP size `dp`; `weights`: the checkpoint it starts from (under OUT)."""
    load = [f"checkpoint.load={os.path.join(out, weights)}"] + (["checkpoint.load_optimizer=false"]
                                                                 if weights == "init" else [])
    return tiny_run_config(
        out, run, f"train.train_steps={STEPS}", f"train.global_batch_size={GLOBAL_BATCH}",
        f"data.micro_batch_size={GLOBAL_MICRO_BATCH // dp}", "model.vision.drop_path_rate=0",
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
    for run, (dp, overrides) in LAYOUTS[dist.get_world_size()].items():
        status = train(layout_config(out, run, dp, *overrides))
        assert status == "completed", f"{run}: {status}"
    mark_done(out)


if __name__ == "__main__":
    main()

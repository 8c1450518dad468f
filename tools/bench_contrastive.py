"""Benchmark: the cost of step-wide contrastive negatives (`loss.contrastive_batch=step`) against
per-micro-batch ones, on CPU: step time and peak memory (each mode in its own process).

    python tools/bench_contrastive.py                        # tiny preset
    python tools/bench_contrastive.py --model b16 --seq-length 512 --micro-batches 2 --steps 2

Peak memory is the process's peak resident set size (ru_maxrss) minus the resident size after the
model was built, i.e. what the steps add (activations, gradients, the feature cache). Prints figures
and the FLOPs model's prediction; it is not a test.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from megatron_lcl.config import (LM_PRESETS, VISION_PRESETS, HeadsConfig, LMConfig, LossConfig, ModelConfig,
                                 ParallelConfig, VisionConfig, apply_preset)
from megatron_lcl.losses import LCLLoss
from megatron_lcl.models.factory import build_model
from megatron_lcl.models.flops import step_flops
from megatron_lcl.runtime import ParallelLayout, initialize_distributed
from megatron_lcl.testing import random_batch
from megatron_lcl.training.pipeline import PipelineShape, step_forward_backward


def model_config(name: str):
    vision, lm, embed = {"tiny": ("tiny", "tiny", 64), "b16": ("B/16", "opt-125m", 512)}[name]
    return ModelConfig(vision=apply_preset(VisionConfig(preset=vision), VISION_PRESETS),
                       lm=apply_preset(LMConfig(preset=lm, vocab_size=50272 if name == "b16" else 1000), LM_PRESETS),
                       heads=HeadsConfig(embed_dim=embed, pool_num_heads=8 if name == "b16" else 4),
                       transformer_impl="local")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    initialize_distributed(ParallelConfig())
    cfg = model_config(args.model)
    model = build_model(cfg, ParallelConfig()).train()
    m, s = cfg.vision.num_image_tokens, args.seq_length
    positions = [p for p in (1, s // 2) if p + m + 2 < s]  # images per sample with text before them
    batches = [random_batch([positions] * args.micro_batch_size, s, m, cfg.vision.image_size, cfg.lm.vocab_size,
                            seed=k) for k in range(args.micro_batches)]
    shape = PipelineShape(s, args.micro_batch_size, carry_rows=1)
    modes = ("micro_batch", "step") if args.mode == "both" else (args.mode,)
    base_mb, times = peak_rss_mb(), {mode: [] for mode in modes}
    for _ in range(args.steps + 1):  # the first round warms up; modes alternate (fair under load)
        for mode in modes:
            loss_fn = LCLLoss(LossConfig(contrastive_batch=mode), None)
            t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            step_forward_backward(model, batches, args.micro_batches, loss_fn, shape, ParallelLayout.current())
            times[mode].append(time.perf_counter() - t0)
    return {"step_time_s": {mode: min(t[1:]) for mode, t in times.items()},
            "peak_added_mb": peak_rss_mb() - base_mb,
            "images_per_step": len(positions) * args.micro_batch_size * args.micro_batches}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "b16"), default="tiny")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=("step", "micro_batch", "both"), help=argparse.SUPPRESS)  # worker
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(worker(args)))
        return
    results = {}
    for mode in ("micro_batch", "step", "both"):  # peak memory: one mode per process; time: alternating
        out = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                              f"--mode={mode}"], capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    memory = {mode: results[mode]["peak_added_mb"] for mode in ("micro_batch", "step")}
    times = results["both"]["step_time_s"]
    print(f"model {args.model}, seq {args.seq_length}, {args.micro_batches} micro-batches of {args.micro_batch_size}, "
          f"{results['both']['images_per_step']} images per step")
    for mode in ("micro_batch", "step"):
        print(f"  {mode:<12} step_time_s {times[mode]:.3f}   peak memory added {memory[mode]:.0f} MB")
    print(f"  step / micro_batch: time x{times['step'] / times['micro_batch']:.2f} (FLOPs model "
          f"x{predicted_ratio(args):.2f}), peak memory x{memory['step'] / max(memory['micro_batch'], 1e-9):.2f}")


def predicted_ratio(args) -> float:
    cfg = model_config(args.model)
    per_sample = len([p for p in (1, args.seq_length // 2) if p + cfg.vision.num_image_tokens + 2 < args.seq_length])
    samples = args.micro_batch_size * args.micro_batches
    micro = step_flops(cfg, args.seq_length, per_sample, samples, contrastive_negatives=per_sample * args.micro_batch_size)
    step = step_flops(cfg, args.seq_length, per_sample, samples, contrastive_negatives=per_sample * samples,
                      feature_pass=True)
    return step["total"] / micro["total"]


if __name__ == "__main__":
    main()

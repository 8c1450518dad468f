"""Benchmark: the cost of step-wide contrastive negatives (`loss.contrastive_batch=step`) against
per-micro-batch ones, on CPU: step time and peak memory (each mode in its own process).

    python tools/bench_contrastive.py                        # tiny preset
    python tools/bench_contrastive.py --model b16 --seq-length 512 --micro-batches 2 --steps 2

Peak memory is the process's peak resident set size (ru_maxrss) minus the resident size after the
model was built, i.e. what the steps add (activations, gradients, the feature cache). Prints figures
and the FLOPs model's prediction; it is not a test.

    python tools/bench_contrastive.py --loss-memory --dp 1 2 4 --local-batch 512 --embed-dim 512

`--loss-memory`: the contrastive loss alone (forward + backward) on DP gloo ranks at a fixed local batch,
per rank: the ring sigmoid loss (`megatron_lcl.losses.sigmoid`), the same loss with every text
all-gathered first (open_clip's way), and the gathered InfoNCE. Peak memory here is counted by a
tracking allocator of the tensors the loss creates (`PeakTensorBytes`: a dispatch mode that adds each
new storage's bytes when an op returns it and subtracts them when the storage is freed), so neither the
allocator's caching nor the process's other memory blurs it; the inputs (made before) are not counted.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron_lcl.config import (LM_PRESETS, VISION_PRESETS, HeadsConfig, LMConfig, LossConfig, ModelConfig,
                                 ParallelConfig, VisionConfig, apply_preset)
from megatron_lcl.losses import LCLLoss
from megatron_lcl.models.factory import build_model
from megatron_lcl.models.flops import step_flops
from megatron_lcl.runtime import ParallelLayout, initialize_distributed
from megatron_lcl.runtime.distributed import free_port
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


class PeakTensorBytes(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created under it (module docstring)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages = set()

    def _freed(self, key, nbytes):
        self.live -= nbytes
        self.storages.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if storage.nbytes() and key not in self.storages:
                    self.storages.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


LOSSES = ("ring sigmoid", "gathered sigmoid", "gathered InfoNCE")


def _loss_memory_rank(rank: int, world: int, port: int, n: int, e: int, out: str):
    from megatron_lcl.losses.contrastive import contrastive_loss_sum
    from megatron_lcl.losses.sigmoid import gathered_sigmoid_loss_sum, sigmoid_loss_sum

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group, counts = dist.group.WORLD, [n] * world
    g = torch.Generator().manual_seed(rank)
    v0, t0 = (F.normalize(torch.randn(n, e, generator=g), dim=-1) for _ in range(2))
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    run = {"ring sigmoid": lambda v, t: sigmoid_loss_sum(v, t, scale, bias, group, counts)[0],
           "gathered sigmoid": lambda v, t: gathered_sigmoid_loss_sum(v, t, scale, bias, group, counts)[0],
           "gathered InfoNCE": lambda v, t: contrastive_loss_sum(v, t, scale, group, counts)[0]}
    peaks = {}
    for name in LOSSES:
        v, t = v0.clone().requires_grad_(), t0.clone().requires_grad_()
        dist.barrier()
        with PeakTensorBytes() as tracker:
            run[name](v, t).backward()
        peaks[name] = tracker.peak
    json.dump(peaks, open(os.path.join(out, f"rank{rank}.json"), "w"))
    dist.destroy_process_group()


def loss_memory(args) -> dict:
    """{dp: {loss: the largest peak of any rank, bytes}} for each DP size of `args.dp`."""
    import tempfile

    table = {}
    for dp in args.dp:
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(_loss_memory_rank, args=(dp, free_port(), args.local_batch, args.embed_dim, out), nprocs=dp)
            ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(dp)]
        table[dp] = {name: max(r[name] for r in ranks) for name in LOSSES}
    print(f"peak tensor memory of the contrastive loss per rank (forward + backward), MiB; local batch "
          f"{args.local_batch}, embed dim {args.embed_dim}, fp32")
    print(f"{'DP':>4} " + "".join(f"{name:>18}" for name in LOSSES))
    for dp, row in table.items():
        print(f"{dp:>4} " + "".join(f"{row[name] / 2 ** 20:>18.2f}" for name in LOSSES))
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "b16"), default="tiny")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=("step", "micro_batch", "both"), help=argparse.SUPPRESS)  # worker
    p.add_argument("--loss-memory", action="store_true", help="the loss's peak memory per rank (docstring)")
    p.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4], help="--loss-memory: DP sizes (gloo ranks)")
    p.add_argument("--local-batch", type=int, default=512, help="--loss-memory: images per rank")
    p.add_argument("--embed-dim", type=int, default=512, help="--loss-memory: e")
    args = p.parse_args(argv)
    if args.loss_memory:
        loss_memory(args)
        return
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

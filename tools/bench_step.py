"""Benchmark: parameter counts by group for the paper's models, and fwd+bwd step time on CPU.

    python tools/bench_step.py                  # counts, then tiny-preset step time at TP=1 and TP=2
    python tools/bench_step.py --skip-counts    # step times only
    python tools/bench_step.py --compare-knobs  # training-step time of each performance knob, side by side
    python tools/bench_step.py --compare-knobs --nproc 8 --vision-preset B/16 --lm-preset opt-125m \
        --seq-length 2048 --images-per-sample 4 --batch-size 4       # at paper size on 8 GPUs

Prints figures; it is not a test. Step timing launches itself under torchrun (gloo on CPU, nccl on GPU).
Beside each step time: the model FLOP/s (`models.flops.step_flops`: the LM's causal attention counted
at s²/2 as SDPA's kernels run it; the full-s² count beside it), MFU against the spec-sheet peak where
the device has one (none for a CPU), and the fraction of a matmul peak measured in each rank.
`--compare-knobs` times the trainer's step (DDP, optimizer, the feature pass of step-wide L_con) for
every setting in `KNOB_SETTINGS` on the same batches at DP = --nproc, with peak memory on GPU (what
recomputation buys), and names the fastest. The knobs and their equivalence: tests/training/test_perf_knobs.py.
"""

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_lcl.config import (LM_PRESETS, VISION_PRESETS, HeadsConfig, LMConfig, LossConfig, ModelConfig,
                                 OptimizerConfig, ParallelConfig, PrecisionConfig, VisionConfig, apply_preset)
from megatron_lcl.losses import LCLLoss
from megatron_lcl.models.factory import build_model
from megatron_lcl.models.flops import count_parameters_by_group, mfu, spec_peak_flops_per_s, step_flops
from megatron_lcl.models.lcl_model import LCLModel
from megatron_lcl.runtime import device, free_port, initialize_distributed, set_seed, to_device
from megatron_lcl.testing import measure_matmul_peak, random_batch, spread_image_positions
from megatron_lcl.training.optim import build_optimizer
from megatron_lcl.training.pipeline import PipelineShape, forward_loss, step_forward_backward, wrap_ddp


def parameter_counts():
    initialize_distributed(ParallelConfig())
    lm = apply_preset(LMConfig(preset="opt-125m", vocab_size=50272, make_vocab_size_divisible_by=8),
                      LM_PRESETS)
    print(f"{'model':<24}{'vit':>14}{'projector':>12}{'lm':>14}{'heads':>12}{'total':>14}")
    for vit in ("B/16", "L/14"):
        cfg = ModelConfig(vision=apply_preset(VisionConfig(preset=vit), VISION_PRESETS), lm=lm,
                          heads=HeadsConfig(embed_dim=512, pool_num_heads=8), transformer_impl="local")
        model = LCLModel(cfg, ParallelConfig())
        c = count_parameters_by_group(model)
        print(f"{'ViT-' + vit + ' + OPT-125M':<24}{c['vit']:>14,}{c['projector']:>12,}{c['lm']:>14,}"
              f"{c['heads']:>12,}{c['total']:>14,}")
        del model
    print("published: ViT-B/16 ~86 M, ViT-L/14 ~303 M, OPT-125M ~125 M (vocab 50272, 2048 positions)")


def step_worker(args):
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp)
    initialize_distributed(parallel)
    cfg = ModelConfig(vision=apply_preset(VisionConfig(preset="tiny"), VISION_PRESETS),
                      lm=apply_preset(LMConfig(preset="tiny", vocab_size=1000), LM_PRESETS),
                      transformer_impl="local")
    model = LCLModel(cfg, parallel)
    M = cfg.vision.num_image_tokens
    batch = random_batch([[4, 60, 120]] * args.batch_size, seq_length=args.seq_length, num_image_tokens=M,
                         image_size=cfg.vision.image_size, vocab_size=1000)
    loss_fn = LCLLoss(LossConfig(), ps.get_data_parallel_group())
    times = []
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        forward_loss(model, batch, loss_fn).total.backward()
        times.append(time.perf_counter() - t0)
    matmul_peak = measure_matmul_peak(device(), torch.float32)  # per rank, after the timed steps
    if dist.get_rank() == 0:
        steady = sorted(times[2:])[len(times[2:]) // 2]
        tokens = args.batch_size * args.seq_length
        print(f"tiny preset, TP={args.tp}: fwd+bwd step_time_s={steady:.4f} (median of {args.steps}), "
              f"tokens_per_s={tokens / steady:,.0f}, images_per_s={3 * args.batch_size / steady:,.1f}")
        print("  " + flops_line(cfg, args, steady, matmul_peak))


def flops_line(cfg: ModelConfig, args, step_time_s: float, matmul_peak: float) -> str:
    """Model FLOP/s of the timed forward + backward (3 images per sample, L_con over the batch's images),
    MFU over the spec peak of `args.tp` devices (none on a CPU), and the fraction of TP x the matmul peak."""
    images = 3 * args.batch_size
    achieved = {count: step_flops(cfg, args.seq_length, 3, samples=args.batch_size, contrastive_negatives=images,
                                  attention_count=count, tensor_model_parallel_size=args.tp)["total"] / step_time_s
                for count in ("causal", "full")}
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    spec = spec_peak_flops_per_s(name, "fp32")  # the timed step runs in fp32: no spec-sheet entry
    model_mfu = f"{mfu(achieved['causal'], spec, args.tp):.1%}" if spec else f"none (no spec-sheet peak: {name}, fp32)"
    return (f"model GFLOP/s {achieved['causal'] / 1e9:.2f} (causal attention at s^2/2; "
            f"{achieved['full'] / 1e9:.2f} counting the full s^2), MFU {model_mfu}, "
            f"{mfu(achieved['causal'], matmul_peak, args.tp):.1%} of {args.tp} x a measured fp32 matmul peak "
            f"({matmul_peak / 1e9:.2f} GFLOP/s per rank)")


# --------------------------------------------------------------------------------- --compare-knobs

# name -> ParallelConfig fields (docs/training.md "Performance knobs"); every one gives the default's numbers.
KNOB_SETTINGS = {
    "default": {},
    "recompute_selective": dict(recompute_granularity="selective"),
    "recompute_full_uniform_1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "recompute_full_block_1": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "overlap_grad_reduce": dict(overlap_grad_reduce=True),
    "distributed_optimizer": dict(use_distributed_optimizer=True),
    "distopt_overlap_grad_param": dict(use_distributed_optimizer=True, overlap_grad_reduce=True,
                                       overlap_param_gather=True),
}


def knob_parallel(knobs: dict, bucket_size):
    return ParallelConfig(**knobs, bucket_size=bucket_size if knobs.get("overlap_grad_reduce") else None)


def time_training_steps(cfg, parallel, precision, batches, layout, args) -> dict:
    """Median step time (and peak GPU memory) of the trainer's step with `parallel`'s knobs."""
    set_seed(1234)
    model = build_model(cfg, parallel, precision)
    ddp = wrap_ddp(model, parallel)
    optimizer = build_optimizer(ddp, OptimizerConfig(), parallel, precision)
    loss_fn = LCLLoss(LossConfig(), layout.dp_group)
    shape = PipelineShape.for_model(cfg, args.seq_length, args.batch_size)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps + 2):  # the first 2 warm up (and megatron-core's first-step sync reduce)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        step_forward_backward(ddp, batches, len(batches), loss_fn, shape, layout)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = sorted(times[2:])[len(times[2:]) // 2]
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del model, ddp, optimizer
    return {"step_time_s": steady, "peak_memory_gib": peak_gib}


def knob_worker(args):
    layout = initialize_distributed(ParallelConfig())
    cfg = ModelConfig(vision=apply_preset(VisionConfig(preset=args.vision_preset), VISION_PRESETS),
                      lm=apply_preset(LMConfig(preset=args.lm_preset, vocab_size=1000), LM_PRESETS),
                      transformer_impl="auto")
    precision = PrecisionConfig(params_dtype="bf16" if torch.cuda.is_available() else "fp32")
    M = cfg.vision.num_image_tokens
    positions = spread_image_positions(args.seq_length, M, args.images_per_sample)
    batches = [to_device(random_batch([positions] * args.batch_size, seq_length=args.seq_length, num_image_tokens=M,
                                      image_size=cfg.vision.image_size, vocab_size=1000,
                                      seed=1000 * layout.dp_rank + i))
               for i in range(args.micro_batches)]
    results = {}
    for name, knobs in KNOB_SETTINGS.items():
        results[name] = time_training_steps(cfg, knob_parallel(knobs, args.bucket_size), precision, batches,
                                            layout, args)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        print_knob_table(results, args, layout.dp_size, precision.params_dtype)


def print_knob_table(results: dict, args, dp_size: int, dtype: str) -> None:
    samples = args.batch_size * args.micro_batches * dp_size
    tokens = samples * args.seq_length
    print(f"ViT {args.vision_preset} + LM {args.lm_preset}, {dtype}, DP={dp_size}, {args.micro_batches} "
          f"micro-batch(es) of {args.batch_size} x {args.seq_length} tokens per rank, median of {args.steps} steps")
    print(f"{'setting':<30}{'step_time_s':>12}{'tokens_per_s':>14}{'vs default':>12}{'peak_mem_GiB':>14}")
    base = results["default"]["step_time_s"]
    for name, r in results.items():
        peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"  # None: CPU
        print(f"{name:<30}{r['step_time_s']:>12.4f}{tokens / r['step_time_s']:>14,.0f}"
              f"{r['step_time_s'] / base:>11.2f}x{peak:>14}")
    fastest = min(results, key=lambda n: results[n]["step_time_s"])
    print(f"fastest: {fastest} ({results[fastest]['step_time_s']:.4f} s per step)")


def launch_knob_comparison(args):
    nproc = args.nproc or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    flags = [f"--steps={args.steps}", f"--batch-size={args.batch_size}", f"--seq-length={args.seq_length}",
             f"--vision-preset={args.vision_preset}", f"--lm-preset={args.lm_preset}",
             f"--images-per-sample={args.images_per_sample}", f"--micro-batches={args.micro_batches}"]
    if args.bucket_size is not None:
        flags.append(f"--bucket-size={args.bucket_size}")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    f"--master_port={free_port()}", __file__, "--worker", "--compare-knobs", *flags],
                   check=True, env=dict(os.environ))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-counts", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--compare-knobs", action="store_true", help="time each of KNOB_SETTINGS")
    parser.add_argument("--nproc", type=int, default=None,
                        help="data-parallel ranks for --compare-knobs (default: the GPUs, else 2 CPU ranks)")
    parser.add_argument("--vision-preset", default="tiny")
    parser.add_argument("--lm-preset", default="tiny")
    parser.add_argument("--images-per-sample", type=int, default=3)
    parser.add_argument("--micro-batches", type=int, default=2, help="per step and rank (--compare-knobs)")
    parser.add_argument("--bucket-size", type=int, default=None,
                        help="parallel.bucket_size of the overlap_grad_reduce settings (default: megatron-core's)")
    args = parser.parse_args(argv)
    if args.worker:
        return knob_worker(args) if args.compare_knobs else step_worker(args)
    if args.compare_knobs:
        return launch_knob_comparison(args)
    if not args.skip_counts:
        parameter_counts()
    for tp in (1, 2):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tp}",
                        f"--master_port={29600 + tp}", __file__, "--worker",
                        f"--tp={tp}", f"--steps={args.steps}", f"--batch-size={args.batch_size}",
                        f"--seq-length={args.seq_length}"], check=True,
                       env=dict(os.environ))


if __name__ == "__main__":
    main()

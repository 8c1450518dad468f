"""Benchmark: megatron_lcl's training step against the same model written as plain PyTorch.

    python tools/bench_vs_torch.py            # CPU: tiny ViT + tiny LM, seq 256, fp32, micro-batch 4
    python tools/bench_vs_torch.py            # CUDA: ViT-L/14 + OPT-125M, seq 2048, bf16, largest micro-batch
    python tools/bench_vs_torch.py --vision B/16 --lm opt-125m --seq-length 1024 --micro-batch 2 --json out.json

One process builds both models: megatron_lcl's (`build_model`, megatron-core DDP + optimizer, one
`step_forward_backward` per step, as the trainer runs it) and the twin of `tools/torch_twin.py`
(HF CLIPVisionModel + OPTForCausalLM with SDPA, torch AdamW, bf16 by autocast). Timed steps
(forward + backward + optimizer) alternate between the two. It prints step time, images/s, tokens/s
(sequence positions), model TFLOP/s (`megatron_lcl.models.flops.step_flops`, the LM's causal attention
counted at s²/2 as the kernels run it), MFU against the GPU's spec-sheet peak (`--peak` for another;
none on a CPU), and, on a separate line, the fraction of a bf16/fp32 matmul peak measured in the same
run (`of_matmul_peak`; ~790-800 TFLOP/s on an H100/H200, so it reads ~1.25x the MFU there), and the
ratio ours / twin of images/s. FLOPs per sample are also counted by torch's FlopCounterMode on both
models (the math kernel: the full s² square, so they are compared with the "full" count), so the two
provably do the same work. Figures, printed as they come (a cut run still shows the ones it reached);
not a test. On a GPU machine, `CUDA_VISIBLE_DEVICES=` runs the CPU case. `--micro-batch auto` (the CUDA
default) doubles the micro-batch while a step of each model fits (the two take turns) and times both at
the largest that fits both. `--dry` builds the configuration, the batch and the FLOPs counts of the run
and stops before building the models (tools/gpu_check.py's dry mode, in CI).
"""

import argparse
import gc
import json
import statistics
import time

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron_lcl.config import (LM_PRESETS, VISION_PRESETS, LMConfig, LossConfig, ModelConfig,  # noqa: E402
                                 OptimizerConfig, ParallelConfig, PrecisionConfig, VisionConfig, apply_preset)
from megatron_lcl.losses import LCLLoss
from megatron_lcl.models.factory import build_model
from megatron_lcl.models.flops import mfu, spec_peak_flops_per_s, step_flops, throughput_metrics  # noqa: E402
from megatron_lcl.runtime import ParallelLayout, destroy_distributed, device, initialize_distributed
from megatron_lcl.runtime.cpu import native_torch
from megatron_lcl.testing import measure_matmul_peak, random_batch, spread_image_positions
from megatron_lcl.training.optim import build_optimizer
from megatron_lcl.training.pipeline import PipelineShape, forward_loss, step_forward_backward, wrap_ddp
from torch_twin import TorchTwin

GPU_DEFAULTS = dict(vision="L/14", lm="opt-125m", seq_length=2048, dtype="bf16", micro_batch="auto")
CPU_DEFAULTS = dict(vision="tiny", lm="tiny", seq_length=256, dtype="fp32", micro_batch="4")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------ inputs

def model_config(args) -> ModelConfig:
    vocab = args.vocab_size or (50272 if args.lm == "opt-125m" else 1000)
    return ModelConfig(vision=apply_preset(VisionConfig(preset=args.vision, layer_scale_init=0.1), VISION_PRESETS),
                       lm=apply_preset(LMConfig(preset=args.lm, vocab_size=vocab, make_vocab_size_divisible_by=8),
                                       LM_PRESETS),
                       transformer_impl="local", attention=args.attention)


def make_batch(cfg: ModelConfig, args, micro_batch: int, device):
    positions = spread_image_positions(args.seq_length, cfg.vision.num_image_tokens, args.images_per_sample)
    batch = random_batch([positions] * micro_batch, seq_length=args.seq_length,
                         num_image_tokens=cfg.vision.num_image_tokens, image_size=cfg.vision.image_size,
                         vocab_size=cfg.lm.vocab_size)
    return batch.to(device)


# ------------------------------------------------------------------------------------ the two steps

class OursStep:
    """megatron_lcl as the trainer runs it: DDP, megatron-core optimizer, the pipeline's step function."""

    def __init__(self, cfg: ModelConfig, args, device):
        parallel, self.precision = ParallelConfig(), PrecisionConfig(params_dtype=args.dtype)
        self.cfg, self.args, self.device = cfg, args, device
        self.model = build_model(cfg, parallel, self.precision)  # on `device`
        self.layout = ParallelLayout.current()
        self.loss_fn = LCLLoss(LossConfig(), self.layout.dp_group)
        self.flops_counted = count_flops(lambda batch: self.loss_terms(batch).total, cfg, args, device)
        self.model.zero_grad(set_to_none=True)
        self.ddp = wrap_ddp(self.model, parallel)
        self.optimizer = build_optimizer(self.ddp, OptimizerConfig(lr=1e-4, warmup_steps=0), parallel, self.precision)

    def loss_terms(self, batch):
        return forward_loss(self.model, batch, self.loss_fn)

    @property
    def core_attention(self) -> str:
        return type(self.model.lm.decoder.layers[0].self_attention.core_attention).__name__

    def __call__(self, batch) -> None:
        shape = PipelineShape.for_model(self.cfg, self.args.seq_length, batch.tokens.shape[0])
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        step_forward_backward(self.ddp, [batch], 1, self.loss_fn, shape, self.layout)
        self.optimizer.step()


class TwinStep:
    """The plain-PyTorch twin as an open_clip user trains it: fp32 weights, bf16 autocast, AdamW, clipping."""

    def __init__(self, cfg: ModelConfig, args, device):
        self.twin = TorchTwin(cfg).to(device)
        self.device, self.autocast = device, args.dtype == "bf16"
        self.loss_cfg, optim = LossConfig(), OptimizerConfig(lr=1e-4)
        self.flops_counted = count_flops(lambda batch: self.loss(batch)["total"], cfg, args, device)
        self.twin.zero_grad(set_to_none=True)
        self.optimizer = torch.optim.AdamW(self.twin.parameters(), lr=optim.lr,
                                           betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps,
                                           weight_decay=optim.weight_decay, fused=device.type == "cuda")
        self.clip_grad = optim.clip_grad

    def loss(self, batch):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.twin.loss(batch, self.loss_cfg)

    def __call__(self, batch) -> None:
        with native_torch():  # as a plain PyTorch user runs it: without megatron_lcl's CPU adaptation
            self._step(batch)

    def _step(self, batch) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(batch)["total"].backward()
        torch.nn.utils.clip_grad_norm_(self.twin.parameters(), self.clip_grad)
        self.optimizer.step()


def count_flops(loss_of, cfg: ModelConfig, args, device) -> int:
    """FLOPs of one forward + backward of one sample, counted by FlopCounterMode (attention through
    the math kernel, whose matmuls the counter sees on every device)."""
    batch = make_batch(cfg, args, 1, device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_of(batch).backward()
    return counter.get_total_flops()


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


# ------------------------------------------------------------------------------------ timing

def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, batch, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step(batch)
    synchronize(device)
    return time.perf_counter() - start


def fits(step, cfg, args, micro_batch: int, device) -> bool:
    """Whether one step at `micro_batch` runs without running out of accelerator memory."""
    try:
        timed(step, make_batch(cfg, args, micro_batch, device), device)
        ok = True
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or cuBLAS failing to allocate its workspace
        if "out of memory" not in str(e) and "ALLOC_FAILED" not in str(e):
            raise
        ok = False
    gc.collect()  # the failed step's tensors, before handing their memory back
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ok


def largest_micro_batches(steps: dict, cfg, args, device) -> dict:
    """{name: the largest power-of-two micro-batch (<= --max-micro-batch) whose step fits; 0 if none}.
    The models take turns at each size, so each search runs with the other's optimizer state resident."""
    largest, growing, micro_batch = {name: 0 for name in steps}, set(steps), 1
    while growing and micro_batch <= args.max_micro_batch:
        for name in sorted(growing):
            if fits(steps[name], cfg, args, micro_batch, device):
                largest[name] = micro_batch
            else:
                growing.discard(name)
            print(f"micro-batch {micro_batch}: {name} {'fits' if name in growing else 'out of memory'}", flush=True)
        micro_batch *= 2
    return largest


def summarize(times: list, cfg: ModelConfig, args, micro_batch: int, peaks: dict) -> dict:
    """Median step time and its rates; `mfu` over the spec peak (None without one), `of_matmul_peak`
    over the measured matmul peak."""
    step_time_s = statistics.median(times)
    images = args.images_per_sample * micro_batch
    achieved = throughput_metrics(cfg, args.seq_length, micro_batch, images, step_time_s,
                                  contrastive_negatives=images)["model_flops_per_s"]  # what the training log reports
    spec, matmul = peaks["spec_flops_per_s"], peaks["matmul_flops_per_s"]
    return {"step_time_s": step_time_s, "images_per_s": images / step_time_s,
            "tokens_per_s": micro_batch * args.seq_length / step_time_s,
            "model_tflops_per_s": achieved / 1e12, "mfu": mfu(achieved, spec) if spec else None,
            "of_matmul_peak": mfu(achieved, matmul)}


# ------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision", help="vision preset (default: L/14 on CUDA, tiny on CPU)")
    parser.add_argument("--lm", help="LM preset (default: opt-125m on CUDA, tiny on CPU)")
    parser.add_argument("--seq-length", type=int, help="default: 2048 on CUDA, 256 on CPU")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--micro-batch", help="an integer or 'auto' (default: auto on CUDA, 4 on CPU)")
    parser.add_argument("--max-micro-batch", type=int, default=64)
    parser.add_argument("--attention", choices=("sdpa", "unfused"), default="sdpa",
                        help="megatron_lcl's core attention (model.attention)")
    parser.add_argument("--images-per-sample", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, help="default: 50272 with opt-125m, else 1000")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each model first")
    parser.add_argument("--peak", type=float,
                        help="peak FLOP/s for MFU (default: the GPU's spec-sheet dense peak; none on a CPU)")
    parser.add_argument("--dry", action="store_true",
                        help="build the config, the batch and the FLOPs counts, print them, build no model")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    for key, value in (GPU_DEFAULTS if torch.cuda.is_available() else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    initialize_distributed(ParallelConfig())
    dev, cfg = device(), model_config(args)
    result = dry_run(args, cfg, dev)  # the configuration, one batch and the FLOPs counts: printed now
    if args.dry:
        return finish(args, result)
    result["peaks"]["matmul_flops_per_s"] = measure_matmul_peak(dev, DTYPES[args.dtype])
    print(f"measured {args.dtype} matmul peak {result['peaks']['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s "
          f"(not the MFU denominator)", flush=True)
    ours, twin = OursStep(cfg, args, dev), TwinStep(cfg, args, dev)
    result["flops_per_sample"].update(counted_megatron_lcl=ours.flops_counted, counted_torch_twin=twin.flops_counted)
    micro_batch, largest = int(args.micro_batch) if args.micro_batch != "auto" else 0, {}
    if not micro_batch:
        largest = largest_micro_batches({"megatron_lcl": ours, "torch_twin": twin}, cfg, args, dev)
        micro_batch = min(largest.values())
        assert micro_batch > 0, f"not even micro-batch 1 fits: {largest}"
    batch = make_batch(cfg, args, micro_batch, dev)
    times = {"megatron_lcl": [], "torch_twin": []}
    for i in range(args.warmup + args.steps):
        elapsed = {name: timed(step, batch, dev) for name, step in (("megatron_lcl", ours), ("torch_twin", twin))}
        for name, seconds in elapsed.items():
            if i >= args.warmup:
                times[name].append(seconds)
        print(f"step {i + 1}/{args.warmup + args.steps}{' (warm-up)' if i < args.warmup else ''}: step_time_s "
              + ", ".join(f"{name} {seconds:.4f}" for name, seconds in elapsed.items()), flush=True)
    result["config"]["micro_batch"] = micro_batch
    result.update(report(args, cfg, micro_batch, largest, result["peaks"], ours, twin, times))
    print_result(result)
    return finish(args, result)


def finish(args, result: dict) -> dict:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    destroy_distributed()
    return result


def dry_run(args, cfg: ModelConfig, dev) -> dict:
    """What the run will do, without a model: its configuration, one micro-batch of 1 sample (built as
    the timed ones are), the FLOPs per sample in both attention conventions and the spec peak."""
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    batch = make_batch(cfg, args, 1, torch.device("cpu"))
    spec = args.peak or spec_peak_flops_per_s(name, args.dtype)
    per_sample = {count: step_flops(cfg, args.seq_length, args.images_per_sample, samples=1,
                                    attention_count=count)["total"] for count in ("causal", "full")}
    result = {
        "device": name, "torch": torch.__version__, "dry": args.dry,
        "config": {"vision": args.vision, "lm": args.lm, "seq_length": args.seq_length, "dtype": args.dtype,
                   "images_per_sample": args.images_per_sample, "micro_batch": args.micro_batch,
                   "vocab_size": cfg.lm.vocab_size, "steps": args.steps, "image_tokens": cfg.vision.num_image_tokens},
        "batch_of_one": {"tokens": list(batch.tokens.shape), "images": list(batch.images.shape),
                         "boi_positions": batch.boi_positions.tolist()},
        "peaks": {"spec_flops_per_s": spec, "spec_source": "--peak" if args.peak else "spec sheet (dense)",
                  "matmul_flops_per_s": None},
        "flops_per_sample": {"analytic": per_sample["causal"], "analytic_full_attention": per_sample["full"]},
    }
    print(f"{name}: ViT {args.vision} + LM {args.lm}, seq {args.seq_length}, {args.dtype}, micro-batch "
          f"{args.micro_batch} x {args.images_per_sample} images (<BoI> at {result['batch_of_one']['boi_positions']})")
    print(f"FLOPs per sample (fwd+bwd): {per_sample['causal']:.4g} with causal attention at s^2/2 (MFU's count), "
          f"{per_sample['full']:.4g} with the full s^2 (paper-comparable)")
    denominator = (f"{spec / 1e12:.0f} TFLOP/s ({result['peaks']['spec_source']})" if spec else
                   "none (no spec-sheet peak for this device and dtype; --peak gives one)")
    print(f"MFU denominator: {denominator}", flush=True)
    return result


def report(args, cfg, micro_batch, largest, peaks, ours, twin, times) -> dict:
    result = {
        "largest_micro_batch": largest,
        "parameters": {"megatron_lcl": parameter_count(ours.model), "torch_twin": parameter_count(twin.twin)},
        "megatron_lcl": dict(summarize(times["megatron_lcl"], cfg, args, micro_batch, peaks),
                             core_attention=ours.core_attention),
        "torch_twin": dict(summarize(times["torch_twin"], cfg, args, micro_batch, peaks),
                           core_attention="transformers sdpa"),
    }
    result["ratio_images_per_s"] = result["megatron_lcl"]["images_per_s"] / result["torch_twin"]["images_per_s"]
    return result


def print_result(r: dict) -> None:
    c, f, peaks = r["config"], r["flops_per_sample"], r["peaks"]
    print(f"micro-batch {c['micro_batch']}" +
          (f" (largest that fits: {r['largest_micro_batch']})" if r["largest_micro_batch"] else ""))
    print(f"FLOPs per sample counted by FlopCounterMode (full s^2): megatron_lcl {f['counted_megatron_lcl']:.4g}, "
          f"twin {f['counted_torch_twin']:.4g} (analytic, full: {f['analytic_full_attention']:.4g}); parameters "
          f"{r['parameters']['megatron_lcl']:,} vs {r['parameters']['torch_twin']:,}")
    print(f"{'':<14}{'step_time_s':>12}{'images/s':>11}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}"
          f"{'of matmul':>11}  attention")
    for name in ("megatron_lcl", "torch_twin"):
        m = r[name]
        print(f"{name:<14}{m['step_time_s']:>12.4f}{m['images_per_s']:>11.1f}{m['tokens_per_s']:>12,.0f}"
              f"{m['model_tflops_per_s']:>10.4g}{format_fraction(m['mfu']):>8}{format_fraction(m['of_matmul_peak']):>11}"
              f"  {m['core_attention']}")
    print(f"MFU: model FLOP/s (causal attention at s^2/2) over the spec-sheet peak "
          f"({format_tflops(peaks['spec_flops_per_s'])}); of matmul: over the measured matmul peak "
          f"({format_tflops(peaks['matmul_flops_per_s'])})")
    print(f"ratio megatron_lcl / twin images/s: {r['ratio_images_per_s']:.3f}", flush=True)


def format_fraction(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def format_tflops(value) -> str:
    return "none" if value is None else f"{value / 1e12:.3g} TFLOP/s"


if __name__ == "__main__":
    main()

"""Benchmark: parameter counts by group for the paper's models, and fwd+bwd step time on CPU.

    python tools/bench_step.py                  # counts, then tiny-preset step time at TP=1 and TP=2
    python tools/bench_step.py --skip-counts    # step times only

Prints figures; it is not a test. Step timing launches itself under torchrun (gloo on CPU).
"""

import argparse
import os
import subprocess
import sys
import time

from megatron_lcl.runtime.mcore_compat import filter_known_warnings

filter_known_warnings()  # before megatron.core is imported


def parameter_counts():
    from megatron_lcl.config import (LM_PRESETS, VISION_PRESETS, HeadsConfig, LMConfig, ModelConfig,
                                     ParallelConfig, VisionConfig, apply_preset)
    from megatron_lcl.models.lcl_model import LCLModel
    from megatron_lcl.models.flops import count_parameters_by_group
    from megatron_lcl.runtime import initialize_distributed

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
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_lcl.config import (LM_PRESETS, VISION_PRESETS, LMConfig, LossConfig, ModelConfig,
                                     ParallelConfig, VisionConfig, apply_preset)
    from megatron_lcl.losses import LCLLoss
    from megatron_lcl.models.lcl_model import LCLModel
    from megatron_lcl.runtime import initialize_distributed
    from megatron_lcl.testing import random_batch
    from megatron_lcl.training.pipeline import forward_loss

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
    if dist.get_rank() == 0:
        steady = sorted(times[2:])[len(times[2:]) // 2]
        tokens = args.batch_size * args.seq_length
        print(f"tiny preset, TP={args.tp}: fwd+bwd step_time_s={steady:.4f} (median of {args.steps}), "
              f"tokens_per_s={tokens / steady:,.0f}, images_per_s={3 * args.batch_size / steady:,.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-counts", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    args = parser.parse_args(argv)
    if args.worker:
        return step_worker(args)
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

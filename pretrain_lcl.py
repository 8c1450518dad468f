"""Pre-train a ViT with Latent Compression Learning (entry point; the driver is `megatron_lcl.train`).

    torchrun --nproc_per_node=2 pretrain_lcl.py --config examples/configs/tiny_cpu.yaml [section.key=value ...]

See `python pretrain_lcl.py --help` and README.md.
"""

from megatron_lcl.stop_signals import catch_stop_signals

catch_stop_signals()  # first: a stop signal during the seconds of imports below must not kill the rank

from megatron_lcl.train import run  # noqa: E402

if __name__ == "__main__":
    run()

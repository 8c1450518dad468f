"""megatron_lcl: Latent Compression Learning (LCL) pre-training on megatron-core."""

__version__ = "0.1.0"

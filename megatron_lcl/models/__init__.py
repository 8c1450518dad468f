"""LCL model: ViT encoder, OPT-architecture causal LM, LCL heads, as megatron-core modules."""

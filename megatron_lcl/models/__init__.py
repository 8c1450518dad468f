"""LCL model: ViT encoder, OPT-architecture causal LM, LCL heads, as megatron-core modules; the model
factory (`factory.build_model`) and the FLOPs/parameter model (`flops`)."""

"""LCL model: ViT encoder, OPT-architecture causal LM, LCL heads, as megatron-core modules; the model
factory (`factory.build_model`), megatron-core's TransformerConfig from the config's sections and the
activations (`transformer_config`), and the FLOPs/parameter model (`flops`)."""

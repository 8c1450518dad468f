"""`build_transformer_config`: the one place a megatron-core `TransformerConfig` is made, from the
config's model sections and the backend `models.specs.select_transformer_impl` chose; and the activation
functions a config may name.

What the backend changes (docs/gpu.md, "Precision on a GPU"):
- `gradient_accumulation_fusion` is on with Transformer Engine layers only: TE's linears then add their
  weight gradients into megatron-core DDP's fp32 `main_grad` buffer inside the wgrad GEMM
  (`fuse_wgrad_accumulation`) instead of returning a bf16 `.grad` for DDP's hook to add. megatron-core's
  local linears would need Apex's `fused_weight_gradient_mlp_cuda` for it, so local layers and the LM's
  output layer (a local `ColumnParallelLinear` on every backend, `output_layer_config`) run without it.
- `fp8` reaches the LM only: the ViT runs its TE layers in params_dtype (see `build_transformer_config`).
"""

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lcl.config import LMConfig, ParallelConfig, PrecisionConfig
from megatron_lcl.models.specs import LOCAL, TRANSFORMER_ENGINE


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation (HF `quick_gelu`, megatron-core `activations.quick_gelu`)."""
    return x * torch.sigmoid(1.702 * x)


# The activations a config may name (`VisionConfig.activation`; the LM is OPT: relu).
ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu, "relu": F.relu}


def _dtype(precision: Optional[PrecisionConfig]) -> torch.dtype:
    return torch.bfloat16 if precision is not None and precision.params_dtype == "bf16" else torch.float32


def build_transformer_config(section, parallel: ParallelConfig, *, init_method_std: float = 0.02,
                             precision: Optional[PrecisionConfig] = None, activation: str = "gelu",
                             pipeline_split: bool = True, impl: str = LOCAL,
                             fuse_wgrad_accumulation: bool = False) -> TransformerConfig:
    """The one place a megatron-core `TransformerConfig` is made.

    `section` is a `VisionConfig` or an `LMConfig`. The ViT is never split across pipeline stages
    (it lives on the first one), so it is built with `pipeline_split=False`. `impl` is the backend
    (`models.specs`: transformer_engine | local) whose layers will read the config.
    `fuse_wgrad_accumulation` asks for `gradient_accumulation_fusion`; it takes effect with Transformer
    Engine layers only, and only a model that megatron-core's DDP wraps may ask (the fused wgrad GEMM
    adds into `param.main_grad`, which that DDP allocates: a TE backward without it fails).

    `precision.fp8` applies to the LM only. Transformer Engine's fp8 GEMMs need the rows of every
    linear's input (all dimensions but the last, flattened) divisible by 8
    (`transformer_engine.pytorch.utils.assert_dim_for_fp8_exec`); the ViT's rows are M x n (M = 1 +
    patches: 197, 257, odd; n the micro-batch's images, 1 for the blank image of a micro-batch without
    any), a multiple of 8 only when n is. So its TE layers run in params_dtype (bf16); the LM's rows
    (seq_length x micro-batch) are checked by `config.validate`.
    """
    assert impl in (TRANSFORMER_ENGINE, LOCAL), f"impl ({impl!r}): resolve it with models.specs.select_transformer_impl"
    dtype = _dtype(precision)
    is_lm = isinstance(section, LMConfig)
    pp = parallel.pipeline_model_parallel_size if pipeline_split else 1
    kwargs = dict(
        num_layers=section.num_layers,
        hidden_size=section.hidden_size,
        num_attention_heads=section.num_attention_heads,
        ffn_hidden_size=section.ffn_hidden_size,
        layernorm_epsilon=section.layernorm_epsilon,
        attention_dropout=section.attention_dropout,
        hidden_dropout=section.hidden_dropout,
        activation_func=ACTIVATIONS[activation],
        add_bias_linear=True,
        normalization="LayerNorm",
        init_method_std=init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=pp,
        sequence_parallel=parallel.sequence_parallel and is_lm,  # see ParallelConfig
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Initialise full weights on CPU then split: TP=k starts from the same weights as TP=1.
        use_cpu_initialization=True,
        batch_p2p_comm=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=fuse_wgrad_accumulation and impl == TRANSFORMER_ENGINE,  # see above
        deallocate_pipeline_outputs=True,
        recompute_granularity=parallel.recompute_granularity,  # see ParallelConfig
        recompute_method=parallel.recompute_method,
        recompute_num_layers=parallel.recompute_num_layers,
        recompute_modules=list(parallel.recompute_modules),
    )
    if pipeline_split and pp > 1:
        kwargs.update(num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
                      num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage)
    if precision is not None and precision.fp8 is not None and is_lm:
        kwargs.update(fp8=precision.fp8)
    return TransformerConfig(**kwargs)


def output_layer_config(config: TransformerConfig) -> TransformerConfig:
    """The LM config without `gradient_accumulation_fusion`, for its output layer: a megatron-core local
    `ColumnParallelLinear` on every backend, which refuses the fusion without Apex's
    `fused_weight_gradient_mlp_cuda`. A shallow copy: everything else is the LM's."""
    if not config.gradient_accumulation_fusion:
        return config
    plain = copy.copy(config)
    plain.gradient_accumulation_fusion = False
    return plain

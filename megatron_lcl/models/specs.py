"""Layer specs: the ONE place that chooses Transformer Engine or megatron-core local layers.

Transformer Engine is used when CUDA is present and `transformer_engine` imports (or when the config
forces it); otherwise megatron-core's local layers, which run on CPU. Nothing else in megatron_lcl
imports Transformer Engine.

`model.attention` picks the core attention of the local layers: `sdpa` (`SDPAttention`, through
`torch.nn.functional.scaled_dot_product_attention`) or `unfused` (megatron-core's `DotProductAttention`).
Transformer Engine layers always keep TE's own attention.
"""

import copy
import functools
import importlib
import importlib.util

import torch
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_lcl.config import ConfigError
from megatron_lcl.models.attention import SDPAttention
from megatron_lcl.models.layers import ColumnParallelLinear, LayerNorm, RowParallelLinear, layer_scale_linear
from megatron_lcl.runtime import mcore_compat  # megatron-core version differences in specs

TRANSFORMER_ENGINE = "transformer_engine"
LOCAL = "local"
SDPA = "sdpa"
UNFUSED = "unfused"


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # a broken TE install (wrong CUDA, missing libs) counts as absent
        return False
    return True


def select_transformer_impl(requested: str = "auto", *, cuda: bool = None, te: bool = None) -> str:
    """Resolve `model.transformer_impl` (auto | transformer_engine | local) to a concrete backend."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    te = transformer_engine_available() if te is None else te
    if requested == LOCAL:
        return LOCAL
    if requested == TRANSFORMER_ENGINE:
        if not (cuda and te):
            raise ConfigError("model.transformer_impl=transformer_engine needs CUDA and an importable "
                              "transformer_engine (pip install 'megatron_lcl[gpu]'); use 'local' or 'auto'")
        return TRANSFORMER_ENGINE
    assert requested == "auto", f"model.transformer_impl ({requested!r}): see megatron_lcl.config.validate"
    return TRANSFORMER_ENGINE if (cuda and te) else LOCAL


def _base_gpt_layer_spec(impl: str, attention: str = SDPA) -> ModuleSpec:
    """megatron-core's GPT layer for `impl`; local layers get the core attention `attention` picks."""
    if impl == TRANSFORMER_ENGINE:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    spec = copy.deepcopy(gpt_layer_specs.get_gpt_layer_local_spec())  # core attention: DotProductAttention
    assert attention in (SDPA, UNFUSED), f"model.attention ({attention!r}): see megatron_lcl.config.validate"
    attn, mlp = spec.submodules.self_attention.submodules, mcore_compat.mlp_submodules(spec)
    if attention == SDPA:
        attn.core_attention = SDPAttention
    # megatron-core's linears, with a direct path when the matrix is not split (models/layers.py).
    attn.linear_qkv = mlp.linear_fc1 = ColumnParallelLinear
    attn.linear_proj = mlp.linear_fc2 = RowParallelLinear
    # megatron-core's local norm refuses sequence parallelism; ours is the same LayerNorm, SP-ready.
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = LayerNorm
    return spec


def block_spec(layer_spec: ModuleSpec, impl: str, config):
    """The TransformerBlock of `layer_spec` layers with the final norm of `impl` (this pipeline stage's
    share of `config.num_layers`).

    Given only a layer spec, megatron-core 0.16 picks the final norm itself (Apex or torch's, the
    latter refusing sequence parallelism even under Transformer Engine); here it matches the layers.
    """
    if impl == TRANSFORMER_ENGINE:  # imported only when Transformer Engine is chosen (and so present)
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = LayerNorm
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(config),
                                      layer_norm=final_norm)


def lm_layer_spec(impl: str, attention: str = SDPA) -> ModuleSpec:
    """Causal pre-LN GPT layer (the OPT layout)."""
    return _base_gpt_layer_spec(impl, attention)


def vit_layer_spec(impl: str, layer_scale_init=None, attention: str = SDPA) -> ModuleSpec:
    """Bidirectional pre-LN layer with optional layer-scale and drop-path on both residual branches.

    megatron-core's own local ViT spec hard-codes a causal mask; here self-attention is `no_mask`.
    """
    spec = copy.deepcopy(_base_gpt_layer_spec(impl, attention))
    attention = spec.submodules.self_attention
    attention.params = dict(attention.params, attn_mask_type=AttnMaskType.no_mask)
    row_parallel = attention.submodules.linear_proj
    scaled = mcore_compat.submodule(layer_scale_linear(row_parallel), layer_scale_init=layer_scale_init)
    attention.submodules.linear_proj = scaled
    mcore_compat.mlp_submodules(spec).linear_fc2 = scaled
    return spec

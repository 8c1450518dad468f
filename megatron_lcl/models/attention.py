"""Core attention through `torch.nn.functional.scaled_dot_product_attention` for the local backend.

`SDPAttention` is a drop-in for megatron-core 0.16.1's `DotProductAttention` (the `core_attention`
submodule of `SelfAttention`): the same constructor and forward signatures, `[sq, b, np, hn]` in and
`[sq, b, hp]` out, heads per tensor-parallel partition. PyTorch picks the kernel: flash or
memory-efficient on CUDA, the fused flash kernel on CPU; the `[b, np, sq, sk]` score matrix of the
unfused path is never materialised.

Supported: `AttnMaskType.causal` (the LM) and `AttnMaskType.no_mask` (the ViT) with
`attention_mask=None`, grouped-query attention, attention dropout. Anything else (padding or
arbitrary masks, packed sequences, attention bias, sliding windows, softmax offsets, context
parallelism) raises an error naming what to change.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

SUPPORTED_MASK_TYPES = (AttnMaskType.causal, AttnMaskType.no_mask)
UNSUPPORTED = "SDPAttention (model.attention=sdpa) does not support {what}; use model.attention=unfused"


class SDPAttention(MegatronModule):
    """Scaled dot-product attention over the heads of one tensor-parallel partition."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        _check_supported(config, layer_number, attn_mask_type)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type  # unused, as in DotProductAttention
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp

        tp_size = self.tp_group.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp_size)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp_size)
        # DotProductAttention divides the scale by the layer number under
        # apply_query_key_layer_scaling and multiplies the scores back in its softmax: the net scale
        # is `softmax_scale` or 1/sqrt(hn) either way.
        head_dim = divide(projection_size, config.num_attention_heads)
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query `[sq, b, np, hn]`, key/value `[sk, b, ng, hn]` -> context `[sq, b, np * hn]`."""
        if attention_mask is not None:
            raise ValueError(UNSUPPORTED.format(what="an attention_mask tensor (the mask type is the mask)"))
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError(UNSUPPORTED.format(what="attention_bias or packed sequences"))
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type not in SUPPORTED_MASK_TYPES:
            raise ValueError(UNSUPPORTED.format(what=f"attn_mask_type {mask_type.name}"))
        sq, sk = query.size(0), key.size(0)
        # One query (decoding with a KV cache) sees every key, as in DotProductAttention.
        is_causal = mask_type == AttnMaskType.causal and sq > 1
        if is_causal and sq != sk:
            raise ValueError(f"SDPAttention: causal attention needs as many queries as keys (sq={sq}, sk={sk})")

        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:  # grouped-query attention: [sk, b, ng, hn] -> [sk, b, np, hn]
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)

        # [s, b, n, hn] -> [b, n, s, hn], the layout SDPA expects (a view, no copy)
        query, key, value = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Each tensor-parallel rank drops different heads: draw from the model-parallel RNG.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = self._attend(query, key, value, dropout_p, is_causal)
        else:
            context = self._attend(query, key, value, dropout_p, is_causal)

        # [b, np, sq, hn] -> [sq, b, np, hn] -> [sq, b, hp]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(sq, context.size(1), self.hidden_size_per_partition)

    def _attend(self, query, key, value, dropout_p: float, is_causal: bool) -> torch.Tensor:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=self.softmax_scale)


def _check_supported(config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType) -> None:
    if attn_mask_type not in SUPPORTED_MASK_TYPES:
        raise ValueError(UNSUPPORTED.format(what=f"attn_mask_type {attn_mask_type.name}"))
    if config.context_parallel_size != 1:
        raise ValueError(UNSUPPORTED.format(what=f"context_parallel_size {config.context_parallel_size}"))
    if config.softmax_type != "vanilla":
        raise ValueError(UNSUPPORTED.format(what=f"softmax_type {config.softmax_type!r}"))
    if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
        raise ValueError(UNSUPPORTED.format(what=f"sliding-window attention (window_size {config.window_size})"))

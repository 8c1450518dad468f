"""SDPAttention at TP=2 on 2 gloo ranks: each rank's heads == the TP=1 DotProductAttention slice, and
the whole tiny LCL model with attention=sdpa at TP=2 == attention=unfused at TP=1.

Run by tests/models/test_attention.py; writes result files that the tests compare.
"""

from dataclasses import replace

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from common import mark_done, named_full, parse_out_dir, save_rank0, tiny_model_config
from megatron_lcl.config import LMConfig, LossConfig, ParallelConfig
from megatron_lcl.losses import LCLLoss
from megatron_lcl.models.attention import SDPAttention
from megatron_lcl.models.lcl_model import LCLModel
from megatron_lcl.models.transformer_config import build_transformer_config
from megatron_lcl.runtime import initialize_distributed, initialize_model_parallel, set_seed
from megatron_lcl.testing import random_batch
from megatron_lcl.training.pipeline import forward_loss

SEED = 1234
HEADS, HEAD_DIM, SEQ, BATCH_SIZE = 4, 16, 24, 2
LM = LMConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS)
CFG = tiny_model_config()
M = CFG.vision.num_image_tokens
BATCH = random_batch([[0, 20], [9]], seq_length=48, num_image_tokens=M, image_size=16, vocab_size=192,
                     seed=7, pad_from=[None, 40])
MASK_TYPES = {"causal": AttnMaskType.causal, "no_mask": AttnMaskType.no_mask}


def qkv_and_upstream_grad():
    """Full-width q, k, v `[s, b, np, hn]` and an upstream gradient `[s, b, np * hn]`, same on every rank."""
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(SEQ, BATCH_SIZE, HEADS, HEAD_DIM, generator=g) for _ in range(3)]
    return qkv, torch.randn(SEQ, BATCH_SIZE, HEADS * HEAD_DIM, generator=g)


def core_attention_run(cls, parallel, mask_type, head_slice):
    """Output and q/k/v gradients of `cls` on the heads `head_slice` of the shared inputs."""
    attention = cls(build_transformer_config(LM, parallel), layer_number=1, attn_mask_type=mask_type,
                    attention_type="self")
    qkv, upstream = qkv_and_upstream_grad()
    qkv = [t[:, :, head_slice].clone().requires_grad_(True) for t in qkv]
    out = attention(*qkv, attention_mask=None)  # [s, b, np/tp * hn]
    columns = slice(head_slice.start * HEAD_DIM, head_slice.stop * HEAD_DIM)
    (out * upstream[:, :, columns]).sum().backward()
    return {"out": out.detach(), "grads": [t.grad for t in qkv]}


def run_core_attention(out):
    """TP=1 DotProductAttention on all heads (reference), then SDPAttention at TP=2 on this rank's."""
    reference = {name: core_attention_run(DotProductAttention, ParallelConfig(), mask, slice(0, HEADS))
                 for name, mask in MASK_TYPES.items()}
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    initialize_model_parallel(parallel, SEED)
    rank = ps.get_tensor_model_parallel_rank()
    heads = slice(rank * HEADS // 2, (rank + 1) * HEADS // 2)
    sharded = {name: core_attention_run(SDPAttention, parallel, mask, heads) for name, mask in MASK_TYPES.items()}
    torch.save({"heads": (heads.start, heads.stop), "reference": reference, "tp2": sharded}, f"{out}/core_rank{rank}.pt")


def model_loss_and_grads(attention, parallel, tp_group):
    """Loss terms and full gradients on the whole batch (contrastive negatives from this rank's
    data-parallel group: at TP=1 each rank computes the whole reference, so no group there)."""
    set_seed(SEED)
    model = LCLModel(replace(CFG, attention=attention), parallel)
    dp_group = ps.get_data_parallel_group() if tp_group is not None else None
    terms = forward_loss(model, BATCH, LCLLoss(LossConfig(), dp_group))
    terms.total.backward()
    return {"terms": {k: v.detach().clone() for k, v in terms.metrics().items()},
            "grads": named_full(model, tp_group, "grad")}


def run_whole_model(out):
    """attention=unfused at TP=1 (every rank computes it) against attention=sdpa at TP=2."""
    initialize_model_parallel(ParallelConfig(), SEED)
    save_rank0(model_loss_and_grads("unfused", ParallelConfig(), None), out, "model_unfused_tp1.pt")
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    initialize_model_parallel(parallel, SEED)
    tp2 = model_loss_and_grads("sdpa", parallel, ps.get_tensor_model_parallel_group())
    save_rank0(tp2, out, "model_sdpa_tp2.pt")


def main():
    out = parse_out_dir()
    initialize_distributed(ParallelConfig(), SEED)
    run_core_attention(out)
    run_whole_model(out)
    mark_done(out)


if __name__ == "__main__":
    main()

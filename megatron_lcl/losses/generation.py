"""L_gen: next-token cross-entropy on text targets, vocab-parallel under tensor parallelism."""

import torch
from megatron.core import tensor_parallel


def generation_loss_sum(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor):
    """Sum of per-token cross-entropy over masked-in targets, and the number of those targets.

    logits `[s, b, v/tp]` (vocab-parallel), labels and loss_mask `[b, s]`. The mask is 0 for targets
    that are image placeholders, `<EoI>` or padding.
    """
    labels_sb = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
    per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels_sb)  # [s, b]
    mask = loss_mask.transpose(0, 1).to(per_token.dtype)
    return (per_token * mask).sum(), mask.sum()

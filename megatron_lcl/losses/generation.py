"""L_gen: next-token cross-entropy on text targets, vocab-parallel under tensor parallelism."""

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel


def generation_loss_sum(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor):
    """Sum of per-token cross-entropy over masked-in targets, and the number of those targets.

    logits `[s, b, v/tp]` (vocab-parallel), labels and loss_mask `[b, s]`. The mask is 0 for targets
    that are image placeholders, `<EoI>` or padding. With the vocabulary split (TP > 1) megatron-core's
    vocab-parallel cross-entropy computes it; with the whole vocabulary on this rank, torch's fused
    `cross_entropy` does: the same value and gradient without the TP all-reduces and the Python
    autograd function (faster on CPU: docs/gpu.md).
    """
    labels_sb = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels_sb)  # [s, b]
    else:
        per_token = F.cross_entropy(logits.float().flatten(0, 1), labels_sb.flatten(),
                                    reduction="none").view_as(labels_sb)
    mask = loss_mask.transpose(0, 1).to(per_token.dtype)
    return (per_token * mask).sum(), mask.sum()

"""One micro-batch through the model and the loss (pipeline size 1), and the loss on model outputs."""

from megatron_lcl.data.batch import LCLBatch
from megatron_lcl.losses import LCLLoss, LossTerms


def loss_terms(out, batch: LCLBatch, loss_fn: LCLLoss) -> LossTerms:
    """`LCLOutput` of the last stage + the batch's targets -> the named loss terms."""
    return loss_fn(out.logits, out.image_features, out.text_features, out.logit_scale,
                   batch.labels, batch.loss_mask)


def forward_loss(model, batch: LCLBatch, loss_fn: LCLLoss) -> LossTerms:
    out = model(batch.tokens, batch.position_ids, batch.images, batch.image_sample_index,
                batch.boi_positions, with_logits=loss_fn.needs_logits)
    return loss_terms(out, batch, loss_fn)

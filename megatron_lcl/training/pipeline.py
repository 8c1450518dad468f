"""The vision-language pipeline: LCL model stages driven by megatron-core's own schedules.

Stage layout (megatron-core `pre_process` / `post_process`): the first stage holds the ViT, pooling,
projector, splice and its share of LM layers; middle stages LM layers only; the last stage the last LM
layers, final LN, output layer, `<BoI>` head and both losses.

Transport. v_i is made on the first stage but consumed on the last. Its `[n, e]` values travel in K
"carry rows" appended to the `[s, b, h]` tensor the schedule sends (zero padded), so the schedule runs
with `seq_length = s + K`; middle stages pass the rows through untouched and autograd carries v's
gradient back to the ViT. The model itself knows nothing of this (it exposes embed/decode/finish).

How the loss terms combine: per micro-batch, `LCLLoss` returns this rank's share of
`mean_tokens(L_gen) + lambda * mean_images(L_con)` where both means run over the micro-batch on all
data-parallel ranks (negatives = that micro-batch's images on every DP rank). The schedule divides
each micro-batch's loss by the number of micro-batches and DDP averages gradients over DP ranks,
so a step optimises the mean over micro-batches of the global per-micro-batch loss.
"""

from dataclasses import dataclass
from functools import partial
from typing import Iterator, List, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_lcl.config import ModelConfig, ParallelConfig, max_images_per_sample
from megatron_lcl.data.batch import LCLBatch
from megatron_lcl.losses import LCLLoss, LossTerms
from megatron_lcl.models.lcl_model import LCLModel
from megatron_lcl.runtime.layout import ParallelLayout


def wrap_ddp(model: LCLModel, parallel: ParallelConfig) -> DistributedDataParallel:
    """megatron-core DDP (grads reduced in fp32, over the DP group), wired into the schedule."""
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=parallel.use_distributed_optimizer),
        model)
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp


# ------------------------------------------------------------------------------ carry rows

def carry_rows_needed(max_images: int, embed_dim: int, micro_batch_size: int, hidden_size: int) -> int:
    """K: rows of `[b, h]` that hold up to `max_images` feature vectors of size e between stages."""
    return max(1, -(-max_images * embed_dim // (micro_batch_size * hidden_size)))


def pack_rows(features: torch.Tensor, rows: int, b: int, h: int) -> torch.Tensor:
    """`[n, e]` -> `[rows, b, h]`, zero padded (differentiable)."""
    flat = features.reshape(-1)
    assert flat.numel() <= rows * b * h, (
        f"{features.shape[0]} images do not fit the {rows} carry rows of the pipeline buffer; "
        "raise the max images per micro-batch the pipeline is built for")
    return torch.cat([flat, flat.new_zeros(rows * b * h - flat.numel())]).view(rows, b, h)


def unpack_rows(carry: torch.Tensor, num_images: int, embed_dim: int) -> torch.Tensor:
    """`[rows, b, h]` -> the first `num_images` feature vectors `[n, e]` (inverse of `pack_rows`)."""
    return carry.reshape(-1)[: num_images * embed_dim].view(num_images, embed_dim)


@dataclass
class PipelineShape:
    """What megatron-core's schedule needs to size the tensors sent between stages."""

    seq_length: int
    micro_batch_size: int
    carry_rows: int

    @classmethod
    def for_model(cls, cfg: ModelConfig, seq_length: int, micro_batch_size: int) -> "PipelineShape":
        max_images = max_images_per_sample(cfg.vision.num_image_tokens, seq_length)
        k = carry_rows_needed(max_images * micro_batch_size, cfg.heads.embed_dim,
                              micro_batch_size, cfg.lm.hidden_size)
        return cls(seq_length, micro_batch_size, k)


def forward_stage(model: LCLModel, batch: Optional[LCLBatch], carry_rows: int, with_logits: bool = True):
    """One pipeline stage. Returns `[s + K, b, h]` to send on, or the `LCLOutput` on the last stage.

    `batch` may be None on middle stages (they need no data).
    """
    if model.pre_process:
        hidden, image_features = model.embed(batch.tokens, batch.position_ids, batch.images,
                                             batch.image_sample_index, batch.boi_positions)
        carry = pack_rows(image_features, carry_rows, hidden.shape[1], hidden.shape[2])  # [K, b, h]
    else:
        x = model.stage_input  # [s + K, b, h]
        hidden, carry = x[:-carry_rows], x[-carry_rows:]
    hidden = model.decode(hidden)  # [s, b, h]
    if not model.post_process:
        return torch.cat([hidden, carry], dim=0)  # [s + K, b, h]
    image_features = unpack_rows(carry, batch.num_images, model.text_head.proj.out_features)
    return model.finish(hidden, image_features, batch.image_sample_index, batch.boi_positions, with_logits)


# ------------------------------------------------------------------------------ loss and schedule

def loss_terms(out, batch: LCLBatch, loss_fn: LCLLoss) -> LossTerms:
    """`LCLOutput` of the last stage + the batch's targets -> the named loss terms."""
    return loss_fn(out.logits, out.image_features, out.text_features, out.logit_scale,
                   batch.labels, batch.loss_mask)


def forward_loss(model: LCLModel, batch: LCLBatch, loss_fn: LCLLoss) -> LossTerms:
    """One micro-batch through the whole model (pipeline size 1) and the loss."""
    out = model(batch.tokens, batch.position_ids, batch.images, batch.image_sample_index,
                batch.boi_positions, with_logits=loss_fn.needs_logits)
    return loss_terms(out, batch, loss_fn)


class LCLForwardStep:
    """megatron-core `forward_step_func`: returns (output, loss_func); loss_func -> (loss, logs)."""

    def __init__(self, loss_fn: LCLLoss, shape: PipelineShape, layout: ParallelLayout):
        self.loss_fn, self.shape = loss_fn, shape
        self.first, self.last = layout.is_first_stage, layout.is_last_stage

    def __call__(self, data_iterator: Optional[Iterator[LCLBatch]], model):
        batch = next(data_iterator) if (self.first or self.last) else None
        stage = model.module if isinstance(model, DistributedDataParallel) else model
        if self.first and self.last:
            terms = forward_loss(stage, batch, self.loss_fn)
        else:
            out = forward_stage(stage, batch, self.shape.carry_rows, self.loss_fn.needs_logits)
            if not self.last:
                return out, None  # [s + K, b, h] to the next stage
            terms = loss_terms(out, batch, self.loss_fn)
        return terms.total, partial(_loss_func, terms)


def _loss_func(terms, output_tensor):
    return output_tensor, {k: v.detach().clone() for k, v in terms.metrics().items()}


def forward_backward(model, data_iterator, num_microbatches: int, loss_fn: LCLLoss,
                     shape: PipelineShape, layout: ParallelLayout, forward_only: bool = False) -> List[dict]:
    """One step's forward and backward over `num_microbatches` micro-batches (1F1B when PP > 1).

    Returns the per-micro-batch metric dicts on the last stage (empty list elsewhere).
    """
    pipelined = layout.pp_size > 1
    return get_forward_backward_func()(
        forward_step_func=LCLForwardStep(loss_fn, shape, layout), data_iterator=data_iterator,
        model=[model], num_microbatches=num_microbatches,
        seq_length=shape.seq_length + (shape.carry_rows if pipelined else 0),  # [s + K, b, h] sent
        micro_batch_size=shape.micro_batch_size, forward_only=forward_only)

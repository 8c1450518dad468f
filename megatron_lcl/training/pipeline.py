"""The vision-language pipeline: LCL model stages driven by megatron-core's own schedules.

Stage layout (megatron-core `pre_process` / `post_process`): the first stage holds the ViT, pooling,
projector, splice and its share of LM layers; middle stages LM layers only; the last stage the last LM
layers, final LN, output layer, `<BoI>` head and both losses.

Transport. v_i is made on the first stage but consumed on the last. Its `[n, e]` values travel in K
"carry rows" appended to the `[s, b, h]` tensor the schedule sends (zero padded), so the schedule runs
with `seq_length = s + K`; middle stages pass the rows through untouched and autograd carries v's
gradient back to the ViT. The model itself knows nothing of this (it exposes embed/decode/finish).

How the loss terms combine (`megatron_lcl.losses.lcl`): a step optimises L_gen over the step's text
targets on all data-parallel ranks (per token, however the step is split into micro-batches and ranks)
plus lambda x L_con. Before the schedule runs, the last stage exchanges the step's counts over the DP
group on the CPU, once (`LCLLoss.step_counts`: they are known at collate time), so no micro-batch reads a
size from the device. Each micro-batch returns its share of the step objective, pre-scaled for the
schedule's division by the number of micro-batches and DDP's average over DP ranks. L_con is

- `loss.contrastive_batch=micro_batch` (`forward_backward`): each image's InfoNCE against the images of
  its micro-batch on every DP rank, averaged over the step's images;
- `loss.contrastive_batch=step` (`step_forward_backward`, the paper's semantics): ONE InfoNCE over
  all images of the step (InfoNCE or sigmoid). A feature cache ("gradient cache"): (1) a forward-only pass through the
  pipeline collects v_i and t_i of every micro-batch on the last stage (no vocabulary logits);
  (2) `LCLLoss.step_contrastive` computes the step's L_con (InfoNCE: local rows against gathered
  columns; sigmoid: local rows against every rank's texts passed around the DP ring), and
  its gradients with respect to every v_i, t_i, the scale (and the bias); (3) the usual 1F1B pass backpropagates
  L_gen plus the surrogate of those cached gradients. The RNG state is put back between (1) and (3), so
  dropout and drop-path draw the same masks in both passes and the surrogate's gradient is exact.
  Cost: one extra forward pass without the output layer (`models.flops.step_flops`).
"""

from dataclasses import dataclass
from functools import partial
from typing import Iterator, List, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_lcl.config import ModelConfig, ParallelConfig, max_images_per_sample
from megatron_lcl.data.batch import LCLBatch
from megatron_lcl.losses import LCLLoss, LossTerms, MicroBatchCounts, StepCounts
from megatron_lcl.losses.lcl import FeatureGrads
from megatron_lcl.models.lcl_model import LCLModel, LCLOutput
from megatron_lcl.runtime.distributed import get_rng_state, set_rng_state
from megatron_lcl.runtime.layout import ParallelLayout


def wrap_ddp(model: LCLModel, parallel: ParallelConfig) -> DistributedDataParallel:
    """megatron-core DDP (grads reduced in fp32, over the DP group), wired into the schedule.

    The schedule runs all micro-batches but the last under `no_sync` and ends with `finalize_model_grads`
    (`ddp.finish_grad_sync`): without `parallel.overlap_grad_reduce` the whole reduce happens there; with
    it, each bucket's reduce starts from the backward hooks of the last micro-batch and is only waited
    for there. With `parallel.overlap_param_gather` the parameters are all-gathered by forward pre-hooks
    (see `megatron_lcl.training.optim.sync_params`).
    """
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=parallel.use_distributed_optimizer,
            overlap_grad_reduce=parallel.overlap_grad_reduce, bucket_size=parallel.bucket_size,
            overlap_param_gather=parallel.overlap_param_gather),
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

def loss_terms(out: LCLOutput, batch: LCLBatch, loss_fn: LCLLoss, counts: MicroBatchCounts,
               feature_grads: Optional[FeatureGrads] = None) -> LossTerms:
    """`LCLOutput` of the last stage + the batch's targets -> the named loss terms."""
    return loss_fn(out.logits, out.image_features, out.text_features, out.logit_scale,
                   batch.labels, batch.loss_mask, batch.con_index, counts, feature_grads, out.logit_bias)


def forward_loss(model: LCLModel, batch: LCLBatch, loss_fn: LCLLoss) -> LossTerms:
    """One micro-batch through the whole model (pipeline size 1) and the loss, as a step of its own
    (its counts are exchanged over the loss's DP group here: every DP rank calls it)."""
    counts = loss_fn.step_counts([batch]).micro_batch(0)
    return loss_terms(_whole_model(model, batch, loss_fn.needs_logits), batch, loss_fn, counts)


def _whole_model(model: LCLModel, batch: LCLBatch, with_logits: bool) -> LCLOutput:
    return model(batch.tokens, batch.position_ids, batch.images, batch.image_sample_index,
                 batch.boi_positions, with_logits=with_logits)


class _StageStep:
    """megatron-core `forward_step_func` skeleton: run this stage, hand non-last outputs on; the last
    stage's `LCLOutput` goes to `self.on_last(out, batch)` -> (loss tensor, {name: value})."""

    def __init__(self, shape: PipelineShape, layout: ParallelLayout, with_logits: bool):
        self.shape, self.with_logits = shape, with_logits
        self.first, self.last = layout.is_first_stage, layout.is_last_stage

    def __call__(self, data_iterator: Optional[Iterator[LCLBatch]], model):
        batch = next(data_iterator) if (self.first or self.last) else None
        stage = model.module if isinstance(model, DistributedDataParallel) else model
        if self.first and self.last:
            out = _whole_model(stage, batch, self.with_logits)
        else:
            out = forward_stage(stage, batch, self.shape.carry_rows, self.with_logits)
            if not self.last:
                return out, None  # [s + K, b, h] to the next stage
        loss, logs = self.on_last(out, batch)
        return loss, partial(_loss_func, logs)

    def on_last(self, out: LCLOutput, batch: LCLBatch):
        raise NotImplementedError


def _loss_func(logs: dict, output_tensor):
    return output_tensor, logs


class LCLForwardStep(_StageStep):
    """The training step's forward: loss terms per micro-batch, in order, with the step's `counts` (last
    stage; None elsewhere) and, when given, the step's feature gradients (one per micro-batch)."""

    def __init__(self, loss_fn: LCLLoss, shape: PipelineShape, layout: ParallelLayout,
                 counts: Optional[StepCounts], feature_grads: Optional[List[FeatureGrads]] = None):
        super().__init__(shape, layout, loss_fn.needs_logits)
        self.loss_fn, self.counts, self.micro_batch = loss_fn, counts, 0
        self.feature_grads = feature_grads

    def on_last(self, out, batch):
        k, self.micro_batch = self.micro_batch, self.micro_batch + 1
        grads = self.feature_grads[k] if self.feature_grads is not None else None
        terms = loss_terms(out, batch, self.loss_fn, self.counts.micro_batch(k), grads)
        return terms.total, {k: v.detach().clone() for k, v in terms.metrics().items()}


class FeatureStep(_StageStep):
    """Forward only, no logits: keeps each micro-batch's L_con features (v, t), the scale and the bias."""

    def __init__(self, shape: PipelineShape, layout: ParallelLayout):
        super().__init__(shape, layout, with_logits=False)
        self.image, self.text, self.scale, self.bias = [], [], None, None

    def on_last(self, out, batch):
        self.image.append(out.image_features.index_select(0, batch.con_index).detach())  # [n_con, e]
        self.text.append(out.text_features.index_select(0, batch.con_index).detach())
        self.scale = out.logit_scale.detach()
        self.bias = None if out.logit_bias is None else out.logit_bias.detach()
        return out.logit_scale.detach() * 0.0, {}


def run_schedule(step: _StageStep, model, data_iterator, num_microbatches: int, shape: PipelineShape,
                 layout: ParallelLayout, forward_only: bool) -> List[dict]:
    """megatron-core's schedule (1F1B when PP > 1) over `num_microbatches` micro-batches."""
    pipelined = layout.pp_size > 1
    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=data_iterator, model=[model], num_microbatches=num_microbatches,
        seq_length=shape.seq_length + (shape.carry_rows if pipelined else 0),  # [s + K, b, h] sent
        micro_batch_size=shape.micro_batch_size, forward_only=forward_only)


def forward_backward(model, data_iterator, num_microbatches: int, loss_fn: LCLLoss,
                     shape: PipelineShape, layout: ParallelLayout, forward_only: bool = False) -> List[dict]:
    """One step's forward and backward, L_con per micro-batch (`contrastive_batch=micro_batch`).

    `data_iterator` yields this rank's micro-batches (None on middle stages); the step's are taken first
    (their counts normalise the loss). Returns the per-micro-batch metric dicts on the last stage (empty
    list elsewhere; `LCLLoss.step_metrics` reduces them to the step's values).
    """
    batches = [next(data_iterator) for _ in range(num_microbatches)] if data_iterator is not None else None
    return _training_pass(model, batches, num_microbatches, loss_fn, shape, layout, forward_only)


def _training_pass(model, batches: Optional[List[LCLBatch]], num_microbatches: int, loss_fn: LCLLoss,
                   shape: PipelineShape, layout: ParallelLayout, forward_only: bool = False,
                   counts: Optional[StepCounts] = None, feature_grads: Optional[List[FeatureGrads]] = None):
    """The schedule's pass with the loss: the last stage needs the step's counts (exchanged here unless
    given) and, with step-wide L_con, each micro-batch's feature gradients."""
    if layout.is_last_stage and counts is None:
        counts = loss_fn.step_counts(batches)  # once per step, CPU ints over the DP group
    step = LCLForwardStep(loss_fn, shape, layout, counts, feature_grads)
    data = iter(batches) if batches is not None else None
    return run_schedule(step, model, data, num_microbatches, shape, layout, forward_only)


def uses_feature_pass(loss_fn: LCLLoss, num_microbatches: int) -> bool:
    """Whether a step runs the feature pass: step-wide L_con over more than one micro-batch."""
    return loss_fn.step_negatives and num_microbatches > 1


def step_forward_backward(model, batches: Optional[List[LCLBatch]], num_microbatches: int, loss_fn: LCLLoss,
                          shape: PipelineShape, layout: ParallelLayout) -> List[dict]:
    """One step's forward and backward with L_con over the whole step (the feature cache above).

    `batches`: this rank's micro-batches (None on middle stages). Falls back to `forward_backward`
    where the two are the same (one micro-batch per step, or no L_con).
    """
    if not uses_feature_pass(loss_fn, num_microbatches):
        return _training_pass(model, batches, num_microbatches, loss_fn, shape, layout)
    counts = loss_fn.step_counts(batches) if layout.is_last_stage else None  # once per step, CPU
    rng = get_rng_state()
    features = FeatureStep(shape, layout)
    with torch.no_grad():
        run_schedule(features, model, iter(batches) if batches is not None else None, num_microbatches,
                     shape, layout, forward_only=True)
    set_rng_state(rng)  # the training pass draws the same dropout / drop-path masks
    grads = (loss_fn.step_contrastive(features.image, features.text, features.scale, counts, features.bias)
             if layout.is_last_stage else None)
    return _training_pass(model, batches, num_microbatches, loss_fn, shape, layout, counts=counts,
                          feature_grads=grads)

"""The vision-language pipeline: LCL model stages driven by megatron-core's own schedules.

Stage layout (megatron-core `pre_process` / `post_process`): the first stage holds the ViT, pooling,
projector, splice and its share of LM layers; middle stages LM layers only; the last stage the last LM
layers, final LN, output layer, `<BoI>` head and both losses. v_i crosses the pipeline in K carry rows
appended to the `[s, b, h]` tensor the schedule sends, so the schedule runs with `seq_length = s + K`.

How the loss terms combine: per micro-batch, `LCLLoss` returns this rank's share of
`mean_tokens(L_gen) + lambda * mean_images(L_con)` where both means run over the micro-batch on all
data-parallel ranks (negatives = that micro-batch's images on every DP rank). The schedule divides
each micro-batch's loss by the number of micro-batches and DDP averages gradients over DP ranks,
so a step optimises the mean over micro-batches of the global per-micro-batch loss.
"""

from dataclasses import dataclass
from functools import partial
from typing import Iterator, List, Optional

from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_lcl.config import ModelConfig, ParallelConfig, PrecisionConfig, validate_model_config
from megatron_lcl.data.batch import LCLBatch
from megatron_lcl.losses import LCLLoss
from megatron_lcl.models.lcl_model import LCLModel, carry_rows_needed
from megatron_lcl.training.step import forward_loss, loss_terms


def build_model_stage(cfg: ModelConfig, parallel: ParallelConfig,
                      precision: Optional[PrecisionConfig] = None) -> LCLModel:
    """This rank's pipeline stage of the LCL model (config validated first)."""
    validate_model_config(cfg, parallel, precision)
    return LCLModel(cfg, parallel, precision, pre_process=ps.is_pipeline_first_stage(),
                    post_process=ps.is_pipeline_last_stage())


def wrap_ddp(model: LCLModel, parallel: ParallelConfig) -> DistributedDataParallel:
    """megatron-core DDP (grads reduced in fp32, over the DP group), wired into the schedule."""
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=parallel.use_distributed_optimizer),
        model)
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp


@dataclass
class PipelineShape:
    """What megatron-core's schedule needs to size the tensors sent between stages."""

    seq_length: int
    micro_batch_size: int
    carry_rows: int

    @classmethod
    def for_model(cls, cfg: ModelConfig, seq_length: int, micro_batch_size: int,
                  max_images_per_sample: int) -> "PipelineShape":
        k = carry_rows_needed(max_images_per_sample * micro_batch_size, cfg.heads.embed_dim,
                              micro_batch_size, cfg.lm.hidden_size)
        return cls(seq_length, micro_batch_size, k)


class LCLForwardStep:
    """megatron-core `forward_step_func`: returns (output, loss_func); loss_func -> (loss, logs)."""

    def __init__(self, loss_fn: LCLLoss, shape: PipelineShape):
        self.loss_fn = loss_fn
        self.shape = shape

    def __call__(self, data_iterator: Optional[Iterator[LCLBatch]], model):
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        batch = next(data_iterator) if (first or last) else None
        stage = model.module if isinstance(model, DistributedDataParallel) else model
        if first and last:
            terms = forward_loss(stage, batch, self.loss_fn)
        else:
            out = stage.forward_stage(batch, self.shape.carry_rows, self.loss_fn.needs_logits)
            if not last:
                return out, None  # [s + K, b, h] to the next stage
            terms = loss_terms(out, batch, self.loss_fn)
        return terms.total, partial(_loss_func, terms)


def _loss_func(terms, output_tensor):
    return output_tensor, {k: v.detach().clone() for k, v in terms.metrics().items()}


def forward_backward(model, data_iterator, num_microbatches: int, loss_fn: LCLLoss,
                     shape: PipelineShape, forward_only: bool = False) -> List[dict]:
    """One step's forward and backward over `num_microbatches` micro-batches (1F1B when PP > 1).

    Returns the per-micro-batch metric dicts on the last stage (empty list elsewhere).
    """
    pipelined = ps.get_pipeline_model_parallel_world_size() > 1
    return get_forward_backward_func()(
        forward_step_func=LCLForwardStep(loss_fn, shape), data_iterator=data_iterator,
        model=[model], num_microbatches=num_microbatches,
        seq_length=shape.seq_length + (shape.carry_rows if pipelined else 0),  # [s + K, b, h] sent
        micro_batch_size=shape.micro_batch_size, forward_only=forward_only)

"""The model factory: this rank's pipeline stage of the LCL model, from the model config."""

from typing import Optional

import torch

from megatron_lcl.config import ModelConfig, ParallelConfig, PrecisionConfig, validate_model_config
from megatron_lcl.models.lcl_model import LCLModel
from megatron_lcl.runtime.device import device as compute_device


def build_model(cfg: ModelConfig, parallel: ParallelConfig, precision: Optional[PrecisionConfig] = None, *,
                first_stage: bool = True, last_stage: bool = True,
                device: Optional[torch.device] = None, fuse_wgrad_accumulation: bool = False) -> LCLModel:
    """The LCL model stage holding the first and/or last pipeline stage's parts (config validated first),
    on `device` (default: this process's compute device, `megatron_lcl.runtime.device()`).

    Weights are initialised on the CPU (full tensors, then split: TP=k starts from TP=1's weights) and
    then moved. Data parallelism (DDP) is applied from outside, by the training code.
    `fuse_wgrad_accumulation`: Transformer Engine layers add weight gradients into megatron-core DDP's
    fp32 `main_grad` (`training.pipeline.wrap_ddp`); only the code that wraps the model so may ask
    (evaluation, benchmarks and plain torch DDP leave it off: TE's backward would find no `main_grad`).
    """
    validate_model_config(cfg, parallel, precision)
    model = LCLModel(cfg, parallel, precision, pre_process=first_stage, post_process=last_stage,
                     fuse_wgrad_accumulation=fuse_wgrad_accumulation)
    return model.to(device if device is not None else compute_device())

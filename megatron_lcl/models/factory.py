"""The model factory: this rank's pipeline stage of the LCL model, from the model config."""

from typing import Optional

from megatron_lcl.config import ModelConfig, ParallelConfig, PrecisionConfig, validate_model_config
from megatron_lcl.models.lcl_model import LCLModel


def build_model(cfg: ModelConfig, parallel: ParallelConfig, precision: Optional[PrecisionConfig] = None, *,
                first_stage: bool = True, last_stage: bool = True) -> LCLModel:
    """The LCL model stage holding the first and/or last pipeline stage's parts (config validated first).

    Data parallelism (DDP) is applied from outside, by the training code.
    """
    validate_model_config(cfg, parallel, precision)
    return LCLModel(cfg, parallel, precision, pre_process=first_stage, post_process=last_stage)

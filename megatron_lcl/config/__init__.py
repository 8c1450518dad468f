"""Configuration: typed dataclass sections, YAML + `a.b=c` overrides, and one validation entry.

    from megatron_lcl.config import load_config, validate_config
    cfg = load_config("examples/configs/tiny_cpu.yaml", ["optimizer.lr=1e-3"])
    validate_config(cfg, world_size=2)           # ConfigError naming every bad field

- `model.py`    model sections (vision, lm, heads, loss, parallel, precision), presets (megatron-core's
                TransformerConfig is made from them in `megatron_lcl.models.transformer_config`)
- `run.py`      run sections (data, train, optimizer, logging, checkpoint) and `LCLConfig`
- `io.py`       YAML <-> `LCLConfig`, overrides, typed coercion with field-naming errors
- `validate.py` every validation rule, once (`config_errors(cfg) -> list`)
"""

from megatron_lcl.config.io import (config_from_dict, config_to_yaml, from_dict, load_config, save_config,
                                    section_to_dict)
from megatron_lcl.config.model import (LM_PRESETS, VISION_PRESETS, HeadsConfig, LMConfig, LossConfig, ModelConfig,
                                       ParallelConfig, PrecisionConfig, VisionConfig, apply_preset,
                                       padded_vocab_size)
from megatron_lcl.config.run import (CheckpointConfig, DataConfig, LCLConfig, LoggingConfig, OptimizerConfig,
                                     TrainConfig, num_microbatches)
from megatron_lcl.config.validate import (ConfigError, config_errors, max_images_per_sample, min_seq_length, model_config_errors,
                                          validate_config, validate_model_config)

__all__ = [
    "LM_PRESETS", "VISION_PRESETS", "CheckpointConfig", "ConfigError", "DataConfig", "HeadsConfig", "LCLConfig",
    "LMConfig", "LoggingConfig", "LossConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig",
    "PrecisionConfig", "TrainConfig", "VisionConfig", "apply_preset",
    "config_errors", "config_from_dict", "config_to_yaml", "from_dict", "load_config", "max_images_per_sample", "min_seq_length",
    "model_config_errors", "num_microbatches", "padded_vocab_size", "save_config", "section_to_dict",
    "validate_config", "validate_model_config",
]

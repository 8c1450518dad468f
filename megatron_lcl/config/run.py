"""The run configuration: the model sections of `megatron_lcl.config` plus data, training, optimizer,
logging and checkpoint sections. One YAML per experiment + `a.b=c` overrides (`config_io`).

Each function receives the section it uses; `LCLConfig` only composes them and checks the fields
that relate sections to each other (`validate_run_config`).
"""

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_lcl.config import (ConfigError, LossConfig, ModelConfig, ParallelConfig, PrecisionConfig,
                                 validate_model_config)


@dataclass
class DataConfig:
    """Where the prepared shards are and how micro-batches are built (`megatron_lcl.data.loader`)."""

    path: Optional[List[str]] = None  # prepared shards: folders, globs or shards (tools/prepare_data.py)
    tokenizer: Optional[str] = None  # sentencepiece .model (tools/train_tokenizer.py)
    seq_length: int = 128
    micro_batch_size: int = 2  # samples per micro-batch per data-parallel rank
    num_workers: int = 1  # DataLoader worker processes per rank (0: in the training process)
    shuffle_buffer: int = 256
    packing: str = "auto"  # auto | truncate | concat | pack (see the loader)
    seed: int = 1234


@dataclass
class TrainConfig:
    train_steps: int = 100  # optimizer steps of the whole run (the LR schedule spans them)
    global_batch_size: int = 4  # samples per step over all DP ranks: micro x DP x micro-batches
    seed: int = 1234
    exit_after_steps: Optional[int] = None  # stop (with a checkpoint) after this many steps of this launch
    drop_path_ramp_steps: int = 0  # drop-path rate rises linearly 0 -> model.vision.drop_path_rate
    max_consecutive_nonfinite: int = 5  # skipped non-finite steps in a row before the run stops


@dataclass
class OptimizerConfig:
    """AdamW + cosine with linear warmup (paper: beta (0.9, 0.95), wd 0.1, lr 3e-4, 2k warmup)."""

    lr: float = 3e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1  # not applied to biases and params with < 2 dims (norms, logit_scale)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 2000
    decay_steps: Optional[int] = None  # None: train.train_steps
    decay_style: str = "cosine"  # cosine | linear | constant


@dataclass
class LoggingConfig:
    log_interval: int = 10  # steps between metrics.jsonl / TensorBoard / console lines
    tensorboard: bool = True
    console: bool = True
    collapse_monitor: bool = True  # effective rank of the v_i over the global batch
    peak_flops_per_s: Optional[float] = None  # per device (e.g. 989e12 H100 bf16 dense): logs `mfu`


@dataclass
class CheckpointConfig:
    save_interval: Optional[int] = 1000  # steps; None: only at exit
    keep_last: int = 3
    save_at_exit: bool = True
    load: Optional[str] = None  # a checkpoints/ folder (its `latest`) or one step_* folder
    auto_resume: bool = True  # resume from run_dir/checkpoints when it holds a checkpoint
    load_optimizer: bool = True
    load_data_state: bool = True  # ignored (with a warning) when the data-parallel layout changed
    # Distributed optimizer only: fully_reshardable (loads at any TP/PP/DP; gathers on DP rank 0 to
    # save) or dp_reshardable (cheaper saves; loads at the same TP/PP only). auto: fully_reshardable
    # where megatron-core can load it (Apex/TE optimizers, i.e. GPU), else dp_reshardable.
    optimizer_format: str = "auto"


@dataclass
class LCLConfig:
    run_dir: str = "runs/lcl"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def num_microbatches(train: TrainConfig, data: DataConfig, dp_size: int) -> int:
    return train.global_batch_size // (data.micro_batch_size * dp_size)


def validate_run_config(cfg: LCLConfig, world_size: Optional[int] = None) -> None:
    """Fail before start-up with every problem listed, each naming its fields."""
    errors = []

    def need(cond, msg):
        if not cond:
            errors.append(msg)

    try:
        validate_model_config(cfg.model, cfg.parallel, cfg.precision, cfg.data.seq_length)
    except ConfigError as e:
        errors += [line.strip()[2:] for line in str(e).splitlines()[1:]]
    t, o, d, c = cfg.train, cfg.optimizer, cfg.data, cfg.checkpoint
    need(d.path is not None, "data.path is required: the prepared shards (tools/prepare_data.py)")
    need(d.tokenizer is not None, "data.tokenizer is required: a .model from tools/train_tokenizer.py")
    need(cfg.loss.mode in ("lcl", "gen", "con"), f"loss.mode ({cfg.loss.mode!r}) must be lcl, gen or con")
    need(t.train_steps > 0, f"train.train_steps ({t.train_steps}) must be > 0")
    need(d.micro_batch_size > 0, f"data.micro_batch_size ({d.micro_batch_size}) must be > 0")
    need(o.decay_style in ("cosine", "linear", "constant"),
         f"optimizer.decay_style ({o.decay_style!r}) must be cosine, linear or constant")
    need(0 <= o.min_lr <= o.lr, f"optimizer.min_lr ({o.min_lr}) must be in [0, optimizer.lr ({o.lr})]")
    need(o.warmup_steps >= 0, f"optimizer.warmup_steps ({o.warmup_steps}) must be >= 0")
    need(d.packing in ("auto", "truncate", "concat", "pack"),
         f"data.packing ({d.packing!r}) must be auto, truncate, concat or pack")
    need(cfg.logging.log_interval > 0, f"logging.log_interval ({cfg.logging.log_interval}) must be > 0")
    need(c.optimizer_format in ("auto", "fully_reshardable", "dp_reshardable"),
         f"checkpoint.optimizer_format ({c.optimizer_format!r}) must be auto, fully_reshardable or dp_reshardable")
    need(c.keep_last >= 1, f"checkpoint.keep_last ({c.keep_last}) must be >= 1")
    need(c.save_interval is None or c.save_interval > 0,
         f"checkpoint.save_interval ({c.save_interval}) must be > 0 or null")
    if world_size is not None:
        errors += _batch_errors(cfg, world_size)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def _batch_errors(cfg: LCLConfig, world_size: int) -> List[str]:
    p = cfg.parallel
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    if world_size % model_parallel:
        return [f"world size ({world_size}) must be divisible by parallel.tensor_model_parallel_size "
                f"({p.tensor_model_parallel_size}) x parallel.pipeline_model_parallel_size "
                f"({p.pipeline_model_parallel_size})"]
    dp = world_size // model_parallel
    per_step = cfg.data.micro_batch_size * dp
    if cfg.train.global_batch_size % per_step:
        return [f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
                f"data.micro_batch_size ({cfg.data.micro_batch_size}) x data-parallel size ({dp})"]
    return []

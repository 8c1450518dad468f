"""The run configuration: the model sections (`config.model`) plus data, training, optimizer, logging
and checkpoint sections, composed in `LCLConfig`. One YAML per experiment + `a.b=c` overrides
(`config.io`); validation in `config.validate`.

Each function receives the section it uses, not the whole tree.
"""

import sys
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

from megatron_lcl.config.model import LossConfig, ModelConfig, ParallelConfig, PrecisionConfig


@dataclass
class DataConfig:
    """Where the prepared shards are and how micro-batches are built (`megatron_lcl.data.loader`)."""

    # prepared shards: folders, globs or shards (tools/prepare_data.py); a weighted blend in Megatron's
    # convention alternates weight and path: [0.5, /data/laion, 0.5, /data/mmc4] (see `data_blend`)
    path: Optional[List[Any]] = None
    tokenizer: Optional[str] = None  # sentencepiece .model (tools/train_tokenizer.py)
    seq_length: int = 128
    micro_batch_size: int = 2  # samples per micro-batch per data-parallel rank
    num_workers: int = 1  # DataLoader worker processes per rank (0: in the training process); speed only
    # logical readers: the unit of data order and of the saved data position. The samples of a step do
    # not depend on the DP size or on num_workers; every DP size the run may use must divide it.
    num_readers: int = 8
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
    # On resume the schedule above must equal the checkpoint's (lr, min_lr, warmup_steps, decay_style,
    # weight_decay, decay_steps or train.train_steps), else the run is refused naming the fields; true:
    # apply these values from the checkpoint's step on (e.g. to extend train.train_steps).
    override_scheduler: bool = False


@dataclass
class LoggingConfig:
    log_interval: int = 10  # steps between metrics.jsonl / TensorBoard / console lines
    tensorboard: bool = True
    console: bool = True
    collapse_monitor: bool = True  # effective rank of the v_i over the global batch
    peak_flops_per_s: Optional[float] = None  # per device (e.g. 989e12 H100 bf16 dense): logs `mfu`


BACKGROUND_SAVES_SUPPORTED = sys.platform.startswith("linux")  # PR_SET_PDEATHSIG (checkpoint.writer)


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
    # Interval saves written in the background by a writer process per rank (started at set-up) while
    # training goes on; the final save (end, stop signal) is written at once. null: on where supported
    # (Linux, where the writer can be tied to its rank's life).
    async_save: Optional[bool] = None

    def background_saves(self) -> bool:
        """`async_save` resolved (null: on where supported)."""
        return self.async_save if self.async_save is not None else BACKGROUND_SAVES_SUPPORTED


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


def path_weight(item) -> Optional[float]:
    if isinstance(item, bool):
        return None
    try:
        return float(item)
    except (TypeError, ValueError):
        return None


def data_blend(path: Optional[List[Any]]) -> Optional[List[Tuple[float, str]]]:
    """`[w1, p1, w2, p2, ...]` (Megatron's `--data-path` convention) -> [(w1, p1), ...]; None when
    `path` is a plain list of paths. Weights are relative (the loader normalises them); whether they
    are positive and well placed is `config.validate`'s to check."""
    if not path or len(path) < 2 or len(path) % 2 or path_weight(path[0]) is None:
        return None
    return [(path_weight(w), str(p)) for w, p in zip(path[0::2], path[1::2])]


def num_microbatches(train: TrainConfig, data: DataConfig, dp_size: int) -> int:
    return train.global_batch_size // (data.micro_batch_size * dp_size)

"""The parallel layout of this process, read once from megatron-core after its groups exist.

    layout = initialize_distributed(cfg.parallel, seed)       # returns a ParallelLayout
    layout.dp_size, layout.is_first_stage, layout.dp_group

Builders and the trainer take this object instead of reading megatron-core's `parallel_state` globals
in their hot paths (torchtitan's `ParallelDims` plays the same role).
"""

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from megatron.core import parallel_state as ps


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    dp_group: Any  # torch.distributed ProcessGroup of this rank's data-parallel replicas

    @classmethod
    def current(cls) -> "ParallelLayout":
        """Read from megatron-core's initialised `parallel_state` (and torch.distributed)."""
        return cls(world_size=dist.get_world_size(), rank=dist.get_rank(),
                   tp_size=ps.get_tensor_model_parallel_world_size(),
                   pp_size=ps.get_pipeline_model_parallel_world_size(),
                   dp_size=ps.get_data_parallel_world_size(),
                   tp_rank=ps.get_tensor_model_parallel_rank(),
                   pp_rank=ps.get_pipeline_model_parallel_rank(),
                   dp_rank=ps.get_data_parallel_rank(),
                   dp_group=ps.get_data_parallel_group())

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def needs_data(self) -> bool:
        """The first stage feeds the model, the last one reads the targets; middle stages take no data."""
        return self.is_first_stage or self.is_last_stage

    @property
    def is_logging_rank(self) -> bool:
        """One rank per (TP, DP) replica set holds each value once: TP rank 0 of DP rank 0."""
        return self.tp_rank == 0 and self.dp_rank == 0

    def sizes(self) -> dict:
        """The layout a checkpoint records (its meta.json `parallel`)."""
        return {"tensor_model_parallel_size": self.tp_size, "pipeline_model_parallel_size": self.pp_size,
                "data_parallel_size": self.dp_size}

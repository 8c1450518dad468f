"""Process-level runtime: distributed initialisation, the parallel layout, the CPU adaptation of
megatron-core (`cpu.py`) and its version adaptations (`mcore_compat.py`)."""

from megatron_lcl.runtime.device import device, pin_memory_enabled, to_device
from megatron_lcl.runtime.distributed import (
    destroy_distributed,
    free_port,
    initialize_distributed,
    initialize_model_parallel,
    set_seed,
)
from megatron_lcl.runtime.layout import ParallelLayout

__all__ = ["device", "to_device", "pin_memory_enabled", "initialize_distributed", "initialize_model_parallel", "destroy_distributed", "set_seed", "free_port",
           "ParallelLayout"]

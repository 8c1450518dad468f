"""Process-level runtime: distributed initialisation and the CPU adaptation of megatron-core."""

from megatron_lcl.runtime.distributed import (
    destroy_distributed,
    initialize_distributed,
    initialize_model_parallel,
    set_seed,
)

__all__ = ["initialize_distributed", "initialize_model_parallel", "destroy_distributed", "set_seed"]

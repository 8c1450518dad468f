"""Process-level runtime: distributed initialisation (which installs the CPU adaptation of
megatron-core, `cpu.py`, and its version adaptations, `mcore_compat.py`), the parallel layout and the
compute device.

The device functions are imported with the package; the rest on first use, so that `runtime.device`
(the data loader's) does not import megatron-core.
"""

from megatron_lcl.lazy import lazy_getattr
from megatron_lcl.runtime.device import device, pin_memory_enabled, to_device

_EXPORTS = {
    "initialize_distributed": "distributed",
    "initialize_model_parallel": "distributed",
    "destroy_distributed": "distributed",
    "set_seed": "distributed",
    "free_port": "distributed",
    "ParallelLayout": "layout",
}

__all__ = sorted(["device", "to_device", "pin_memory_enabled", *_EXPORTS])

__getattr__ = lazy_getattr(__name__, _EXPORTS)

"""Where this process computes: the one device function every model stage, batch and collective
buffer goes through.

Under CUDA that is the GPU `initialize_distributed` bound the process to (LOCAL_RANK's); otherwise the
CPU. Callers write the same lines for both; only `runtime/` knows the difference.
"""

import torch


def device() -> torch.device:
    """The local GPU under CUDA (`torch.cuda.current_device()`), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(obj, non_blocking: bool = True):
    """Move a tensor, or anything with a `.to(device, non_blocking=...)` (an `LCLBatch`), to `device()`.

    `non_blocking` copies overlap with compute when the source is in pinned memory (the loader pins
    batches under CUDA); on CPU the move is a no-op.
    """
    return obj.to(device(), non_blocking=non_blocking)


def pin_memory_enabled() -> bool:
    """Whether loaders should pin batches (only useful, and only possible, with CUDA)."""
    return torch.cuda.is_available()

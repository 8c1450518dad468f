"""Let megatron-core run on CPU with the gloo backend.

This is the ONE place in megatron_lcl that adapts torch and megatron-core to the CPU (their version
adaptations are its sibling `mcore_compat.py`). `megatron_lcl.runtime.distributed` installs it at
distributed initialisation, only when CUDA is absent; it is a no-op otherwise.

megatron-core assumes CUDA in a handful of places (measured with megatron-core 0.16.1, and the same set
covers 0.19.2, which adds `torch.cuda.current_stream()` to its gradient sync; its other version
adaptations are in `mcore_compat.py`):
- the tensor-parallel RNG tracker reads and writes CUDA generator states;
- `torch.cuda.current_device / synchronize / current_stream` are called directly (the first also as
  `device=` of buffers made in autograd backward passes);
- `device="cuda"` literals in the pipeline schedules, attention-mask helpers and buffers;
- `param.type() == 'torch.cuda.FloatTensor'` asserts in grad clipping and the distributed optimizer.

The RNG and `torch.cuda.*` calls are redirected to their CPU equivalents; the device literals and
the type check are handled by a `TorchFunctionMode` that rewrites CUDA devices to CPU.

That mode costs a Python call for every torch operation, so the hot code, which holds no CUDA literal,
runs without it (`native_torch`): megatron-core's forward step (the model's forward and the loss) and
backward step, and torch's AdamW update (the optimizer megatron-core builds without Apex or Transformer
Engine). The one literal in those paths, megatron-core's causal mask of the unfused attention, is made
on CPU here. The gain is measured in docs/gpu.md (`tools/bench_vs_torch.py`).
"""

import contextlib
import ctypes
import functools
import os

import torch
from megatron.core.fusions import fused_softmax
from megatron.core.pipeline_parallel import schedules
from megatron.core.tensor_parallel import random as mcore_random
from torch.overrides import TorchFunctionMode

_ENABLED = False


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # `torch.cuda.current_device()` returns an int, used as `device=<int>`.
    return isinstance(device, int) and not isinstance(device, bool)


# Tensor types megatron-core checks by name (fp32 params, bf16/fp16 params of mixed precision).
_CPU_TYPE_NAMES = ("torch.FloatTensor", "torch.BFloat16Tensor", "torch.HalfTensor")


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites `device=cuda...` (and `.to('cuda')`) to CPU; reports CPU float types as cuda ones for
    megatron-core's `param.type() == 'torch.cuda.FloatTensor'`-style checks."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and result in _CPU_TYPE_NAMES:
            return result.replace("torch.", "torch.cuda.", 1)
        return result


class _NullStream:
    """Stands in for `torch.cuda.current_stream()` on CPU, where all work is synchronous."""

    def wait_stream(self, _other):
        pass

    def wait_event(self, _event):  # megatron-core 0.19's gradient buffers (CUDA-graph replays only)
        pass

    def synchronize(self):
        pass

    def record_event(self, _event=None):
        return None


def enable_cpu_runtime() -> None:
    """Install the CPU adaptation. Idempotent; does nothing when CUDA is available."""
    global _ENABLED
    if _ENABLED or torch.cuda.is_available():
        return
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    # (not torch.manual_seed: that calls torch.cuda.manual_seed_all itself)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None
    # A device, not the index 0: megatron-core writes `device=torch.cuda.current_device()`, also in the
    # backward of its autograd Functions (the sequence-parallel reduce-scatter), where the mode below
    # is not active.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _NullStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    fused_softmax.get_default_causal_mask = _causal_mask
    schedules.forward_step = natively(schedules.forward_step)
    schedules.backward_step = natively(schedules.backward_step)
    # The class's step, before any optimizer wraps it with torch's step hooks (which keep `native`).
    torch.optim.AdamW.step = natively(torch.optim.AdamW.step)

    _keep_freed_memory()

    global _MODE
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # stays pushed for the life of the process
    _ENABLED = True


_MODE = None

# glibc's malloc options (mallopt): the sizes below which freed memory stays in the process.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = {_M_MMAP_THRESHOLD: 1 << 30, _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20}


def _keep_freed_memory() -> bool:
    """Have glibc keep freed blocks (up to 1 GB) for reuse instead of returning them to the kernel.

    torch's CPU allocator has no cache: every activation and gradient is a fresh malloc, and with glibc's
    defaults a block of more than a few MB is mmap-ed and unmapped each time (or trimmed off the heap),
    so every step page-faults its large tensors in again (the logits, the embedding's gradient). Keeping
    them, as a caching allocator does on a GPU, shortens the CPU step (measured in docs/gpu.md); memory
    stays at the process's peak. Skipped when the user set any
    MALLOC_* variable, or the C library is not glibc. Returns whether it applied.
    """
    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(option, value) == 1 for option, value in MALLOC_SETTINGS.items())


@functools.lru_cache(maxsize=None)
def _causal_mask(sq: int) -> torch.Tensor:
    """megatron-core's `get_default_causal_mask` (True above the diagonal), made on CPU."""
    return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)


@contextlib.contextmanager
def native_torch():
    """Run the block without the CUDA->CPU rewrite mode, for code that holds no CUDA device literal.
    A no-op when the CPU runtime is off, or when another torch-function mode is on top of it."""
    if _MODE is None or torch.overrides._get_current_function_mode() is not _MODE:
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


def natively(fn):
    """`fn` run under `native_torch()`."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with native_torch():
            return fn(*args, **kwargs)
    run.native = True
    return run

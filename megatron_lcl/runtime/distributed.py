"""Distributed start-up: one function for both nccl+CUDA and gloo+CPU, from torchrun's environment.
It is where the adaptations of megatron-core are installed (`install_adaptations`), once per process.
"""

import datetime
import gc
import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_lcl.config import ConfigError, ParallelConfig
from megatron_lcl.runtime import cpu, mcore_compat
from megatron_lcl.runtime.layout import ParallelLayout


def initialize_distributed(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 10) -> ParallelLayout:
    """Initialise torch.distributed (from RANK/WORLD_SIZE/MASTER_ADDR/...) and megatron-core's groups;
    returns this process's `ParallelLayout`.

    On a machine without CUDA this switches on the CPU runtime and uses gloo; with CUDA it binds the
    process to LOCAL_RANK's GPU and uses nccl. Safe to call in a single process without torchrun.
    """
    use_cuda = torch.cuda.is_available()
    install_adaptations()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if use_cuda else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # env:// (RANK, WORLD_SIZE, MASTER_ADDR/PORT). Under torchrun also for ONE process: its
            # workers must use the agent's store (TORCHELASTIC_USE_AGENT_STORE), or the rendezvous waits
            # forever.
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # A plain process (tests, notebooks, `python tool.py`): one rank on a fresh local port,
            # whatever MASTER_PORT an earlier in-process run left in the environment.
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
    initialize_model_parallel(parallel, seed)
    return ParallelLayout.current()


def install_adaptations() -> None:
    """megatron-core's version adaptations (`mcore_compat`) and, without CUDA, its CPU adaptation
    (`cpu`): the one call site of both, before any model or optimizer is built. Idempotent."""
    if not torch.cuda.is_available():
        cpu.enable_cpu_runtime()
    mcore_compat.install()


def launched_by_torchrun() -> bool:
    """Whether torchrun (torch.distributed.run / elastic agent) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def initialize_model_parallel(parallel: ParallelConfig, seed: int = 1234) -> None:
    """(Re)create megatron-core's TP/PP/DP groups; may be called again after `destroy_model_parallel`."""
    world = dist.get_world_size()
    model_parallel = parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
    if world % model_parallel != 0:
        raise ConfigError(
            f"world size ({world}) must be divisible by parallel.tensor_model_parallel_size "
            f"({parallel.tensor_model_parallel_size}) x parallel.pipeline_model_parallel_size "
            f"({parallel.pipeline_model_parallel_size})")
    destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
    )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Seed python/numpy/torch and megatron-core's tensor-parallel RNG tracker.

    As in Megatron-LM, the default generator is offset by the pipeline rank only, so tensor- and
    data-parallel replicas draw the same numbers (e.g. identical drop-path masks across TP ranks).
    """
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def get_rng_state() -> dict:
    """Every generator this process draws from: python, numpy, torch (and CUDA), and megatron-core's
    tensor-parallel tracker. `set_rng_state` puts them back (checkpoints; replaying a forward pass)."""
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def rng_device() -> str:
    """The device type of the generators `get_rng_state` reads: "cuda", or "cpu" (the CPU runtime keeps
    CPU generator states in megatron-core's tracker)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def rng_state_fits(state: dict) -> bool:
    """Whether `state` (from `get_rng_state`, maybe on another device) can be put back here: its tracker
    states are the size of this process's (a CUDA Philox state is 16 bytes, a CPU Mersenne Twister's
    5056), and it holds a CUDA state when this process draws on CUDA."""
    def size(s):  # a state tensor's bytes (megatron-core's CUDA-graph-safe tracker keeps generators)
        return s.numel() if isinstance(s, torch.Tensor) else type(s)

    now = tensor_parallel.get_cuda_rng_tracker().get_states()
    sizes_fit = all(name not in now or size(saved) == size(now[name]) for name, saved in state["tracker"].items())
    return sizes_fit and (not torch.cuda.is_available() or "cuda" in state)


def set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    # a copy: the tracker keeps the dict it is given and updates it in place as it draws
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def destroy_model_parallel() -> None:
    """megatron-core's groups, and the torch process groups behind them. megatron-core's own
    `destroy_model_parallel` only drops its references: torch keeps every group it created, and each
    gloo group keeps its connections' polling threads (`gloo_tcp_loop`). A process that lays out its
    groups again (in-process runs one after another, the evaluation engine, tests) would pile them up:
    measured, ~1000 such threads after one test module, together busy on two cores. Every group but the
    default one is destroyed (a group taken before this call must not be used after it)."""
    if not dist.is_initialized():
        return
    from torch.distributed import distributed_c10d as c10d

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    for group in [g for g in list(c10d._world.pg_map) if g is not c10d.GroupMember.WORLD]:
        dist.destroy_process_group(group)
    gc.collect()  # models, optimizers and losses of the old layout hold its groups in reference cycles


def destroy_distributed() -> None:
    if not dist.is_initialized():
        return
    destroy_model_parallel()
    dist.destroy_process_group()
    gc.collect()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, for a rendezvous some process binds a few seconds later.

    Drawn at random below the kernel's ephemeral range rather than from it (`bind(0)`): in that gap
    the kernel hands ephemeral ports to every outgoing connection (a concurrent gloo mesh opens
    dozens), so a port it just gave us can be taken before torchrun binds it (EADDRINUSE). Below the
    range only another explicit choice can collide. The draw uses the system's entropy, never the
    `random` module a run seeds, so processes seeded alike still draw different ports.
    """
    low, _ = _ephemeral_range()
    draw = random.SystemRandom()
    for _ in range(64):
        port = draw.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the range below is crowded: let the kernel choose
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; macOS uses 49152-65535, also above this draw

"""Where a checkpoint's data files are written: in the rank itself (a synchronous save), or in the
rank's one background writer process (an asynchronous save). No save starts a process: the writer
is started once, at set-up, outside any stop-signal window, and dies with its rank.

megatron-core plans a save (`dist_checkpointing.save(..., async_sharded_save=True)`) and hands back
an `AsyncRequest`: this rank's data files as write buckets `(path, storage key, (byte items, tensor
items))`, and the finalize functions that gather every rank's write results and write the index.
`write_buckets` writes the buckets (one thread per file, as megatron-core's writer does with one
process per file) and puts the results where megatron-core's finalize reads them
(`mcore_compat.write_results_queue`).

An asynchronous save copies the tensors first (`StagingArea`: host buffers in shared memory, kept
between saves, so staging costs one copy and the writer reads them without another; under CUDA the
buffers are page-locked once and the device-to-host copies run without waiting, `PinnedCudaCopies`);
training then goes on while `BackgroundWriter` writes the copies. This module imports torch and the standard
library only: the writer process starts in about a second and never imports megatron-core.
"""

import atexit
import ctypes
import inspect
import math
import multiprocessing
import os
import queue
import shutil
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
import torch.multiprocessing  # noqa: F401 - registers the shared-memory pickling of tensors
from torch.distributed.checkpoint.filesystem import _StorageWriterTransforms, _write_item

from megatron_lcl.stop_signals import STOP_SIGNALS

_WRITE_ITEM_FORMAT = {}
if "serialization_format" in inspect.signature(_write_item).parameters:  # torch >= 2.6
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    _WRITE_ITEM_FORMAT = {"serialization_format": SerializationFormat.TORCH_SAVE}


# ------------------------------------------------------------------------------------- writing

def write_buckets(buckets: list, results_queue) -> None:
    """Write each bucket's file (fsynced), then put `{bucket index: [WriteResult]}`, or the first
    error, into `results_queue`. Never raises: megatron-core's finalize turns an error into the
    save's failure on every rank."""
    try:
        with ThreadPoolExecutor(max_workers=max(len(buckets), 1), thread_name_prefix="ckpt-write") as pool:
            results = dict(enumerate(pool.map(_write_bucket, buckets)))
    except Exception as e:  # noqa: BLE001 - reported through the queue, raised by the finalize
        results = e
    results_queue.put(results)


def _write_bucket(bucket) -> list:
    path, storage_key, (bytes_data, tensor_data) = bucket
    transforms = _StorageWriterTransforms()
    with open(path, "wb") as stream:
        results = [_write_item(transforms, stream, data, item, storage_key, **_WRITE_ITEM_FORMAT)
                   for item, data in list(bytes_data) + [(item, _own_storage(t)) for item, t in tensor_data]]
        stream.flush()
        os.fsync(stream.fileno())
    return results


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a copy when it views a larger storage (torch.save writes a tensor's whole storage)."""
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def request_buckets(request) -> Optional[list]:
    """The write buckets of megatron-core's AsyncRequest (None: nothing to write on this rank)."""
    return None if request.async_fn is None else request.async_fn_args[1]


def write_now(request, results_queue) -> None:
    """A synchronous save's data files, written by this process (tensors on the GPU copied off first)."""
    if request.async_fn is None:
        return
    buckets = request.preload_fn() if request.preload_fn is not None else request_buckets(request)
    write_buckets(buckets, results_queue)


def write_staged_now(staged: "Staged"):
    """A background save's data files written by this process, from its staged copies (its writer
    died); returns the results as the writer would have."""
    done = queue.SimpleQueue()
    write_buckets(staged.buckets(), done)
    return done.get()


# ------------------------------------------------------------------------------------- staging

class StagingUnavailable(RuntimeError):
    """The shared memory for a background save's copies is not there (the save is written at once)."""


SHARED_MEMORY = "/dev/shm"  # where torch's shared CPU tensors live (shm_open), a tmpfs


class HostCopies:
    """How staging copies a save's tensors into its host buffers: tensors on the CPU, plain copies."""

    def pin(self, flat: torch.Tensor) -> None:
        """Called once for each new buffer."""

    def unpin(self, flat: torch.Tensor) -> None:
        """Called once for each buffer given up (another layout), before it is freed."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def wait(self) -> None:
        """Called once after a save's copies: they are all done on return."""


class PinnedCudaCopies(HostCopies):
    """Tensors on the GPU: each shared buffer page-locked once, in place (`cudaHostRegister`, as
    torch.distributed.checkpoint's stager does for its shared-memory copies; `Tensor.pin_memory()`
    would copy into new pinned memory that the writer process cannot see), then every device-to-host
    copy enqueued without waiting (into page-locked memory a copy is a DMA that runs asynchronously;
    into pageable memory each one blocks), and one synchronisation of the stream after the last.
    `cudart` and `stream` stand in for `torch.cuda.cudart()` and the current stream in tests."""

    REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context of the process

    def __init__(self, cudart=None, stream=None):
        self._cudart = cudart if cudart is not None else torch.cuda.cudart()
        self._stream = stream if stream is not None else torch.cuda.current_stream()

    def pin(self, flat: torch.Tensor) -> None:
        error = int(self._cudart.cudaHostRegister(flat.data_ptr(), flat.numel(), self.REGISTER_PORTABLE))
        if error != 0:
            raise RuntimeError(f"cudaHostRegister of a {flat.numel() / 2**20:.1f} MiB checkpoint staging buffer "
                               f"failed with cudaError {error}")

    def unpin(self, flat: torch.Tensor) -> None:
        self._cudart.cudaHostUnregister(flat.data_ptr())

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)

    def wait(self) -> None:
        self._stream.synchronize()  # the copies were enqueued on this stream, after the step's kernels


def host_copies(device_type: str) -> HostCopies:
    """The copies for a save's tensors on `device_type` ("cuda" or "cpu")."""
    return PinnedCudaCopies() if device_type == "cuda" else HostCopies()


class StagingArea:
    """Host copies of a save's tensors, in shared memory: one buffer per file (one storage to hand to
    the writer process, however many tensors), reused by every later save of the same plan. `copies`
    (`host_copies(device type)`) pins each buffer once and does the copies."""

    ALIGN = 64  # bytes: every tensor's offset in its buffer

    def __init__(self, copies: Optional[HostCopies] = None):
        self._buffers = {}  # bucket index -> (layout, flat uint8 buffer)
        self._copies = copies if copies is not None else HostCopies()

    def stage(self, buckets: list) -> "Staged":
        """The copies of `buckets`' tensors (byte items are already snapshots). StagingUnavailable when
        new buffers do not fit in the free shared memory: a tmpfs allocates on first touch, and a copy
        that runs out of it dies of SIGBUS."""
        layouts = [self._layout(tensor_data) for _, _, (_, tensor_data) in buckets]
        new = [i for i, layout in enumerate(layouts) if self._buffers.get(i, (None,))[0] != layout]
        needed = sum(layouts[i][-1] for i in new)
        free = shutil.disk_usage(SHARED_MEMORY).free if os.path.isdir(SHARED_MEMORY) else 0
        if needed and needed > free * 0.9:
            raise StagingUnavailable(
                f"a background save needs {needed / 2**30:.2f} GiB of shared memory for its copies and "
                f"{SHARED_MEMORY} has {free / 2**30:.2f} GiB free (a container's default is 64 MiB: docker "
                "run --shm-size, or checkpoint.async_save=false)")
        for i in new:
            self._replace_buffer(i, layouts[i])
        specs = []
        for i, (path, key, (bytes_data, tensor_data)) in enumerate(buckets):
            layout, flat = self._buffers[i]
            for (_, tensor), (offset, dtype, shape, _) in zip(tensor_data, layout[:-1]):
                self._copies.copy(_view(flat, offset, dtype, shape), tensor.detach())
            specs.append((path, key, (bytes_data, [(item, entry) for (item, _), entry in zip(tensor_data, layout[:-1])])))
        self._copies.wait()
        return Staged([self._buffers[i][1] for i in range(len(buckets))], specs)

    def _replace_buffer(self, i: int, layout: tuple) -> None:
        if i in self._buffers:
            self._copies.unpin(self._buffers.pop(i)[1])
        flat = torch.empty(layout[-1], dtype=torch.uint8).share_memory_()  # [total bytes], shm-backed
        self._copies.pin(flat)
        self._buffers[i] = (layout, flat)

    @classmethod
    def _layout(cls, tensor_data) -> tuple:
        """((offset, dtype, shape, nbytes) per tensor, ..., total bytes)."""
        entries, offset = [], 0
        for _, t in tensor_data:
            nbytes = t.numel() * t.element_size()
            entries.append((offset, t.dtype, tuple(t.shape), nbytes))
            offset += -(-nbytes // cls.ALIGN) * cls.ALIGN
        return tuple(entries) + (max(offset, 1),)

    @property
    def nbytes(self) -> int:
        return sum(flat.numel() for _, flat in self._buffers.values())


class Staged:
    """A staged save as the writer process receives it: the buffers (one shared storage each) and the
    buckets with (offset, dtype, shape) in place of each tensor."""

    def __init__(self, flats: list, specs: list):
        self.flats, self.specs = flats, specs

    def buckets(self) -> list:
        return [(path, key, (bytes_data, [(item, _view(flat, offset, dtype, shape))
                                          for item, (offset, dtype, shape, _) in entries]))
                for flat, (path, key, (bytes_data, entries)) in zip(self.flats, self.specs)]


def _view(flat: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return flat[offset:offset + nbytes].view(dtype).view(shape)


# ------------------------------------------------------------------------------------- the process

class WriterDied(RuntimeError):
    pass


class BackgroundWriter:
    """This rank's writer process: takes `(write function, staged save)` jobs, one at a time, and
    answers each with its results. It ignores the stop signals (a rank finishes an in-flight save before
    it exits) and is SIGKILLed by the kernel when its rank ends, however the rank ends (Linux).

    Jobs and results travel through two pipes, not multiprocessing queues: a queue's locks in a spawn
    context are named POSIX semaphores (`/dev/shm/sem.mp-*`), which a SIGKILLed rank leaves behind, and
    a writer killed while waiting for a job would hold the queue's read lock for good. The rank closes
    its copies of the writer's ends, so the writer's death reads as end-of-file."""

    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        jobs_in, self._jobs = ctx.Pipe(duplex=False)  # (read end, write end)
        self._results, results_out = ctx.Pipe(duplex=False)
        self._busy = self._ready = False
        self.process = ctx.Process(target=_writer_main, args=(os.getpid(), jobs_in, results_out),
                                   name="checkpoint-writer", daemon=True)
        self.process.start()
        jobs_in.close()
        results_out.close()

    def wait_ready(self) -> None:
        """Wait until the process has started (its interpreter and torch imported: seconds of CPU). The
        trainer waits at the end of set-up: started later, the start-up shares the rank's CPU with the
        first steps and with a stop signal's final save (measured on a loaded 2-core machine: 0.7-0.8
        CPU-s of it after the signal, as much as the rank's whole stop path). A dead process is not
        waited for (its first save says so)."""
        try:
            while not self._ready:
                alive = self.process.is_alive()
                if self._results.poll(0.05 if alive else 0):  # what a dead one sent is still read
                    self._ready = self._results.recv() == _READY
                elif not alive:
                    return
        except (EOFError, OSError):  # the process ended during its start-up
            pass

    def submit(self, staged: "Staged") -> None:
        """Hand `staged` to the process. When it has died, `result` says so (the save is not lost: the
        caller still holds `staged`)."""
        assert not self._busy, "one save at a time"
        self.wait_ready()  # its results pipe then holds this job's results only
        self._busy = True
        try:
            self._jobs.send((write_buckets, staged))  # looked up now: a test may stand in its own
        except OSError:  # BrokenPipeError: nobody reads the jobs any more
            pass

    def busy(self) -> bool:
        """Whether the submitted job is still being written (False also when the writer died)."""
        return self._busy and not self._results.poll() and self.process.is_alive()

    def result(self):
        """The submitted job's results (waits for them); WriterDied when the process ended without them."""
        try:
            while not self._results.poll(0.05):
                if not self.process.is_alive():
                    raise WriterDied(self.ended("during the save"))
            return self._results.recv()
        except (EOFError, OSError):  # the process ended before (or while) sending them
            self.process.join(5)  # hang guard: its end of the pipe is closed, so it is ending
            raise WriterDied(self.ended("during the save")) from None
        finally:
            self._busy = False

    def ended(self, when: str) -> str:
        """What became of the process: 'its checkpoint writer process (pid P) ended with exit code C WHEN'."""
        return f"its checkpoint writer process (pid {self.process.pid}) ended with exit code {self.process.exitcode} {when}"

    def close(self) -> None:
        """End the process now: nothing is left for it to do, or what is left was abandoned (a save
        completes only through `result`), so it is not asked to finish (its interpreter's exit takes
        a second)."""
        self.process.kill()
        self.process.join()
        self._jobs.close()
        self._results.close()


_writer: Optional[BackgroundWriter] = None
_READY = "ready"  # the process's first message: started


def background_writer() -> BackgroundWriter:
    """This process's writer, started on the first call (at set-up) and kept for the life of the process;
    a new one when it has ended (killed: the OOM killer may pick it, as it maps the staging buffers)."""
    global _writer
    if _writer is None or not _writer.process.is_alive():
        from megatron_lcl.stop_signals import shielded_from_stop_signals

        if _writer is not None:
            _writer.close()
        with shielded_from_stop_signals():  # blocked from its first instruction until it ignores them
            _writer = BackgroundWriter()
    return _writer


@atexit.register
def _close_writer() -> None:  # before multiprocessing's own exit handler, which would wait for it
    if _writer is not None:
        _writer.close()


def background_writes_supported() -> tuple:
    """(True, "") where a writer can be tied to its rank's life (Linux: PR_SET_PDEATHSIG), else
    (False, why)."""
    if not sys.platform.startswith("linux"):
        return False, f"a background writer cannot be tied to its rank's life on {sys.platform} (Linux only)"
    return True, ""


def _writer_main(parent: int, jobs, results) -> None:
    _die_with_parent(parent)
    for sig in STOP_SIGNALS + (signal.SIGINT,):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    torch.set_num_threads(1)
    results.send(_READY)
    while True:
        try:
            fn, staged = jobs.recv()
        except EOFError:  # the rank closed its end
            return
        done = queue.SimpleQueue()  # write_buckets' results, sent on as they are
        fn(staged.buckets(), done)
        results.send(done.get())
        del fn, staged


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when `parent` (the rank that started it) ends (Linux PR_SET_PDEATHSIG)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:  # the rank ended before the prctl
        os._exit(1)

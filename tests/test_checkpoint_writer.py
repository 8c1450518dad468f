"""The background checkpoint writer's parts, without training: how staging copies (plain on CPU; pinned
once, non-blocking and synchronised once with CUDA, checked here with a stand-in CUDA runtime), the
writer process's death while idle and during a write, and the named semaphores it no longer creates
(what a SIGKILLed run used to leave in /dev/shm). The same faults in a real 2-rank run are in
test_checkpoint_faults.py; a whole run's processes are probed for semaphores in test_async_checkpoint.py.
"""

import os
import signal
import multiprocessing

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from megatron_lcl.checkpoint import writer


def named_semaphores(pids) -> set:
    """The names in /dev/shm of the POSIX semaphores that processes `pids` hold and that are still linked
    (a SIGKILL leaves them behind). glibc maps a semaphore under a temporary name it then links to the
    real one (so /proc/PID/maps says "(deleted)"): matched by inode."""
    inodes = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.readlines()
        except (FileNotFoundError, ProcessLookupError):  # ended since it was listed
            continue
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/dev/shm/sem."):
                inodes.add(int(fields[4]))
    found = set()
    for name in os.listdir("/dev/shm"):
        try:
            if os.stat(os.path.join("/dev/shm", name)).st_ino in inodes:
                found.add(name)
        except FileNotFoundError:  # another process's, just removed
            pass
    return found


def buckets_of(tmp_path, tensors: list) -> list:
    """One file's write bucket, as megatron-core plans it: (path, storage key, (byte items, tensor items))."""
    def item(i, t):
        return WriteItem(index=MetadataIndex(f"t{i}", (0,) * t.dim()), type=WriteItemType.TENSOR,
                         tensor_data=TensorWriteData(chunk=ChunkStorageMetadata((0,) * t.dim(), t.shape),
                                                     properties=TensorProperties.create_from_tensor(t), size=t.shape))

    return [(str(tmp_path / "__0_0.distcp"), "__0_0.distcp", ([], [(item(i, t), t) for i, t in enumerate(tensors)]))]


TENSORS = [torch.randn(10, 3), torch.arange(7, dtype=torch.bfloat16), torch.randn(4, 5).t()]  # the last not contiguous


# ------------------------------------------------------------------------------------- staging copies

class FakeCudart:
    """Stands in for torch.cuda.cudart(): records the buffers registered and unregistered."""

    def __init__(self, error: int = 0):
        self.calls, self.error = [], error

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", ptr, size, flags))
        return self.error

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0


class FakeStream:
    def __init__(self):
        self.synchronized = 0

    def synchronize(self):
        self.synchronized += 1


class CopySource(torch.Tensor):
    """A tensor that records the keyword arguments of every `copy_` it is the source of."""

    copies = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            cls.copies.append(dict(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


def test_staging_on_cpu_copies_plainly_and_never_touches_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "cudart", lambda: pytest.fail("the CPU path called torch.cuda.cudart()"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: pytest.fail("the CPU path asked for a stream"))
    copies = writer.host_copies("cpu")
    assert type(copies) is writer.HostCopies
    staged = writer.StagingArea(copies).stage(buckets_of(tmp_path, TENSORS))
    for (_, t), (_, s) in zip(buckets_of(tmp_path, TENSORS)[0][2][1], staged.buckets()[0][2][1]):
        assert s.dtype == t.dtype and torch.equal(s, t)


def test_staging_with_cuda_pins_each_buffer_once_copies_without_waiting_and_synchronises_once(tmp_path, monkeypatch):
    cudart, stream = FakeCudart(), FakeStream()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    copies = writer.host_copies("cuda")
    assert type(copies) is writer.PinnedCudaCopies
    area = writer.StagingArea(copies)
    CopySource.copies = []
    for save in range(3):  # the same plan: the buffer is reused, registered once
        sources = [(t + save).as_subclass(CopySource) for t in TENSORS]
        staged = area.stage(buckets_of(tmp_path, sources))
        assert stream.synchronized == save + 1
        for t, (_, s) in zip(TENSORS, staged.buckets()[0][2][1]):
            assert torch.equal(s, t + save)
    flat = staged.flats[0]
    assert cudart.calls == [("register", flat.data_ptr(), flat.numel(), writer.PinnedCudaCopies.REGISTER_PORTABLE)]
    assert CopySource.copies == [{"non_blocking": True}] * (3 * len(TENSORS))
    assert flat.is_shared()  # pinned in place: the writer process still sees the buffer

    area.stage(buckets_of(tmp_path, [torch.zeros(100)]))  # another plan: the old buffer unpinned before it goes
    new = area._buffers[0][1]
    assert cudart.calls[1:] == [("unregister", flat.data_ptr()), ("register", new.data_ptr(), new.numel(), 1)]


def test_a_failed_pin_is_one_line(tmp_path):
    area = writer.StagingArea(writer.PinnedCudaCopies(FakeCudart(error=2), FakeStream()))
    with pytest.raises(RuntimeError, match=r"^cudaHostRegister of a 0\.0 MiB checkpoint staging buffer failed "
                                           r"with cudaError 2$"):
        area.stage(buckets_of(tmp_path, TENSORS))


# ------------------------------------------------------------------------------------- the writer process

def file_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("writer")
    return tmp, writer.StagingArea().stage(buckets_of(tmp, TENSORS))


def test_a_writer_killed_while_idle_is_replaced_and_one_killed_while_writing_says_so(staged):
    tmp, staged = staged
    first = writer.background_writer()
    first.submit(staged)
    assert 0 in first.result()
    written = file_bytes(tmp / "__0_0.distcp")

    os.kill(first.process.pid, signal.SIGKILL)  # while idle
    first.process.join()
    assert first.ended("while idle") == \
        f"its checkpoint writer process (pid {first.process.pid}) ended with exit code -9 while idle"
    second = writer.background_writer()
    assert second is not first and second.process.is_alive()
    second.submit(staged)
    assert 0 in second.result() and file_bytes(tmp / "__0_0.distcp") == written

    second.submit(staged)
    os.kill(second.process.pid, signal.SIGKILL)  # during the write (or before it began: the same to the rank)
    with pytest.raises(writer.WriterDied, match=r"ended with exit code -9 during the save$"):
        second.result()
    os.remove(tmp / "__0_0.distcp")
    assert 0 in writer.write_staged_now(staged)  # what the saver does then: the same file from the copies
    assert file_bytes(tmp / "__0_0.distcp") == written

    third = writer.background_writer()
    os.kill(third.process.pid, signal.SIGKILL)
    third.process.join()
    third.submit(staged)  # to a writer already dead: no error here, WriterDied at the result
    with pytest.raises(writer.WriterDied):
        third.result()


def test_the_writer_holds_no_named_semaphore(staged):
    """A named semaphore (a spawn context's Lock/Queue) outlives a SIGKILLed process in /dev/shm; the
    writer's pipes need none. Control: a spawn-context SimpleQueue's locks are found."""
    _, staged = staged
    w = writer.background_writer()
    w.submit(staged)
    w.result()
    assert named_semaphores([os.getpid(), w.process.pid]) == set()
    control = multiprocessing.get_context("spawn").SimpleQueue()
    assert len(named_semaphores([os.getpid()])) == 2, "the probe does not see a queue's semaphores"
    del control

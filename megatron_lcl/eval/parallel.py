"""Data parallelism of the evaluation commands, over the package's `ParallelLayout` (TP = PP = 1:
every rank is a data-parallel replica).

- `init_parallel()`: torch.distributed from torchrun's environment (nccl + this rank's GPU, or gloo
  on CPU) through `megatron_lcl.runtime.initialize_distributed`; a single process needs no launcher.
  `one_process()`: the layout of a single process, without torch.distributed (tests, sweeps);
- `all_sum`, `all_gather_objects`, `merge_bad_logs`: over the layout's data-parallel group;
- `GlobalBatches`: epoch e's order is a permutation seeded with (seed, e); global batch b is its b-th
  slice of `batch_size` items and rank r takes the r-th contiguous part, so W ranks see exactly the
  samples of the 1-rank run; `loader` decodes them in DataLoader workers; `eval_batches` visits every
  item once, in order.
"""

from typing import Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron_lcl.config import ParallelConfig
from megatron_lcl.eval.bad_samples import BadSampleLog, merge_saved_logs
from megatron_lcl.eval.datasets import collate
from megatron_lcl.eval.errors import InputError
from megatron_lcl.runtime.device import device as compute_device
from megatron_lcl.runtime.distributed import initialize_distributed
from megatron_lcl.runtime.layout import ParallelLayout


def one_process() -> ParallelLayout:
    return ParallelLayout(world_size=1, rank=0, tp_size=1, pp_size=1, dp_size=1, tp_rank=0, pp_rank=0, dp_rank=0,
                          dp_group=None)


def init_parallel() -> ParallelLayout:
    """The process group from torchrun's environment (or a one-rank group), as a ParallelLayout."""
    return initialize_distributed(ParallelConfig())


def contrastive_group(layout: ParallelLayout) -> Optional[object]:
    """A second group over the data-parallel ranks for the contrastive gather, kept apart from DDP's
    all-reduces (None in one process). Every rank must call it."""
    if layout.dp_size == 1:
        return None
    return dist.new_group(ranks=dist.get_process_group_ranks(layout.dp_group))


def all_sum(values: List[float], layout: ParallelLayout) -> List[float]:
    """Sum of each value over the data-parallel ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=compute_device())
    if layout.dp_size > 1:
        dist.all_reduce(t, group=layout.dp_group)
    return t.tolist()


def all_gather_objects(obj, layout: ParallelLayout) -> list:
    if layout.dp_size == 1:
        return [obj]
    out = [None] * layout.dp_size
    dist.all_gather_object(out, obj, group=layout.dp_group)
    return out


def merge_bad_logs(log: BadSampleLog, layout: ParallelLayout) -> dict:
    """One BadSampleLog dict over all ranks (each rank read different samples)."""
    return merge_saved_logs(all_gather_objects(log.as_dict(), layout))


class GlobalBatches(torch.utils.data.Sampler):
    """This rank's part of each global batch of an epoch, from batch `start` on (see module doc).

    shuffle=False, drop_last=False: the evaluation order (every item once; the last batch short)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                 world: int = 1, shuffle: bool = True, drop_last: bool = True):
        if batch_size % world:
            raise InputError(f"--batch-size ({batch_size}) must be divisible by the number of ranks ({world})")
        self.n, self.batch_size, self.start, self.rank, self.world = n, batch_size, start, rank, world
        self.seed, self.epoch, self.shuffle, self.drop_last = seed, epoch, shuffle, drop_last

    def num_batches(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.start)

    def __iter__(self) -> Iterator[List[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        per_rank = self.batch_size // self.world
        for b in range(self.start, self.num_batches()):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self.drop_last:
                mine = batch[self.rank * per_rank:(self.rank + 1) * per_rank]
            else:  # short last batch: split as evenly as possible
                mine = batch.tensor_split(self.world)[self.rank]
            yield mine.tolist()


def loader(dataset, sampler: GlobalBatches, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate, persistent_workers=False,
                                       prefetch_factor=4 if num_workers else None)


def eval_batches(dataset, batch_size: int, layout: ParallelLayout, num_workers: int) -> Iterator[dict]:
    """Every item of `dataset` once over all ranks, in order, batches of `batch_size` (global)."""
    world = layout.dp_size
    batch_size = max(world, batch_size - batch_size % world)
    sampler = GlobalBatches(len(dataset), batch_size, 0, 0, rank=layout.dp_rank, world=world, shuffle=False,
                            drop_last=False)
    yield from loader(dataset, sampler, num_workers)

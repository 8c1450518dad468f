"""Streaming loader: prepared webdataset shards -> `LCLBatch` micro-batches for one DP rank.

Stages (each logical reader runs them on its own part of the data):

    shard order (per epoch, seeded)  ->  this reader's shards or documents  ->  shuffle buffer
    ->  build samples (sample_builder.py: layout, tokenize, truncate/pack)  ->  decode + transform images
    ->  (in the training process) batch + collate to LCLBatch

Data order: logical readers. There are `data.num_readers` (R) readers, fixed for the run; reader i is a
pure function of (data, seed, i). With at least R shards, reader i reads its own shards of each epoch
(`order[i::R]`); with fewer, every reader reads all of them and keeps documents `index % R == i`.
The run's samples are numbered n = 0, 1, 2, ... over all steps; sample n is the next sample of reader
`n % R`. Step t takes samples [t * G, (t + 1) * G) (G = global batch), its micro-batch j the samples
[t * G + j * B, t * G + (j + 1) * B) (B = micro_batch_size x DP size). DP rank r runs readers r, r + D,
r + 2D, ... (D = DP size, which must divide R) and takes the samples n = r (mod D) in order: exactly
its share of every micro-batch. So the samples of a step, and of each of its micro-batches, depend on
the data, the seed, R and the batch sizes only: not on the DP size, TP/PP or `data.num_workers`.
Tensor-parallel ranks of one replica (and the last pipeline stage) pass the same `dp_rank` and get
identical batches; middle pipeline stages take no data and should not build a loader. The last stage of
a pipeline (PP > 1) never runs the ViT: its loader is labels-only (`labels_only=True`), the same samples
in the same order without decoding, transforming, pinning or uploading a single image (`images=None`).
It is exact as long as every image decodes: an image that fails to decode (counted `corrupt_image`,
prepare verified them all once) drops its sample on the first stage only, which the trainer detects
(`slots_consumed` of both stages, compared every step) and stops on with one error before the step is
applied.

Workers. The rank's readers are split over its DataLoader worker processes (worker w runs the readers
at positions w, w + P, ... of the rank's list, P processes); each worker yields one sample at a time,
in the order above, and the training process collates micro-batches. P is the largest divisor of the
rank's reader count not above `data.num_workers` (P must divide it for torch's round-robin over
workers to give that order), so `num_workers` changes speed only, never the samples.

Exact resume, at any DP size or number of workers. Every random choice is seeded from (seed, epoch,
document key) or (seed, epoch, reader), so a reader's stream is a pure function of the config. A reader
counts "slots": built samples, including ones later dropped (an image that fails to decode). The
state is per logical reader: samples handed out, the slot cursor of its last one, its skip and
per-source counters. A rank saves the readers it runs; `merge_states` joins the states of all DP
ranks, and `load_state_dict` takes the readers this rank runs from it, whatever DP size or workers
saved it: each reader restarts at its cursor (fast-forwarding through earlier slots building token
layouts only, no image decoding) and the rank's next sample is the next n of its residue class.
Nothing is skipped or repeated. The state is valid only for the same data, seed, `num_readers` and
sample settings (sequence length, packing, shuffle buffer, image size; checked on load); the
micro-batch and global batch sizes may change (the stream of samples is the same).

Weighted blends (`data.path: [0.5, /data/laion, 0.5, /data/mmc4]`, Megatron's convention). Each source
keeps its own shards, reader split, shuffle, epochs and packer: one document stream per source and
reader. A reader's slot k takes its next sample from the source drawn by the k-th draw of a generator
seeded with (seed, reader): the choice sequence is a pure function of (seed, reader, slot), so the one
slot cursor per reader still resumes exactly (replaying the draws tells how far each source stream
went). Samples per source are counted per reader (`loader.source_counts()`, saved in the state).

Skipped data. Readers count what they drop (by reason, naming shard and key) and send the counts with
each sample; the loader keeps each reader's totals of consumed samples (`loader.skips`, a merged
SkipCounter; `loader.skip_counts()` for metrics), saved in the state. A shard that breaks mid-way
counts as many `corrupt_shard` as samples were lost after the break, with a warning line naming shard
and key (`shards.tar_samples`).
"""

import glob
import logging
import os
import random
from dataclasses import dataclass, field
from itertools import accumulate, count
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_lcl.config import DataConfig
from megatron_lcl.config.run import data_blend
from megatron_lcl.data import skips as S
from megatron_lcl.data.batch import LCLBatch
from megatron_lcl.data.documents import from_wds_sample
from megatron_lcl.data.sample_builder import (BuiltSample, ConcatPacker, DocumentPacker, SpecialIds,
                                              document_layout, tokenize_layout, truncate_and_pad)
from megatron_lcl.data.shard_paths import shard_paths
from megatron_lcl.data.shards import tar_samples
from megatron_lcl.data.skips import SkipCounter
from megatron_lcl.data.tokenizer import LCLTokenizer
from megatron_lcl.data.transforms import decode_image, eval_transform, train_transform
from megatron_lcl.runtime.device import pin_memory_enabled
from megatron_lcl.stop_signals import ignore_stop_signals

STATE_VERSION = 2  # 1: one position per DP rank and worker (before logical readers); not continued
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlendSource:
    """One weighted source of a blend: its name in metrics, its normalised weight, its sorted shards."""

    name: str
    weight: float
    shards: tuple


@dataclass(frozen=True)
class LoaderConfig:
    """One DP rank's loader: the `data` config section plus what the model and the layout decide.

    `data.packing`: "auto" is the paper's rule per source (MMC4 "truncate", OBELICS/LAION "concat");
    "truncate": one document per sample; "concat": windows over concatenated documents;
    "pack": MMC4 documents truncated as in "truncate", then several whole documents per sample.
    Validation of these values is `megatron_lcl.config.validate`'s (the loader relies on it).
    """

    data: DataConfig
    shards: tuple  # sorted prepared shard paths
    image_size: int
    num_image_tokens: int
    dp_rank: int = 0
    dp_size: int = 1
    train_transform: bool = True
    blend: tuple = ()  # BlendSource per source of a weighted data.path; () for one unweighted source
    decode_images: bool = True  # False: labels-only batches (images=None), same samples and order

    @property
    def num_readers(self) -> int:
        return self.data.num_readers

    @property
    def readers(self) -> tuple:
        """The logical readers this DP rank runs, in the order its samples cycle through them."""
        return tuple(range(self.dp_rank, self.num_readers, self.dp_size))

    @property
    def worker_processes(self) -> int:
        """DataLoader processes: the largest divisor of this rank's reader count <= data.num_workers."""
        if self.data.num_workers == 0:
            return 0
        mine = len(self.readers)
        return max(p for p in range(1, min(self.data.num_workers, mine) + 1) if mine % p == 0)

    def fingerprint(self) -> dict:
        """The settings a saved loader state is only valid for (checked on load). Not the DP size,
        the workers or the batch sizes: the stream of samples does not depend on them."""
        d = self.data
        return {"shards": [os.path.basename(s) for s in self.shards], "seq_length": d.seq_length,
                "image_size": self.image_size, "num_image_tokens": self.num_image_tokens,
                "seed": d.seed, "num_readers": d.num_readers, "shuffle_buffer": d.shuffle_buffer,
                "packing": d.packing, "train_transform": self.train_transform,
                **({"blend": [[b.name, b.weight, [os.path.basename(s) for s in b.shards]] for b in self.blend]}
                   if self.blend else {})}


def find_shards(data_path: Union[str, Sequence[str]]) -> tuple:
    """Prepared shards from a folder, a glob, a shard path or a list of those."""
    items = [data_path] if isinstance(data_path, str) else list(data_path)
    shards = []
    for item in items:
        shards += shard_paths(item)
    if not shards:
        raise FileNotFoundError(f"no prepared shards (*.tar) at {data_path}; run tools/prepare_data.py")
    return tuple(sorted(set(shards)))


def find_blend(data_path: Sequence) -> tuple:
    """`[w1, p1, w2, p2, ...]` -> BlendSource per source, weights normalised to sum 1, names from the
    paths (folder name; `_2`, `_3`, ... appended when two are the same)."""
    blend = data_blend(list(data_path))
    total = sum(w for w, _ in blend)
    names = []
    for _, path in blend:
        name = os.path.basename(os.path.dirname(path) if glob.has_magic(path) else path.rstrip("/")) or path
        names.append(name if name not in names else f"{name}_{len(names) + 1}")
    return tuple(BlendSource(n, w / total, find_shards(p)) for n, (w, p) in zip(names, blend))


# ----------------------------------------------------------------------------- one logical reader

class _ReaderStream:
    """The deterministic sample stream of one logical reader (a pure function of data, seed, reader)."""

    def __init__(self, cfg: LoaderConfig, reader: int, tokenizer: Optional[LCLTokenizer] = None):
        self.cfg = cfg
        self.reader = reader
        self.num_readers = cfg.num_readers
        self.tokenizer = tokenizer or LCLTokenizer(cfg.data.tokenizer)
        self.ids = SpecialIds.of(self.tokenizer)
        self.skips = SkipCounter()  # skips since the last sample handed out
        self.who = f"reader {reader} of {self.num_readers}"

    def documents(self, shards: Optional[tuple] = None, tag: str = "") -> Iterator[tuple]:
        """(epoch, shard name, wds sample) forever, in this reader's seeded order, of `shards` (default:
        all; a blend source passes its own, and its `tag` keeps its seeds apart)."""
        cfg = self.cfg
        shards = cfg.shards if shards is None else shards
        for epoch in count():
            order = epoch_order(shards, f"{cfg.data.seed}{tag}", epoch)
            mine, split_by_shard = reader_shards(order, self.reader, self.num_readers)
            rng = random.Random(f"{cfg.data.seed}{tag}-buffer-{epoch}-{self.reader}")
            seen = 0
            for shard, sample in _shuffled(self._read(mine, split_by_shard), cfg.data.shuffle_buffer, rng):
                seen += 1
                yield epoch, shard, sample
            if seen == 0:
                raise RuntimeError(
                    f"{self.who} got no documents from {len(shards)} shard(s)"
                    f"{tag and ' of blend source ' + tag[1:]}; set data.num_readers lower (it is "
                    f"{self.num_readers}) or give more data")

    def _read(self, shards: List[str], split_by_shard: bool) -> Iterator[tuple]:
        index = 0
        for shard in shards:
            name = os.path.basename(shard)
            for sample in tar_samples(shard, self._count_lost, f"{self.who}: "):
                if split_by_shard or index % self.num_readers == self.reader:
                    yield name, sample
                index += 1

    def _count_lost(self, where: str, detail: str, n: int) -> None:
        self.skips.add(S.CORRUPT_SHARD, where, detail, count=n)  # the counter of the sample in the making

    def samples(self, fast_forward: int = 0) -> Iterator[tuple]:
        """(source name or None, built sample or None): one item per slot, from one source or a blend."""
        if not self.cfg.blend:
            for sample in self.built_samples(fast_forward=fast_forward):
                yield None, sample
            return
        blend = self.cfg.blend
        choices = self._blend_choices()
        behind = [0] * len(blend)  # slots each source stream gives before the resume point
        for _ in range(fast_forward):
            behind[next(choices)] += 1
        choices = self._blend_choices()
        streams = [self.built_samples(b.shards, fast_forward=behind[i], tag=f"-{b.name}")
                   for i, b in enumerate(blend)]
        while True:
            i = next(choices)
            yield blend[i].name, next(streams[i])

    def _blend_choices(self) -> Iterator[int]:
        """The source index of every slot of this reader: seeded by (seed, reader), drawn by weight."""
        rng = random.Random(f"{self.cfg.data.seed}-blend-{self.reader}")
        cumulative = list(accumulate(b.weight for b in self.cfg.blend))
        sources = range(len(cumulative))
        while True:
            yield rng.choices(sources, cum_weights=cumulative)[0]  # one rng.random() per slot

    def built_samples(self, shards: Optional[tuple] = None, fast_forward: int = 0,
                      tag: str = "") -> Iterator[Optional[BuiltSample]]:
        """Samples with token layouts, images still encoded. One yielded item = one slot.

        In "truncate" packing a document is one slot whatever its length, so the first
        `fast_forward` slots are yielded as None without tokenizing them.
        """
        cfg = self.cfg
        packers, slots = {}, 0
        usable = {}  # epoch -> documents that passed, to fail loudly rather than spin on unusable data
        for epoch, shard, raw in self.documents(shards, tag):
            if epoch > 0 and not usable.get(epoch - 1):
                raise RuntimeError(f"{self.who}: no usable document in a whole epoch of its data; "
                                   f"skipped:\n{self.skips.summary()}")
            where = f"{shard}:{raw.get('__key__', '?')}"
            try:
                doc = from_wds_sample(raw)
            except ValueError as e:
                self.skips.add(S.BAD_SAMPLE, where, str(e)[:120])
                continue
            rng = random.Random(f"{cfg.data.seed}-{epoch}-{doc.key}")
            layout = document_layout(doc, rng)
            if not any(kind == "image" for kind, _ in layout):
                self.skips.add(S.NO_USABLE_IMAGE, where)
                continue
            usable[epoch] = usable.get(epoch, 0) + 1
            packing = cfg.data.packing if cfg.data.packing != "auto" else ("truncate" if doc.source == "mmc4" else "concat")
            if packing == "truncate" and slots < fast_forward:
                slots += 1
                yield None
                continue
            segments = tokenize_layout(doc, layout, self.tokenizer, self.ids, cfg.num_image_tokens,
                                       crop_seed=f"{cfg.data.seed}-{epoch}-{doc.key}")
            if packing == "truncate":
                slots += 1
                yield truncate_and_pad(segments, cfg.data.seq_length, self.ids.pad, origin=where)
                continue
            if doc.source not in packers:  # one packer per source keeps sources unmixed
                packers[doc.source] = (DocumentPacker(cfg.data.seq_length, self.ids.pad) if packing == "pack" else
                                       ConcatPacker(cfg.data.seq_length, self.ids.pad, cfg.num_image_tokens))
            for sample in packers[doc.source].add(segments, origin=where):
                slots += 1
                yield sample

    def decode_images(self, sample: BuiltSample) -> Optional[List[torch.Tensor]]:
        size = self.cfg.image_size
        tensors = []
        for seg in sample.images:
            try:
                img = decode_image(seg.image.data, size)
                if self.cfg.train_transform:
                    tensors.append(train_transform(img, size, random.Random(seg.crop_seed)))
                else:
                    tensors.append(eval_transform(img, size))
            except Exception as e:  # corrupt bytes despite prepare: drop the sample, count it
                self.skips.add(S.CORRUPT_IMAGE, ",".join(sample.origins), f"{type(e).__name__}: {str(e)[:80]}")
                return None
        return tensors

    def delivered(self, start_slot: int) -> Iterator[tuple]:
        """(sample, image tensors, meta) per sample handed out, forever, after the first `start_slot`
        slots (fast-forwarded). A sample whose image fails to decode is dropped (counted)."""
        slot = 0
        for source, sample in self.samples(fast_forward=start_slot):
            slot += 1
            if slot <= start_slot:
                if slot == start_slot:
                    self.skips = SkipCounter()  # skips before the resume point were already counted
                continue
            images = self.decode_images(sample) if self.cfg.decode_images else None
            if images is None and self.cfg.decode_images:
                continue
            meta = {"reader": self.reader, "cursor": slot, "source": source, "origins": sample.origins,
                    "skips": self.skips.state_dict() if self.skips else None}
            self.skips = SkipCounter()
            yield sample, images, meta


def epoch_order(shards: Sequence[str], seed: str, epoch: int) -> List[str]:
    """The shards of `epoch` in their seeded order."""
    order = list(shards)
    random.Random(f"{seed}-shards-{epoch}").shuffle(order)
    return order


def reader_shards(order: List[str], reader: int, num_readers: int) -> tuple:
    """(the shards `reader` reads, whether it reads them whole): its own shards when there are at
    least as many as readers, else all of them (keeping every num_readers-th document)."""
    split_by_shard = len(order) >= num_readers
    return (order[reader::num_readers] if split_by_shard else order), split_by_shard


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Seeded shuffle buffer (size <= 1 passes items through)."""
    if size <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            k = rng.randrange(len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def collate(samples: List[BuiltSample], images: Optional[List[List[torch.Tensor]]], ids: SpecialIds,
            image_size: int, num_image_tokens: int) -> LCLBatch:
    """Samples (and their decoded images, or None for a labels-only batch) -> one `LCLBatch` on the CPU."""
    full = torch.tensor([s.tokens for s in samples], dtype=torch.long)  # [b, s + 1]
    tokens, labels = full[:, :-1].contiguous(), full[:, 1:].contiguous()  # [b, s] each
    b, s = tokens.shape
    not_text = (labels == ids.image) | (labels == ids.eoi) | (labels == ids.pad)
    flat = [t for per_sample in images for t in per_sample] if images is not None else None
    segs = [seg for sample in samples for seg in sample.images]
    labels_given = [seg.image.label for seg in segs]
    batch = LCLBatch(
        tokens=tokens,
        labels=labels,
        loss_mask=(~not_text).float(),
        position_ids=torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s).contiguous(),
        images=(None if flat is None else  # labels only
                torch.stack(flat) if flat else torch.empty(0, 3, image_size, image_size)),
        image_sample_index=torch.tensor([i for i, smp in enumerate(samples) for _ in smp.images], dtype=torch.long),
        boi_positions=torch.tensor([p for smp in samples for p in smp.boi_positions], dtype=torch.long),
        image_has_context=torch.tensor([c for smp in samples for c in smp.image_context], dtype=torch.bool),
        image_labels=(torch.tensor([-1 if l is None else l for l in labels_given], dtype=torch.long)
                      if any(l is not None for l in labels_given) else None),
    )
    batch.validate(num_image_tokens)
    return batch


# ----------------------------------------------------------------------------- workers

class _RankSamples(IterableDataset):
    """This rank's samples from `next_sample` on (local numbering: sample k is the next one of reader
    `readers[k % len(readers)]`); a worker process yields every P-th of them (P processes)."""

    def __init__(self, cfg: LoaderConfig, cursors: Dict[int, int], next_sample: int):
        self.cfg, self.cursors, self.next_sample = cfg, cursors, next_sample

    def __iter__(self):
        info = get_worker_info()
        processes, physical = (info.num_workers, info.id) if info is not None else (1, 0)
        # torch takes items round-robin from worker 0 on: worker p serves samples next + p + i * P,
        # those of the readers at positions = next + p (mod P) (P divides the reader count).
        first = self.next_sample + physical
        readers = self.cfg.readers
        tokenizer = LCLTokenizer(self.cfg.data.tokenizer)
        streams = {}
        for k in count(first, processes):
            reader = readers[k % len(readers)]
            if reader not in streams:
                streams[reader] = _ReaderStream(self.cfg, reader, tokenizer).delivered(self.cursors[reader])
            yield next(streams[reader])


def _passthrough(item):
    return item


# ----------------------------------------------------------------------------- public loader

@dataclass
class _ReaderProgress:
    """What the training process has consumed from one logical reader (the resume state)."""

    samples: int = 0  # samples handed out
    cursor: int = 0  # slot of the last one
    skips: SkipCounter = field(default_factory=SkipCounter)
    sources: Dict[str, int] = field(default_factory=dict)  # blend only: samples per source

    def state_dict(self) -> dict:
        return {"samples": self.samples, "cursor": self.cursor, "skips": self.skips.state_dict(),
                "sources": dict(self.sources)}

    @classmethod
    def from_state(cls, state: dict) -> "_ReaderProgress":
        skips = SkipCounter()
        skips.load_state_dict(state["skips"])
        return cls(state["samples"], state["cursor"], skips, dict(state["sources"]))


class LCLDataLoader:
    """Iterable of `LCLBatch` for one DP rank, with `state_dict()` / `load_state_dict()` for resume.

    Iterating again (a new `iter()`) continues from the current state, e.g. after `load_state_dict`.
    """

    def __init__(self, cfg: LoaderConfig):
        assert cfg.num_readers % cfg.dp_size == 0, \
            f"data.num_readers ({cfg.num_readers}) must be divisible by the data-parallel size ({cfg.dp_size})"
        self.cfg = cfg
        self.progress = {r: _ReaderProgress(sources={b.name: 0 for b in cfg.blend}) for r in cfg.readers}
        self.last_batch_origins: List[List[str]] = []  # per sample: the "shard:key"s it was built from
        self.ids = SpecialIds.of(LCLTokenizer(cfg.data.tokenizer))
        if cfg.worker_processes < cfg.data.num_workers:
            log.info(f"data.num_workers={cfg.data.num_workers}: DP rank {cfg.dp_rank} runs "
                     f"{len(cfg.readers)} reader(s) of data.num_readers={cfg.num_readers}, so "
                     f"{cfg.worker_processes} worker process(es) (a divisor of its readers)")

    @property
    def samples_consumed(self) -> int:
        """Samples this rank has handed out (its local sample index)."""
        return sum(p.samples for p in self.progress.values())

    @property
    def slots_consumed(self) -> int:
        """Slots this rank's readers went past (their cursors): samples handed out plus samples dropped.
        A labels-only loader and a full one of the same rank agree on it unless an image failed to decode."""
        return sum(p.cursor for p in self.progress.values())

    def __iter__(self) -> Iterator[LCLBatch]:
        cfg = self.cfg
        dataset = _RankSamples(cfg, {r: p.cursor for r, p in self.progress.items()}, self.samples_consumed)
        processes, micro = cfg.worker_processes, cfg.data.micro_batch_size
        # Our randomness is all seeded explicitly; a private generator keeps torch's DataLoader from
        # drawing its worker base seed from (and so moving) the training process's global RNG.
        # Workers ignore stop signals: a job-wide SIGTERM must not kill them before the rank's last
        # step and save (the rank closes them itself).
        loader = DataLoader(dataset, batch_size=None, num_workers=processes, collate_fn=_passthrough,
                            prefetch_factor=2 * micro if processes else None,
                            generator=torch.Generator().manual_seed(cfg.data.seed),
                            worker_init_fn=ignore_stop_signals)
        pin = pin_memory_enabled()
        pending = []
        for item in loader:
            pending.append(item)
            if len(pending) < micro:
                continue
            batch = collate([s for s, _, _ in pending],
                            [i for _, i, _ in pending] if cfg.decode_images else None, self.ids,
                            cfg.image_size, cfg.num_image_tokens)
            for _, _, meta in pending:
                self._consumed(meta)
            self.last_batch_origins = [meta["origins"] for _, _, meta in pending]
            pending = []
            yield batch.pin_memory() if pin else batch

    def _consumed(self, meta: dict) -> None:
        progress = self.progress[meta["reader"]]
        progress.samples += 1
        progress.cursor = meta["cursor"]
        if meta["skips"]:
            received = SkipCounter()
            received.load_state_dict(meta["skips"])
            progress.skips.merge(received)
        if meta["source"] is not None:
            progress.sources[meta["source"]] += 1

    @property
    def skips(self) -> SkipCounter:
        """The skips of every sample handed out so far, over this rank's readers."""
        total = SkipCounter()
        for reader in sorted(self.progress):
            total.merge(self.progress[reader].skips)
        return total

    def skip_counts(self) -> dict:
        """{reason: count} of data dropped so far (for metrics); `self.skips.examples` names them."""
        return dict(self.skips.counts)

    def source_counts(self) -> dict:
        """{source name: samples handed out so far} of a blend (for metrics); {} for one source."""
        totals = {b.name: 0 for b in self.cfg.blend}
        for p in self.progress.values():
            for name, n in p.sources.items():
                totals[name] += n
        return totals

    def state_dict(self) -> dict:
        """This rank's readers' positions (join the states of all DP ranks with `merge_states`)."""
        return {"version": STATE_VERSION, "config": self.cfg.fingerprint(),
                "readers": {r: p.state_dict() for r, p in sorted(self.progress.items())}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (one rank's or `merge_states` of several): it must hold every reader
        this rank runs, saved at any DP size or number of workers."""
        _check_version(state)
        mine, saved = self.cfg.fingerprint(), state["config"]
        diffs = [f"{k}: saved {saved.get(k)!r}, now {mine.get(k)!r}" for k in {**mine, **saved}
                 if saved.get(k) != mine.get(k)]
        if diffs:
            raise ValueError("data loader state does not match this loader (exact resume needs the same "
                             "data, seed, data.num_readers and sample settings): " + "; ".join(diffs))
        missing = [r for r in self.cfg.readers if r not in state["readers"]]
        if missing:
            raise ValueError(f"data loader state lacks reader(s) {missing} of DP rank {self.cfg.dp_rank} "
                             f"(it holds {sorted(state['readers'])}): merge the states of every DP rank")
        progress = {r: _ReaderProgress.from_state(state["readers"][r]) for r in self.cfg.readers}
        _check_positions({r: p.samples for r, p in progress.items()}, f"DP rank {self.cfg.dp_rank}'s readers")
        self.progress = progress


def _check_version(state: dict) -> None:
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"data loader state version {state.get('version')} (now {STATE_VERSION}): saved "
                         "before the data order had logical readers (data.num_readers), so it cannot be "
                         "continued exactly")


def _check_positions(samples: Dict[int, int], what: str) -> None:
    """The readers' sample counts, in reader order, must be those of a round-robin over them:
    the first `n % len` readers one ahead of the rest (n = their total)."""
    counts = [samples[r] for r in sorted(samples)]
    q, extra = divmod(sum(counts), len(counts))
    if counts != [q + 1] * extra + [q] * (len(counts) - extra):
        raise ValueError(f"data loader state: the samples handed out by {what} ({counts}) are not those of "
                         "the round-robin over readers (a corrupted or hand-edited state)")


def merge_states(states: Sequence[dict]) -> dict:
    """One state holding the readers of all `states` (the `state_dict()`s of every DP rank of a run,
    at the DP size it was saved at); it loads at any DP size that divides data.num_readers."""
    for s in states:
        _check_version(s)
    configs = [s["config"] for s in states]
    if any(c != configs[0] for c in configs):
        raise ValueError("data loader states of one checkpoint disagree on their settings")
    readers = {}
    for s in states:
        readers.update(s["readers"])
    if len(readers) != configs[0]["num_readers"]:
        raise ValueError(f"data loader states hold readers {sorted(readers)}, not all "
                         f"{configs[0]['num_readers']} of data.num_readers")
    _check_positions({r: p["samples"] for r, p in readers.items()}, "the readers")
    return {"version": STATE_VERSION, "config": configs[0], "readers": readers}


def build_loader(data: DataConfig, *, image_size: int, num_image_tokens: int, dp_rank: int = 0,
                 dp_size: int = 1, train_transform: bool = True, labels_only: bool = False) -> LCLDataLoader:
    """The training loader for one data-parallel rank (see the module docstring). `data` is the run
    config's data section, validated by `megatron_lcl.config.validate_config` (`data.path`: folders,
    globs or shard paths of prepared shards, or a weighted blend `[w1, path1, w2, path2, ...]`;
    `data.tokenizer`: the sentencepiece model; `data.num_readers`: divisible by `dp_size`).
    `labels_only`: batches without images (`images=None`), for the last stage of a pipeline."""
    assert 0 <= dp_rank < dp_size, f"dp_rank ({dp_rank}) must be in [0, dp_size={dp_size})"
    blend = find_blend(data.path) if data_blend(data.path) else ()
    shards = tuple(s for b in blend for s in b.shards) if blend else find_shards(data.path)
    return LCLDataLoader(LoaderConfig(data, shards, image_size, num_image_tokens, dp_rank, dp_size,
                                      train_transform, blend, decode_images=not labels_only))

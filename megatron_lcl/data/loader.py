"""Streaming loader: prepared webdataset shards -> `LCLBatch` micro-batches for one DP rank.

Stages (each worker process runs them on its own part of the data):

    shard order (per epoch, seeded)  ->  this reader's shards or documents  ->  shuffle buffer
    ->  build samples (rules.py: layout, tokenize, truncate/pack)  ->  decode + transform images
    ->  batch + collate to LCLBatch

Data-parallel split. There are `dp_size * num_workers` readers; reader `dp_rank * num_workers + w`.
With at least that many shards, each reader reads its own shards (`order[reader::num_readers]`);
with fewer shards every reader reads all of them and keeps documents `index % num_readers == reader`.
Either way ranks see disjoint documents that together cover the data in each epoch. Tensor-parallel
ranks of one replica pass the same `dp_rank` and get identical batches; pipeline stages that take no
data should not build a loader at all.

Determinism and exact resume. Every random choice is seeded from (seed, epoch, document key) or
(seed, epoch, reader), so the stream of samples a worker produces is a pure function of the config.
A worker counts "slots": built samples, including ones later dropped (e.g. an image that fails to
decode). Each batch carries the worker's slot cursor; the loader keeps, per worker, the cursor of the
last batch it handed out, plus the number of batches consumed. `load_state_dict` restarts each
worker at its cursor: it fast-forwards through the earlier slots building token layouts only (no image
decoding, cheap) and rotates worker ids so the next batch comes from the worker whose turn it is.
The state is only valid for the same data, seed, dp_rank/dp_size, num_workers, batch size and sequence
settings (checked on load).

Another data-parallel size (a job requeued on fewer or more nodes): `continue_from(old states)`. Each
reader's state records where it reads (epoch, shard). A shard that some old reader had opened counts
as read; the shards of that epoch no old reader had opened are split among the new readers (the same
rule as above), then the epochs continue with the new split. Nothing is read twice; what is lost is
the unread rest of the opened shards (at most one shard plus the shuffle buffer per old reader, and
the rest of an epoch's share of readers that had finished theirs are not re-read either). Slot
cursors start at 0; skip and source counters carry over (summed onto DP rank 0).

Weighted blends (`data.path: [0.5, /data/laion, 0.5, /data/mmc4]`, Megatron's convention). Each source
keeps its own shards, DP split, shuffle, epochs and packer: one document stream per source and reader.
A reader's slot k takes its next sample from the source drawn by the k-th draw of a generator seeded
with (seed, reader): the choice sequence is a pure function of (seed, reader, slot), so the one slot
cursor per worker still resumes exactly (replaying the draws tells how far each source stream went).
Samples per source are counted like skips (`loader.source_counts()`, saved in the state).

Skipped data. Workers count what they drop (by reason, naming shard and key) and send the counts
with each batch; `loader.skips` (a SkipCounter) holds the totals of consumed batches and is saved in
the state. Use `loader.skip_counts()` for metrics. A shard that breaks mid-way counts as many
`corrupt_shard` as samples were lost after the break, with a warning line naming shard and key
(`sources.tar_samples`).
"""

import glob
import os
import random
from dataclasses import dataclass
from itertools import accumulate, count
from typing import Iterator, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_lcl.config import DataConfig
from megatron_lcl.config.run import data_blend, shards_at
from megatron_lcl.data import skips as S
from megatron_lcl.data.batch import LCLBatch
from megatron_lcl.data.documents import from_wds_sample
from megatron_lcl.data.rules import (BuiltSample, ConcatPacker, DocumentPacker, SpecialIds, document_layout,
                                     tokenize_layout, truncate_and_pad)
from megatron_lcl.data.skips import SkipCounter
from megatron_lcl.data.sources import tar_samples
from megatron_lcl.data.tokenizer import LCLTokenizer
from megatron_lcl.data.transforms import decode_image, eval_transform, train_transform
from megatron_lcl.runtime.device import pin_memory_enabled
from megatron_lcl.runtime.signals import ignore_stop_signals

STATE_VERSION = 1


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

    @property
    def logical_workers(self) -> int:
        return max(self.data.num_workers, 1)

    def fingerprint(self) -> dict:
        """The settings a saved loader state is only valid for (checked on load)."""
        d = self.data
        return {"shards": [os.path.basename(s) for s in self.shards], "seq_length": d.seq_length,
                "image_size": self.image_size, "num_image_tokens": self.num_image_tokens,
                "micro_batch_size": d.micro_batch_size, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "seed": d.seed, "num_workers": d.num_workers, "shuffle_buffer": d.shuffle_buffer,
                "packing": d.packing, "train_transform": self.train_transform,
                **({"blend": [[b.name, b.weight, [os.path.basename(s) for s in b.shards]] for b in self.blend]}
                   if self.blend else {})}


def find_shards(data_path: Union[str, Sequence[str]]) -> tuple:
    """Prepared shards from a folder, a glob, a shard path or a list of those."""
    items = [data_path] if isinstance(data_path, str) else list(data_path)
    shards = []
    for item in items:
        shards += shards_at(item)
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


# ----------------------------------------------------------------------------- per-worker stream

class _WorkerStream:
    """The deterministic sample stream of one reader (one worker of one DP rank)."""

    def __init__(self, cfg: LoaderConfig, logical_worker: int, unread: Optional[dict] = None):
        self.cfg = cfg
        self.unread = unread or {}  # {tag: {epoch: shard names}} after a DP-size change (continue_from)
        self.read_position = {}  # {tag: [epoch, shard name]}: the shard this reader is reading
        self.worker = logical_worker
        self.reader = cfg.dp_rank * cfg.logical_workers + logical_worker
        self.num_readers = cfg.dp_size * cfg.logical_workers
        self.tokenizer = LCLTokenizer(cfg.data.tokenizer)
        self.ids = SpecialIds.of(self.tokenizer)
        self.skips = SkipCounter()  # skips since the last batch handed out

    def documents(self, shards: Optional[tuple] = None, tag: str = "") -> Iterator[tuple]:
        """(epoch, shard name, wds sample) forever, in this reader's seeded order, of `shards` (default:
        all; a blend source passes its own, and its `tag` keeps its seeds apart)."""
        cfg = self.cfg
        shards = cfg.shards if shards is None else shards
        unread = self.unread.get(tag, {})
        for epoch in count(min(unread, default=0)):
            order = epoch_order(shards, f"{cfg.data.seed}{tag}", epoch, unread)
            mine, split_by_shard = reader_shards(order, self.reader, self.num_readers)
            rng = random.Random(f"{cfg.data.seed}{tag}-buffer-{epoch}-{self.reader}")
            seen = 0
            for shard, sample in _shuffled(self._tracked(self._read(mine, split_by_shard), tag, epoch),
                                           cfg.data.shuffle_buffer, rng):
                seen += 1
                yield epoch, shard, sample
            if seen == 0 and epoch == 0 and not unread:
                raise RuntimeError(
                    f"DP rank {cfg.dp_rank} worker {self.worker} got no documents from "
                    f"{len(shards)} shard(s){tag and ' of blend source ' + tag[1:]}; use fewer readers (dp_size x num_workers = {self.num_readers})")

    def _tracked(self, items: Iterator[tuple], tag: str, epoch: int) -> Iterator[tuple]:
        for name, sample in items:
            self.read_position[tag] = [epoch, name]
            yield name, sample

    def _read(self, shards: List[str], split_by_shard: bool) -> Iterator[tuple]:
        index = 0
        who = f"DP rank {self.cfg.dp_rank} worker {self.worker}: "
        for shard in shards:
            name = os.path.basename(shard)
            for sample in tar_samples(shard, self._count_lost, who):
                if split_by_shard or index % self.num_readers == self.reader:
                    yield name, sample
                index += 1

    def _count_lost(self, where: str, detail: str, n: int) -> None:
        self.skips.add(S.CORRUPT_SHARD, where, detail, count=n)  # the counter of the batch in the making

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
        cut = self.unread.get(tag, {})  # epochs a DP-size change cut short may give this reader nothing
        for epoch, shard, raw in self.documents(shards, tag):
            if epoch > min(cut, default=0) and epoch - 1 not in cut and not usable.get(epoch - 1):
                raise RuntimeError(f"DP rank {cfg.dp_rank} worker {self.worker}: no usable document in a "
                                   f"whole epoch of its data; skipped:\n{self.skips.summary()}")
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

    def batches(self, start_slot: int) -> Iterator[tuple]:
        """(LCLBatch, meta) forever, starting after `start_slot` slots (fast-forwarded)."""
        pending, slot = [], 0
        for source, sample in self.samples(fast_forward=start_slot):
            slot += 1
            if slot <= start_slot:
                if slot == start_slot:
                    self.skips = SkipCounter()  # skips before the resume point were already counted
                continue
            images = self.decode_images(sample)
            if images is None:
                continue
            pending.append((sample, images, source))
            if len(pending) == self.cfg.data.micro_batch_size:
                batch = collate([s for s, _, _ in pending], [i for _, i, _ in pending], self.ids,
                                self.cfg.image_size, self.cfg.num_image_tokens)
                meta = {"worker": self.worker, "cursor": slot, "skips": self.skips.state_dict(),
                        "read_position": {k: list(v) for k, v in self.read_position.items()},
                        "origins": [s.origins for s, _, _ in pending],
                        "sources": [name for _, _, name in pending if name is not None]}
                self.skips = SkipCounter()
                pending = []
                yield batch, meta


def epoch_order(shards: Sequence[str], seed: str, epoch: int, unread: dict) -> List[str]:
    """The shards of `epoch` in their seeded order; only the `unread` ones of an epoch a DP-size change cut."""
    order = list(shards)
    random.Random(f"{seed}-shards-{epoch}").shuffle(order)
    if epoch in unread:
        keep = set(unread[epoch])
        order = [s for s in order if os.path.basename(s) in keep]
    return order


def reader_shards(order: List[str], reader: int, num_readers: int) -> tuple:
    """(the shards `reader` reads, whether it reads them whole): its own shards when there are at
    least as many as readers, else all of them (keeping every num_readers-th document)."""
    split_by_shard = len(order) >= num_readers
    return (order[reader::num_readers] if split_by_shard else order), split_by_shard


def unread_shards(cfg: LoaderConfig, old_states: List[dict]) -> dict:
    """{tag: {epoch: unread shard names}} from the states of every DP rank of another DP size: per
    epoch between the slowest and the furthest old reader, the shards no old reader had opened."""
    old = old_states[0]["config"]
    old_readers = old["dp_size"] * max(old["num_workers"], 1)
    positions = [p for state in old_states for p in state["read_positions"]]  # reader = dp * workers + w
    before = old_states[0].get("unread", {})
    sources = [(f"-{b.name}", b.shards) for b in cfg.blend] if cfg.blend else [("", cfg.shards)]
    result = {}
    for tag, shards in sources:
        at = [p.get(tag, [min(before.get(tag, {}), default=0), None]) for p in positions]
        result[tag] = {}
        for epoch in range(min(e for e, _ in at), max(e for e, _ in at) + 1):
            order = [os.path.basename(s) for s in
                     epoch_order(shards, f"{cfg.data.seed}{tag}", epoch, before.get(tag, {}))]
            opened = set()
            for reader, (reader_epoch, name) in enumerate(at):
                mine, _ = reader_shards(order, reader, old_readers)
                if epoch < reader_epoch:
                    opened.update(mine)
                elif epoch == reader_epoch and name is not None:
                    opened.update(mine[:mine.index(name) + 1])
            result[tag][epoch] = [s for s in order if s not in opened]
    return result


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


def collate(samples: List[BuiltSample], images: List[List[torch.Tensor]], ids: SpecialIds,
            image_size: int, num_image_tokens: int) -> LCLBatch:
    full = torch.tensor([s.tokens for s in samples], dtype=torch.long)  # [b, s + 1]
    tokens, labels = full[:, :-1].contiguous(), full[:, 1:].contiguous()  # [b, s] each
    b, s = tokens.shape
    not_text = (labels == ids.image) | (labels == ids.eoi) | (labels == ids.pad)
    flat = [t for per_sample in images for t in per_sample]
    segs = [seg for sample in samples for seg in sample.images]
    labels_given = [seg.image.label for seg in segs]
    batch = LCLBatch(
        tokens=tokens,
        labels=labels,
        loss_mask=(~not_text).float(),
        position_ids=torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s).contiguous(),
        images=torch.stack(flat) if flat else torch.empty(0, 3, image_size, image_size),
        image_sample_index=torch.tensor([i for i, smp in enumerate(samples) for _ in smp.images], dtype=torch.long),
        boi_positions=torch.tensor([p for smp in samples for p in smp.boi_positions], dtype=torch.long),
        image_has_context=torch.tensor([c for smp in samples for c in smp.image_context], dtype=torch.bool),
        image_labels=(torch.tensor([-1 if l is None else l for l in labels_given], dtype=torch.long)
                      if any(l is not None for l in labels_given) else None),
    )
    batch.validate(num_image_tokens)
    return batch


class _StreamDataset(IterableDataset):
    def __init__(self, cfg: LoaderConfig, cursors: List[int], rotation: int, unread: dict):
        self.cfg, self.cursors, self.rotation, self.unread = cfg, cursors, rotation, unread

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.rotation) % self.cfg.logical_workers
        stream = _WorkerStream(self.cfg, logical, self.unread)
        return stream.batches(start_slot=self.cursors[logical])


def _passthrough(item):
    return item


# ----------------------------------------------------------------------------- public loader

class LCLDataLoader:
    """Iterable of `LCLBatch` for one DP rank, with `state_dict()` / `load_state_dict()` for resume.

    Iterating again (a new `iter()`) continues from the current state, e.g. after `load_state_dict`.
    """

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        self.batches_consumed = 0
        self.cursors = [0] * cfg.logical_workers
        self.skips = SkipCounter()
        self.source_samples = {b.name: 0 for b in cfg.blend}  # blend only: samples handed out per source
        self.last_batch_origins: List[List[str]] = []  # per sample: the "shard:key"s it was built from
        self.read_positions = [{} for _ in range(cfg.logical_workers)]  # per worker: {tag: [epoch, shard]}
        self.unread = {}  # after a DP-size change: {tag: {epoch: shard names}} (see continue_from)

    def __iter__(self) -> Iterator[LCLBatch]:
        cfg = self.cfg
        dataset = _StreamDataset(cfg, list(self.cursors), self.batches_consumed % cfg.logical_workers,
                                 self.unread)
        # Our randomness is all seeded explicitly; a private generator keeps torch's DataLoader from
        # drawing its worker base seed from (and so moving) the training process's global RNG.
        # Workers ignore stop signals: a job-wide SIGTERM must not kill them before the rank's last
        # step and save (the rank closes them itself).
        loader = DataLoader(dataset, batch_size=None, num_workers=cfg.data.num_workers,
                            collate_fn=_passthrough, prefetch_factor=2 if cfg.data.num_workers else None,
                            generator=torch.Generator().manual_seed(cfg.data.seed),
                            worker_init_fn=ignore_stop_signals, pin_memory=pin_memory_enabled())
        for batch, meta in loader:
            self.cursors[meta["worker"]] = meta["cursor"]
            self.read_positions[meta["worker"]] = meta["read_position"]
            received = SkipCounter()
            received.load_state_dict(meta["skips"])
            self.skips.merge(received)
            for name in meta["sources"]:
                self.source_samples[name] += 1
            self.batches_consumed += 1
            self.last_batch_origins = meta["origins"]
            yield batch

    def skip_counts(self) -> dict:
        """{reason: count} of data dropped so far (for metrics); `self.skips.examples` names them."""
        return dict(self.skips.counts)

    def source_counts(self) -> dict:
        """{source name: samples handed out so far} of a blend (for metrics); {} for one source."""
        return dict(self.source_samples)

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "batches_consumed": self.batches_consumed,
            "cursors": list(self.cursors),
            "read_positions": [dict(p) for p in self.read_positions],
            "unread": self.unread,
            "skips": self.skips.state_dict(),
            **({"source_samples": dict(self.source_samples)} if self.cfg.blend else {}),
            "config": self.cfg.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        assert state.get("version") == STATE_VERSION, f"unknown data loader state version {state.get('version')}"
        mine = self.cfg.fingerprint()
        saved = state["config"]
        diffs = [f"{k}: saved {saved.get(k)!r}, now {mine.get(k)!r}" for k in {**mine, **saved}
                 if saved.get(k) != mine.get(k)]
        if diffs:
            raise ValueError("data loader state does not match this loader (exact resume needs the same "
                             "data and settings): " + "; ".join(diffs))
        self.batches_consumed = state["batches_consumed"]
        self.cursors = list(state["cursors"])
        self.skips.load_state_dict(state["skips"])
        self.read_positions = [dict(p) for p in state.get("read_positions", self.read_positions)]
        self.unread = state.get("unread", {})
        if self.cfg.blend:
            self.source_samples = dict(state["source_samples"])

    def continue_from(self, old_states: List[dict]) -> None:
        """Continue after what the loaders of another data-parallel size read: `old_states` are their
        `state_dict()`s, by DP rank (see the module docstring for what is skipped, nothing repeats)."""
        mine, saved = self.cfg.fingerprint(), old_states[0]["config"]
        # New readers start on the shards no old reader opened: only which shards, in which epoch order
        # (seed, blend), must match; the batching (micro-batch size, workers, packing...) may change.
        diffs = [f"{k}: saved {saved.get(k)!r}, now {mine.get(k)!r}" for k in ("shards", "seed", "blend")
                 if saved.get(k) != mine.get(k)]
        if diffs or "read_positions" not in old_states[0]:
            raise ValueError("the saved data loader states cannot be continued at another data-parallel size "
                             "(" + ("; ".join(diffs) or "saved before read positions were recorded") + "); "
                             "set checkpoint.load_data_state=false to start the data stream afresh")
        self.unread = unread_shards(self.cfg, old_states)
        if self.cfg.dp_rank == 0:  # the counters of everything read so far, once
            for state in old_states:
                old = SkipCounter()
                old.load_state_dict(state["skips"])
                self.skips.merge(old)
                for name, n in state.get("source_samples", {}).items():
                    self.source_samples[name] += n


def build_loader(data: DataConfig, *, image_size: int, num_image_tokens: int, dp_rank: int = 0,
                 dp_size: int = 1, train_transform: bool = True) -> LCLDataLoader:
    """The training loader for one data-parallel rank (see the module docstring). `data` is the run
    config's data section, validated by `megatron_lcl.config.validate_config` (`data.path`: folders,
    globs or shard paths of prepared shards, or a weighted blend `[w1, path1, w2, path2, ...]`; `data.tokenizer`: the sentencepiece model)."""
    assert 0 <= dp_rank < dp_size, f"dp_rank ({dp_rank}) must be in [0, dp_size={dp_size})"
    blend = find_blend(data.path) if data_blend(data.path) else ()
    shards = tuple(s for b in blend for s in b.shards) if blend else find_shards(data.path)
    return LCLDataLoader(LoaderConfig(data, shards, image_size, num_image_tokens, dp_rank, dp_size,
                                      train_transform, blend))

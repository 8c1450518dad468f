"""The data order depends on the data, the seed and data.num_readers only: not on the data-parallel size
or the number of DataLoader workers. A DP-size change on resume continues exactly.

Each layout runs its DP ranks' loaders side by side in this process; a step's global micro-batch j is
the j-th micro-batch of every rank together. Samples are compared by their documents ("shard:key") and
a digest of their tokens and images.
"""

import hashlib
from collections import Counter

import pytest
import webdataset as wds

from megatron_lcl.data.documents import DocImage, Document, to_wds_sample
from megatron_lcl.data.loader import merge_states
from data_helpers import jpeg_bytes, make_loader
from data_helpers import loader_kwargs, prepared_mmc4, synthetic_mmc4, tokenizer_path  # noqa: F401 (fixtures)
from test_blend import blend_loader, prepared_laion  # noqa: F401 (fixture)

MICRO_BATCH = 4  # samples of one global micro-batch, over all DP ranks


def sample_ids(batch, origins) -> list:
    """Per sample: (its "shard:key"s, a digest of its tokens and its images)."""
    out = []
    for i, where in enumerate(origins):
        digest = hashlib.sha1(batch.tokens[i].numpy().tobytes())
        digest.update(batch.images[batch.image_sample_index == i].numpy().tobytes())
        out.append((tuple(where), digest.hexdigest()))
    return out


def run_layout(make, dp: int, workers: int, steps: int, micro_batches: int, state=None):
    """`steps` steps of `micro_batches` global micro-batches at DP size `dp`: per step and micro-batch the
    sorted samples, and the merged state of all ranks after them (the loaders start from `state`)."""
    loaders = [make(dp_rank=r, dp_size=dp, num_workers=workers, micro_batch_size=MICRO_BATCH // dp)
               for r in range(dp)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    streams = [iter(loader) for loader in loaders]
    record = []
    for _ in range(steps):
        step = []
        for _ in range(micro_batches):
            samples = []
            for loader, stream in zip(loaders, streams):
                samples += sample_ids(next(stream), loader.last_batch_origins)
            step.append(sorted(samples))
        record.append(step)
    for stream in streams:
        stream.close()  # ends the worker processes
    return record, merge_states([loader.state_dict() for loader in loaders]), loaders


def keys_of(record) -> Counter:
    return Counter(key for step in record for micro in step for where, _ in micro for key in where)


def test_every_step_is_the_same_at_any_dp_size_and_workers(prepared_mmc4, loader_kwargs):
    """DP 1, 2, 4 x workers 0, 1, 2: every global batch (3 micro-batches of 4) holds the same samples,
    micro-batch by micro-batch, over 3 epochs of the data (~70 usable documents per epoch)."""
    def make(**layout):
        return make_loader(prepared_mmc4, **{**loader_kwargs, **layout})

    steps = 18  # 18 x 12 = 216 samples: 27 per reader, 3 epochs of its ~9 documents
    reference, _, _ = run_layout(make, 1, 0, steps, 3)
    epochs = max(keys_of(reference).values())
    assert epochs >= 3 and len(keys_of(reference)) > 60, (epochs, len(keys_of(reference)))
    for dp in (1, 2, 4):
        for workers in (0, 1, 2) if dp > 1 else (1, 2):  # DP 1 without workers is the reference
            record, _, _ = run_layout(make, dp, workers, steps, 3)
            for t, (got, want) in enumerate(zip(record, reference)):
                assert Counter(k for m in got for s in m for k in s[0]) == \
                    Counter(k for m in want for s in m for k in s[0]), f"DP {dp}, {workers} workers: step {t}"
                assert got == want, f"DP {dp}, {workers} workers: step {t} has other samples or micro-batches"


@pytest.fixture(scope="module")
def one_epoch_corpus(tmp_path_factory) -> tuple:
    """64 usable single-image documents in 8 shards of 8: with 8 readers each reads one shard per epoch."""
    root = tmp_path_factory.mktemp("one_epoch")
    keys = []
    for shard in range(8):
        with wds.TarWriter(str(root / f"shard-{shard:06d}.tar")) as sink:
            for i in range(8):
                key = f"doc{shard}_{i}"
                image = DocImage(data=jpeg_bytes(colour=(shard * 30, i * 30, 90)), matched_text_index=0,
                                 matched_sim=0.3, label=i)
                text = ["A circle " + " ".join(["red"] * (i + 1)) + ".", f"Shard {shard} text."]
                sink.write(to_wds_sample(Document(key, "mmc4", text, [image], f"src:{key}")))
                keys.append(f"shard-{shard:06d}.tar:{key}")
    return str(root), keys


def test_dp_size_changes_read_every_document_of_the_epoch_once(one_epoch_corpus, loader_kwargs):
    """DP 2 (2 workers) for 3 steps -> DP 1 (in process) for 2 -> DP 4 (1 worker) for 3: 8 steps of 8
    samples read each of the 64 documents exactly once, step by step the samples of an uninterrupted
    DP 1 run; the skip and sample counters continue."""
    path, all_keys = one_epoch_corpus

    def make(**layout):
        return make_loader(path, **{**loader_kwargs, **layout})

    uninterrupted, end_state, _ = run_layout(make, 1, 0, 8, 2)
    first, state, _ = run_layout(make, 2, 2, 3, 2)
    second, state, _ = run_layout(make, 1, 0, 2, 2, state)
    third, state, loaders = run_layout(make, 4, 1, 3, 2, state)
    chain = first + second + third
    assert chain == uninterrupted
    read = keys_of(chain)
    assert sorted(read) == sorted(all_keys) and set(read.values()) == {1}, read
    assert state == end_state  # every reader at the same position, counters included
    assert sum(loader.samples_consumed for loader in loaders) == 64


def test_a_blend_continues_exactly_at_another_dp_size(prepared_laion, prepared_mmc4, tokenizer_path):
    """A 0.5 / 0.5 blend: DP 2 (2 workers) for 3 steps -> DP 4 for 3 equals DP 1 for 6, source counts too."""
    def make(**layout):
        return blend_loader(prepared_laion, prepared_mmc4, (0.5, 0.5), tokenizer_path=tokenizer_path, **layout)

    uninterrupted, end_state, loaders = run_layout(make, 1, 0, 6, 2)
    first, state, _ = run_layout(make, 2, 2, 3, 2)
    second, state, resumed = run_layout(make, 4, 0, 3, 2, state)
    assert first + second == uninterrupted
    assert state == end_state
    counts = Counter()
    for loader in resumed:
        counts.update(loader.source_counts())
    assert counts == Counter(loaders[0].source_counts()) and sum(counts.values()) == 6 * 2 * MICRO_BATCH
    assert min(counts.values()) > 0


def test_a_state_missing_readers_or_out_of_step_is_refused(prepared_mmc4, loader_kwargs):
    def make(**layout):
        return make_loader(prepared_mmc4, **{**loader_kwargs, **layout})

    half = make(dp_rank=0, dp_size=2, micro_batch_size=2)
    next(iter(half))
    with pytest.raises(ValueError, match=r"lacks reader\(s\) \[1, 3, 5, 7\] of DP rank 0"):
        make().load_state_dict(half.state_dict())  # DP 1 needs every reader: merge the ranks' states
    with pytest.raises(ValueError, match="not all 8 of data.num_readers"):
        merge_states([half.state_dict()])
    other = make(dp_rank=1, dp_size=2, micro_batch_size=2)  # rank 1 has read nothing: out of step
    with pytest.raises(ValueError, match="round-robin"):
        merge_states([half.state_dict(), other.state_dict()])


def test_a_dp_size_that_does_not_divide_num_readers_is_a_config_error():
    from megatron_lcl.config import load_config
    from megatron_lcl.config.validate import config_errors

    cfg = load_config("examples/configs/tiny_cpu.yaml", ["data.path=[/a]", "data.tokenizer=t.model",
                                                         "train.global_batch_size=12"])
    assert not [e for e in config_errors(cfg, world_size=4) if "num_readers" in e]
    errors = config_errors(cfg, world_size=3)
    assert any(e.startswith("data.num_readers (8) must be divisible by the data-parallel size (3") for e in errors), errors
    cfg.data.num_readers = 0
    assert "data.num_readers (0) must be > 0" in config_errors(cfg)

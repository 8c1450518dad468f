"""A tar shard that breaks mid-way: the samples before the break are read, the rest is counted as
`corrupt_shard` (the samples lost, not one per shard), named by shard and key, with one warning line.

Shards are broken for real: a garbled member header (the file keeps its length, the samples after it
are there but unreadable) and a file cut short (what is after the cut is gone).
"""

import logging
import re
import shutil
import tarfile

import pytest

import data_helpers
from data_helpers import make_loader, write_laion_shard
from megatron_lcl.data.skips import SkipCounter
from megatron_lcl.data.sources import read_laion

# The fixtures used here (data_helpers is not a conftest: a module registers the ones it names).
synthetic_mmc4, tokenizer_path = data_helpers.synthetic_mmc4, data_helpers.tokenizer_path
prepared_mmc4, loader_kwargs = data_helpers.prepared_mmc4, data_helpers.loader_kwargs


def sample_offsets(path) -> dict:
    """{sample key: byte offset of its first member's header}, in file order (from the intact shard)."""
    offsets = {}
    with tarfile.open(path) as tf:
        for member in tf.getmembers():
            offsets.setdefault(member.name.split(".")[0], member.offset)
    return offsets


def garble_header(path, key) -> None:
    offset = sample_offsets(path)[key]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x17" * 512)


def cut_at(path, offset) -> None:
    with open(path, "r+b") as f:
        f.truncate(offset)


def sample_offsets_of_intact(tmp_path) -> dict:
    write_laion_shard(tmp_path / "intact.tar", 10)
    return sample_offsets(tmp_path / "intact.tar")


def read_laion_shard(path):
    skips = SkipCounter()
    docs = list(read_laion(str(path), skips))
    return [d.origin.split(":")[1] for d in docs], skips


def test_intact_shard_counts_nothing(tmp_path, caplog):
    write_laion_shard(tmp_path / "s.tar", 10)
    keys, skips = read_laion_shard(tmp_path / "s.tar")
    assert keys == [f"{i:09d}" for i in range(10)] and not skips and not caplog.records


def test_garbled_header_counts_every_sample_after_it(tmp_path, caplog):
    path = tmp_path / "s.tar"
    write_laion_shard(path, 10)
    garble_header(path, "000000006")
    with caplog.at_level(logging.WARNING):
        keys, skips = read_laion_shard(path)
    assert keys == [f"{i:09d}" for i in range(6)]
    assert dict(skips.counts) == {"corrupt_shard": 4}  # samples 6..9: all of the rest, not 1
    (example,) = skips.examples["corrupt_shard"]
    assert example == ("s.tar:000000005: shard broken after sample 6 (key 000000005) at byte "
                       f"{sample_offsets_of_intact(tmp_path)['000000006']} of {path.stat().st_size}: invalid tar "
                       "header; 4 sample(s) after it unreadable (000000006 .. 000000009)")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.getMessage() == f"skipped corrupt shard {example}"


@pytest.mark.parametrize("into_data, lost", [(False, 0), (True, 1)])
def test_truncated_shard_is_reported_where_it_ends(tmp_path, caplog, into_data, lost):
    """Cut at a sample's first header (nothing after it is left to count) or inside its first member's
    data (the header announces that sample: it is lost)."""
    path = tmp_path / "s.tar"
    write_laion_shard(path, 10)
    with tarfile.open(path) as tf:
        first = tf.getmember("000000004.jpg")
    cut = first.offset_data + 100 if into_data else first.offset
    cut_at(path, cut)
    with caplog.at_level(logging.WARNING):
        keys, skips = read_laion_shard(path)
    assert keys == [f"{i:09d}" for i in range(4)]
    assert dict(skips.counts) == {"corrupt_shard": 1}  # the event, or the one sample the file announces
    (example,) = skips.examples["corrupt_shard"]
    header = first.offset_data - 512 if into_data else first.offset  # the member whose data is cut / the cut
    why = ("member 000000004.jpg runs past the end of the file (truncated); 1 sample(s) after it unreadable "
           "(000000004)" if into_data else
           "the file ends before the end-of-archive marker (truncated); 0 sample(s) after it unreadable")
    assert example.startswith(f"s.tar:000000003: shard broken after sample 4 (key 000000003) at byte "
                              f"{header} of {cut}: {why}"), example
    assert len(caplog.records) == 1


def test_loader_counts_the_lost_rest_of_a_prepared_shard(prepared_mmc4, loader_kwargs, tmp_path, caplog):
    """One of 8 prepared shards (10 documents each) garbled after its 3rd document: the loader's skip
    counts (what the trainer logs as skipped/corrupt_shard) hold the 7 lost documents, named."""
    shards = tmp_path / "shards"
    shutil.copytree(prepared_mmc4, shards)
    broken = sorted(shards.glob("*.tar"))[2]
    keys = list(sample_offsets(broken))
    garble_header(broken, keys[3])
    loader = make_loader(shards, **{**loader_kwargs, "shuffle_buffer": 1, "micro_batch_size": 1})
    with caplog.at_level(logging.WARNING):
        batches = iter(loader)
        for _ in range(80):  # one epoch holds at most 80 - 7 samples
            next(batches)
            if loader.skip_counts().get("corrupt_shard"):
                break
    assert loader.skip_counts()["corrupt_shard"] == len(keys) - 3 == 7
    (example,) = loader.skips.examples["corrupt_shard"]
    assert example.startswith(f"{broken.name}:{keys[2]}: shard broken after sample 3 (key {keys[2]})")
    assert example.endswith(f"invalid tar header; 7 sample(s) after it unreadable ({keys[3]} .. {keys[-1]})")
    (record,) = caplog.records
    assert re.fullmatch(r"reader \d of 8: skipped corrupt shard " + re.escape(example), record.getMessage())

"""Webdataset tar shards, read one way for training data and evaluation (which files a data path
names: `data.shard_paths`).

    for sample in tar_samples(shard, count_lost): ...        # in order: {"__key__", "jpg", "txt", ...}
    index = tar_index(shard)              # {key: {ext: (data offset, size)}}: read members by offset

A sample is the members that share a key: the member name up to the first dot of its file name
(webdataset's `base_plus_ext`), the rest being the extension. `tar_samples` streams a shard through
webdataset (training data, LAION); `tar_index` reads only the headers, for random access by offset
(the evaluation sources read one image at a time in their DataLoader workers).
"""

import logging
import os
import tarfile
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import webdataset as wds

TAR_BLOCK = tarfile.BLOCKSIZE  # 512: headers and data start on block boundaries
log = logging.getLogger(__name__)


def sample_key(member_name: str) -> Tuple[Optional[str], Optional[str]]:
    """"dir/s000001.seg.png" -> ("dir/s000001", "seg.png"); (None, None) for a name without extension."""
    return wds.tariterators.base_plus_ext(member_name)


def tar_index(shard: str) -> Dict[str, Dict[str, Tuple[int, int]]]:
    """{key: {extension (lower case): (data offset, size)}} of one uncompressed tar, from its headers."""
    samples: Dict[str, Dict[str, Tuple[int, int]]] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, ext = sample_key(member.name)
            if member.isfile() and key is not None:
                samples.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
    return samples


def tar_samples(path: str, count_lost: Callable[[str, str, int], None], who: str = "") -> Iterator[dict]:
    """The webdataset samples of one tar shard, in order. Where the archive breaks, the samples before
    the break are yielded and the rest is reported once: `count_lost(where, detail, n)` with `where` =
    "shard:key" of the last sample read, `n` the samples found after the break that could not be
    read (at least 1: the event itself), and one warning line (prefixed by `who`, the reader)."""
    shard = os.path.basename(path)
    errors, read, last_key = [], set(), None
    for sample in wds.tarfile_samples([{"url": path}], handler=lambda exn: errors.append(exn) or True):
        read.add(sample["__key__"])
        last_key = sample["__key__"]
        yield sample
    try:
        keys, broken_at, size, why = _walk_tar(path)
    except OSError as e:
        keys, broken_at, size, why = [], 0, 0, "unreadable"
        errors.append(e)
    if broken_at is None and not errors:
        return
    lost = [k for k in dict.fromkeys(keys) if k not in read]
    where = f"{shard}:{last_key if last_key is not None else '(no sample)'}"
    detail = (f"shard broken after sample {len(read)} (key {last_key})"
              + (f" at byte {broken_at} of {size}: {why}" if broken_at is not None else "")
              + f"; {len(lost)} sample(s) after it unreadable"
              + (f" ({lost[0]}{' .. ' + lost[-1] if len(lost) > 1 else ''})" if lost else "")
              + (f"; {type(errors[0]).__name__}: {str(errors[0]).split(' @ ')[0][:100]}" if errors else ""))
    count_lost(where, detail, max(len(lost), 1))
    log.warning(f"{who}skipped corrupt shard {where}: {detail}")


def _walk_tar(path: str) -> Tuple[List[str], Optional[int], int, str]:
    """Sample keys of every member a tar's headers announce, the byte offset where the archive breaks
    (None when it reaches its end-of-archive marker), the file size and what is wrong there. After a
    break the walk looks for the next valid header (tar headers carry a checksum) block by block, to
    the end of the file."""
    size = os.path.getsize(path)
    keys, broken_at, offset, why = [], None, 0, ""
    with open(path, "rb") as f:
        while offset < size or broken_at is None:
            f.seek(offset)
            block = f.read(TAR_BLOCK)
            if broken_at is None and block == tarfile.NUL * TAR_BLOCK:
                return keys, None, size, ""
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError:
                info = None
            if info is not None and info.type not in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME):
                keys.append(sample_key(info.name)[0] or info.name)
            data_blocks = -(-info.size // TAR_BLOCK) * TAR_BLOCK if info is not None else 0
            whole = info is not None and offset + TAR_BLOCK + data_blocks <= size
            if not whole and broken_at is None:
                broken_at = offset
                why = ("invalid tar header" if len(block) == TAR_BLOCK and info is None else
                       "the file ends before the end-of-archive marker (truncated)" if info is None else
                       f"member {info.name} runs past the end of the file (truncated)")
            offset += TAR_BLOCK + (data_blocks if whole else 0)
    return keys, broken_at, size, why

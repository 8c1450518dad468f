"""Readers for the three sources as they are distributed. Each yields `Document`s and records
what it could not read in a `SkipCounter` (never raises on bad input).

- MMC4: `.jsonl` or `.jsonl.zip` document shards; `text_list`, `image_info[{image_name, raw_url,
  matched_text_index, matched_sim}]`; image files found by `image_name` under `images_dir`.
- OBELICS: `.jsonl` or `.parquet` rows with aligned `images`/`texts` lists (exactly one of the two
  non-null at each position). An image entry is either raw bytes, a `{"bytes": ..., "path": ...}`
  struct (HuggingFace `Image` feature), a `data:image/...;base64,...` URI, or a file path (relative
  paths are resolved against `images_dir`, else the row file's folder). http(s) URLs are counted as
  missing images: download them first (e.g. with img2dataset) and give paths.
- LAION: img2dataset's webdataset layout, `key.jpg` + `key.txt` + `key.json` in tar shards.

Tar shards (LAION here, prepared shards in the loader) are read by `shards.tar_samples`: a shard that
breaks mid-way (truncated, garbled, unreadable) gives the samples before the break, and the rest of it is
counted as `corrupt_shard`, named by shard and key, with one warning line per event.

Image bytes are not read or checked here (MMC4/OBELICS give paths); `prepare.py` loads and verifies.
"""

import base64
import io
import json
import os
import zipfile
from typing import Iterator, List

from megatron_lcl.data import skips as S
from megatron_lcl.data.documents import DocImage, Document, safe_key
from megatron_lcl.data.shards import tar_samples
from megatron_lcl.data.skips import SkipCounter

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".jsonl.zip", ".jsonl", ".parquet", ".tar", ".json"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _jsonl_lines(path: str) -> Iterator[tuple]:
    """(where_prefix, line_number, line) for a .jsonl file or every .jsonl in a .jsonl.zip."""
    if path.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            for member in sorted(zf.namelist()):
                if member.endswith("/"):
                    continue
                with zf.open(member) as f:
                    for n, line in enumerate(io.TextIOWrapper(f, encoding="utf-8", errors="replace")):
                        yield f"{os.path.basename(path)}/{member}", n, line
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f):
                yield os.path.basename(path), n, line


def _json_rows(path: str, skips: SkipCounter) -> Iterator[tuple]:
    """(where, key, row) for every parseable JSON line; malformed lines are counted."""
    stem = _stem(path)
    for where_file, n, line in _jsonl_lines(path):
        if not line.strip():
            continue
        key = safe_key(f"{stem}_{n:07d}")
        where = f"{where_file}:{n + 1} ({key})"
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON line must be an object, got {type(row).__name__}")
        except ValueError as e:
            skips.add(S.MALFORMED_JSON, where, str(e)[:120])
            continue
        yield where, key, row


def read_mmc4(path: str, images_dir: str, skips: SkipCounter) -> Iterator[Document]:
    for where, key, row in _json_rows(path, skips):
        texts = row.get("text_list")
        infos = row.get("image_info", [])
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts) or not isinstance(infos, list):
            skips.add(S.MALFORMED_JSON, where, "text_list must be a list of strings, image_info a list")
            continue
        images: List[DocImage] = []
        for info in infos:
            try:
                images.append(_mmc4_image(info, images_dir, len(texts)))
            except (KeyError, TypeError, ValueError) as e:
                skips.add(S.BAD_SAMPLE, where, f"bad image_info entry {str(info)[:80]}: {e!r}")
        yield Document(key, "mmc4", texts, images, where)


def _mmc4_image(info: dict, images_dir: str, num_texts: int) -> DocImage:
    index = int(info["matched_text_index"])
    if not 0 <= index < num_texts:
        raise ValueError(f"matched_text_index {index} outside text_list of {num_texts}")
    meta = {k: v for k, v in info.items() if k not in ("matched_text_index", "matched_sim", "label")}
    label = info.get("label")
    return DocImage(
        path=os.path.join(images_dir, info["image_name"]),
        matched_text_index=index,
        matched_sim=float(info["matched_sim"]),
        label=None if label is None else int(label),
        meta=meta,
    )


def _obelics_rows(path: str, skips: SkipCounter) -> Iterator[tuple]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # optional dependency: only OBELICS parquet needs it

        stem = _stem(path)
        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256, columns=["images", "texts"]):
            for row in batch.to_pylist():
                key = safe_key(f"{stem}_{n:07d}")
                yield f"{os.path.basename(path)}:row{n} ({key})", key, row
                n += 1
    else:
        yield from _json_rows(path, skips)


def read_obelics(path: str, images_dir: str, skips: SkipCounter) -> Iterator[Document]:
    base_dir = images_dir or os.path.dirname(os.path.abspath(path))
    for where, key, row in _obelics_rows(path, skips):
        images_col, texts_col = row.get("images"), row.get("texts")
        if not isinstance(images_col, list) or not isinstance(texts_col, list) or len(images_col) != len(texts_col):
            skips.add(S.MALFORMED_JSON, where, "images/texts must be lists of equal length")
            continue
        texts, images, order = [], [], []
        for pos, (image, text) in enumerate(zip(images_col, texts_col)):
            if (image is None) == (text is None):
                skips.add(S.BAD_SAMPLE, where, f"position {pos}: exactly one of image/text must be set")
                continue
            if text is not None:
                order.append(("text", len(texts)))
                texts.append(str(text))
            else:
                try:
                    images.append(_obelics_image(image, base_dir))
                    order.append(("image", len(images) - 1))
                except ValueError as e:
                    skips.add(S.MISSING_IMAGE, where, f"image at position {pos}: {e}")
        yield Document(key, "obelics", texts, images, where, order)


def _obelics_image(entry, base_dir: str) -> DocImage:
    if isinstance(entry, dict):
        if entry.get("bytes"):
            return DocImage(data=bytes(entry["bytes"]))
        entry = entry.get("path")
    if isinstance(entry, (bytes, bytearray)):
        return DocImage(data=bytes(entry))
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"unsupported image entry {str(entry)[:60]!r}")
    if entry.startswith("data:"):
        return DocImage(data=base64.b64decode(entry.split(",", 1)[1]))
    if entry.startswith(("http://", "https://")):
        raise ValueError(f"{entry[:80]} is a URL: download images first and give file paths")
    return DocImage(path=entry if os.path.isabs(entry) else os.path.join(base_dir, entry), meta={"path": entry})


def read_laion(path: str, skips: SkipCounter) -> Iterator[Document]:
    shard = os.path.basename(path)
    stem = _stem(path)

    def count_lost(where: str, detail: str, n: int) -> None:
        skips.add(S.CORRUPT_SHARD, where, detail, count=n)

    for sample in tar_samples(path, count_lost):
        key = sample["__key__"]
        where = f"{shard}:{key}"
        image_field = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        meta = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except ValueError as e:
                skips.add(S.MALFORMED_JSON, where, str(e)[:120])
        caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else meta.get("caption")
        if image_field is None:
            skips.add(S.MISSING_IMAGE, where, "no .jpg/.png/.webp member")
            continue
        if not caption:
            skips.add(S.BAD_SAMPLE, where, "no caption (.txt)")
            continue
        meta = {k: v for k, v in meta.items() if k in ("url", "key", "similarity", "width", "height")}
        image = DocImage(data=sample[image_field], matched_text_index=0, meta=meta)
        doc_key = safe_key(f"{stem}_{os.path.basename(key)}")
        yield Document(doc_key, "laion", [caption], [image], where)


def read_source(source: str, path: str, images_dir: str, skips: SkipCounter) -> Iterator[Document]:
    if source == "mmc4":
        if not images_dir:  # default: an images/ folder beside the jsonl, else the jsonl's folder
            folder = os.path.dirname(os.path.abspath(path))
            images_dir = os.path.join(folder, "images") if os.path.isdir(os.path.join(folder, "images")) else folder
        return read_mmc4(path, images_dir, skips)
    if source == "obelics":
        return read_obelics(path, images_dir, skips)
    if source == "laion":
        return read_laion(path, skips)
    raise ValueError(f"unknown source format {source!r}; expected one of mmc4, obelics, laion")

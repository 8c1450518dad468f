"""Streaming transfer-evaluation data: map-style datasets over a compact on-disk index.

Only an index is held in memory (numpy arrays: file names, tar offsets, labels; a few dozen bytes per
image, and numpy, so DataLoader workers share it without copy-on-write growth); image bytes are read
and decoded in the DataLoader workers (`preprocess_image`: resize the shorter side, centre-crop, CLIP
mean/std). Sources:

- `ImageFolderSource(root)`: `root/<class>/*.jpg`, classes sorted by name (torchvision's numbering);
  a class folder without images keeps its number and is reported in `problems`.
- `TarSource(shards)`: webdataset shards; members grouped by key (name up to the first dot); the
  image is the jpg/jpeg/png/webp/bmp member, the label `.cls` or `json[label_field]`, the caption
  `.txt` or `json["caption"]`, read lazily by offset (uncompressed tar).
- `JsonlPairsSource(path)`: `{"image": path, "caption": text}` lines, paths relative to the file.
- `KarpathySource` (karpathy.py): retrieval/captioning test sets with 5 captions per image.

Bad input never crashes a run: an unreadable or undecodable image yields a `BadSample(origin,
reason)` that `collate` drops and `BadSampleLog` counts and names; index-time problems (no image
member, no label, empty class folder) are listed in the source's `problems`.
"""

import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_lcl.eval.datasets import IMAGE_EXTS, ImageSet, is_image_folder, shard_paths
from megatron_lcl.eval.errors import InputError

MAX_NAMED_PROBLEMS = 50  # named in results; beyond that only counted


@dataclass
class BadSample:
    """An item that could not be used: `origin` is the file or `shard:key`, `reason` what failed."""

    origin: str
    reason: str


def reason_kind(reason: str) -> str:
    """What went wrong, without the details: "cannot decode image (UnidentifiedImageError: ...)" ->
    "cannot decode image" (every reason starts with its kind, then ":" or "(" and the details)."""
    return re.split(r"[:(;]", reason, maxsplit=1)[0].strip()


@dataclass
class BadSampleLog:
    """Bad samples by origin: `count` distinct ones (the first MAX_NAMED_PROBLEMS also `named`),
    `reads` failed reads (a bad image in the training set fails once per epoch), and `by_reason`
    the distinct ones per `reason_kind`."""

    count: int = 0
    reads: int = 0
    named: List[str] = field(default_factory=list)
    by_reason: Dict[str, int] = field(default_factory=dict)
    _seen: set = field(default_factory=set, repr=False)

    def add(self, origin: str, reason: str) -> None:
        self.reads += 1
        if origin in self._seen:
            return
        self._seen.add(origin)
        self.count += 1
        kind = reason_kind(reason)
        self.by_reason[kind] = self.by_reason.get(kind, 0) + 1
        if len(self.named) < MAX_NAMED_PROBLEMS:
            self.named.append(f"{origin}: {reason}")

    def extend(self, bad: Sequence[BadSample]) -> None:
        for b in bad:
            self.add(b.origin, b.reason)

    def as_dict(self) -> dict:
        return {"count": self.count, "reads": self.reads, "named": list(self.named),
                "by_reason": dict(self.by_reason)}

    def load(self, saved: dict) -> None:
        self.count, self.reads, self.named = saved["count"], saved["reads"], list(saved["named"])
        self.by_reason = dict(saved.get("by_reason", {}))
        self._seen = {n.split(": ", 1)[0] for n in self.named}


def _strings(values: Sequence[str]) -> np.ndarray:
    """A fixed-width byte-string array (no per-item Python objects: fork-safe, compact)."""
    return np.array([v.encode("utf-8") for v in values], dtype=np.bytes_) if values else np.zeros(0, "S1")


def _str(value: np.bytes_) -> str:
    return bytes(value).decode("utf-8")


def decode(data: bytes, origin: str, image_size: int):
    """Image bytes -> `[3, S, S]` (eval transform), or a BadSample naming `origin`."""
    from megatron_lcl.data import preprocess_image

    try:
        return preprocess_image(data, image_size)
    except Exception as e:  # PIL raises many types for corrupt data
        detail = "" if "<_io." in str(e) else f": {e}"
        return BadSample(origin, f"cannot decode image ({type(e).__name__}{detail})")


def read_file(path: str):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return BadSample(path, f"cannot read: {e.strerror or e}")


# ------------------------------------------------------------------------------------------ ImageFolder

class ImageFolderSource:
    """`root/<class>/<image>` as (image, label); the index keeps file names, not bytes."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise InputError(f"{root}: no such folder (an ImageFolder root/<class>/<image>)")
        self.root = root
        self.class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.class_names:
            raise InputError(f"{root}: no class sub-folders (an ImageFolder is root/<class>/<image>)")
        self.problems = BadSampleLog()
        names, labels = [], []
        for k, name in enumerate(self.class_names):
            files = sorted(n for n in os.listdir(os.path.join(root, name))
                           if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)
            if not files:
                self.problems.add(os.path.join(root, name), "class folder with no images")
            names += [os.path.join(name, n) for n in files]
            labels += [k] * len(files)
        if not names:
            raise InputError(f"{root}: no images ({'/'.join(IMAGE_EXTS)}) in any of its "
                             f"{len(self.class_names)} class folders")
        self.files = _strings(names)  # [n] relative paths
        self.labels = np.asarray(labels, dtype=np.int32)  # [n]

    def __len__(self) -> int:
        return len(self.files)

    def origin(self, i: int) -> str:
        return os.path.join(self.root, _str(self.files[i]))

    def image_bytes(self, i: int):
        return read_file(self.origin(i))


# ------------------------------------------------------------------------------------------ tar shards

def _member_key(name: str) -> Tuple[str, str]:
    base = os.path.basename(name)
    key, _, ext = base.partition(".")
    return os.path.join(os.path.dirname(name), key), ext.lower()


def _scan_shard(shard: str) -> Dict[str, Dict[str, Tuple[int, int]]]:
    """{key: {ext: (data offset, size)}} of one uncompressed tar, reading headers only."""
    samples: Dict[str, Dict[str, Tuple[int, int]]] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.isfile():
                key, ext = _member_key(member.name)
                samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
    return samples


class TarSource:
    """Webdataset shards as (image, label) or (image, caption) items, read by offset in the workers.

    want: "label" (`.cls` or `json[label_field]`, read at index time) or "caption" (`.txt` or
    `json["caption"]`, read lazily). Samples without an image or the wanted field go to `problems`.
    """

    def __init__(self, path, want: str, label_field: str = "label"):
        assert want in ("label", "caption"), want
        paths = [path] if isinstance(path, str) else list(path)  # several sets: CC12M + CC3M + SBU
        self.shards = sorted({shard for p in paths for shard in shard_paths(p)})
        if not self.shards:
            raise InputError(f"{path}: no webdataset shards (*.tar)")
        self.want, self.label_field, self.problems = want, label_field, BadSampleLog()
        rows = []  # (shard, key, image offset, image size, text offset, text size, text kind, label)
        for s, shard in enumerate(self.shards):
            try:
                samples = _scan_shard(shard)
            except (OSError, tarfile.TarError) as e:
                self.problems.add(shard, f"cannot read shard: {e}")
                continue
            for key, parts in samples.items():
                row = self._row(s, shard, key, parts)
                if row is not None:
                    rows.append(row)
        if not rows:
            raise InputError(f"{path}: no usable samples in {len(self.shards)} shard(s): "
                             f"{problems_summary(self.problems)}")
        cols = list(zip(*rows))
        self.shard_ids = np.asarray(cols[0], dtype=np.int32)
        self.keys = _strings(cols[1])
        self.spans = np.asarray(list(zip(*cols[2:6])), dtype=np.int64)  # [n, 4] image off/size, text off/size
        self.text_kind = np.asarray(cols[6], dtype=np.int8)  # 0 txt, 1 json
        self.labels = np.asarray(cols[7], dtype=np.int64)
        self.class_names = [str(k) for k in range(int(self.labels.max()) + 1)] if want == "label" else []
        self._files: Dict[int, object] = {}

    def _row(self, s: int, shard: str, key: str, parts: dict):
        where = f"{shard}:{key}"
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if image is None:
            self.problems.add(where, f"no image member ({'/'.join(IMAGE_EXTS)}); has {sorted(parts)}")
            return None
        text, kind, label = parts.get("txt"), 0, -1
        if self.want == "label":
            try:
                label = self._label(shard, parts)
            except ValueError as e:  # a .cls that is not an integer, a json member that is not JSON
                self.problems.add(where, f"bad class ({type(e).__name__}: {e})")
                return None
            if label is None:
                self.problems.add(where, f"no class (a .cls member or json[{self.label_field!r}])")
                return None
        elif text is None and "json" in parts:
            text, kind = parts["json"], 1
        if self.want == "caption" and text is None:
            self.problems.add(where, "no caption (a .txt member or json['caption'])")
            return None
        text = text or (0, 0)
        return s, key, image[0], image[1], text[0], text[1], kind, label

    def _label(self, shard: str, parts: dict) -> Optional[int]:
        if "cls" in parts:
            return int(self._read(shard, *parts["cls"]).decode().strip())
        if "json" in parts:
            meta = json.loads(self._read(shard, *parts["json"]))
            if self.label_field in meta:
                return int(meta[self.label_field])
        return None

    @staticmethod
    def _read(shard: str, offset: int, size: int) -> bytes:
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def __len__(self) -> int:
        return len(self.keys)

    def origin(self, i: int) -> str:
        return f"{self.shards[self.shard_ids[i]]}:{_str(self.keys[i])}"

    def _bytes(self, i: int, offset: int, size: int) -> bytes:
        s = int(self.shard_ids[i])
        f = self._files.get(s)
        if f is None or f.closed:  # opened in the worker that reads (never shared across a fork)
            f = self._files[s] = open(self.shards[s], "rb")
        f.seek(offset)
        return f.read(size)

    def image_bytes(self, i: int):
        try:
            return self._bytes(i, int(self.spans[i, 0]), int(self.spans[i, 1]))
        except OSError as e:
            return BadSample(self.origin(i), f"cannot read: {e}")

    def caption(self, i: int) -> str:
        raw = self._bytes(i, int(self.spans[i, 2]), int(self.spans[i, 3]))
        if self.text_kind[i] == 1:
            return str(json.loads(raw)["caption"])
        return raw.decode("utf-8").strip()

    def __getstate__(self):  # open file handles stay in the process that opened them
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


# ------------------------------------------------------------------------------------------ jsonl / ImageSet

class JsonlPairsSource:
    """`{"image": path, "caption": text}` lines (image paths relative to the file). A line that is not
    such an object is left out and named in `problems` (`path:line`)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such file")
        self.path, self.problems = path, BadSampleLog()
        images, captions = [], []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = self._row(line, f"{path}:{n}")
                    if row is not None:
                        images.append(os.path.join(os.path.dirname(path), row["image"]))
                        captions.append(str(row["caption"]))
        if not images:
            raise InputError(f"{path}: no {{image, caption}} pairs: {problems_summary(self.problems)}")
        self.images, self.captions = _strings(images), _strings(captions)

    def _row(self, line: str, where: str) -> Optional[dict]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            self.problems.add(where, f"not JSON ({e.msg} at column {e.colno})")
            return None
        if not isinstance(row, dict):
            self.problems.add(where, f"not a JSON object (a {type(row).__name__})")
            return None
        missing = [k for k in ("image", "caption") if k not in row]
        if missing:
            self.problems.add(where, f"missing key {missing[0]!r} (has keys {sorted(row)})")
            return None
        return row

    def __len__(self) -> int:
        return len(self.images)

    def origin(self, i: int) -> str:
        return _str(self.images[i])

    def image_bytes(self, i: int):
        return read_file(self.origin(i))

    def caption(self, i: int) -> str:
        return _str(self.captions[i])


class ImageSetSource:
    """An in-memory `ImageSet` (synthetic corpus, small sets) seen as a source."""

    def __init__(self, images: ImageSet):
        self.set, self.problems, self.class_names = images, BadSampleLog(), list(images.class_names)
        self.labels = None if images.labels is None else np.asarray(images.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.set)

    def origin(self, i: int) -> str:
        return self.set.origins[i]

    def image_bytes(self, i: int):
        return self.set.images[i]

    def caption(self, i: int) -> str:
        return self.set.captions[i]


class SubsetSource:
    """Items `indices` of another source (a seeded train/eval split)."""

    def __init__(self, source, indices: Sequence[int]):
        self.base, self.indices = source, np.asarray(indices, dtype=np.int64)
        self.problems, self.class_names = source.problems, list(getattr(source, "class_names", []))
        labels = getattr(source, "labels", None)
        self.labels = None if labels is None else np.asarray(labels)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def origin(self, i: int) -> str:
        return self.base.origin(int(self.indices[i]))

    def image_bytes(self, i: int):
        return self.base.image_bytes(int(self.indices[i]))

    def caption(self, i: int) -> str:
        return self.base.caption(int(self.indices[i]))


def labeled_source(path: str, label_field: str = "label"):
    """An ImageFolder or webdataset shards as a labelled source (see module doc)."""
    if is_image_folder(path):
        return ImageFolderSource(path)
    if shard_paths(path):
        return TarSource(path, "label", label_field)
    what = "no such file or directory" if not os.path.exists(path) else \
        "not an ImageFolder (class sub-folders of images) or webdataset shards (*.tar)"
    raise InputError(f"{path}: {what}")


def pair_source(paths):
    """Webdataset shards (one or several paths/globs) or one `.jsonl` of {image, caption}."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if len(paths) == 1 and paths[0].endswith(".jsonl"):
        return JsonlPairsSource(paths[0])
    for p in paths:
        if not shard_paths(p):
            what = "no such file or directory" if not os.path.exists(p) else \
                "not a .jsonl of {image, caption}, a Karpathy/COCO .json or webdataset shards (*.tar)"
            raise InputError(f"{p}: {what}")
    return TarSource(paths, "caption")


def problems_summary(problems: BadSampleLog, examples: int = 2) -> str:
    """'3 left out (missing file 2, no captions 1), e.g. X: missing file; Y: no captions' (one line)."""
    if not problems.count:
        return "nothing was left out"
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(problems.by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{problems.count} left out ({kinds}), e.g. {'; '.join(problems.named[:examples])}"


# ------------------------------------------------------------------------------------------ datasets

class _SourceImages(torch.utils.data.Dataset):
    """Item i of a source, its image read and decoded in the worker: pixels `[3, S, S]` or a BadSample."""

    def __init__(self, source, image_size: int):
        self.source, self.image_size = source, image_size

    def __len__(self) -> int:
        return len(self.source)

    def pixels(self, i: int):
        data = self.source.image_bytes(i)
        if isinstance(data, BadSample):
            return data
        return decode(data, self.source.origin(i), self.image_size)


class LabeledImages(_SourceImages):
    """Item i -> (pixels `[3, S, S]`, label, i), or a BadSample."""

    def __getitem__(self, i: int):
        pixels = self.pixels(i)
        return pixels if isinstance(pixels, BadSample) else (pixels, int(self.source.labels[i]), i)


class CaptionedImages(_SourceImages):
    """Item i -> (pixels `[3, S, S]`, caption, i), or a BadSample (caption read in the worker too)."""

    def __getitem__(self, i: int):
        pixels = self.pixels(i)
        if isinstance(pixels, BadSample):
            return pixels
        try:
            return pixels, self.source.caption(i), i
        except Exception as e:
            return BadSample(self.source.origin(i), f"cannot read caption: {e}")


def collate(items: list) -> dict:
    """Drop BadSamples (returned under "bad"); stack pixels `[b, 3, S, S]`; labels `[b]` or captions."""
    bad = [x for x in items if isinstance(x, BadSample)]
    good = [x for x in items if not isinstance(x, BadSample)]
    out = {"bad": bad, "index": torch.tensor([x[2] for x in good], dtype=torch.long)}
    out["pixels"] = torch.stack([x[0] for x in good]) if good else torch.zeros(0)
    second = [x[1] for x in good]
    if second and isinstance(second[0], str):
        out["captions"] = second
    else:
        out["labels"] = torch.tensor(second, dtype=torch.long)
    return out

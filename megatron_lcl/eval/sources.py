"""Transfer-evaluation data as sources: a compact index of items whose images are read one at a time.

Every source has `len(source)`, `origin(i)` (the file or `shard:key`, for messages), `image_bytes(i)`
(the encoded image, or a BadSample naming what failed), `problems` (a BadSampleLog of what the index
left out), and, by what it holds, `labels` (`[n]` integers) with `class_names`, or `caption(i)`.
An index holds numpy arrays (file names, tar offsets, labels: a few dozen bytes per image, shared by
DataLoader workers without copy-on-write growth); the bytes are read in the workers (datasets.py).

- `ImageSet`: images held in memory (a synthetic corpus, the tests' hand-made sets);
- `ImageFolderSource(root)`: `root/<class>/*.jpg`, classes sorted by name (torchvision's numbering);
  a class folder without images keeps its number and is reported in `problems`;
- `TarSource(shards)`: webdataset shards (`data.shard_paths`: which files a path names; `data.shards`:
  the members of a sample); the image is the jpg/jpeg/png/webp/bmp member, the label `.cls` or `json[label_field]`,
  the caption `.txt` or `json["caption"]`, read by offset (uncompressed tar);
- `JsonlPairsSource(path)`: `{"image": path, "caption": text}` lines, paths relative to the file;
- `SubsetSource(source, indices)`: a seeded train/eval `split`;
- test sets with several captions per image: karpathy.py.

`labeled_source(path)` and `pair_source(paths)` pick the source from what a path is.
"""

import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_lcl.data import labeled_images
from megatron_lcl.data.shard_paths import shard_paths
from megatron_lcl.data.shards import tar_index
from megatron_lcl.data.shapes import SHAPES
from megatron_lcl.eval.bad_samples import BadSample, BadSampleLog, problems_summary
from megatron_lcl.eval.errors import InputError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


def string_array(values: Sequence[str]) -> np.ndarray:
    """A fixed-width byte-string array (no per-item Python objects: fork-safe, compact)."""
    return np.array([v.encode("utf-8") for v in values], dtype=np.bytes_) if values else np.zeros(0, "S1")


def string_at(values: np.ndarray, i: int) -> str:
    return bytes(values[i]).decode("utf-8")


def read_file(path: str):
    """The file's bytes, or a BadSample naming it."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return BadSample(path, f"cannot read: {e.strerror or e}")


# ------------------------------------------------------------------------------------------ in memory

@dataclass
class ImageSet:
    """Encoded images held in memory, with integer labels or one caption per image."""

    images: List[bytes]
    origins: List[str]  # file path or shard:key of each image, for messages
    labels: Optional[Sequence[int]] = None
    captions: Optional[List[str]] = None
    class_names: List[str] = field(default_factory=list)
    problems: BadSampleLog = field(default_factory=BadSampleLog)

    def __post_init__(self):
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)  # [n]

    def __len__(self) -> int:
        return len(self.images)

    def origin(self, i: int) -> str:
        return self.origins[i]

    def image_bytes(self, i: int):
        return self.images[i]

    def caption(self, i: int) -> str:
        return self.captions[i]


def is_synthetic_corpus(path: str) -> bool:
    return os.path.isdir(path) and os.path.isdir(os.path.join(path, "images")) and \
        any(n.endswith(".jsonl") for n in os.listdir(path))


def synthetic_labeled(corpus: str, label_field: str = "label") -> ImageSet:
    """A synthetic corpus's images labelled by shape (`label`) or by a categorical image_info field."""
    items = labeled_images(corpus)
    if not items:
        raise InputError(f"{corpus}: no images")
    if label_field == "label":
        names, labels = list(SHAPES), [it["label"] for it in items]
    elif all(isinstance(it.get(label_field), str) for it in items):  # a categorical image_info field
        names = sorted({it[label_field] for it in items})
        labels = [names.index(it[label_field]) for it in items]
    else:
        fields = sorted(k for k, v in items[0].items() if isinstance(v, str) and k not in ("path", "caption"))
        raise InputError(f"--label-field ({label_field!r}) for this synthetic corpus must be label or one of "
                         f"its categorical image_info fields: {', '.join(fields)}")
    paths = [it["path"] for it in items]
    return ImageSet([read_file(p) for p in paths], paths, labels=labels, class_names=names)


def synthetic_pairs(corpus: str) -> ImageSet:
    """A synthetic corpus's images, each with its matched sentence."""
    items = labeled_images(corpus)
    return ImageSet([read_file(it["path"]) for it in items], [it["path"] for it in items],
                    captions=[it["caption"] for it in items])


# ------------------------------------------------------------------------------------------ ImageFolder

def is_image_folder(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    subdirs = [d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))]
    return bool(subdirs) and any(_image_names(os.path.join(path, d)) for d in subdirs)


def _image_names(folder: str) -> List[str]:
    return sorted(n for n in os.listdir(folder) if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)


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
            files = _image_names(os.path.join(root, name))
            if not files:
                self.problems.add(os.path.join(root, name), "class folder with no images")
            names += [os.path.join(name, n) for n in files]
            labels += [k] * len(files)
        if not names:
            raise InputError(f"{root}: no images ({'/'.join(IMAGE_EXTS)}) in any of its "
                             f"{len(self.class_names)} class folders")
        self.files = string_array(names)  # [n] relative paths
        self.labels = np.asarray(labels, dtype=np.int32)  # [n]

    def __len__(self) -> int:
        return len(self.files)

    def origin(self, i: int) -> str:
        return os.path.join(self.root, string_at(self.files, i))

    def image_bytes(self, i: int):
        return read_file(self.origin(i))


# ------------------------------------------------------------------------------------------ tar shards

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
                samples = tar_index(shard)
            except (OSError, tarfile.TarError) as e:
                self.problems.add(shard, f"cannot read shard: {e}")
                continue
            rows += [row for key, parts in samples.items() if (row := self._row(s, shard, key, parts)) is not None]
        if not rows:
            raise InputError(f"{path}: no usable samples in {len(self.shards)} shard(s): "
                             f"{problems_summary(self.problems)}")
        cols = list(zip(*rows))
        self.shard_ids = np.asarray(cols[0], dtype=np.int32)
        self.keys = string_array(cols[1])
        self.spans = np.asarray(list(zip(*cols[2:6])), dtype=np.int64)  # [n, 4] image off/size, text off/size
        self.text_kind = np.asarray(cols[6], dtype=np.int8)  # 0 txt, 1 json
        self.labels = np.asarray(cols[7], dtype=np.int64)
        self.class_names = [str(k) for k in range(int(self.labels.max()) + 1)] if want == "label" else []
        self._files: dict = {}

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
        return f"{self.shards[self.shard_ids[i]]}:{string_at(self.keys, i)}"

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


# ------------------------------------------------------------------------------------------ jsonl pairs

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
                row = self._row(line, f"{path}:{n}") if line.strip() else None
                if row is not None:
                    images.append(os.path.join(os.path.dirname(path), row["image"]))
                    captions.append(str(row["caption"]))
        if not images:
            raise InputError(f"{path}: no {{image, caption}} pairs: {problems_summary(self.problems)}")
        self.images, self.captions = string_array(images), string_array(captions)

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
        return string_at(self.images, i)

    def image_bytes(self, i: int):
        return read_file(self.origin(i))

    def caption(self, i: int) -> str:
        return string_at(self.captions, i)


# ------------------------------------------------------------------------------------------ splits

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


def split(n: int, eval_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Seeded random (train, eval) index split; eval gets round(n * eval_fraction) items."""
    if not 0.0 < eval_fraction < 1.0:
        raise InputError(f"--eval-fraction ({eval_fraction}) must be in (0, 1)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n * eval_fraction))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


# ------------------------------------------------------------------------------------------ by path

def labeled_source(path: str, label_field: str = "label"):
    """Labelled images from a synthetic corpus (in memory), an ImageFolder or webdataset shards."""
    if is_synthetic_corpus(path):
        return synthetic_labeled(path, label_field)
    if is_image_folder(path):
        return ImageFolderSource(path)
    if shard_paths(path):
        return TarSource(path, "label", label_field)
    what = "no such file or directory" if not os.path.exists(path) else \
        "not a synthetic corpus (docs_*.jsonl + images/), an ImageFolder (class sub-folders of images) " \
        "or webdataset shards (*.tar)"
    raise InputError(f"{path}: {what}")


def pair_source(paths):
    """Image-caption pairs: a synthetic corpus (in memory), one `.jsonl` of {image, caption}, or
    webdataset shards (one or several paths/globs)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if len(paths) == 1 and is_synthetic_corpus(paths[0]):
        return synthetic_pairs(paths[0])
    if len(paths) == 1 and paths[0].endswith(".jsonl"):
        return JsonlPairsSource(paths[0])
    for p in paths:
        if not shard_paths(p):
            what = "no such file or directory" if not os.path.exists(p) else \
                "not a synthetic corpus, a .jsonl of {image, caption}, a Karpathy/COCO .json or webdataset " \
                "shards (*.tar)"
            raise InputError(f"{p}: {what}")
    return TarSource(paths, "caption")

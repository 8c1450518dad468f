"""Test sets with several captions per image: the Karpathy split files and COCO-format annotations.

Karpathy JSON (`dataset_coco.json`, `dataset_flickr30k.json`, `dataset_flickr8k.json`):

    {"images": [{"split": "test", "filepath": "val2014", "filename": "COCO_val2014_...jpg",
                 "sentences": [{"raw": "A man riding a horse.", ...}, ...]}, ...]}

the image is `image_root/filepath/filename` (`filepath` is absent for Flickr); COCO Karpathy test
has 5,000 images and 25,010 captions (5 per image, a few have 6), Flickr30k test 1,000 and 5,000.
COCO-format captions (NoCaps val, `captions_val2014.json`): `images[{id, file_name}]` and
`annotations[{image_id, caption}]`.

An image without captions or whose file is missing is left out and named in `problems`; an image
that cannot be decoded is skipped at read time (a BadSample) together with its captions. An
image listed twice (the same file) is kept once, its captions merged, and the extra listing counted
in `problems` ("duplicate image"): otherwise it would tie with itself and never be an IR@1 hit. A
file that is not in the format (not JSON, no `images`, a sentence without `raw`, ...) is an
InputError naming the file, the entry and the field.

As training data (`--data dataset_coco.json`), `CaptionPairs` makes every caption of the Karpathy
train + restval split one (image, caption) pair; `training_overlap` finds test images that are also
training images (by file, or `shard:key`).
"""

import json
import os
from collections import Counter
from typing import Dict, List, Optional, Tuple

import numpy as np

from megatron_lcl.eval.errors import InputError
from megatron_lcl.eval.bad_samples import BadSampleLog, problems_summary
from megatron_lcl.eval.sources import TarSource, pair_source, read_file, string_array, string_at

MAX_OVERLAP_NAMED = 5


class CaptionedTestSet:
    """Images (read lazily) with all their reference captions.

    `captions[j]` belongs to image `text_to_image[j]`; `references(i)` lists image i's captions;
    `image_ids[i]` is the id predictions are written under (COCO's `cocoid` / `image_id`)."""

    def __init__(self, name: str, paths: List[str], captions: List[List[str]], problems: BadSampleLog,
                 image_ids: Optional[list] = None):
        assert paths, f"{name}: no images"  # the loaders raise an InputError naming the file first
        self.name, self.problems, self.class_names = name, problems, []
        self.files = string_array(paths)  # [n_images]
        self.captions = [c for caps in captions for c in caps]  # [n_texts]
        self.text_to_image = np.repeat(np.arange(len(paths)), [len(c) for c in captions])  # [n_texts]
        self.labels = np.arange(len(paths))  # item i's label is i: LabeledImages yields (inputs, i, i)
        self.image_ids = list(image_ids) if image_ids is not None else list(range(len(paths)))
        self.split: Optional[str] = None  # a Karpathy file's split ("test", "train+restval"); None: COCO format

    def __len__(self) -> int:
        return len(self.files)

    def origin(self, i: int) -> str:
        return string_at(self.files, i)

    def image_bytes(self, i: int):
        return read_file(self.origin(i))

    def caption(self, i: int) -> str:
        """The first reference (for use as an image-caption pair source)."""
        return self.captions[int(np.searchsorted(self.text_to_image, i))]

    def references(self, i: int) -> List[str]:
        return [self.captions[j] for j in np.nonzero(self.text_to_image == i)[0]]


class _Images:
    """Collects a test set's images: each file once (a repeated one merges its captions into the
    first listing and is counted in `problems`), files that are missing or without captions left out."""

    def __init__(self, path: str):
        self.path, self.problems = path, BadSampleLog()
        self.files: List[str] = []
        self.captions: List[List[str]] = []
        self.ids: list = []
        self._first: Dict[str, Tuple[int, str]] = {}  # normalised file -> (index, the entry that listed it)

    def add(self, file: str, captions: List[str], image_id, entry: str) -> None:
        key = _file_key(file)
        if not captions:
            self.problems.add(f"{self.path}:{entry}", f"no captions (for {file})")
            return
        if key in self._first:
            k, first = self._first[key]
            self.captions[k] += [c for c in captions if c not in self.captions[k]]
            self.problems.add(f"{self.path}:{entry}", f"duplicate image (the file of {first}; captions merged)")
            return
        if not os.path.isfile(file):
            self.problems.add(file, f"missing file (listed in {os.path.basename(self.path)} {entry})")
            return
        self._first[key] = (len(self.files), entry)
        self.files.append(file)
        self.captions.append(captions)
        self.ids.append(image_id)

    def test_set(self, name: str, listed: int, what: str, root: str) -> CaptionedTestSet:
        if not self.files:
            hint = ""
            if self.problems.by_reason.get("missing file"):
                hint = f"; image paths are read relative to {root} (--image-root sets it)"
            raise InputError(f"{self.path}: none of the {listed} images {what} is usable: "
                             f"{problems_summary(self.problems)}{hint}")
        return CaptionedTestSet(name, self.files, self.captions, self.problems, self.ids)


def _file_key(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def read_json(path: str):
    """The parsed JSON at `path`, or an InputError ("no such file", "not JSON (... line 3 column 5)")."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None


def _field(path: str, entry: str, obj, key: str, kind, required: bool = True):
    """`obj[key]` checked to be a `kind`; an InputError naming file, entry and field otherwise."""
    if not isinstance(obj, dict):
        raise InputError(f"{path}: {entry}: not a JSON object (a {type(obj).__name__})")
    if key not in obj:
        if not required:
            return None
        raise InputError(f"{path}: {entry}: no {key!r} (has keys {sorted(obj)})")
    value = obj[key]
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise InputError(f"{path}: {entry}.{key}: a {type(value).__name__}, expected a {names}")
    return value


def load_karpathy(path: str, image_root: Optional[str] = None, split: str = "test") -> CaptionedTestSet:
    """One split ("test", "val", "train"; "train" includes "restval") of a Karpathy JSON; image paths
    are relative to `image_root` (default: the JSON's folder)."""
    images = _field(path, "top level", read_json(path), "images", list)
    root = image_root or os.path.dirname(os.path.abspath(path))
    splits = {"train", "restval"} if split == "train" else {split}
    found, listed = _Images(path), 0
    for n, image in enumerate(images):
        entry = f"images[{n}]"
        if _field(path, entry, image, "split", str) not in splits:
            continue
        listed += 1
        filename = _field(path, entry, image, "filename", str, required=False)
        if filename is None:
            found.problems.add(f"{path}:{entry}", "no 'filename'")
            continue
        file = os.path.join(root, _field(path, entry, image, "filepath", str, required=False) or "", filename)
        sentences = _field(path, entry, image, "sentences", list, required=False) or []
        captions = [_field(path, f"{entry}.sentences[{k}]", s, "raw", str).strip() for k, s in enumerate(sentences)]
        image_id = image.get("cocoid", image.get("imgid", n))
        found.add(file, [c for c in captions if c], image_id, entry)
    label = "+".join(sorted(splits, key=["train", "restval"].index)) if split == "train" else split
    if not listed:
        counts = Counter(str(image.get("split")) for image in images)
        raise InputError(f"{path}: no images with split {label!r} (splits in the file: "
                         f"{', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'none'})")
    test_set = found.test_set(f"{os.path.basename(path)}:{label}", listed, f"with split {label!r}", root)
    test_set.split = label
    return test_set


def load_coco_captions(path: str, image_root: str) -> CaptionedTestSet:
    """COCO-format caption annotations (NoCaps val, captions_val2014.json)."""
    data = read_json(path)
    refs: Dict[object, List[str]] = {}
    for n, a in enumerate(_field(path, "top level", data, "annotations", list)):
        image_id = _field(path, f"annotations[{n}]", a, "image_id", (int, str))
        refs.setdefault(image_id, []).append(str(_field(path, f"annotations[{n}]", a, "caption", str)).strip())
    images = _field(path, "top level", data, "images", list)
    found = _Images(path)
    for n, image in enumerate(images):
        entry = f"images[{n}]"
        image_id = _field(path, entry, image, "id", (int, str))
        file = os.path.join(image_root, _field(path, entry, image, "file_name", str))
        found.add(file, [c for c in refs.get(image_id, []) if c], image_id, entry)
    if not images:
        raise InputError(f"{path}: images: an empty list")
    return found.test_set(os.path.basename(path), len(images), "listed", image_root)


def is_captions_json(path: str) -> bool:
    return path.endswith(".json")


def load_captioned_test_set(path: str, image_root: Optional[str] = None, split: str = "test") -> CaptionedTestSet:
    """A Karpathy JSON (has images[].sentences) or COCO-format annotations (has annotations)."""
    head = read_json(path)
    if isinstance(head, dict) and "annotations" in head:
        return load_coco_captions(path, image_root or os.path.dirname(os.path.abspath(path)))
    return load_karpathy(path, image_root, split)


class PairsTestSet:
    """A pairs source (one caption per item: jsonl, shards, a split) seen as a test set; an image
    listed twice (same origin) is kept once with both captions (counted in `problems`)."""

    def __init__(self, source, name: str):
        self.source, self.name, self.class_names = source, name, []
        self.problems = BadSampleLog()
        self.problems.load(source.problems.as_dict())  # the source's own, plus the duplicates below
        first: Dict[str, int] = {}
        self.index: List[int] = []  # image k is the source's item index[k]
        captions: List[List[str]] = []
        for i in range(len(source)):
            origin, caption = source.origin(i), source.caption(i)
            k = first.setdefault(_file_key(origin), len(self.index))
            if k < len(self.index):
                if caption not in captions[k]:
                    captions[k].append(caption)
                self.problems.add(f"{name}[{i}]", f"duplicate image ({origin}, first listed as item "
                                                  f"{self.index[k]}; captions merged)")
                continue
            self.index.append(i)
            captions.append([caption])
        self.captions = [c for caps in captions for c in caps]  # [n_texts]
        self.text_to_image = np.repeat(np.arange(len(self.index)), [len(c) for c in captions])  # [n_texts]
        self.labels = np.arange(len(self.index))
        self.image_ids = [self.origin(k) for k in range(len(self.index))]

    def __len__(self) -> int:
        return len(self.index)

    def origin(self, i: int) -> str:
        return self.source.origin(self.index[i])

    def image_bytes(self, i: int):
        return self.source.image_bytes(self.index[i])

    def caption(self, i: int) -> str:
        return self.captions[int(np.searchsorted(self.text_to_image, i))]


def as_test_set(source, name: str):
    """A CaptionedTestSet as it is; any other pairs source wrapped as a PairsTestSet."""
    return source if isinstance(source, CaptionedTestSet) else PairsTestSet(source, name)


def test_sets(paths: List[str], image_root: Optional[str], split: str) -> list:
    """--eval-data: each path a Karpathy / COCO caption JSON (`split` of a Karpathy file) or image-caption
    pairs (`sources.pair_source`: a synthetic corpus, jsonl, shards)."""
    return [load_captioned_test_set(p, image_root, split) if is_captions_json(p) else as_test_set(pair_source([p]), p)
            for p in paths]


# ------------------------------------------------------------------------------------------ as training data

class CaptionPairs:
    """Every caption of a CaptionedTestSet as one (image, caption) training pair: item j is caption j
    and its image (COCO Karpathy train + restval: 113,287 images, ~566k pairs)."""

    def __init__(self, captioned: CaptionedTestSet):
        self.set, self.problems, self.class_names = captioned, captioned.problems, []
        self.name = captioned.name

    def __len__(self) -> int:
        return len(self.set.captions)

    def _image(self, j: int) -> int:
        return int(self.set.text_to_image[j])

    def origin(self, j: int) -> str:
        return self.set.origin(self._image(j))

    def image_bytes(self, j: int):
        return self.set.image_bytes(self._image(j))

    def caption(self, j: int) -> str:
        return self.set.captions[j]


def training_pairs(paths: List[str], image_root: Optional[str] = None):
    """--data: one Karpathy JSON (its train + restval split, every caption a pair) or COCO-format
    caption JSON (every annotation a pair), else `sources.pair_source(paths)` (a synthetic corpus, jsonl, shards)."""
    captions_json = [p for p in paths if is_captions_json(p)]
    if not captions_json:
        return pair_source(paths)
    if len(paths) > 1:
        raise InputError(f"--data {' '.join(paths)}: a caption JSON ({captions_json[0]}) must be the only --data entry")
    return CaptionPairs(load_captioned_test_set(captions_json[0], image_root, split="train"))


def training_overlap(train_source, test_set) -> dict:
    """Test images that are also training images, by file (normalised path) or `shard:key`:
    {"count", "of", "named": the first few}. Training shards the test set does not use are skipped."""
    test = {_file_key(test_set.origin(i)) for i in range(len(test_set))}
    hits = sorted({key for key in _training_origins(train_source, test) if key in test})
    return {"count": len(hits), "of": len(test), "named": hits[:MAX_OVERLAP_NAMED]}


def _training_origins(source, test_keys: set):
    base = getattr(source, "base", None)
    if isinstance(source, TarSource) or isinstance(base, TarSource):
        shards = {k.rsplit(":", 1)[0] for k in test_keys}
        tar = base if base is not None else source
        wanted = {s for s, shard in enumerate(tar.shards) if _file_key(shard) in shards}
        if not wanted:
            return
        shard_ids = tar.shard_ids if base is None else tar.shard_ids[source.indices]
        for i in np.nonzero(np.isin(shard_ids, list(wanted)))[0]:
            yield _file_key(source.origin(int(i)))
        return
    for i in range(len(source)):
        yield _file_key(source.origin(i))

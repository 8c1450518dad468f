"""Test sets with several captions per image: the Karpathy split files and COCO-format annotations.

Karpathy JSON (`dataset_coco.json`, `dataset_flickr30k.json`, `dataset_flickr8k.json`):

    {"images": [{"split": "test", "filepath": "val2014", "filename": "COCO_val2014_...jpg",
                 "sentences": [{"raw": "A man riding a horse.", ...}, ...]}, ...]}

the image is `image_root/filepath/filename` (`filepath` is absent for Flickr); COCO Karpathy test
has 5,000 images and 25,010 captions (5 per image, a few have 6), Flickr30k test 1,000 and 5,000.
COCO-format captions (NoCaps val, `captions_val2014.json`): `images[{id, file_name}]` and
`annotations[{image_id, caption}]`.

An image without captions or whose file is missing is left out and named in `problems`; an image
that cannot be decoded is skipped at read time (streaming.BadSample) together with its captions.
"""

import json
import os
from typing import List, Optional

import numpy as np

from megatron_lcl.eval.streaming import BadSampleLog, _str, _strings, read_file


class CaptionedTestSet:
    """Images (read lazily) with all their reference captions.

    `captions[j]` belongs to image `text_to_image[j]`; `references(i)` lists image i's captions."""

    def __init__(self, name: str, paths: List[str], captions: List[List[str]], problems: BadSampleLog):
        if not paths:
            raise ValueError(f"{name}: no usable images; problems: {problems.named[:5]}")
        self.name, self.problems, self.class_names = name, problems, []
        self.files = _strings(paths)  # [n_images]
        self.captions = [c for caps in captions for c in caps]  # [n_texts]
        self.text_to_image = np.repeat(np.arange(len(paths)), [len(c) for c in captions])  # [n_texts]
        self.labels = np.arange(len(paths))  # item i's label is i: LabeledImages yields (pixels, i, i)

    def __len__(self) -> int:
        return len(self.files)

    def origin(self, i: int) -> str:
        return _str(self.files[i])

    def image_bytes(self, i: int):
        return read_file(self.origin(i))

    def caption(self, i: int) -> str:
        """The first reference (for use as an image-caption pair source)."""
        return self.captions[int(np.searchsorted(self.text_to_image, i))]

    def references(self, i: int) -> List[str]:
        return [self.captions[j] for j in np.nonzero(self.text_to_image == i)[0]]


def _usable(path: str, captions: List[str], problems: BadSampleLog, where: str) -> bool:
    if not captions:
        problems.add(path, f"no captions in {where}")
        return False
    if not os.path.isfile(path):
        problems.add(path, f"missing file (listed in {where})")
        return False
    return True


def load_karpathy(path: str, image_root: Optional[str] = None, split: str = "test") -> CaptionedTestSet:
    """One split ("test", "val", "train"; "train" includes "restval") of a Karpathy JSON; image paths
    are relative to `image_root` (default: the JSON's folder)."""
    with open(path) as f:
        data = json.load(f)
    if "images" not in data:
        raise ValueError(f"{path}: not a Karpathy split file (no 'images' list)")
    root = image_root or os.path.dirname(os.path.abspath(path))
    splits = {"train", "restval"} if split == "train" else {split}
    problems, paths, captions = BadSampleLog(), [], []
    for n, image in enumerate(data["images"]):
        if image.get("split") not in splits:
            continue
        if "filename" not in image:
            problems.add(f"{path}:images[{n}]", "no 'filename'")
            continue
        file = os.path.join(root, image.get("filepath", ""), image["filename"])
        caps = [s["raw"].strip() for s in image.get("sentences", []) if str(s.get("raw", "")).strip()]
        if _usable(file, caps, problems, f"{os.path.basename(path)} images[{n}]"):
            paths.append(file)
            captions.append(caps)
    name = f"{os.path.basename(path)}:{split}"
    return CaptionedTestSet(name, paths, captions, problems)


def load_coco_captions(path: str, image_root: str) -> CaptionedTestSet:
    """COCO-format caption annotations (NoCaps val, captions_val2014.json)."""
    with open(path) as f:
        data = json.load(f)
    refs = {}
    for a in data.get("annotations", []):
        refs.setdefault(a["image_id"], []).append(str(a["caption"]).strip())
    problems, paths, captions = BadSampleLog(), [], []
    for image in data.get("images", []):
        file = os.path.join(image_root, image["file_name"])
        caps = [c for c in refs.get(image["id"], []) if c]
        if _usable(file, caps, problems, f"{os.path.basename(path)} image id {image['id']}"):
            paths.append(file)
            captions.append(caps)
    return CaptionedTestSet(os.path.basename(path), paths, captions, problems)


def is_captions_json(path: str) -> bool:
    return path.endswith(".json") and os.path.isfile(path)


def load_captioned_test_set(path: str, image_root: Optional[str] = None, split: str = "test") -> CaptionedTestSet:
    """A Karpathy JSON (has images[].sentences) or COCO-format annotations (has annotations)."""
    with open(path) as f:
        head = json.load(f)
    if "annotations" in head:
        return load_coco_captions(path, image_root or os.path.dirname(os.path.abspath(path)))
    return load_karpathy(path, image_root, split)


class PairsTestSet:
    """A pairs source (one caption per image: jsonl, shards, a split) seen as a test set."""

    def __init__(self, source, name: str):
        self.source, self.name, self.problems, self.class_names = source, name, source.problems, []
        self.captions = [source.caption(i) for i in range(len(source))]  # [n_texts]
        self.text_to_image = np.arange(len(source))  # caption j belongs to image j
        self.labels = np.arange(len(source))

    def __len__(self) -> int:
        return len(self.source)

    def origin(self, i: int) -> str:
        return self.source.origin(i)

    def image_bytes(self, i: int):
        return self.source.image_bytes(i)

    def caption(self, i: int) -> str:
        return self.captions[i]


def as_test_set(source, name: str):
    """A CaptionedTestSet as it is; any other pairs source wrapped as a PairsTestSet."""
    return source if isinstance(source, CaptionedTestSet) else PairsTestSet(source, name)

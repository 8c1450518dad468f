"""Transfer-evaluation data: labelled images (classification) and image-caption pairs (retrieval).

Sources, picked from what `path` is:
- a synthetic corpus folder (`python -m megatron_lcl.data.synthetic`: `docs_*.jsonl` + `images/`):
  labels are the shape class (`label_field` may pick `colour` or `background` instead); captions are
  each image's matched sentence;
- an ImageFolder (`root/<class name>/*.jpg`; classes sorted by name, as torchvision numbers them);
- webdataset shards (a `.tar`, a folder of them, or a glob): members grouped by key; the image is the
  `jpg`/`jpeg`/`png`/`webp` member; the class is the `cls` member (an integer) or `json[label_field]`;
  the caption is the `txt` member (or `json["caption"]`);
- retrieval only: a `.jsonl` file of `{"image": path, "caption": text}` (paths relative to the file).

Images are kept as encoded bytes and decoded on demand with the eval transform (`preprocess_image`):
resize the shorter side, centre-crop, CLIP mean/std.
"""

import glob
import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_lcl.eval.errors import InputError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


@dataclass
class ImageSet:
    """Encoded images with either integer labels or captions (one per image)."""

    images: List[bytes]
    origins: List[str]  # file path or shard:key of each image, for error messages
    labels: Optional[List[int]] = None
    captions: Optional[List[str]] = None
    class_names: List[str] = field(default_factory=list)
    _cache: Dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        pick = lambda xs: None if xs is None else [xs[i] for i in indices]  # noqa: E731
        return ImageSet([self.images[i] for i in indices], pick(self.origins), pick(self.labels),
                        pick(self.captions), list(self.class_names))

    def pixels(self, indices: Sequence[int], image_size: int) -> torch.Tensor:
        """Eval-transformed images `[len(indices), 3, S, S]` (decoded once, then cached if small)."""
        from megatron_lcl.data import preprocess_image

        cacheable = len(self) * 3 * image_size ** 2 <= 200_000_000  # ~800 MB of float32
        out = []
        for i in indices:
            t = self._cache.get(i)
            if t is None:
                try:
                    t = preprocess_image(self.images[i], image_size)
                except Exception as e:
                    raise InputError(f"{self.origins[i]}: cannot decode image ({type(e).__name__}: {e})") from e
                if cacheable:
                    self._cache[i] = t
            out.append(t)
        return torch.stack(out)


def split(n: int, eval_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Seeded random (train, eval) index split; eval gets round(n * eval_fraction) items."""
    if not 0.0 < eval_fraction < 1.0:
        raise InputError(f"--eval-fraction ({eval_fraction}) must be in (0, 1)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n * eval_fraction))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


# ------------------------------------------------------------------------------------------ detection

def is_synthetic_corpus(path: str) -> bool:
    return os.path.isdir(path) and os.path.isdir(os.path.join(path, "images")) and \
        any(n.endswith(".jsonl") for n in os.listdir(path))


def shard_paths(path: str) -> List[str]:
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.tar")))
    if path.endswith(".tar") and os.path.isfile(path):
        return [path]
    return sorted(glob.glob(path))


def is_image_folder(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    subdirs = [d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))]
    return bool(subdirs) and any(_image_files(os.path.join(path, d)) for d in subdirs)


def _image_files(folder: str) -> List[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------------------------------ classification

def load_labeled(path: str, label_field: str = "label") -> ImageSet:
    """Labelled images from a synthetic corpus, an ImageFolder or webdataset shards (see module doc)."""
    if is_synthetic_corpus(path):
        return _synthetic_labeled(path, label_field)
    if is_image_folder(path):
        return _image_folder(path)
    shards = shard_paths(path)
    if shards:
        return _webdataset(shards, label_field, want="label")
    what = "no such file or directory" if not os.path.exists(path) else \
        "not a synthetic corpus (docs_*.jsonl + images/), an ImageFolder (class sub-folders of images) " \
        "or webdataset shards (*.tar)"
    raise InputError(f"{path}: {what}")


def _synthetic_labeled(corpus: str, label_field: str) -> ImageSet:
    from megatron_lcl.data import labeled_images

    items = labeled_images(corpus)
    if not items:
        raise InputError(f"{corpus}: no images")
    if label_field == "label":
        from megatron_lcl.data.synthetic import SHAPES

        names, labels = list(SHAPES), [it["label"] for it in items]
    elif all(isinstance(it.get(label_field), str) for it in items):  # a categorical image_info field
        names = sorted({it[label_field] for it in items})
        labels = [names.index(it[label_field]) for it in items]
    else:
        fields = sorted(k for k, v in items[0].items() if isinstance(v, str) and k not in ("path", "caption"))
        raise InputError(f"--label-field ({label_field!r}) for this synthetic corpus must be label or one of "
                         f"its categorical image_info fields: {', '.join(fields)}")
    paths = [it["path"] for it in items]
    return ImageSet([_read(p) for p in paths], paths, labels=labels, class_names=names)


def _image_folder(root: str) -> ImageSet:
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    images, origins, labels = [], [], []
    for k, name in enumerate(names):
        for p in _image_files(os.path.join(root, name)):
            images.append(_read(p))
            origins.append(p)
            labels.append(k)
    return ImageSet(images, origins, labels=labels, class_names=names)


def _webdataset(shards: List[str], label_field: str, want: str) -> ImageSet:
    """Group tar members by key (the name up to its first dot, as webdataset does)."""
    images, origins, labels, captions = [], [], [], []
    for shard in shards:
        samples: Dict[str, Dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(member.name), key)
                samples.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
        for key, parts in samples.items():
            where = f"{shard}:{key}"
            image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            if image is None:
                raise InputError(f"{where}: no image member ({'/'.join(IMAGE_EXTS)}); has {sorted(parts)}")
            meta = json.loads(parts["json"]) if "json" in parts else {}
            if want == "label":
                if "cls" in parts:
                    label = int(parts["cls"].decode().strip())
                elif label_field in meta:
                    label = int(meta[label_field])
                else:
                    raise InputError(f"{where}: no class (a .cls member or json[{label_field!r}])")
                labels.append(label)
            else:
                if "txt" in parts:
                    text = parts["txt"].decode("utf-8").strip()
                elif "caption" in meta:
                    text = str(meta["caption"])
                else:
                    raise InputError(f"{where}: no caption (a .txt member or json['caption'])")
                captions.append(text)
            images.append(image)
            origins.append(where)
    if want == "label":
        num = max(labels) + 1 if labels else 0
        return ImageSet(images, origins, labels=labels, class_names=[str(k) for k in range(num)])
    return ImageSet(images, origins, captions=captions)


# ------------------------------------------------------------------------------------------ retrieval

def load_pairs(path: str) -> ImageSet:
    """Image-caption pairs from a synthetic corpus, webdataset shards, or a jsonl of {image, caption}."""
    if is_synthetic_corpus(path):
        from megatron_lcl.data import labeled_images

        items = labeled_images(path)
        return ImageSet([_read(it["path"]) for it in items], [it["path"] for it in items],
                        captions=[it["caption"] for it in items])
    if path.endswith(".jsonl"):
        return _jsonl_pairs(path)
    shards = shard_paths(path)
    if shards:
        return _webdataset(shards, "label", want="caption")
    what = "no such file or directory" if not os.path.exists(path) else \
        "not a synthetic corpus, a .jsonl of {image, caption} or webdataset shards"
    raise InputError(f"{path}: {what}")


def _jsonl_pairs(path: str) -> ImageSet:
    """The pairs the streaming source parses, read into memory; here a malformed row is an error."""
    from megatron_lcl.eval.streaming import JsonlPairsSource  # streaming builds on this module

    source = JsonlPairsSource(path)
    if source.problems.count:
        raise InputError(source.problems.named[0])  # "<path>:<line>: missing key 'caption' ..."
    origins = [source.origin(i) for i in range(len(source))]
    return ImageSet([_read(p) for p in origins], origins, captions=[source.caption(i) for i in range(len(source))])

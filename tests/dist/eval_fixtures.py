"""Small real-format fixtures for the transfer-evaluation tests (used in-process and by the torchrun
scripts): coloured PNGs, an ImageFolder with train/ and val/, webdataset shards, a Karpathy JSON
with 5 captions per image, and a fixed random patch encoder."""

import io
import json
import random
import tarfile
from pathlib import Path

import torch
from PIL import Image

from megatron_lcl.eval.encoders import VisionEncoder

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40)}


def png(colour, size=16, rng=None) -> bytes:
    """A solid colour square with a few random noise pixels."""
    img = Image.new("RGB", (size, size), colour)
    rng = rng or random.Random(0)
    for _ in range(8):
        img.putpixel((rng.randrange(size), rng.randrange(size)), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def patch_encoder(seed: int = 0) -> VisionEncoder:
    """A fixed random feature extractor: 4x4 patches -> 32 features, [n, 16, 32] 'latents'."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, 32, kernel_size=4, stride=4)
    return VisionEncoder(conv, _patch_latents, 32, 16, "patches", "test")


def _patch_latents(module, pixels):
    return module(pixels).flatten(2).transpose(1, 2)  # [n, 32, 4, 4] -> [n, 16, 32]


def write_image_folder(root: Path, per_class: int, seed: int, corrupt: bool = False, empty_class: bool = False):
    """root/<colour>/<i>.png; optionally one corrupt file and an empty class folder ('zz_empty')."""
    rng = random.Random(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i:04d}.png").write_bytes(png(colour, rng=rng))
    if corrupt:
        (root / "red" / "broken.png").write_bytes(b"not a png at all")
    if empty_class:
        (root / "zz_empty").mkdir(exist_ok=True)
    return root


def write_shard(path: Path, samples: list) -> Path:
    """A webdataset tar of samples [{ext: bytes}] keyed s000000, s000001, ..."""
    with tarfile.open(path, "w") as tar:
        for i, parts in enumerate(samples):
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"s{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def colour_caption_samples(n: int, seed: int) -> list:
    rng = random.Random(seed)
    names = list(COLOURS)
    out = []
    for _ in range(n):
        c = names[rng.randrange(len(names))]
        out.append({"png": png(COLOURS[c], rng=rng), "txt": f"a {c} square".encode(), "cls": str(names.index(c)).encode()})
    return out


def write_karpathy(root: Path, name: str = "dataset_coco.json", with_problems: bool = False) -> Path:
    """4 test images (one per colour), 5 captions each, plus a train image; COCO-style filepath.
    with_problems adds a test image without captions and one whose file is missing."""
    rng = random.Random(5)
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    images = []
    for k, (cname, colour) in enumerate(COLOURS.items()):
        fname = f"COCO_val2014_{k:012d}.png"
        (root / "val2014" / fname).write_bytes(png(colour, rng=rng))
        sentences = [{"raw": f"A {cname} square.", "tokens": []}, {"raw": f"a square that is {cname}"},
                     {"raw": f"{cname} colour"}, {"raw": f"the {cname} block"}, {"raw": f"{cname}!"}]
        images.append({"split": "test", "filepath": "val2014", "filename": fname, "cocoid": k,
                       "sentences": sentences})
    images.append({"split": "train", "filepath": "val2014", "filename": images[0]["filename"],
                   "sentences": [{"raw": "train only"}]})
    if with_problems:
        images.append({"split": "test", "filepath": "val2014", "filename": images[1]["filename"], "sentences": []})
        images.append({"split": "test", "filepath": "val2014", "filename": "missing.png",
                       "sentences": [{"raw": "a ghost"}] * 5})
    path = root / name
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path

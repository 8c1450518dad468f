"""Image transforms (PIL + torch; torchvision does not import beside the CPU torch wheel).

`train_transform` is OpenCLIP's training transform: RandomResizedCrop(size, scale=(0.9, 1.0),
ratio=(3/4, 4/3), bicubic) -> RGB -> [0, 1] tensor -> CLIP mean/std. `eval_transform` resizes the
shorter side to `size` (bicubic) and centre-crops. Both return `[3, size, size]` float32.
"""

import io
import math
import random

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_SCALE = (0.9, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)

_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def decode_image(data: bytes, size: int) -> Image.Image:
    """Decode image bytes to RGB. JPEGs are decoded at reduced scale when much larger than `size`."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        img.draft("RGB", (size, size))  # DCT-domain downscale: free speed for big JPEGs
    return img.convert("RGB")


def random_resized_crop_box(width: int, height: int, rng: random.Random) -> tuple:
    """torchvision's RandomResizedCrop.get_params with OpenCLIP's scale: (left, top, right, bottom)."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    # Fallback: centre crop at the closest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    array = np.array(img, dtype=np.uint8)  # [H, W, 3]
    # Make [3, H, W] contiguous while still uint8: elementwise ops on the permuted view are ~3x slower.
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div_(255.0)
    return tensor.sub_(_MEAN).div_(_STD)


def train_transform(img: Image.Image, size: int, rng: random.Random) -> torch.Tensor:
    box = random_resized_crop_box(img.width, img.height, rng)
    img = img.resize((size, size), Image.BICUBIC, box=box)  # crop + resize in one pass
    return to_normalized_tensor(img)


def eval_transform(img: Image.Image, size: int) -> torch.Tensor:
    scale = size / min(img.width, img.height)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.convert("RGB").resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return to_normalized_tensor(img.crop((left, top, left + size, top + size)))


def preprocess_image(data: bytes, size: int, rng: random.Random = None) -> torch.Tensor:
    """Image bytes -> `[3, size, size]`: the training transform when `rng` is given, else eval."""
    img = decode_image(data, size)
    return train_transform(img, size, rng) if rng is not None else eval_transform(img, size)

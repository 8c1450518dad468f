"""Map-style torch Datasets over a source (sources.py): item i's image read and decoded in the
DataLoader worker with the eval transform (`preprocess_image`: resize the shorter side, centre-crop,
CLIP mean/std), or, for a frozen encoder, its latents taken from a `FrozenLatents` cache.

    LabeledImages(source, image_size)[i]    -> (inputs, label, i)    or a BadSample
    CaptionedImages(source, image_size)[i]  -> (inputs, caption, i)  or a BadSample
    collate(items) -> {"inputs" [b, 3, S, S] (or latents [b, M, h]), "labels" [b] | "captions",
                       "index" [b], "bad": [BadSample]}
"""

from typing import Dict, Optional

import torch

from megatron_lcl.data import preprocess_image
from megatron_lcl.eval.bad_samples import BadSample


def decode(data: bytes, origin: str, image_size: int):
    """Image bytes -> `[3, S, S]` (eval transform), or a BadSample naming `origin`."""
    try:
        return preprocess_image(data, image_size)
    except Exception as e:  # PIL raises many types for corrupt data
        detail = "" if "<_io." in str(e) else f": {e}"
        return BadSample(origin, f"cannot decode image ({type(e).__name__}{detail})")


FrozenLatents = Dict[int, torch.Tensor]  # item -> latents [M, h] (float32) of a frozen encoder


class SourceImages(torch.utils.data.Dataset):
    """Item i of a source as the encoder's input: pixels `[3, S, S]`, or with `latents` (the frozen
    encoder's outputs of the readable items, computed once: engine.cache_frozen_latents) its latents
    `[M, h]`; an item not in `latents` is read and decoded (a BadSample again where it failed)."""

    def __init__(self, source, image_size: int, latents: Optional[FrozenLatents] = None):
        self.source, self.image_size, self.latents = source, image_size, latents

    def __len__(self) -> int:
        return len(self.source)

    def inputs(self, i: int):
        if self.latents is not None and i in self.latents:
            return self.latents[i]
        data = self.source.image_bytes(i)
        if isinstance(data, BadSample):
            return data
        return decode(data, self.source.origin(i), self.image_size)

    def with_latents(self, latents: FrozenLatents) -> "SourceImages":
        return type(self)(self.source, self.image_size, latents)


class LabeledImages(SourceImages):
    """Item i -> (inputs, label, i), or a BadSample."""

    def __getitem__(self, i: int):
        inputs = self.inputs(i)
        return inputs if isinstance(inputs, BadSample) else (inputs, int(self.source.labels[i]), i)


class CaptionedImages(SourceImages):
    """Item i -> (inputs, caption, i), or a BadSample (caption read in the worker too)."""

    def __getitem__(self, i: int):
        inputs = self.inputs(i)
        if isinstance(inputs, BadSample):
            return inputs
        try:
            return inputs, self.source.caption(i), i
        except Exception as e:
            return BadSample(self.source.origin(i), f"cannot read caption: {e}")


def collate(items: list) -> dict:
    """Drop BadSamples (returned under "bad"); stack the inputs; labels `[b]` or captions."""
    bad = [x for x in items if isinstance(x, BadSample)]
    good = [x for x in items if not isinstance(x, BadSample)]
    out = {"bad": bad, "index": torch.tensor([x[2] for x in good], dtype=torch.long)}
    out["inputs"] = torch.stack([x[0] for x in good]) if good else torch.zeros(0)
    second = [x[1] for x in good]
    if second and isinstance(second[0], str):
        out["captions"] = second
    else:
        out["labels"] = torch.tensor(second, dtype=torch.long)
    return out

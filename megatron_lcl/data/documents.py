"""The prepared-document format: one webdataset sample per source document.

A prepared shard (`shard-000000.tar`, written by `tools/prepare_data.py`) holds, per document:

    {key}.json       {"source": "mmc4"|"obelics"|"laion", "origin": "file:line", "texts": [...],
                      "images": [{"matched_text_index": int|null, "matched_sim": float|null,
                                  "label": int|null, "meta": {...}}, ...],
                      "order": [["text", 0], ["image", 0], ...] | null}
    {key}.img0.jpg   encoded image 0 (JPEG, verified to decode), {key}.img1.jpg, ...

`order` is the fixed interleaving of OBELICS documents; MMC4 and LAION documents have none: their
images are placed before/after `texts[matched_text_index]` at sampling time (sample_builder.py).
"""

import json
import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

SOURCES = ("mmc4", "obelics", "laion")


@dataclass
class DocImage:
    data: Optional[bytes] = None  # encoded bytes; None until loaded (readers may give a path)
    path: Optional[str] = None  # where to load it from, when data is None
    matched_text_index: Optional[int] = None
    matched_sim: Optional[float] = None
    label: Optional[int] = None  # class label (synthetic corpus / eval only)
    meta: dict = field(default_factory=dict)

    def header(self) -> dict:
        return {
            "matched_text_index": self.matched_text_index,
            "matched_sim": self.matched_sim,
            "label": self.label,
            "meta": self.meta,
        }


@dataclass
class Document:
    key: str  # unique within a dataset; no dots (webdataset splits key and field at the first dot)
    source: str
    texts: List[str]
    images: List[DocImage]
    origin: str  # where it came from, for error messages: "docs_00003.jsonl:17"
    order: Optional[List[Tuple[str, int]]] = None  # OBELICS only: [("text", i) | ("image", j)]

    def num_chars(self) -> int:
        return sum(len(t) for t in self.texts)


def safe_key(text: str) -> str:
    """A webdataset-safe sample key: no dots or slashes."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def to_wds_sample(doc: Document) -> dict:
    header = {
        "source": doc.source,
        "origin": doc.origin,
        "texts": doc.texts,
        "images": [img.header() for img in doc.images],
        "order": doc.order,
    }
    sample = {"__key__": doc.key, "json": json.dumps(header).encode("utf-8")}
    for j, img in enumerate(doc.images):
        assert img.data is not None, f"{doc.origin}: image {j} was never loaded"
        sample[f"img{j}.jpg"] = img.data
    return sample


def from_wds_sample(sample: dict, with_images: bool = True) -> Document:
    """Inverse of `to_wds_sample`. Raises ValueError (with the key) on a malformed sample."""
    key = sample.get("__key__", "?")
    try:
        header = json.loads(sample["json"])
        images = []
        for j, h in enumerate(header["images"]):
            data = sample[f"img{j}.jpg"] if with_images else None
            images.append(DocImage(data=data, **h))
        order = [tuple(o) for o in header["order"]] if header.get("order") else None
        return Document(key, header["source"], header["texts"], images, header["origin"], order)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed prepared sample {key!r}: {e!r}") from e

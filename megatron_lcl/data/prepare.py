"""Source documents -> verified, filtered webdataset shards.

Deterministic, document-level rules are applied here, once:
- MMC4: images with `matched_sim < 0.24` are dropped; a document with no such image is dropped.
- OBELICS: a document must keep 1..6 images (more -> dropped as `too_many_images`).
- every image is loaded and decoded (missing file / corrupt bytes -> that image is dropped and
  counted); images larger than `max_image_side` are downscaled, non-JPEGs re-encoded as JPEG.
- enormous documents (> `max_doc_chars` characters or > `max_doc_images` images) are dropped.
- MMC4-Pair (`--format mmc4_pair`, paper Sec. 4.1: a paired dataset for CLIP-style comparisons): the
  MMC4 rules above, then every kept image becomes one pair document, the image with its matched
  sentence (`text_list[matched_text_index]`, MMC4's bipartite CLIP-similarity matching). Pairs are
  written as image-text pair documents (source "laion": one image, one caption, laid out and packed
  at load time as LAION-Random is); `meta.pair_of` names the MMC4 document.
The random per-sample choices (which <= 6 MMC4 images, before/after placement) happen at load time
(sample_builder.py), so one prepared dataset serves every seed.

The command (`lcl-prepare-data`, `python tools/prepare_data.py`, `python -m megatron_lcl.data.prepare`):

    lcl-prepare-data --format mmc4 --input mmc4/docs/ --images-dir mmc4/images --output data/mmc4
    lcl-prepare-data --format obelics --input 'obelics/*.parquet' --output data/obelics
    lcl-prepare-data --format laion --input 'laion/{00000..00099}.tar' --output data/laion
    lcl-prepare-data --format mmc4_pair --input mmc4/docs/ --images-dir mmc4/images --output data/mmc4_pair

writes DIR/shard-000000.tar ... (one sample per document) and DIR/summary.json, and prints a summary:
documents and images in/out, drops by reason with examples (file:line or shard:key). See docs/data.md.
"""

import argparse
import glob
import io
import json
import multiprocessing
import os
from dataclasses import dataclass, field
from typing import List, Optional

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from megatron_lcl.data import skips as S
from megatron_lcl.data.documents import DocImage, Document, to_wds_sample
from megatron_lcl.data.sample_builder import MAX_IMAGES_PER_DOC, MIN_SIMILARITY
from megatron_lcl.data.skips import SkipCounter
from megatron_lcl.data.sources import read_source

INPUT_PATTERNS = {
    "mmc4": ("*.jsonl", "*.jsonl.zip"),
    "obelics": ("*.jsonl", "*.parquet"),
    "laion": ("*.tar",),
    "mmc4_pair": ("*.jsonl", "*.jsonl.zip"),
}


@dataclass
class PrepareSummary:
    docs_in: int = 0
    docs_out: int = 0
    images_in: int = 0
    images_out: int = 0
    shards: List[str] = field(default_factory=list)
    skips: SkipCounter = field(default_factory=SkipCounter)

    def to_dict(self) -> dict:
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "images_in": self.images_in,
            "images_out": self.images_out,
            "shards": [os.path.basename(s) for s in self.shards],
            "skipped": self.skips.state_dict(),
        }

    def report(self) -> str:
        return (
            f"documents: {self.docs_in} in, {self.docs_out} out\n"
            f"images:    {self.images_in} in, {self.images_out} out\n"
            f"shards:    {len(self.shards)}\n"
            f"skipped (by reason):\n{self.skips.summary()}"
        )


def list_inputs(source: str, inputs: List[str]) -> List[str]:
    """Expand files, folders and globs into the sorted list of source files."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            for pattern in INPUT_PATTERNS[source]:
                files.extend(glob.glob(os.path.join(item, pattern)))
        else:
            matched = glob.glob(item)
            if not matched:
                raise FileNotFoundError(f"--input {item!r} matches no file")
            files.extend(matched)
    if not files:
        raise FileNotFoundError(f"no {source} input files ({', '.join(INPUT_PATTERNS[source])}) in {inputs}")
    return sorted(set(files))


def load_verified_image(img: DocImage, max_side: int) -> bytes:
    """Read + fully decode the image; returns JPEG bytes (original bytes when already a small JPEG)."""
    data = img.data
    if data is None:
        with open(img.path, "rb") as f:  # FileNotFoundError -> missing_image
            data = f.read()
    pil = Image.open(io.BytesIO(data))
    pil.load()  # raises on truncated/corrupt data
    if pil.format == "JPEG" and pil.mode == "RGB" and max(pil.size) <= max_side:
        return data
    pil = pil.convert("RGB")
    if max(pil.size) > max_side:
        pil.thumbnail((max_side, max_side), Image.BICUBIC)
    out = io.BytesIO()
    pil.save(out, format="JPEG", quality=92)
    return out.getvalue()


def filter_document(doc: Document, skips: SkipCounter, args: "PrepareOptions") -> Optional[Document]:
    """Apply the deterministic rules; returns the document to write or None (counted)."""
    if doc.num_chars() > args.max_doc_chars or len(doc.images) > args.max_doc_images:
        skips.add(S.TOO_LARGE, doc.origin, f"{doc.num_chars()} chars, {len(doc.images)} images")
        return None
    keep = []
    for j, img in enumerate(doc.images):
        if doc.source == "mmc4" and img.matched_sim < args.min_similarity:
            skips.add(S.LOW_SIMILARITY, doc.origin, f"image {j} sim {img.matched_sim:.3f}")
            continue
        try:
            img.data = load_verified_image(img, args.max_image_side)
        except FileNotFoundError:
            skips.add(S.MISSING_IMAGE, doc.origin, f"image {j}: {img.path}")
            continue
        except Exception as e:  # PIL raises many types on bad bytes
            skips.add(S.CORRUPT_IMAGE, doc.origin, f"image {j}: {type(e).__name__}: {str(e)[:80]}")
            continue
        keep.append(j)
    if not keep:
        skips.add(S.NO_USABLE_IMAGE, doc.origin)
        return None
    if doc.source == "obelics" and len(keep) > MAX_IMAGES_PER_DOC:
        skips.add(S.TOO_MANY_IMAGES, doc.origin, f"{len(keep)} images > {MAX_IMAGES_PER_DOC}")
        return None
    return _keep_images(doc, keep)


def mmc4_pairs(doc: Document) -> List[Document]:
    """A filtered MMC4 document -> one (image, matched sentence) pair document per image, in order."""
    pairs = []
    for j, img in enumerate(doc.images):
        image = DocImage(img.data, img.path, 0, img.matched_sim, img.label, {**img.meta, "pair_of": doc.key})
        pairs.append(Document(f"{doc.key}_i{j}", "laion", [doc.texts[img.matched_text_index]], [image],
                              f"{doc.origin} image {j}"))
    return pairs


def _keep_images(doc: Document, keep: List[int]) -> Document:
    new_index = {old: new for new, old in enumerate(keep)}
    images = [doc.images[j] for j in keep]
    order = None
    if doc.order is not None:
        order = [(kind, i if kind == "text" else new_index[i]) for kind, i in doc.order
                 if kind == "text" or i in new_index]
    return Document(doc.key, doc.source, doc.texts, images, doc.origin, order)


@dataclass
class PrepareOptions:
    min_similarity: float = MIN_SIMILARITY
    max_image_side: int = 512
    max_doc_chars: int = 1_000_000
    max_doc_images: int = 256
    shard_size: int = 1000


def _prepare_files(source: str, files: List[str], pattern: str, images_dir: Optional[str],
                   options: PrepareOptions, progress: bool, part: int = 0) -> PrepareSummary:
    """Prepare `files` into shards named by `pattern` (one process)."""
    summary = PrepareSummary()
    with wds.ShardWriter(pattern, maxcount=options.shard_size, verbose=0) as sink, \
            tqdm(desc=f"prepare {source} [{part}]", unit="doc", disable=not progress, position=part) as bar:
        for path in files:
            try:
                reader_format = "mmc4" if source == "mmc4_pair" else source
                for doc in read_source(reader_format, path, images_dir, summary.skips):
                    summary.docs_in += 1
                    summary.images_in += len(doc.images)
                    kept = filter_document(doc, summary.skips, options)
                    for out in ([] if kept is None else mmc4_pairs(kept) if source == "mmc4_pair" else [kept]):
                        sink.write(to_wds_sample(out))
                        summary.docs_out += 1
                        summary.images_out += len(out.images)
                    bar.update(1)
                    bar.set_postfix(out=summary.docs_out, skipped=summary.skips.total(), refresh=False)
            except Exception as e:  # an unreadable file (bad zip, broken parquet): count it, go on
                summary.skips.add(S.CORRUPT_SHARD, os.path.basename(path),
                                  f"rest of file skipped: {type(e).__name__}: {str(e)[:100]}")
    return summary


def prepare(source: str, inputs: List[str], output_dir: str, images_dir: Optional[str] = None,
            options: Optional[PrepareOptions] = None, progress: bool = True,
            num_workers: int = 1) -> PrepareSummary:
    """Read `inputs`, filter and verify, write `output_dir/shard-*.tar` + `summary.json`.

    With `num_workers > 1`, worker k prepares input files k, k + N, ... into `shard-wKK-%06d.tar`.
    """
    options = options or PrepareOptions()
    files = list_inputs(source, inputs)
    os.makedirs(output_dir, exist_ok=True)
    num_workers = max(1, min(num_workers, len(files)))
    if num_workers == 1:
        parts = [_prepare_files(source, files, os.path.join(output_dir, "shard-%06d.tar"), images_dir,
                                options, progress)]
    else:
        jobs = [(source, files[k::num_workers], os.path.join(output_dir, f"shard-w{k:02d}-%06d.tar"),
                 images_dir, options, progress, k) for k in range(num_workers)]
        with multiprocessing.Pool(num_workers) as pool:
            parts = pool.starmap(_prepare_files, jobs)
    summary = PrepareSummary()
    for part in parts:
        summary.docs_in += part.docs_in
        summary.docs_out += part.docs_out
        summary.images_in += part.images_in
        summary.images_out += part.images_out
        summary.skips.merge(part.skips)
    summary.shards = sorted(glob.glob(os.path.join(output_dir, "shard-*.tar")))
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary.to_dict(), f, indent=1)
    return summary


def main(argv=None) -> None:
    defaults = PrepareOptions()
    p = argparse.ArgumentParser(
        description="Convert MMC4 / OBELICS / LAION into the webdataset shards the LCL loader streams.")
    p.add_argument("--format", required=True, choices=sorted(INPUT_PATTERNS))
    p.add_argument("--input", required=True, nargs="+", help="files, folders or globs")
    p.add_argument("--output", required=True, help="output folder for shard-*.tar")
    p.add_argument("--images-dir", default=None,
                   help="MMC4 / MMC4-Pair: folder of image files named by image_name (default: INPUT/images or INPUT); "
                        "OBELICS: base for relative image paths (default: the row file's folder)")
    p.add_argument("--shard-size", type=int, default=defaults.shard_size, help="documents per output shard")
    p.add_argument("--min-similarity", type=float, default=defaults.min_similarity, help="MMC4 matched_sim threshold")
    p.add_argument("--max-image-side", type=int, default=defaults.max_image_side,
                   help="downscale larger images to this side (keeps loading fast)")
    p.add_argument("--max-doc-chars", type=int, default=defaults.max_doc_chars)
    p.add_argument("--max-doc-images", type=int, default=defaults.max_doc_images)
    p.add_argument("--num-workers", type=int, default=1,
                   help="processes, each preparing every N-th input file into its own shards")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        list_inputs(args.format, args.input)
    except FileNotFoundError as e:
        p.error(str(e))  # one line and status 2, before anything is written
    options = PrepareOptions(args.min_similarity, args.max_image_side, args.max_doc_chars,
                             args.max_doc_images, args.shard_size)
    summary = prepare(args.format, args.input, args.output, args.images_dir, options,
                      progress=not args.no_progress, num_workers=args.num_workers)
    print(f"prepared {args.format} -> {args.output}\n{summary.report()}")


if __name__ == "__main__":
    main()

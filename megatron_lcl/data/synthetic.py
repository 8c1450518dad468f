"""Synthetic interleaved corpus in MMC4 format, for the demo, tests and the small-scale loss ablation.

    python -m megatron_lcl.data.synthetic --output DIR --num-docs 200 --image-size 64 --seed 0
    python -m megatron_lcl.data.synthetic --output DIR --kind scenes --split train      # or --split heldout

writes `DIR/docs_00000.jsonl ...` (MMC4 documents: `text_list`, `image_info`) and `DIR/images/*.jpg`.
Each image is a coloured shape (circle, square, triangle, cross, star, ...) on a textured background
(plain, stripes, checks, dots, gradient); its caption sentence describes it ("a large red circle on a
striped background, in the top left") and sits among filler sentences. Every image_info entry keeps
`label` (the shape class), `label_name`, `colour` and `background` for transfer evaluation; about one
image in six gets a `matched_sim` below 0.24 (so the similarity rule has work to do) and a few
documents have no usable image at all. Deterministic by seed.

`--kind scenes` (`scenes.py`) draws two-object scenes whose description is only recoverable by binding
attributes to places ("two red triangles left of a blue circle"), with distractor sentences about
scenes that are not shown, and a compositional split: `train` never shows a quarter of the
(shape, colour) pairs, `heldout` shows them as the counted object of every scene.
"""

import argparse
import json
import os
import random
import time
from typing import List

from PIL import Image, ImageDraw

from megatron_lcl.data import scenes
from megatron_lcl.data.shapes import BACKGROUNDS, COLOURS, SHAPES, draw_background, draw_shape, filler_sentence

SIZES = {"small": 0.22, "medium": 0.34, "large": 0.46}
PLACES = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
          "bottom right": (0.7, 0.7), "centre": (0.5, 0.5)}


def make_image(rng: random.Random, image_size: int) -> tuple:
    """(PIL image, attributes) for one random shape picture."""
    attrs = {
        "shape": rng.randrange(len(SHAPES)),
        "colour": rng.choice(list(COLOURS)),
        "background": rng.choice(BACKGROUNDS),
        "size": rng.choice(list(SIZES)),
        "place": rng.choice(list(PLACES)),
    }
    img = Image.new("RGB", (image_size, image_size))
    draw = ImageDraw.Draw(img)
    draw_background(draw, attrs["background"], image_size, rng)
    fx, fy = PLACES[attrs["place"]]
    jitter = image_size * 0.05
    draw_shape(draw, SHAPES[attrs["shape"]], fx * image_size + rng.uniform(-jitter, jitter),
               fy * image_size + rng.uniform(-jitter, jitter), SIZES[attrs["size"]] * image_size / 2 * 1.6,
               COLOURS[attrs["colour"]])
    return img, attrs


def caption(attrs: dict, rng: random.Random) -> str:
    opener = rng.choice(("Here is", "This picture shows", "We saw", "The photo has", "Look at"))
    return (f"{opener} a {attrs['size']} {attrs['colour']} {SHAPES[attrs['shape']]} on a "
            f"{attrs['background']} background, in the {attrs['place']}.")


def make_document(doc_id: int, rng: random.Random, image_size: int, images_dir: str,
                  max_images: int, filler: int) -> dict:
    num_images = rng.randint(1, max_images)
    text_list: List[str] = [filler_sentence(rng) for _ in range(rng.randint(1, filler))]
    image_info = []
    no_usable = rng.random() < 0.05  # a few documents whose images all fall below the threshold
    for j in range(num_images):
        img, attrs = make_image(rng, image_size)
        name = f"doc{doc_id:07d}_{j}.jpg"
        img.save(os.path.join(images_dir, name), quality=90)
        index = rng.randint(0, len(text_list))
        text_list.insert(index, caption(attrs, rng))
        for info in image_info:  # keep earlier matches pointing at their sentence
            if info["matched_text_index"] >= index:
                info["matched_text_index"] += 1
        low = no_usable or rng.random() < 1 / 6
        image_info.append({
            "image_name": name,
            "raw_url": f"https://synthetic.invalid/{name}",
            "matched_text_index": index,
            "matched_sim": round(rng.uniform(0.12, 0.235) if low else rng.uniform(0.245, 0.40), 4),
            "label": attrs["shape"],
            "label_name": SHAPES[attrs["shape"]],
            "colour": attrs["colour"],
            "background": attrs["background"],
        })
    for _ in range(rng.randint(0, filler)):
        text_list.append(filler_sentence(rng))
    return {"url": f"https://synthetic.invalid/doc/{doc_id}", "text_list": text_list, "image_info": image_info}


def write_corpus(output: str, num_docs: int, image_size: int = 64, seed: int = 0, docs_per_shard: int = 100,
                 max_images: int = 8, filler: int = 6, kind: str = "shapes", split: str = "train") -> List[str]:
    """Write the corpus (`kind` shapes | scenes; `split` train | heldout, scenes only); returns the
    jsonl shard paths."""
    assert kind in ("shapes", "scenes"), f"kind ({kind!r}) must be shapes or scenes"
    images_dir = os.path.join(output, "images")
    os.makedirs(images_dir, exist_ok=True)
    paths = []
    for start in range(0, num_docs, docs_per_shard):
        path = os.path.join(output, f"docs_{start // docs_per_shard:05d}.jsonl")
        with open(path, "w") as f:
            for doc_id in range(start, min(start + docs_per_shard, num_docs)):
                rng = random.Random(f"{seed}-{doc_id}")
                if kind == "scenes":
                    doc = scenes.make_document(doc_id, rng, image_size, images_dir, min(max_images, 4), split)
                else:
                    doc = make_document(doc_id, rng, image_size, images_dir, max_images, filler)
                f.write(json.dumps(doc) + "\n")
        paths.append(path)
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--num-docs", type=int, default=200)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs-per-shard", type=int, default=100)
    p.add_argument("--max-images", type=int, default=8, help="images per document: 1..N (>6 exercises the cap)")
    p.add_argument("--filler", type=int, default=6, help="up to N filler sentences before and after")
    p.add_argument("--kind", choices=("shapes", "scenes"), default="shapes")
    p.add_argument("--split", choices=("train", "heldout"), default="train",
                   help="scenes: train never shows the held-out (shape, colour) pairs; heldout always does")
    args = p.parse_args(argv)
    for flag, value, least in (("--num-docs", args.num_docs, 1), ("--image-size", args.image_size, 8),
                               ("--docs-per-shard", args.docs_per_shard, 1), ("--max-images", args.max_images, 1),
                               ("--filler", args.filler, 0)):
        if value < least:  # -3 documents were "written" with status 0
            p.error(f"{flag} {value}: at least {least}")
    t0 = time.time()
    paths = write_corpus(args.output, args.num_docs, args.image_size, args.seed, args.docs_per_shard,
                         args.max_images, args.filler, args.kind, args.split)
    print(f"wrote {args.num_docs} documents in {len(paths)} jsonl shard(s) + images/ to {args.output} "
          f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()


def labeled_images(corpus_dir: str, min_similarity: float = 0.0) -> List[dict]:
    """Every image of a synthetic corpus with its labels, for transfer evaluation:
    `{"path", "label", "label_name", "colour", "background", "caption"}` (scenes add `count`,
    `relation`, `shape_b`, `colour_b`, `held_out`, and `object_b`, derived here: the second object's
    "colour shape", a 16-way label only an encoder that binds colour to shape gets right) in corpus
    order."""
    items = []
    for name in sorted(os.listdir(corpus_dir)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(corpus_dir, name)) as f:
            for line in f:
                doc = json.loads(line)
                for info in doc["image_info"]:
                    if info["matched_sim"] < min_similarity:
                        continue
                    extra = {k: v for k, v in info.items() if k not in
                             ("image_name", "raw_url", "matched_text_index", "matched_sim")}
                    if "shape_b" in info and "colour_b" in info:
                        extra["object_b"] = f"{info['colour_b']} {info['shape_b']}"
                    items.append({
                        **extra, "path": os.path.join(corpus_dir, "images", info["image_name"]),
                        "caption": doc["text_list"][info["matched_text_index"]],
                    })
    return items

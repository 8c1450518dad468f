"""Two-object scenes for the synthetic corpus (`write_corpus(kind="scenes")`): a corpus where what an
image shows is only recoverable by binding attributes to places, and is predictable from its caption.

A scene: object A (one or two copies) left of / above object B, each a (shape, colour) pair, on a
speckled background that no sentence describes. Its caption: "Two red triangles left of a blue
circle." Documents hold 1-4 scenes, each with its caption, among filler sentences and distractor
sentences that describe scenes NOT shown (same words, other bindings), so the text before an image
predicts it only through its own caption.

Compositional split: a quarter of the (shape, colour) pairs (`is_held_out`) never appear in a `train`
corpus (as A or B); in a `heldout` corpus every A is such a pair. A frozen encoder evaluated on
`heldout` images must represent combinations it never saw during pre-training.

image_info per image: `label` (A's shape, an index into shapes.SHAPES), `label_name`, `colour`
(A's), `count` (one | two), `relation` (left of | above), `shape_b`, `colour_b`, `background`
(speckled), `held_out` (A's pair is held out).
"""

import os
import random

from PIL import Image, ImageDraw

from megatron_lcl.data import shapes

SHAPES = shapes.SHAPES[:4]  # circle, square, triangle, cross: same indices as shapes.SHAPES
COLOURS = ("red", "green", "blue", "yellow")
RELATIONS = ("left of", "above")
COUNTS = ("one", "two")


def is_held_out(shape: int, colour: int) -> bool:
    """A quarter of the (shape, colour) pairs, one per shape and one per colour."""
    return (shape + colour) % len(COLOURS) == 0


def sample_scene(rng: random.Random, split: str) -> dict:
    """Attributes of one scene; `split` decides which (shape, colour) pairs may appear (see module doc)."""
    while True:
        a, b = (rng.randrange(len(SHAPES)), rng.randrange(len(COLOURS))), \
            (rng.randrange(len(SHAPES)), rng.randrange(len(COLOURS)))
        if a == b:
            continue
        if split == "train" and (is_held_out(*a) or is_held_out(*b)):
            continue
        if split == "heldout" and not is_held_out(*a):
            continue
        return {"a": a, "b": b, "count": rng.randrange(len(COUNTS)), "relation": rng.randrange(len(RELATIONS))}


def describe(scene: dict) -> str:
    (sa, ca), (sb, cb) = scene["a"], scene["b"]
    two = scene["count"] == 1
    plural = ("es" if SHAPES[sa].endswith("s") else "s") if two else ""
    return (f"{COUNTS[scene['count']].capitalize()} {COLOURS[ca]} {SHAPES[sa]}{plural} "
            f"{RELATIONS[scene['relation']]} a {COLOURS[cb]} {SHAPES[sb]}.")


def draw_scene(scene: dict, image_size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), tuple(rng.randrange(70, 160) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(image_size * image_size // 24):  # speckles: texture no sentence mentions
        x, y = rng.randrange(image_size), rng.randrange(image_size)
        draw.point((x, y), fill=tuple(rng.randrange(40, 220) for _ in range(3)))
    r, s = image_size * 0.13, image_size
    jitter = lambda: rng.uniform(-0.04, 0.04) * s  # noqa: E731
    horizontal = scene["relation"] == 0
    a_at, b_at = ((0.27, 0.5), (0.73, 0.5)) if horizontal else ((0.5, 0.27), (0.5, 0.73))
    copies = [0.0] if scene["count"] == 0 else [-0.2, 0.2]  # two copies side by side, across the axis
    for offset in copies:
        cx, cy = (a_at[0], a_at[1] + offset) if horizontal else (a_at[0] + offset, a_at[1])
        _draw(draw, scene["a"], cx * s + jitter(), cy * s + jitter(), r)
    _draw(draw, scene["b"], b_at[0] * s + jitter(), b_at[1] * s + jitter(), r)
    return img


def _draw(draw, obj, cx, cy, r):
    shape, colour = obj
    shapes.draw_shape(draw, SHAPES[shape], cx, cy, r, shapes.COLOURS[COLOURS[colour]])


def make_document(doc_id: int, rng: random.Random, image_size: int, images_dir: str, max_images: int,
                  split: str) -> dict:
    """One MMC4 document of 1..max_images scenes with captions, filler and distractor sentences."""
    text_list = [shapes.filler_sentence(rng) for _ in range(rng.randint(0, 2))]
    image_info = []
    for j in range(rng.randint(1, max_images)):
        scene = sample_scene(rng, split)
        name = f"doc{doc_id:07d}_{j}.jpg"
        draw_scene(scene, image_size, rng).save(os.path.join(images_dir, name), quality=92)
        if rng.random() < 0.5:  # a distractor: a scene that is not shown, in the same words
            text_list.append(f"Another page showed {describe(sample_scene(rng, split)).lower()}")
        text_list.append(describe(scene))
        (sa, ca), (sb, cb) = scene["a"], scene["b"]
        image_info.append({
            "image_name": name, "raw_url": f"https://synthetic.invalid/{name}",
            "matched_text_index": len(text_list) - 1, "matched_sim": round(rng.uniform(0.26, 0.40), 4),
            "label": sa, "label_name": SHAPES[sa], "colour": COLOURS[ca], "count": COUNTS[scene["count"]],
            "relation": RELATIONS[scene["relation"]], "shape_b": SHAPES[sb], "colour_b": COLOURS[cb],
            "background": "speckled", "held_out": is_held_out(sa, ca),
        })
        text_list += [shapes.filler_sentence(rng) for _ in range(rng.randint(0, 1))]
    return {"url": f"https://synthetic.invalid/doc/{doc_id}", "text_list": text_list, "image_info": image_info}

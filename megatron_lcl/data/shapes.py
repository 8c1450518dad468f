"""What the synthetic corpora draw and write: shapes, colours, textured backgrounds, filler sentences.
Shared by the one-shape corpus (`synthetic.py`) and the two-object scenes (`scenes.py`).
"""

import math
import random

from PIL import ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "star", "diamond", "ring", "bar")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = ("plain", "striped", "checkered", "dotted", "gradient")
FILLER_WORDS = ("the people in our town walked along the river every morning and talked about the weather "
                "market news and old stories while children played near the bridge a small cafe served "
                "warm bread coffee and soup to travellers who came from far away cities to see the "
                "autumn festival with music lights and dancing until late at night").split()


def draw_background(draw: ImageDraw.ImageDraw, kind: str, size: int, rng: random.Random) -> None:
    a = tuple(rng.randrange(60, 200) for _ in range(3))
    b = tuple(min(255, c + rng.randrange(30, 60)) for c in a)
    draw.rectangle([0, 0, size, size], fill=a)
    step = max(4, size // rng.choice((6, 8, 10)))
    if kind == "striped":
        for x in range(0, size, step * 2):
            draw.rectangle([x, 0, x + step - 1, size], fill=b)
    elif kind == "checkered":
        for y in range(0, size, step):
            for x in range((y // step % 2) * step, size, step * 2):
                draw.rectangle([x, y, x + step - 1, y + step - 1], fill=b)
    elif kind == "dotted":
        r = max(1, step // 4)
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=b)
    elif kind == "gradient":
        for y in range(0, size, 2):
            t = y / size
            draw.rectangle([0, y, size, y + 1], fill=tuple(int(a[i] * (1 - t) + b[i] * t) for i in range(3)))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: tuple) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
    elif shape == "star":
        points = [(cx + (r if k % 2 == 0 else r / 2.5) * math.sin(k * math.pi / 5),
                   cy - (r if k % 2 == 0 else r / 2.5) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(points, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    elif shape == "bar":
        draw.rectangle([cx - r, cy - r / 4, cx + r, cy + r / 4], fill=colour)


def filler_sentence(rng: random.Random) -> str:
    words = [rng.choice(FILLER_WORDS) for _ in range(rng.randint(6, 22))]
    return " ".join(words).capitalize() + "."

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
        out.append({"png": png(COLOURS[c], rng=rng), "txt": f"a {c} square".encode(),
                    "cls": str(names.index(c)).encode()})
    return out


def write_karpathy(root: Path, name: str = "dataset_coco.json", with_problems: bool = False,
                   train_per_colour: int = 0) -> Path:
    """4 test images (one per colour), 5 captions each, plus a train image (the file of test image 0:
    a train/test overlap); COCO-style filepath. with_problems adds a test image without captions and
    one whose file is missing. train_per_colour adds that many train + restval images per colour
    (own files, 5 captions each) and one val image per colour."""
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
    for k in range(train_per_colour):
        for cname, colour in COLOURS.items():
            for split, folder in (("train", "train2014"), ("restval", "val2014"), ("val", "val2014")):
                if split == "val" and k:
                    continue
                fname = f"{split}_{cname}_{k}.png"
                (root / folder).mkdir(parents=True, exist_ok=True)
                (root / folder / fname).write_bytes(png(colour, rng=rng))
                images.append({"split": split, "filepath": folder, "filename": fname, "cocoid": 1000 + len(images),
                               "sentences": [{"raw": f"a {cname} square {j}"} for j in range(5)]})
    if with_problems:
        images.append({"split": "test", "filepath": "val2014", "filename": images[1]["filename"], "sentences": []})
        images.append({"split": "test", "filepath": "val2014", "filename": "missing.png",
                       "sentences": [{"raw": "a ghost"}] * 5})
    path = root / name
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


EIGHT = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
         "black": (10, 10, 10), "white": (245, 245, 245), "purple": (140, 40, 170), "orange": (250, 140, 20)}
EIGHT_CAPTIONS = {"red": "a red square", "green": "a green block", "blue": "the blue tile",
                  "yellow": "yellow paint", "black": "a black square at night", "white": "white snow",
                  "purple": "the purple block", "orange": "an orange tile"}


def write_caption_pairs(root: Path) -> Path:
    """8 distinct images with distinct captions as a pairs .jsonl (+ the images under root/img)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = random.Random(9)
    lines = []
    for name, colour in EIGHT.items():
        (root / "img" / f"{name}.png").write_bytes(png(colour, rng=rng))
        lines.append(json.dumps({"image": f"img/{name}.png", "caption": EIGHT_CAPTIONS[name]}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def write_tiny_lm(path: Path, texts) -> Path:
    """A random tiny OPTForCausalLM + a word-level tokenizer over `texts`' words, save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1,
                    eos_token_id=1, dropout=0.0, attention_dropout=0.0)
    OPTForCausalLM(cfg).save_pretrained(str(path))
    return path


def assert_same_weights(two: dict, one: dict, steps: int, lr: float) -> None:
    """Equal to float32 round-off. Exception: attention key biases (`in_proj_bias`'s middle third,
    `k_proj.bias`), whose gradient is exactly zero in theory (softmax is shift-invariant) and
    round-off noise in practice, which Adam normalises to steps of up to lr: there only
    |difference| <= steps x lr is required."""
    assert set(two) == set(one) and one
    for k in one:
        a, b = two[k], one[k]
        if k.endswith("in_proj_bias"):
            h = a.shape[0] // 3
            assert (a[h:2 * h] - b[h:2 * h]).abs().max() <= steps * lr, k
            a, b = torch.cat([a[:h], a[2 * h:]]), torch.cat([b[:h], b[2 * h:]])
        elif k.endswith("k_proj.bias"):
            assert (a - b).abs().max() <= steps * lr, k
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")

"""MMC4-Pair (paper Sec. 4.1): every MMC4 image kept by the rules becomes one pair with its matched sentence."""

import json
import os

import webdataset as wds

from megatron_lcl.data import skips as S
from megatron_lcl.data.documents import from_wds_sample
from megatron_lcl.data.prepare import prepare
from data_helpers import NUM_IMAGE_TOKENS, jpeg_bytes, make_loader, png_bytes
from data_helpers import loader_kwargs, tokenizer_path, synthetic_mmc4  # noqa: F401 (fixtures)

DOCS = [  # (text_list, [(image_name, matched_text_index, matched_sim)])
    (["a dog runs on the beach", "the sky is blue", "a red car parked outside"],
     [("a.jpg", 2, 0.31), ("b.jpg", 0, 0.10), ("c.png", 1, 0.24)]),  # b: below 0.24; c: exactly 0.24, kept
    (["nothing matches here", "still nothing"], [("d.jpg", 0, 0.20)]),  # no image kept: no pair
    (["one sentence only", "a cat sleeps"], [("e.jpg", 1, 0.5), ("missing.jpg", 0, 0.9)]),  # missing file
]
EXPECTED = {"a.jpg": "a red car parked outside", "c.png": "the sky is blue", "e.jpg": "a cat sleeps"}


def write_fixture(root) -> str:
    os.makedirs(root / "images")
    for name in ("a.jpg", "b.jpg", "d.jpg", "e.jpg"):
        (root / "images" / name).write_bytes(jpeg_bytes(size=(24, 24)))
    (root / "images" / "c.png").write_bytes(png_bytes())
    lines = [json.dumps({"text_list": texts, "image_info": [
        {"image_name": n, "raw_url": f"http://x/{n}", "matched_text_index": i, "matched_sim": sim}
        for n, i, sim in infos]}) for texts, infos in DOCS]
    (root / "docs_00000.jsonl").write_text("\n".join(lines) + "\n")
    return str(root)


def read_prepared(out: str) -> list:
    docs = []
    for shard in sorted(os.listdir(out)):
        if shard.endswith(".tar"):
            docs += [from_wds_sample(s) for s in wds.WebDataset(os.path.join(out, shard), shardshuffle=False)]
    return docs


def test_one_pair_per_kept_image_with_its_matched_sentence(tmp_path):
    out = str(tmp_path / "pairs")
    summary = prepare("mmc4_pair", [write_fixture(tmp_path / "mmc4")], out, progress=False)
    pairs = read_prepared(out)
    got = {doc.images[0].meta["image_name"]: doc.texts for doc in pairs}
    assert got == {name: [sentence] for name, sentence in EXPECTED.items()}
    for doc in pairs:
        assert len(doc.images) == 1 and doc.images[0].matched_text_index == 0 and doc.images[0].data
        assert doc.images[0].meta["pair_of"] in {"docs_00000_0000000", "docs_00000_0000002"}
    assert (summary.docs_in, summary.docs_out, summary.images_in, summary.images_out) == (3, 3, 6, 3)
    assert summary.skips.counts == {S.LOW_SIMILARITY: 2, S.NO_USABLE_IMAGE: 1, S.MISSING_IMAGE: 1}


def test_pairs_train_like_laion_pairs(tmp_path, loader_kwargs):
    """The loader builds them as image-text pairs: each image right before or after its sentence."""
    out = str(tmp_path / "pairs")
    prepare("mmc4_pair", [write_fixture(tmp_path / "mmc4")], out, progress=False)
    loader = make_loader(out, **dict(loader_kwargs, micro_batch_size=1, shuffle_buffer=1, num_readers=1))
    batch = next(iter(loader))
    batch.validate(NUM_IMAGE_TOKENS)
    # the pairs concatenated into one window (epochs repeat: 3 pairs, then the next epoch's)
    assert batch.num_images >= 3
    keys = {origin.split(":")[1] for origin in loader.last_batch_origins[0]}
    assert keys == {"docs_00000_0000000_i0", "docs_00000_0000000_i1", "docs_00000_0000002_i0"}


def test_cli_accepts_mmc4_pair(tmp_path, capsys):
    from prepare_data import main

    main(["--format", "mmc4_pair", "--input", write_fixture(tmp_path / "mmc4"), "--output", str(tmp_path / "o"),
          "--no-progress"])
    assert "prepared mmc4_pair" in capsys.readouterr().out and len(read_prepared(str(tmp_path / "o"))) == 3

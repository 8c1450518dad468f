import json
import os

from PIL import Image

from megatron_lcl.data.synthetic import SHAPES, main, write_corpus


def read_docs(folder):
    docs = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".jsonl"):
            docs += [json.loads(line) for line in open(os.path.join(folder, name))]
    return docs


def test_deterministic_and_mmc4_shaped(tmp_path):
    write_corpus(str(tmp_path / "a"), 30, image_size=24, seed=3, docs_per_shard=10)
    write_corpus(str(tmp_path / "b"), 30, image_size=24, seed=3, docs_per_shard=10)
    write_corpus(str(tmp_path / "c"), 30, image_size=24, seed=4, docs_per_shard=10)
    a, b, c = (read_docs(tmp_path / x) for x in "abc")
    assert a == b and a != c and len(a) == 30
    for x in sorted(os.listdir(tmp_path / "a" / "images"))[:20]:
        assert (tmp_path / "a" / "images" / x).read_bytes() == (tmp_path / "b" / "images" / x).read_bytes()
    sims = []
    for doc in a:
        for info in doc["image_info"]:
            sentence = doc["text_list"][info["matched_text_index"]]
            assert info["label_name"] == SHAPES[info["label"]] and info["label_name"] in sentence
            assert info["colour"] in sentence and info["background"] in sentence
            assert Image.open(tmp_path / "a" / "images" / info["image_name"]).size == (24, 24)
            sims.append(info["matched_sim"])
    assert any(s < 0.24 for s in sims) and sum(s >= 0.24 for s in sims) > len(sims) / 2


def test_cli_writes_the_corpus(tmp_path, capsys):
    main(["--output", str(tmp_path), "--num-docs", "200", "--image-size", "64", "--seed", "1"])
    assert len(read_docs(tmp_path)) == 200 and "200 documents" in capsys.readouterr().out


def test_labeled_images_for_eval(tmp_path):
    import random

    import torch

    from megatron_lcl.data import labeled_images, preprocess_image

    write_corpus(str(tmp_path), 10, image_size=24, seed=0)
    items = labeled_images(str(tmp_path), min_similarity=0.24)
    assert items and all(it["label_name"] in it["caption"] for it in items)
    data = open(items[0]["path"], "rb").read()
    assert preprocess_image(data, 16).shape == (3, 16, 16)
    assert torch.equal(preprocess_image(data, 16, random.Random(1)), preprocess_image(data, 16, random.Random(1)))


def test_impossible_sizes_are_refused_before_anything_is_written(tmp_path, capsys):
    """--num-docs -3 "wrote -3 documents" with status 0; each count is now checked."""
    import pytest

    for flag, value in (("--num-docs", "-3"), ("--image-size", "4"), ("--docs-per-shard", "0"),
                        ("--max-images", "0"), ("--filler", "-1")):
        with pytest.raises(SystemExit) as stop:
            main(["--output", str(tmp_path / "corpus"), flag, value])
        assert stop.value.code == 2 and f"{flag} {value}: at least" in capsys.readouterr().err
    assert not (tmp_path / "corpus").exists()

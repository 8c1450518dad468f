"""prepare_data: rules applied once, bad input skipped, counted and named, never a crash."""

import json
import os

import pytest
import webdataset as wds

from data_helpers import jpeg_bytes, png_bytes
from megatron_lcl.data.documents import from_wds_sample
from megatron_lcl.data.prepare import PrepareOptions, prepare
from data_helpers import write_laion_shard
from data_helpers import synthetic_mmc4  # noqa: F401 (fixtures)


def read_prepared(folder):
    docs = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tar"):
            docs += [from_wds_sample(s) for s in wds.tarfile_samples([{"url": os.path.join(folder, name)}])]
    return docs


def image_info(name, index, sim):
    return {"image_name": name, "raw_url": "u", "matched_text_index": index, "matched_sim": sim}


def test_mmc4_bad_inputs_are_counted_and_named(tmp_path):
    src, images = tmp_path / "src", tmp_path / "src" / "images"
    images.mkdir(parents=True)
    (images / "good.jpg").write_bytes(jpeg_bytes())
    (images / "big.png").write_bytes(png_bytes(size=(900, 300)))
    (images / "corrupt.jpg").write_bytes(jpeg_bytes()[:50])  # truncated JPEG
    lines = [
        json.dumps({"text_list": ["a", "b"], "image_info": [image_info("good.jpg", 0, 0.3),
                                                            image_info("low.jpg", 1, 0.1)]}),
        "{this line is not json",
        json.dumps({"text_list": ["c"], "image_info": [image_info("missing.jpg", 0, 0.3)]}),
        json.dumps({"text_list": ["d"], "image_info": [image_info("corrupt.jpg", 0, 0.3)]}),
        json.dumps({"text_list": ["e"], "image_info": []}),
        json.dumps({"text_list": ["x" * 5000], "image_info": [image_info("good.jpg", 0, 0.3)]}),
        json.dumps({"text_list": ["f", "g"], "image_info": [image_info("big.png", 1, 0.24)]}),
    ]
    (src / "part.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    summary = prepare("mmc4", [str(src)], str(out), options=PrepareOptions(max_doc_chars=1000, max_image_side=128),
                      progress=False)

    assert (summary.docs_in, summary.docs_out) == (6, 2)
    assert (summary.images_in, summary.images_out) == (6, 2)
    assert dict(summary.skips.counts) == {
        "low_similarity_image": 1, "malformed_json": 1, "missing_image": 1, "corrupt_image": 1,
        "no_usable_image": 3, "too_large_document": 1}
    ex = summary.skips.examples
    assert ex["malformed_json"][0].startswith("part.jsonl:2")
    assert "part.jsonl:3" in ex["missing_image"][0] and "missing.jpg" in ex["missing_image"][0]
    assert "part.jsonl:4" in ex["corrupt_image"][0]
    assert "part.jsonl:6" in ex["too_large_document"][0]
    assert "too_large_document" in summary.report() and "part.jsonl:2" in summary.report()
    assert json.load(open(out / "summary.json"))["docs_out"] == 2

    docs = read_prepared(out)
    assert [d.texts for d in docs] == [["a", "b"], ["f", "g"]]
    assert [len(d.images) for d in docs] == [1, 1]  # low-similarity image dropped
    assert docs[0].images[0].data == jpeg_bytes()  # small JPEGs are kept byte for byte
    big = docs[1].images[0].data
    assert big[:2] == b"\xff\xd8"  # PNG re-encoded as JPEG, downscaled to 128 px
    from PIL import Image
    import io
    assert Image.open(io.BytesIO(big)).size == (128, 43)


def test_obelics_image_count_rule(tmp_path):
    (tmp_path / "p.jpg").write_bytes(jpeg_bytes())
    rows = [
        {"texts": ["t", None, None], "images": [None, "p.jpg", "p.jpg"]},
        {"texts": ["t"] + [None] * 7, "images": [None] + ["p.jpg"] * 7},  # 7 images > 6
        {"texts": ["only text"], "images": [None]},
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    summary = prepare("obelics", [str(tmp_path / "rows.jsonl")], str(tmp_path / "out"), progress=False)
    assert summary.docs_out == 1
    assert summary.skips.counts == {"too_many_images": 1, "no_usable_image": 1}
    (doc,) = read_prepared(tmp_path / "out")
    assert doc.order == [("text", 0), ("image", 0), ("image", 1)]


def test_laion_prepare(tmp_path):
    write_laion_shard(tmp_path / "00000.tar", 5, broken_key="000000001")
    summary = prepare("laion", [str(tmp_path / "*.tar")], str(tmp_path / "out"), progress=False)
    assert (summary.docs_in, summary.docs_out) == (4, 4) and summary.skips.counts == {"missing_image": 1}
    docs = read_prepared(tmp_path / "out")
    assert docs[0].source == "laion" and docs[0].texts == ["a photo number 0"]


def test_cli_prints_summary(tmp_path, synthetic_mmc4, capsys):
    import prepare_data

    prepare_data.main(["--format", "mmc4", "--input", synthetic_mmc4, "--output", str(tmp_path / "o"),
                       "--shard-size", "25", "--no-progress"])
    printed = capsys.readouterr().out
    assert "documents: 80 in" in printed and "low_similarity_image" in printed
    assert len([n for n in os.listdir(tmp_path / "o") if n.endswith(".tar")]) >= 3


def test_unreadable_file_is_counted_and_parallel_prepare_matches(tmp_path, synthetic_mmc4):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(synthetic_mmc4, src)
    (src / "broken.jsonl.zip").write_bytes(b"PK\x03\x04 definitely not a zip")
    serial = prepare("mmc4", [str(src)], str(tmp_path / "one"), progress=False)
    parallel = prepare("mmc4", [str(src)], str(tmp_path / "two"), progress=False, num_workers=2)
    assert serial.skips.counts["corrupt_shard"] == 1
    assert "broken.jsonl.zip" in serial.skips.examples["corrupt_shard"][0]
    assert serial.to_dict()["skipped"]["counts"] == parallel.to_dict()["skipped"]["counts"]
    assert (serial.docs_out, serial.images_out) == (parallel.docs_out, parallel.images_out)
    keys = [sorted(d.key for d in read_prepared(tmp_path / name)) for name in ("one", "two")]
    assert keys[0] == keys[1] and len(keys[0]) == serial.docs_out
    assert any(s.startswith("shard-w01-") for s in parallel.to_dict()["shards"])


@pytest.mark.parametrize("tool, fmt, expected", [
    ("prepare", "mmc4", "--input '{missing}' matches no file"),
    ("tokenizer", "mmc4", "--input '{missing}' matches no file"),
    ("tokenizer", "text", "--input '{missing}': no such file"),
    ("prepare", "obelics", "no obelics input files"),
])
def test_a_mistyped_input_is_one_line_and_status_2_before_anything_is_written(tmp_path, capsys, tool, fmt, expected):
    from megatron_lcl.data import build_tokenizer, prepare

    missing = tmp_path / "nothing_here"
    given = str(tmp_path) if expected.startswith("no ") else str(missing)  # an existing folder without inputs
    out = tmp_path / "out" / "x"
    main = prepare.main if tool == "prepare" else build_tokenizer.main
    with pytest.raises(SystemExit) as stop:
        main(["--format", fmt, "--input", given, "--output", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert expected.format(missing=missing) in err.splitlines()[-1], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()

"""Each reader on small fixtures in the sources' distributed layouts."""

import base64
import json
import os
import zipfile

import pytest

from data_helpers import jpeg_bytes, png_bytes, write_laion_shard
from megatron_lcl.data.skips import SkipCounter
from megatron_lcl.data.sources import read_laion, read_mmc4, read_obelics, read_source

MMC4_DOC = {
    "url": "https://example.com/a",
    "text_list": ["First sentence.", "A red square.", "Last sentence."],
    "image_info": [
        {"image_name": "a.jpg", "raw_url": "https://example.com/a.jpg", "matched_text_index": 1, "matched_sim": 0.31},
        {"image_name": "b.jpg", "raw_url": "https://example.com/b.jpg", "matched_text_index": 0, "matched_sim": 0.2},
    ],
}


def write_mmc4(folder, docs, name="docs.jsonl"):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        for d in docs:
            f.write((d if isinstance(d, str) else json.dumps(d)) + "\n")
    return path


def test_mmc4_jsonl(tmp_path):
    path = write_mmc4(tmp_path, [MMC4_DOC, MMC4_DOC])
    skips = SkipCounter()
    docs = list(read_mmc4(path, str(tmp_path / "imgs"), skips))
    assert len(docs) == 2 and not skips
    d = docs[0]
    assert d.source == "mmc4" and d.texts == MMC4_DOC["text_list"]
    assert [i.matched_text_index for i in d.images] == [1, 0]
    assert [i.matched_sim for i in d.images] == [0.31, 0.2]
    assert d.images[0].path == os.path.join(str(tmp_path / "imgs"), "a.jpg")
    assert d.images[0].meta["raw_url"] == "https://example.com/a.jpg"
    assert "." not in d.key and d.key != docs[1].key
    assert d.origin.startswith("docs.jsonl:1")


def test_mmc4_jsonl_zip_and_bad_lines(tmp_path):
    bad_index = dict(MMC4_DOC, image_info=[dict(MMC4_DOC["image_info"][0], matched_text_index=9)])
    lines = [json.dumps(MMC4_DOC), "{not json", json.dumps([1, 2]), json.dumps(bad_index)]
    path = tmp_path / "shard.jsonl.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("shard.jsonl", "\n".join(lines) + "\n")
    skips = SkipCounter()
    docs = list(read_mmc4(str(path), str(tmp_path), skips))
    assert len(docs) == 2  # the one with a bad image_info entry keeps its text, loses the image
    assert docs[1].images == []
    assert skips.counts["malformed_json"] == 2 and skips.counts["bad_sample"] == 1
    assert any("shard.jsonl.zip/shard.jsonl:2" in e for e in skips.examples["malformed_json"])


def test_obelics_jsonl_conventions(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "p.jpg").write_bytes(jpeg_bytes())
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    rows = [
        {"texts": ["Intro.", None, "Middle.", None], "images": [None, "pics/p.jpg", None, data_uri]},
        {"texts": ["x", "y"], "images": [None]},  # misaligned lists
        {"texts": ["x", None], "images": [None, "https://example.com/p.jpg"]},  # URL: not downloaded
        {"texts": ["both"], "images": ["pics/p.jpg"]},  # both set at one position
    ]
    path = tmp_path / "obelics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    skips = SkipCounter()
    docs = list(read_obelics(str(path), None, skips))
    assert len(docs) == 3
    d = docs[0]
    assert d.order == [("text", 0), ("image", 0), ("text", 1), ("image", 1)]
    assert d.texts == ["Intro.", "Middle."]
    assert d.images[0].path == os.path.join(str(tmp_path), "pics/p.jpg") and d.images[1].data == png_bytes()
    assert docs[1].images == [] and docs[2].images == []
    assert skips.counts == {"malformed_json": 1, "missing_image": 1, "bad_sample": 1}
    assert "download" in skips.examples["missing_image"][0]


def test_obelics_parquet(tmp_path):
    import pyarrow as pa  # the dev extra installs it
    import pyarrow.parquet as pq

    table = pa.table({
        "images": [[None, jpeg_bytes(), None], [png_bytes(), None]],
        "texts": [["Hello.", None, "Bye."], [None, "Caption."]],
    })
    pq.write_table(table, tmp_path / "rows.parquet")
    docs = list(read_obelics(str(tmp_path / "rows.parquet"), None, SkipCounter()))
    assert [d.order for d in docs] == [[("text", 0), ("image", 0), ("text", 1)], [("image", 0), ("text", 0)]]
    assert docs[0].images[0].data == jpeg_bytes() and docs[1].texts == ["Caption."]


def test_laion_webdataset(tmp_path):
    write_laion_shard(tmp_path / "00000.tar", 4, broken_key="000000002")
    skips = SkipCounter()
    docs = list(read_laion(str(tmp_path / "00000.tar"), skips))
    assert len(docs) == 3
    assert docs[0].texts == ["a photo number 0"] and docs[0].images[0].matched_text_index == 0
    assert docs[0].images[0].data[:2] == b"\xff\xd8" and docs[0].images[0].meta["url"] == "u0"
    assert skips.counts == {"missing_image": 1} and "00000.tar:000000002" in skips.examples["missing_image"][0]


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown source format"):
        read_source("cc3m", str(tmp_path / "x"), None, SkipCounter())

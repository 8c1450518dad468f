"""Helpers and fixtures shared by the data tests.

Not a conftest.py: tests elsewhere in the suite do `from conftest import ...`, and a second
conftest module in this folder would shadow theirs. Test modules import the fixtures they use from
here; `_once` makes the session fixtures build once per pytest session even though each importing
module registers its own copy.
"""

import io
import os

import pytest
import webdataset as wds
from PIL import Image

from megatron_lcl.config import DataConfig
from megatron_lcl.data.loader import build_loader
from megatron_lcl.data.prepare import PrepareOptions, prepare
from megatron_lcl.data.skips import SkipCounter
from megatron_lcl.data.sources import read_mmc4
from megatron_lcl.data.synthetic import write_corpus
from megatron_lcl.data.tokenizer import train_tokenizer

SEQ_LENGTH = 128
IMAGE_SIZE = 32
NUM_IMAGE_TOKENS = 8


def jpeg_bytes(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="JPEG")
    return out.getvalue()


def png_bytes(colour=(30, 200, 30), size=(20, 20)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def write_laion_shard(path, n, broken_key=None):
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            key = f"{i:09d}"
            sample = {"__key__": key, "txt": f"a photo number {i}", "json": {"url": f"u{i}", "similarity": 0.3}}
            if key != broken_key:
                sample["jpg"] = jpeg_bytes(colour=(i * 20 % 255, 0, 0))
            sink.write(sample)


_BUILT = {}


def _once(name, tmp_path_factory, build):
    key = (name, str(tmp_path_factory.getbasetemp()))
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


@pytest.fixture(scope="session")
def synthetic_mmc4(tmp_path_factory) -> str:
    def build():
        root = str(tmp_path_factory.mktemp("synthetic_mmc4"))
        write_corpus(root, num_docs=80, image_size=40, seed=0, docs_per_shard=40)
        return root
    return _once("synthetic_mmc4", tmp_path_factory, build)


@pytest.fixture(scope="session")
def tokenizer_path(synthetic_mmc4, tmp_path_factory) -> str:
    def build():
        texts = []
        for name in sorted(os.listdir(synthetic_mmc4)):
            if name.endswith(".jsonl"):
                for doc in read_mmc4(os.path.join(synthetic_mmc4, name), synthetic_mmc4, SkipCounter()):
                    texts += doc.texts
        prefix = str(tmp_path_factory.mktemp("tokenizer") / "lcl")
        return train_tokenizer(texts, prefix, vocab_size=300, character_coverage=1.0)
    return _once("tokenizer", tmp_path_factory, build)


@pytest.fixture(scope="session")
def prepared_mmc4(synthetic_mmc4, tmp_path_factory) -> str:
    def build():
        out = str(tmp_path_factory.mktemp("prepared_mmc4"))
        prepare("mmc4", [synthetic_mmc4], out, options=PrepareOptions(shard_size=10), progress=False)
        return out
    return _once("prepared_mmc4", tmp_path_factory, build)


@pytest.fixture
def loader_kwargs(tokenizer_path):
    return dict(tokenizer_path=tokenizer_path, seq_length=SEQ_LENGTH, image_size=IMAGE_SIZE,
                num_image_tokens=NUM_IMAGE_TOKENS, micro_batch_size=3, seed=7, num_workers=0,
                shuffle_buffer=16)


def make_loader(path, *, tokenizer_path, image_size, num_image_tokens, dp_rank=0, dp_size=1,
                train_transform=True, **data_fields):
    """`build_loader` from `loader_kwargs`-style keywords: the data-section ones go into a DataConfig."""
    data = DataConfig(path=[str(path)], tokenizer=tokenizer_path, **data_fields)
    return build_loader(data, image_size=image_size, num_image_tokens=num_image_tokens, dp_rank=dp_rank,
                        dp_size=dp_size, train_transform=train_transform)

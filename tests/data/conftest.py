"""Shared fixtures: a small synthetic MMC4 corpus, a tokenizer trained on it, prepared shards.

Everything is written under pytest's tmp dirs; session-scoped so the suite builds them once.
"""

import io
import os

import pytest
from PIL import Image

from megatron_lcl.data.prepare import PrepareOptions, prepare
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


@pytest.fixture(scope="session")
def synthetic_mmc4(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic_mmc4"))
    write_corpus(root, num_docs=80, image_size=40, seed=0, docs_per_shard=40)
    return root


@pytest.fixture(scope="session")
def tokenizer_path(synthetic_mmc4, tmp_path_factory) -> str:
    from megatron_lcl.data.sources import read_mmc4
    from megatron_lcl.data.skips import SkipCounter

    texts = []
    for name in sorted(os.listdir(synthetic_mmc4)):
        if name.endswith(".jsonl"):
            for doc in read_mmc4(os.path.join(synthetic_mmc4, name), synthetic_mmc4, SkipCounter()):
                texts += doc.texts
    prefix = str(tmp_path_factory.mktemp("tokenizer") / "lcl")
    return train_tokenizer(texts, prefix, vocab_size=300, character_coverage=1.0)


@pytest.fixture(scope="session")
def prepared_mmc4(synthetic_mmc4, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("prepared_mmc4"))
    prepare("mmc4", [synthetic_mmc4], out, options=PrepareOptions(shard_size=10), progress=False)
    return out


@pytest.fixture
def loader_kwargs(tokenizer_path):
    return dict(tokenizer_path=tokenizer_path, seq_length=SEQ_LENGTH, image_size=IMAGE_SIZE,
                num_image_tokens=NUM_IMAGE_TOKENS, micro_batch_size=3, seed=7, num_workers=0,
                shuffle_buffer=16)

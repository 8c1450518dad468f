"""The streaming loader: batch contract, determinism, reader split, exact resume, skip counters.
(Layout independence of the data order and DP-size changes: test_data_order.py.)"""

import itertools
import random

import pytest
import torch
import webdataset as wds

from megatron_lcl.data.documents import DocImage, Document, to_wds_sample
from megatron_lcl.data.loader import _ReaderStream
from megatron_lcl.data.tokenizer import LCLTokenizer
from megatron_lcl.data.transforms import CLIP_MEAN, decode_image, eval_transform, train_transform
from data_helpers import IMAGE_SIZE, NUM_IMAGE_TOKENS, SEQ_LENGTH, jpeg_bytes, make_loader
from data_helpers import loader_kwargs, prepared_mmc4, synthetic_mmc4, tokenizer_path  # noqa: F401 (fixtures)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("tokens", "labels", "loss_mask", "position_ids", "images", "image_sample_index",
                     "boi_positions", "image_labels"):
            assert torch.equal(getattr(x, name), getattr(y, name)), f"{name} differs"


def test_batch_contract(prepared_mmc4, loader_kwargs):
    tok = LCLTokenizer(loader_kwargs["tokenizer_path"])
    batches = take(make_loader(prepared_mmc4, **loader_kwargs), 6)
    b, s = 3, SEQ_LENGTH
    for batch in batches:
        batch.validate(NUM_IMAGE_TOKENS)
        assert batch.tokens.shape == (b, s) and batch.images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch.tokens.dtype == torch.long and batch.loss_mask.dtype == torch.float32
        assert torch.equal(batch.labels[:, :-1], batch.tokens[:, 1:])
        assert torch.equal(batch.position_ids[0], torch.arange(s))
        not_text = (batch.labels == tok.image_id) | (batch.labels == tok.eoi_id) | (batch.labels == tok.pad_id)
        assert torch.equal(batch.loss_mask, (~not_text).float())
        assert (batch.loss_mask[batch.labels == tok.boi_id] == 1).all()  # predicting <BoI> is allowed
        assert torch.equal(batch.tokens[:, 0], torch.full((b,), tok.bos_id))  # MMC4: one document per sample
        for j in range(batch.num_images):
            row, p = int(batch.image_sample_index[j]), int(batch.boi_positions[j])
            run = batch.tokens[row, p:p + NUM_IMAGE_TOKENS + 2].tolist()
            assert run == [tok.boi_id] + [tok.image_id] * NUM_IMAGE_TOKENS + [tok.eoi_id]
        assert (batch.tokens == tok.boi_id).sum() == batch.num_images
        assert batch.image_sample_index.tolist() == sorted(batch.image_sample_index.tolist())
        assert batch.image_labels.shape == (batch.num_images,)
        assert ((batch.image_labels >= 0) & (batch.image_labels < 8)).all()
    assert sum(b.num_images for b in batches) > 0


def test_deterministic_for_a_seed(prepared_mmc4, loader_kwargs):
    a = take(make_loader(prepared_mmc4, **loader_kwargs), 4)
    b = take(make_loader(prepared_mmc4, **loader_kwargs), 4)  # e.g. the other TP rank of the replica
    assert_same_batches(a, b)
    c = take(make_loader(prepared_mmc4, **dict(loader_kwargs, seed=8)), 4)
    assert not torch.equal(a[0].tokens, c[0].tokens)


@pytest.mark.parametrize("num_readers", [4, 12])  # 8 shards: split by shard, by document
def test_readers_disjoint_and_covering(prepared_mmc4, loader_kwargs, num_readers):
    def epoch0_keys(cfg, reader):
        return [raw["__key__"] for epoch, _, raw in
                itertools.takewhile(lambda x: x[0] == 0, _ReaderStream(cfg, reader).documents())]

    cfg = make_loader(prepared_mmc4, **dict(loader_kwargs, num_readers=num_readers)).cfg
    flat = [k for reader in range(num_readers) for k in epoch0_keys(cfg, reader)]
    assert len(flat) == len(set(flat)), "readers overlap"
    one = make_loader(prepared_mmc4, **dict(loader_kwargs, num_readers=1)).cfg
    assert sorted(flat) == sorted(epoch0_keys(one, 0)) and len(flat) > 60


def test_dp_ranks_get_different_documents_end_to_end(prepared_mmc4, loader_kwargs):
    origins = []
    for rank in range(2):
        loader = make_loader(prepared_mmc4, **dict(loader_kwargs, dp_rank=rank, dp_size=2))
        mine = set()
        for _ in itertools.islice(iter(loader), 5):
            mine |= {o for sample in loader.last_batch_origins for o in sample}
        origins.append(mine)
    assert origins[0] and origins[1] and not origins[0] & origins[1]


@pytest.mark.parametrize("num_workers,packing,consumed",
                         [(2, "auto", 3), (2, "auto", 4), (0, "concat", 5), (2, "pack", 3), (0, "auto", 27)])
def test_exact_resume(prepared_mmc4, loader_kwargs, num_workers, packing, consumed):
    kwargs = dict(loader_kwargs, num_workers=num_workers, packing=packing)
    uninterrupted = take(make_loader(prepared_mmc4, **kwargs), consumed + 8)
    first = make_loader(prepared_mmc4, **kwargs)
    assert_same_batches(take(first, consumed), uninterrupted[:consumed])
    state = first.state_dict()
    assert first.samples_consumed == sum(r["samples"] for r in state["readers"].values()) == consumed * 3
    resumed = make_loader(prepared_mmc4, **kwargs)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 4), uninterrupted[consumed:consumed + 4])
    again = make_loader(prepared_mmc4, **kwargs)  # resuming a resumed run
    again.load_state_dict(resumed.state_dict())
    assert_same_batches(take(again, 4), uninterrupted[consumed + 4:])
    # (0, "auto", 27): ~70 documents per epoch, 27 batches of 3 resume across an epoch boundary.


def test_state_from_other_settings_is_refused(prepared_mmc4, loader_kwargs):
    loader = make_loader(prepared_mmc4, **loader_kwargs)
    take(loader, 1)
    for field, value in (("num_readers", 4), ("seed", 8), ("seq_length", 64), ("packing", "concat")):
        other = make_loader(prepared_mmc4, **dict(loader_kwargs, **{field: value}))
        with pytest.raises(ValueError, match=f"{field}: saved .*, now {value!r}"):
            other.load_state_dict(loader.state_dict())
    older = dict(loader.state_dict(), version=1)  # a position per DP rank and worker: not continued
    with pytest.raises(ValueError, match="version 1"):
        make_loader(prepared_mmc4, **loader_kwargs).load_state_dict(older)


def test_bad_samples_in_shards_are_counted_and_named(tmp_path, loader_kwargs):
    def doc(key, data):
        image = DocImage(data=data, matched_text_index=0, matched_sim=0.3, label=1)
        return Document(key, "mmc4", ["A red circle.", "More text."], [image], f"src.jsonl:{key}")

    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as sink:
        for k in range(6):
            sink.write(to_wds_sample(doc(f"good{k}", jpeg_bytes())))
        sink.write(to_wds_sample(doc("corrupt", b"\xff\xd8 not a jpeg")))
        sink.write({"__key__": "nojson", "json": b"{broken", "img0.jpg": jpeg_bytes()})
        sink.write(to_wds_sample(Document("lowsim", "mmc4", ["t"], [DocImage(data=jpeg_bytes(), matched_text_index=0,
                                                                             matched_sim=0.1)], "src:lowsim")))
    loader = make_loader(str(tmp_path), **dict(loader_kwargs, micro_batch_size=2, shuffle_buffer=0, num_readers=1))
    # 6 good documents (3 batches) per epoch; the bad ones come last in the shard, so their skips
    # arrive with the first batch of the next epoch: batch 4 carries epoch 0's, batch 7 epoch 1's.
    batches = take(loader, 7)
    assert all(b.num_images == 2 for b in batches)
    counts = loader.skip_counts()
    assert counts == {"corrupt_image": 2, "bad_sample": 2, "no_usable_image": 2}, counts
    ex = loader.skips.examples
    assert ex["corrupt_image"][0].startswith("shard-000000.tar:corrupt")
    assert ex["bad_sample"][0].startswith("shard-000000.tar:nojson")
    assert ex["no_usable_image"][0] == "shard-000000.tar:lowsim"
    assert loader.state_dict()["readers"][0]["skips"]["counts"] == counts


def test_transforms():
    img = decode_image(jpeg_bytes(size=(80, 50)), 32)
    a = train_transform(img, 32, random.Random(0))
    b = train_transform(img, 32, random.Random(0))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    grey = decode_image(jpeg_bytes(colour=(int(CLIP_MEAN[0] * 255),) * 3, size=(64, 64)), 32)
    e = eval_transform(grey, 16)
    assert e.shape == (3, 16, 16) and e[0].abs().max() < 0.05  # mean colour normalises to ~0


def test_obelics_and_laion_end_to_end(tmp_path, loader_kwargs):
    import base64
    import json

    from data_helpers import write_laion_shard
    from megatron_lcl.data.prepare import prepare

    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes()).decode()
    rng = random.Random(0)
    words = ["red", "circle", "on", "a", "striped", "background"]
    rows = []
    for _ in range(30):  # text, image, text, image, ...: 1..4 images per document
        texts, images = [], []
        for _ in range(rng.randint(1, 4)):
            texts += [" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))), None]
            images += [None, uri]
        rows.append({"texts": texts, "images": images})
    (tmp_path / "obelics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    write_laion_shard(tmp_path / "00000.tar", 40)
    tok = LCLTokenizer(loader_kwargs["tokenizer_path"])
    for source, inputs in (("obelics", [str(tmp_path / "obelics.jsonl")]), ("laion", [str(tmp_path / "00000.tar")])):
        out = str(tmp_path / f"prepared_{source}")
        prepare(source, inputs, out, progress=False)
        loader = make_loader(out, **loader_kwargs)
        batches = take(loader, 5)
        for batch in batches:
            batch.validate(NUM_IMAGE_TOKENS)
            assert (batch.tokens == tok.boi_id).sum() == batch.num_images == (batch.tokens == tok.eoi_id).sum()
            assert batch.image_labels is None
        pad_fraction = sum(float((b.tokens == tok.pad_id).float().mean()) for b in batches) / len(batches)
        assert pad_fraction < 0.25, f"{source}: concatenated windows should be mostly full ({pad_fraction})"
        assert sum(b.num_images for b in batches) >= 5
        assert not loader.skip_counts()


def test_unusable_data_fails_loudly_instead_of_spinning(tmp_path, loader_kwargs):
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as sink:
        sink.write({"__key__": "nojson", "json": b"{broken"})
    with pytest.raises(RuntimeError, match="no usable document"):
        take(make_loader(str(tmp_path), **dict(loader_kwargs, num_readers=1)), 1)
    one = tmp_path / "one"
    one.mkdir()
    with wds.TarWriter(str(one / "shard-000000.tar")) as sink:  # 1 good document: 7 of 8 readers get none
        sink.write(to_wds_sample(Document("good", "mmc4", ["A red circle."], [
            DocImage(data=jpeg_bytes(), matched_text_index=0, matched_sim=0.3)], "src:good")))
    with pytest.raises(RuntimeError, match="reader 1 of 8 got no documents from 1 shard.*data.num_readers"):
        take(make_loader(str(one), **dict(loader_kwargs, micro_batch_size=2)), 1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_leaves_the_global_rng_alone(prepared_mmc4, loader_kwargs, num_workers):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    take(make_loader(prepared_mmc4, **dict(loader_kwargs, num_workers=num_workers)), 2)
    assert torch.equal(torch.rand(3), expected)


def test_loader_workers_outlive_a_job_wide_stop_signal(prepared_mmc4, loader_kwargs):
    """torchrun and slurm signal every process of the job: SIGTERM/SIGUSR1 to the DataLoader workers
    must not kill them before the rank's last step and save (the rank stops them when it closes)."""
    import os
    import signal

    import psutil

    from multiprocessing import resource_tracker

    # Not the workers: what earlier tests in this pytest process started, such as the resource tracker
    # that megatron_lcl.stop_signals starts (signalling it here would be the test's fault, not the loader's).
    me = psutil.Process(os.getpid())
    before = {p.pid for p in me.children()}
    loader = make_loader(prepared_mmc4, **dict(loader_kwargs, num_workers=2))
    stream = iter(loader)
    first = next(stream)
    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    workers = [p for p in me.children() if p.pid not in before and p.pid != tracker]
    assert len(workers) == 2, [(p.pid, p.name()) for p in workers]
    for w in workers:
        w.send_signal(signal.SIGTERM)
        w.send_signal(signal.SIGUSR1)
    more = [next(stream) for _ in range(3)]  # the workers still serve batches
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert first.tokens.shape == more[-1].tokens.shape
    stream.close()


LABEL_FIELDS = ("tokens", "labels", "loss_mask", "position_ids", "image_sample_index", "boi_positions",
                "image_has_context", "con_index", "image_labels")


def labels_only_loader(path, *, tokenizer_path, image_size, num_image_tokens, **data_fields):
    """The last pipeline stage's loader (`build_loader(labels_only=True)`) from `loader_kwargs`-style keywords."""
    from megatron_lcl.config import DataConfig
    from megatron_lcl.data.loader import build_loader

    return build_loader(DataConfig(path=[str(path)], tokenizer=tokenizer_path, **data_fields), image_size=image_size,
                        num_image_tokens=num_image_tokens, labels_only=True)


def test_labels_only_loader_gives_the_full_loaders_batches_without_decoding(prepared_mmc4, loader_kwargs,
                                                                             monkeypatch):
    """What the last pipeline stage reads: the full loader's text fields and image metadata, batch by batch
    in the same order (also with worker processes, and resumed from the full loader's state), with
    `images=None` and no image decoded."""
    from megatron_lcl.data import loader as loader_module

    full_loader = make_loader(prepared_mmc4, **loader_kwargs)
    full = take(full_loader, 8)
    state_after_3 = make_loader_state(prepared_mmc4, loader_kwargs, batches=3)
    decoded = []
    monkeypatch.setattr(loader_module, "decode_image", lambda *args: decoded.append(args) or decode_image(*args))
    labels = labels_only_loader(prepared_mmc4, **loader_kwargs)
    got = take(labels, 8)
    assert decoded == [] and all(b.images is None for b in got)
    assert sum(b.num_images for b in got) == sum(b.num_images for b in full) > 0
    with_workers = take(labels_only_loader(prepared_mmc4, **dict(loader_kwargs, num_workers=2)), 8)
    resumed = labels_only_loader(prepared_mmc4, **loader_kwargs)
    resumed.load_state_dict(state_after_3)
    for name, batches in (("labels-only", got), ("labels-only, 2 workers", with_workers),
                          ("labels-only, resumed after 3", [None] * 3 + take(resumed, 5))):
        for k, (x, y) in enumerate(zip(full, batches)):
            if y is None:
                continue
            y.validate(NUM_IMAGE_TOKENS)
            assert x.num_text_targets == y.num_text_targets and x.num_con_images == y.num_con_images
            for field in LABEL_FIELDS:
                assert torch.equal(getattr(x, field), getattr(y, field)), f"{name}: batch {k} {field} differs"
    assert labels.slots_consumed == full_loader.slots_consumed  # what the trainer compares across stages
    assert decoded == []  # (in this process: the resumed one too)


def make_loader_state(path, kwargs, batches: int) -> dict:
    loader = make_loader(path, **kwargs)
    take(loader, batches)
    return loader.state_dict()


def test_an_image_that_fails_to_decode_puts_the_labels_only_loader_behind(tmp_path, loader_kwargs):
    """The one case the two loaders part: the full loader drops a sample whose image does not decode, the
    labels-only one cannot see it. `slots_consumed` then differs, which the trainer turns into one error."""
    def doc(key, data):
        image = DocImage(data=data, matched_text_index=0, matched_sim=0.3, label=1)
        return Document(key, "mmc4", [f"A red circle, {key}.", "More text."], [image], f"src.jsonl:{key}")

    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as sink:
        for k in range(3):
            sink.write(to_wds_sample(doc(f"good{k}", jpeg_bytes())))
        sink.write(to_wds_sample(doc("corrupt", b"\xff\xd8 not a jpeg")))
        sink.write(to_wds_sample(doc("good3", jpeg_bytes())))
    kwargs = dict(loader_kwargs, micro_batch_size=4, shuffle_buffer=0, num_readers=1)
    full, labels = make_loader(str(tmp_path), **kwargs), labels_only_loader(str(tmp_path), **kwargs)
    full_batch, label_batch = take(full, 1)[0], take(labels, 1)[0]
    assert full.skip_counts() == {"corrupt_image": 1} and not labels.skip_counts()
    assert not torch.equal(full_batch.tokens, label_batch.tokens)
    assert full.slots_consumed == labels.slots_consumed + 1

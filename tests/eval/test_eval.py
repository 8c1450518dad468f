"""Transfer evaluation: probe accuracy on separable vs random labels, exact retrieval metrics, frozen
transfer leaves the encoder bitwise unchanged, the CLIs on a tiny checkpoint and a HF CLIPVisionModel
folder, and the data sources (the loss-ablation script: tests/test_ablation.py)."""

import io
import json
import pathlib
import random
import tarfile

import pytest
import torch

from megatron_lcl.eval.classify import ProbeConfig, run_classification, topk_accuracy_pct
from megatron_lcl.eval.datasets import CaptionedImages, LabeledImages
from megatron_lcl.eval.encoders import VisionEncoder, load_encoder, weights_fingerprint
from megatron_lcl.eval.karpathy import as_test_set
from megatron_lcl.eval.retrieve import RetrievalConfig, recall_at_k, run_retrieval
from megatron_lcl.eval.sources import ImageSet, SubsetSource, labeled_source, pair_source

from common import tiny_model_config
from eval_fixtures import EIGHT_CAPTIONS, png, write_caption_pairs

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLOURS = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (235, 210, 40)]


def colour_set(n: int, seed: int, random_labels: bool = False) -> ImageSet:
    rng = random.Random(seed)
    classes = [rng.randrange(len(COLOURS)) for _ in range(n)]
    images = [png(COLOURS[c], rng=rng) for c in classes]
    labels = [rng.randrange(len(COLOURS)) for _ in range(n)] if random_labels else classes
    return ImageSet(images, [f"img{i}" for i in range(n)], labels=labels,
                    class_names=[str(c) for c in COLOURS])


def patch_encoder(seed: int = 0) -> VisionEncoder:
    """A fixed random feature extractor: 4x4 patches -> 32 features, [n, 16, 32] 'latents'."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, 32, kernel_size=4, stride=4)
    return VisionEncoder(conv, lambda m, x: m(x).flatten(2).transpose(1, 2), 32, 16, "patches", "test")


# ------------------------------------------------------------------------------------------ metrics

def test_recall_exact_on_hand_built_matrices():
    sim = torch.tensor([[0.9, 0.1, 0.8],
                        [0.2, 0.5, 0.7],
                        [0.3, 0.4, 0.1]])
    r = recall_at_k(sim, torch.arange(3), ks=(1, 2, 3))
    # image ranks of their captions: 0, 1 (0.7 > 0.5), 2; caption ranks of their images: 0, 0, 2
    assert r == pytest.approx({"TR@1": 100 / 3, "TR@2": 200 / 3, "TR@3": 100.0,
                               "IR@1": 200 / 3, "IR@2": 200 / 3, "IR@3": 100.0})
    assert recall_at_k(torch.eye(5), torch.arange(5)) == {k: 100.0 for k in
                                                          ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10")}
    # ties count against the model: a collapsed encoder (all similarities equal) gets R@k = 0 for k < n
    flat = recall_at_k(torch.ones(4, 4), torch.arange(4), ks=(1, 3, 4))
    assert flat == {"TR@1": 0.0, "TR@3": 0.0, "TR@4": 100.0, "IR@1": 0.0, "IR@3": 0.0, "IR@4": 100.0}
    # COCO-style: several captions per image; an image is a hit if any of its captions is in its top k
    sim = torch.tensor([[0.1, 0.9, 0.5],
                        [0.8, 0.3, 0.2]])
    r = recall_at_k(sim, torch.tensor([0, 0, 1]), ks=(1, 2))
    # image 0: caption 1 first -> hit@1; image 1: its caption 2 (0.2) below 0.8, 0.3 -> rank 2, miss@2
    # captions: 0 (img0 0.1 < img1 0.8) rank 1; 1 rank 0; 2 (img1 0.2 < img0 0.5) rank 1
    assert r == pytest.approx({"TR@1": 50.0, "TR@2": 50.0, "IR@1": 100 / 3, "IR@2": 100.0})


def test_topk_accuracy():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    labels = torch.tensor([0, 2, 0, 2])
    assert topk_accuracy_pct(logits, labels, 1) == 25.0
    assert topk_accuracy_pct(logits, labels, 2) == 50.0
    assert topk_accuracy_pct(logits, labels, 5) == 100.0  # k capped at the class count


# ------------------------------------------------------------------------------------------ probe

def test_probe_separates_colours_but_not_random_labels():
    encoder = patch_encoder()
    cfg = ProbeConfig(epochs=15, batch_size=32, lr=3e-3)
    before = weights_fingerprint(encoder)
    separable = run_classification(encoder, colour_set(240, 1), colour_set(120, 2), cfg)
    noise = run_classification(encoder, colour_set(240, 1, random_labels=True),
                               colour_set(120, 2, random_labels=True), cfg)
    assert separable["accuracy_pct"]["acc-1"] >= 95.0, separable["accuracy_pct"]
    assert noise["accuracy_pct"]["acc-1"] <= 45.0, noise["accuracy_pct"]  # chance: 25
    assert separable["encoder_unchanged"] and weights_fingerprint(encoder) == before


def test_retrieval_learns_colour_captions():
    rng = random.Random(3)
    names = ["red", "green", "blue", "yellow"]

    def pairs(classes):
        return ImageSet([png(COLOURS[c], rng=rng) for c in classes], [str(i) for i in range(len(classes))],
                        captions=[f"a {names[c]} square" for c in classes])

    # held out: one image per colour, so the captions are distinct and R@1 is well defined
    result = run_retrieval(patch_encoder(), pairs([rng.randrange(4) for _ in range(200)]),
                           [as_test_set(pairs([0, 1, 2, 3]), "held-out")],
                           RetrievalConfig(epochs=8, batch_size=32, embed_dim=32, text_width=32, text_layers=1))
    assert result["recall_pct"]["TR@1"] == result["recall_pct"]["IR@1"] == 100.0, result["recall_pct"]
    assert result["encoder_unchanged"]


# ------------------------------------------------------------------------------------------ megatron_lcl / HF

CFG = tiny_model_config()


@pytest.fixture(scope="module")
def tiny_checkpoint(single_rank, tmp_path_factory):
    from megatron_lcl.config import ParallelConfig
    from megatron_lcl.checkpoint import save_weights
    from megatron_lcl.models.lcl_model import LCLModel
    from megatron_lcl.runtime import set_seed
    from megatron_lcl.config import LCLConfig

    set_seed(7)
    model = LCLModel(CFG, ParallelConfig())
    return save_weights(model, LCLConfig(model=CFG), str(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(scope="module")
def hf_clip_dir(tiny_checkpoint, tmp_path_factory):
    from megatron_lcl.hf.convert import build_hf_models
    from megatron_lcl.checkpoint import full_state_dict, load_pretrained

    lcl = load_pretrained(tiny_checkpoint)
    state = full_state_dict(lcl.model)
    clip, _ = build_hf_models(state, CFG.vision, CFG.lm, state["lm.embedding.word_embeddings.weight"].shape[0])
    out = tmp_path_factory.mktemp("hf") / "vision"
    clip.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def exported(single_rank, tmp_path_factory):
    """A tiny checkpoint whose config names a sentencepiece tokenizer, exported by convert_to_hf."""
    from dataclasses import replace

    from megatron_lcl.checkpoint import save_weights
    from megatron_lcl.config import LCLConfig, ParallelConfig
    from megatron_lcl.data.tokenizer import train_tokenizer
    from megatron_lcl.hf.export import export_to_hf
    from megatron_lcl.models.lcl_model import LCLModel
    from megatron_lcl.runtime import set_seed

    root = tmp_path_factory.mktemp("export")
    sp = train_tokenizer(list(EIGHT_CAPTIONS.values()) * 20, str(root / "sp"), 64)
    cfg = LCLConfig(model=CFG)
    cfg = replace(cfg, data=replace(cfg.data, tokenizer=sp))
    set_seed(7)
    checkpoint = save_weights(LCLModel(CFG, ParallelConfig()), cfg, str(root / "checkpoint"))
    export_to_hf(checkpoint, str(root / "hf"), log=lambda *a: None)
    return root, sp


def test_caption_transfer_from_a_convert_to_hf_export(exported, tmp_path, capsys):
    """The documented command with the exported LM (`--lm OUT/lm`): lm/ is a complete HF folder (its
    tokenizer gives sentencepiece's ids, the config its EOS) and the captions are not empty."""
    from transformers import AutoConfig, AutoTokenizer

    from megatron_lcl.data.tokenizer import LCLTokenizer
    from megatron_lcl.eval import caption

    root, sp = exported
    ours, theirs = LCLTokenizer(sp), AutoTokenizer.from_pretrained(str(root / "hf" / "lm"))
    text = "a red square at night"
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    config = AutoConfig.from_pretrained(str(root / "hf" / "lm"))
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (ours.pad_id, ours.bos_id, ours.eos_id)
    pairs = write_caption_pairs(tmp_path)
    result = caption.run_command_line(["--encoder", str(root / "hf"), "--lm", str(root / "hf" / "lm"), "--data", str(pairs),
                           "--eval-data", str(pairs), "--steps", "40", "--batch-size", "8", "--lr", "3e-3",
                           "--num-workers", "0", "--metric-tokenizer", "python",
                           "--output", str(tmp_path / "cap.json")])
    predictions = json.loads((tmp_path / "cap.predictions.pairs.json").read_text())
    assert len(predictions) == 8 and all(p["caption"].strip() for p in predictions), predictions
    assert predictions[0]["image_id"] == str(tmp_path / "img" / "red.png")  # pairs sets: the image's file
    assert result["scores_by_set"][str(pairs)]["CIDEr"] > 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron_lcl.data.synthetic import write_corpus

    root = tmp_path_factory.mktemp("eval_corpus")
    write_corpus(str(root), num_docs=16, image_size=16, seed=3)
    return str(root)


def test_both_encoder_kinds_give_the_same_latents(tiny_checkpoint, hf_clip_dir):
    ours, theirs = load_encoder(tiny_checkpoint), load_encoder(hf_clip_dir)
    assert (ours.kind, theirs.kind) == ("megatron_lcl", "hf_clip")
    assert (ours.hidden_size, ours.image_size) == (theirs.hidden_size, theirs.image_size) == (32, 16)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        a, b = ours(images), theirs(images)
    assert a.shape == (3, CFG.vision.num_image_tokens, 32)
    assert (a - b).abs().max().item() <= 1e-4


def test_frozen_leaves_encoder_bitwise_unchanged_and_full_trains_it(tiny_checkpoint, corpus):
    encoder = load_encoder(tiny_checkpoint)
    with torch.no_grad():  # make layer-scale non-trivial: the ViT blocks then matter
        for name, p in encoder.named_parameters():
            if name.endswith("layer_scale"):
                p.fill_(0.5)
    before = {k: v.clone() for k, v in encoder.state_dict().items() if torch.is_tensor(v)}  # no _extra_state
    images = labeled_source(corpus)
    train_set = SubsetSource(images, range(0, len(images) - 16))
    eval_set = SubsetSource(images, range(len(images) - 16, len(images)))
    frozen = run_classification(encoder, train_set, eval_set, ProbeConfig(epochs=2, batch_size=16))
    assert frozen["encoder_unchanged"]
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    full = run_classification(encoder, train_set, eval_set,
                              ProbeConfig(mode="full", epochs=1, batch_size=16, encoder_lr=1e-3))
    assert not full["encoder_unchanged"]
    assert any(not torch.equal(before[k], encoder.state_dict()[k]) for k in before)


@pytest.mark.parametrize("kind", ["checkpoint", "hf"])
def test_clis_run_on_checkpoint_and_hf_folder(kind, tiny_checkpoint, hf_clip_dir, corpus, tmp_path, capsys):
    from megatron_lcl.eval import classify, retrieve

    encoder = tiny_checkpoint if kind == "checkpoint" else hf_clip_dir
    cls = classify.run_command_line(["--encoder", encoder, "--data", corpus, "--epochs", "1", "--batch-size", "16",
                         "--output", str(tmp_path / "cls.json")])
    ret = retrieve.run_command_line(["--encoder", encoder, "--data", corpus, "--epochs", "1", "--batch-size", "16",
                         "--output", str(tmp_path / "ret.json")])
    printed = capsys.readouterr().out
    assert "classification" in printed and "acc-1" in printed and "TR@1" in printed and "IR@10" in printed
    saved_cls, saved_ret = (json.loads((tmp_path / n).read_text()) for n in ("cls.json", "ret.json"))
    assert saved_cls["accuracy_pct"] == cls["accuracy_pct"] and saved_cls["encoder_unchanged"]
    assert set(saved_ret["recall_pct"]) == {"TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10"}
    assert saved_ret["recall_pct"] == ret["recall_pct"] and saved_ret["num_eval"] > 0
    assert saved_cls["encoder_kind"] == ("megatron_lcl" if kind == "checkpoint" else "hf_clip")
    top1 = classify.linear_probe_accuracy(encoder, corpus, epochs=1, batch_size=16)  # the sweep tool's entry point
    assert top1 == pytest.approx(cls["accuracy_pct"]["acc-1"] / 100)


# ------------------------------------------------------------------------------------------ data sources

def test_image_folder_webdataset_and_jsonl_sources(tmp_path):
    rng = random.Random(0)
    for name, colour in (("blue", COLOURS[2]), ("red", COLOURS[0])):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "folder" / name / f"{i}.png").write_bytes(png(colour, rng=rng))
    images = labeled_source(str(tmp_path / "folder"))
    assert images.class_names == ["blue", "red"] and images.labels.tolist() == [0, 0, 0, 1, 1, 1]

    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:
        for i in range(4):
            for ext, data in (("png", png(COLOURS[i % 2], rng=rng)), ("cls", str(i % 2).encode()),
                              ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shards = labeled_source(str(tmp_path))
    assert shards.labels.tolist() == [0, 1, 0, 1] and [LabeledImages(shards, 16)[i][0].shape for i in (0, 3)] == \
        [(3, 16, 16)] * 2
    tar_pairs = pair_source(str(tmp_path / "shard-000000.tar"))
    assert [tar_pairs.caption(i) for i in range(4)] == [f"caption {i}" for i in range(4)]

    (tmp_path / "pairs.jsonl").write_text("".join(
        json.dumps({"image": f"folder/red/{i}.png", "caption": f"red {i}"}) + "\n" for i in range(3)))
    pairs = pair_source(str(tmp_path / "pairs.jsonl"))
    assert [pairs.caption(i) for i in range(3)] == ["red 0", "red 1", "red 2"]
    assert CaptionedImages(pairs, 8)[2][0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="nothing_here: no such file or directory"):
        labeled_source(str(tmp_path / "nothing_here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: not a synthetic corpus"):
        labeled_source(str(tmp_path / "empty"))


def test_scenes_probe_fields_are_the_documents_labels(tmp_path):
    """Any categorical image_info field of a synthetic corpus is a probe task (the ablation's count and
    colour_b); the labels are the ones the documents record; an unknown field names the valid ones."""
    from megatron_lcl.data import labeled_images
    from megatron_lcl.data.synthetic import write_corpus

    write_corpus(str(tmp_path), num_docs=6, image_size=16, seed=5, kind="scenes")
    items = labeled_images(str(tmp_path))
    for field in ("count", "colour_b"):
        images = labeled_source(str(tmp_path), field)
        assert [images.class_names[k] for k in images.labels] == [it[field] for it in items]
    assert set(labeled_source(str(tmp_path), "count").class_names) <= {"one", "two"}
    with pytest.raises(ValueError, match="must be label or one of its categorical image_info fields: .*colour_b"):
        labeled_source(str(tmp_path), "held_out")  # a bool, not a class


def test_transfer_command_bad_paths_are_one_line_and_status_2(tmp_path, capsys):
    """`python -m megatron_lcl.eval.transfer` (every scaling sweep's eval_command) ends on a mistyped
    path like the other evaluation commands: one line naming the flag, status 2, no traceback."""
    from megatron_lcl.eval import transfer

    out = str(tmp_path / "eval.json")
    assert transfer.main(["--encoder", str(tmp_path), "--data", str(tmp_path / "corpus"), "--output", out]) == 2
    assert capsys.readouterr().err == f"error: --data {tmp_path / 'corpus'}: no such file or directory\n"
    assert transfer.main(["--encoder", str(tmp_path / "ckpt"), "--data", str(tmp_path), "--output", out]) == 2
    assert capsys.readouterr().err == f"error: --encoder {tmp_path / 'ckpt'}: no such file or directory\n"

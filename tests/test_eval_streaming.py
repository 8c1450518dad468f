"""Transfer evaluation at scale: streaming sources (lazy, deterministic, bad input counted and named),
the Karpathy 5-caption protocol, the data-parallel engine (2 ranks == 1 rank on the same global
batches, resume == no resume), and the stream CLIs."""

import json

import pytest
import torch

from eval_fixtures import (assert_same_weights, colour_caption_samples, patch_encoder, write_image_folder,
                           write_karpathy, write_shard)
from megatron_lcl.eval import classify, retrieve
from megatron_lcl.eval.engine import GlobalBatches, Runtime, loader
from megatron_lcl.eval.karpathy import load_captioned_test_set, load_karpathy
from megatron_lcl.eval.retrieve import recall_at_k
from megatron_lcl.eval.streaming import LabeledImages, labeled_source, pair_source
from multirank import run_torchrun


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_stream")
    write_image_folder(root / "folder" / "train", 12, 1, corrupt=True, empty_class=True)
    write_image_folder(root / "folder" / "val", 4, 2)
    (root / "shards").mkdir()
    write_shard(root / "shards" / "pairs-000.tar", colour_caption_samples(24, 1))
    write_shard(root / "shards" / "pairs-001.tar", colour_caption_samples(24, 2) + [{"txt": b"no image"}])
    write_karpathy(root / "coco", with_problems=True)
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     image_size=16, patch_size=8)).save_pretrained(str(root / "hf_vision"))
    return root


# ------------------------------------------------------------------------------------------ metrics

def test_recall_five_captions_per_image_by_hand():
    """2 images x 5 captions each (captions 0-4 -> image 0, 5-9 -> image 1)."""
    sim = torch.tensor([[.1, .2, .3, .4, .9, .8, .0, .0, .0, .0],   # image 0: best own caption .9 is first
                        [.5, .5, .5, .5, .5, .4, .3, .2, .1, .45]])  # image 1: best own .45 < five .5s
    text_to_image = torch.arange(10) // 5
    r = recall_at_k(sim, text_to_image, ks=(1, 5, 6))
    # TR: image 0 rank 0 (hit@1); image 1: own best .45, five wrong captions score .5 -> rank 5 (hit@6 only)
    # IR per caption (2 images): c0-3 own .1-.4 < .5 -> rank 1; c4 .9 > .5 -> 0; c5 .4 > .8? no: own .4 <
    # image 0's .8 -> rank 1; c6-8 own .3/.2/.1 > 0 -> rank 0; c9 .45 > 0 -> rank 0.  IR@1 = 5/10
    assert r["TR@1"] == 50.0 and r["TR@5"] == 50.0 and r["TR@6"] == 100.0
    assert r["IR@1"] == pytest.approx(50.0) and r["IR@5"] == 100.0


def test_karpathy_json_five_captions_and_problems_named(fixtures):
    test = load_karpathy(str(fixtures / "coco" / "dataset_coco.json"))
    assert len(test) == 4 and len(test.captions) == 20
    assert test.text_to_image.tolist() == [i for i in range(4) for _ in range(5)]
    assert test.references(1)[0] == "A green square."
    named = " | ".join(test.problems.named)
    assert test.problems.count == 2 and "no captions" in named and "missing.png: missing file" in named
    assert len(load_karpathy(str(fixtures / "coco" / "dataset_coco.json"), split="train")) == 1
    coco = {"images": [{"id": 7, "file_name": "val2014/COCO_val2014_000000000000.png"}],
            "annotations": [{"image_id": 7, "caption": c} for c in ("red", "a red one")]}
    (fixtures / "coco" / "nocaps_val.json").write_text(json.dumps(coco))
    nocaps = load_captioned_test_set(str(fixtures / "coco" / "nocaps_val.json"))
    assert len(nocaps) == 1 and nocaps.references(0) == ["red", "a red one"]


# ------------------------------------------------------------------------------------------ streaming data

def test_sources_are_lazy_and_count_bad_input(fixtures):
    folder = labeled_source(str(fixtures / "folder" / "train"))
    assert folder.class_names == ["blue", "green", "red", "yellow", "zz_empty"] and len(folder) == 49
    assert folder.files.dtype.kind == "S" and folder.files.nbytes < 49 * 40  # names only, no image bytes
    assert folder.problems.named == [f"{fixtures}/folder/train/zz_empty: class folder with no images"]
    items = LabeledImages(folder, 16)
    bad = [items[i] for i in range(len(folder)) if not isinstance(items[i], tuple)]
    assert len(bad) == 1 and bad[0].origin.endswith("red/broken.png") and "cannot decode" in bad[0].reason
    shards = pair_source(str(fixtures / "shards"))
    assert len(shards) == 48 and shards.caption(0).startswith("a ") and shards.problems.count == 1
    assert "pairs-001.tar:s000024: no image member" in shards.problems.named[0]


def test_global_batches_deterministic_and_split_over_ranks(fixtures):
    folder = labeled_source(str(fixtures / "folder" / "train"))
    data = LabeledImages(folder, 16)
    one = [b["index"].tolist() + [x.origin for x in b["bad"]] for b in
           loader(data, GlobalBatches(len(data), 8, Runtime(), seed=3, epoch=1), num_workers=2)]
    again = [b["index"].tolist() + [x.origin for x in b["bad"]] for b in
             loader(data, GlobalBatches(len(data), 8, Runtime(), seed=3, epoch=1), num_workers=0)]
    assert one == again and len(one) == 6  # 49 // 8, workers or not
    other_epoch = list(GlobalBatches(len(data), 8, Runtime(), seed=3, epoch=2))
    assert other_epoch != list(GlobalBatches(len(data), 8, Runtime(), seed=3, epoch=1))
    ranks = [list(GlobalBatches(len(data), 8, Runtime(rank=r, world=2), seed=3, epoch=1)) for r in (0, 1)]
    whole = list(GlobalBatches(len(data), 8, Runtime(), seed=3, epoch=1))
    assert [a + b for a, b in zip(*ranks)] == whole
    assert list(GlobalBatches(len(data), 8, Runtime(), seed=3, epoch=1, start=4)) == whole[4:]


# ------------------------------------------------------------------------------------------ engine

def test_probe_resume_equals_no_resume(fixtures, tmp_path):
    train = labeled_source(str(fixtures / "folder" / "train"))
    val = labeled_source(str(fixtures / "folder" / "val"))

    def run(steps, ckpt):
        cfg = classify.ProbeConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, num_workers=0,
                                   save_every_steps=3)
        r = classify.run_classification_streaming(patch_encoder(), train, val, cfg, Runtime(), ckpt)
        return r.pop("_model").trainable_state(), r

    straight, _ = run(8, None)
    ckpt = str(tmp_path / "probe.pt")
    run(8, ckpt)  # saves at steps 3 and 6, then 8
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 8 and state["bad"]["count"] == 1
    state["step"] = 3  # pretend the run died after step 3: rerun from the step-3 weights
    torch.save(dict(state, **_step3(tmp_path, train, val)), ckpt)
    resumed, result = run(8, ckpt)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert result["bad_samples"]["train_read"]["count"] == 1


def _step3(tmp_path, train, val) -> dict:
    cfg = classify.ProbeConfig(steps=8, batch_size=8, lr=3e-3, warmup_steps=2, num_workers=0, save_every_steps=3)
    path = str(tmp_path / "partial.pt")

    class Stop(Exception):
        pass

    import megatron_lcl.eval.engine as engine
    original = engine.EvalCheckpoint.save

    def save_then_stop(self, step, *a):
        original(self, step, *a)
        raise Stop

    engine.EvalCheckpoint.save = save_then_stop
    try:
        classify.run_classification_streaming(patch_encoder(), train, val, cfg, Runtime(), path)
    except Stop:
        pass
    finally:
        engine.EvalCheckpoint.save = original
    saved = torch.load(path, weights_only=False)
    assert saved["step"] == 3
    return {"model": saved["model"], "optimizer": saved["optimizer"], "bad": saved["bad"]}


@pytest.fixture(scope="module")
def ddp_results(fixtures):
    out = run_torchrun("eval_checks.py", 2, fixtures / "ddp_out")
    return torch.load(out / "ddp.pt", weights_only=False)


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_two_rank_probe_equals_one_rank(ddp_results, fixtures, mode):
    import eval_checks

    one = eval_checks.probe_weights(str(fixtures), mode, Runtime())
    two = ddp_results[f"probe_{mode}"]
    assert ddp_results["world"] == 2
    if mode == "full":
        assert any(k.startswith("encoder.") for k in one["head"])
    assert_same_weights(two["head"], one["head"], eval_checks.PROBE["steps"], eval_checks.PROBE["lr"])
    assert two["result"]["accuracy_pct"] == pytest.approx(one["result"]["accuracy_pct"])
    assert two["result"]["bad_samples"]["train_read"]["count"] == one["result"]["bad_samples"]["train_read"]["count"]


def test_two_rank_retrieval_equals_one_rank(ddp_results, fixtures):
    import eval_checks

    one = eval_checks.retrieval_weights(str(fixtures), Runtime())
    two = ddp_results["retrieval"]
    assert_same_weights(two["head"], one["head"], eval_checks.RETRIEVAL["steps"], 1e-3)
    name = "dataset_coco.json:test"
    assert two["result"]["recall_by_set"][name] == pytest.approx(one["result"]["recall_by_set"][name])
    assert ddp_results["cli_world"] == 2


# ------------------------------------------------------------------------------------------ CLIs

def test_stream_clis_with_karpathy_test_set(fixtures, tmp_path, capsys):
    hf = str(fixtures / "hf_vision")
    cls = classify.main(["--encoder", hf, "--data", str(fixtures / "folder"), "--steps", "2", "--batch-size", "8",
                         "--num-workers", "0", "--output", str(tmp_path / "cls.json")])
    assert cls["world_size"] == 1 and cls["num_classes"] == 5  # zz_empty keeps its number
    assert json.loads((tmp_path / "cls.json").read_text())["bad_samples"]["train_index"]["count"] == 1  # zz_empty
    ret = retrieve.main(["--encoder", hf, "--data", str(fixtures / "shards" / "pairs-000.tar"),
                         str(fixtures / "shards" / "pairs-001.tar"),
                         "--eval-data", str(fixtures / "coco" / "dataset_coco.json"), "--steps", "2",
                         "--batch-size", "8", "--num-workers", "0", "--output", str(tmp_path / "ret.json")])
    printed = capsys.readouterr().out
    assert "dataset_coco.json:test" in printed and "TR@1" in printed
    saved = json.loads((tmp_path / "ret.json").read_text())
    assert saved["recall_by_set"]["dataset_coco.json:test"]["num_captions"] == 20
    assert saved["bad_samples"]["test_index"]["dataset_coco.json:test"]["count"] == 2
    assert ret["num_train"] == 48


def test_paper_presets_are_table_8():
    args = classify.parse_args(["--encoder", "e", "--data", "d", "--preset", "paper", "--lr", "2e-4"])
    assert (args.epochs, args.batch_size, args.lr, args.weight_decay, args.warmup_steps, args.adam_beta2) == \
        (90, 8192, 2e-4, 1e-4, 1500, 0.95)  # an explicit flag wins over the preset
    args = retrieve.parse_args(["--encoder", "e", "--data", "d", "--preset", "paper"])
    assert (args.steps, args.batch_size, args.lr, args.encoder_lr, args.warmup_steps) == (5000, 16384, 1e-3, 1e-5, 500)

"""Transfer evaluation at scale: streaming sources (lazy, deterministic, bad input counted and named),
the Karpathy 5-caption protocol, the data-parallel engine (2 ranks == 1 rank on the same global
batches, resume == no resume), and the stream CLIs."""

import json

import pytest
import torch

from eval_fixtures import (assert_same_weights, colour_caption_samples, patch_encoder, write_image_folder,
                           write_karpathy, write_shard)
from megatron_lcl.eval import classify, retrieve
from megatron_lcl.eval.datasets import LabeledImages
from megatron_lcl.eval.karpathy import as_test_set, load_captioned_test_set, load_karpathy
from megatron_lcl.eval.parallel import GlobalBatches, loader, one_process
from megatron_lcl.eval.retrieve import recall_at_k
from megatron_lcl.eval.sources import labeled_source, pair_source
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
           loader(data, GlobalBatches(len(data), 8, seed=3, epoch=1), num_workers=2)]
    again = [b["index"].tolist() + [x.origin for x in b["bad"]] for b in
             loader(data, GlobalBatches(len(data), 8, seed=3, epoch=1), num_workers=0)]
    assert one == again and len(one) == 6  # 49 // 8, workers or not
    other_epoch = list(GlobalBatches(len(data), 8, seed=3, epoch=2))
    assert other_epoch != list(GlobalBatches(len(data), 8, seed=3, epoch=1))
    ranks = [list(GlobalBatches(len(data), 8, seed=3, epoch=1, rank=r, world=2)) for r in (0, 1)]
    whole = list(GlobalBatches(len(data), 8, seed=3, epoch=1))
    assert [a + b for a, b in zip(*ranks)] == whole
    assert list(GlobalBatches(len(data), 8, seed=3, epoch=1, start=4)) == whole[4:]


# ------------------------------------------------------------------------------------------ engine

def test_probe_resume_equals_no_resume(fixtures, tmp_path):
    train = labeled_source(str(fixtures / "folder" / "train"))
    val = labeled_source(str(fixtures / "folder" / "val"))

    def run(steps, ckpt):
        cfg = classify.ProbeConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, num_workers=0,
                                   save_every_steps=3)
        r = classify.run_classification(patch_encoder(), train, val, cfg, one_process(), ckpt)
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
        classify.run_classification(patch_encoder(), train, val, cfg, one_process(), path)
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

    one = eval_checks.probe_weights(str(fixtures), mode, one_process())
    two = ddp_results[f"probe_{mode}"]
    assert ddp_results["world"] == 2
    if mode == "full":
        assert any(k.startswith("encoder.") for k in one["head"])
    assert_same_weights(two["head"], one["head"], eval_checks.PROBE["steps"], eval_checks.PROBE["lr"])
    assert two["result"]["accuracy_pct"] == pytest.approx(one["result"]["accuracy_pct"])
    assert two["result"]["bad_samples"]["train_read"]["count"] == one["result"]["bad_samples"]["train_read"]["count"]


def test_two_rank_retrieval_equals_one_rank(ddp_results, fixtures):
    import eval_checks

    one = eval_checks.retrieval_weights(str(fixtures), one_process())
    two = ddp_results["retrieval"]
    assert_same_weights(two["head"], one["head"], eval_checks.RETRIEVAL["steps"], 1e-3)
    name = "dataset_coco.json:test"
    assert two["result"]["recall_by_set"][name] == pytest.approx(one["result"]["recall_by_set"][name])
    assert ddp_results["cli_world"] == 2


# ------------------------------------------------------------------------------------------ CLIs

def test_stream_clis_with_karpathy_test_set(fixtures, tmp_path, capsys):
    hf = str(fixtures / "hf_vision")
    cls = classify.run_command_line(["--encoder", hf, "--data", str(fixtures / "folder"), "--steps", "2", "--batch-size", "8",
                         "--num-workers", "0", "--output", str(tmp_path / "cls.json")])
    assert cls["world_size"] == 1 and cls["num_classes"] == 5  # zz_empty keeps its number
    assert json.loads((tmp_path / "cls.json").read_text())["bad_samples"]["train_index"]["count"] == 1  # zz_empty
    ret = retrieve.run_command_line(["--encoder", hf, "--data", str(fixtures / "shards" / "pairs-000.tar"),
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


# ------------------------------------------------------------------------------------------ as a user meets it

def test_karpathy_duplicate_test_image_merged_and_counted(tmp_path):
    """A test image listed twice is one image (else it ties with itself: never an IR@1 hit), its
    captions merged, the extra listing counted as "duplicate image"; the same for a pairs .jsonl."""
    path = write_karpathy(tmp_path)
    data = json.loads(path.read_text())
    data["images"].append(dict(data["images"][2], sentences=[{"raw": "A blue square."}, {"raw": "blue again"}]))
    path.write_text(json.dumps(data))
    test = load_karpathy(str(path))
    assert len(test) == 4 and len(test.captions) == 21  # "A blue square." already there; "blue again" merged
    assert test.references(2)[-1] == "blue again" and test.image_ids == [0, 1, 2, 3]
    assert test.problems.by_reason == {"duplicate image": 1} and "images[5]: duplicate image (the file of " \
        "images[2]" in test.problems.named[0]
    sim = torch.eye(4)[:, test.text_to_image]  # a perfect model scores 100 once the duplicate is merged
    assert recall_at_k(sim * 2 - 1, torch.as_tensor(test.text_to_image))["IR@1"] == 100.0
    lines = [{"image": "val2014/COCO_val2014_000000000000.png", "caption": c} for c in ("red", "a red one")]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    pairs = as_test_set(pair_source(str(tmp_path / "pairs.jsonl")), "pairs")
    assert len(pairs) == 1 and pairs.captions == ["red", "a red one"] and pairs.problems.by_reason == {
        "duplicate image": 1}


def test_held_out_split_merges_a_repeated_image(tmp_path):
    """A seeded split of --data is a test set like any other: an image that appears twice in it is one
    image with both captions, the extra listing counted (the in-memory sets did not merge)."""
    from eval_fixtures import png

    (tmp_path / "one.png").write_bytes(png((220, 40, 40)))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"image": "one.png", "caption": f"red {i}"}) + "\n"
                                                  for i in range(4)))
    train, (test,) = retrieve.retrieval_sets([str(tmp_path / "pairs.jsonl")], None, None, 0.5, 0)
    assert len(train) == 2 and len(test) == 1 and len(test.captions) == 2
    assert test.problems.by_reason == {"duplicate image": 1}


def _cli(module, argv, capsys):
    """The command's exit status and its stderr lines (`main`, as `python -m` and the console script run it)."""
    code = module.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def _bad_input_cases(root, tmp_path):
    """(argv after --encoder, what the one line must contain) for each kind of bad input."""
    coco, shards = root / "coco" / "dataset_coco.json", str(root / "shards")
    no_test = tmp_path / "train_only.json"
    no_test.write_text(json.dumps({"images": [{"split": "train", "filename": "x.png", "sentences": [{"raw": "x"}]}]}))
    no_raw = tmp_path / "no_raw.json"
    data = json.loads(coco.read_text())
    data["images"][1]["sentences"][2] = {"tokens": ["a", "square"]}
    no_raw.write_text(json.dumps(data))
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [\n  {"split": "test",}\n]}')
    return [
        (["--data", shards, "--eval-data", str(no_test)],
         f"{no_test}: no images with split 'test' (splits in the file: train 1)"),
        (["--data", shards, "--eval-data", str(root / "coco" / "datset_coco.json")],
         f"--eval-data {root}/coco/datset_coco.json: no such file or directory"),
        (["--data", shards, "--eval-data", str(no_raw)],
         f"{no_raw}: images[1].sentences[2]: no 'raw' (has keys ['tokens'])"),
        (["--data", shards, "--eval-data", str(broken)], f"{broken}: not JSON (Expecting property name enclosed in "
                                                         f"double quotes at line 2 column 20)"),
        (["--data", shards, "--eval-data", str(coco), "--image-root", str(tmp_path)],
         f"{coco}: none of the 6 images with split 'test' is usable: 6 left out (missing file 5, no captions 1)"),
        (["--data", shards, "--eval-data", str(coco), "--steps", "5", "--warmup-steps", "10", "--batch-size", "8"],
         "--warmup-steps 10 is not shorter than the run (--steps 5: 5 steps)"),
        (["--data", shards, "--eval-data", str(coco), "--preset", "paper"],
         "--batch-size (16384) is larger than the training set (48 examples)"),
        (["--data", str(tmp_path / "nothing-*.tar"), "--eval-data", str(coco)],
         f"--data {tmp_path}/nothing-*.tar: the pattern matches no file"),
    ]


def test_every_bad_input_is_one_line_and_exit_2(fixtures, tmp_path, capsys):
    hf = str(fixtures / "hf_vision")
    for argv, message in _bad_input_cases(fixtures, tmp_path):
        code, err = _cli(retrieve, ["--encoder", hf, "--num-workers", "0"] + argv, capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
    code, err = _cli(retrieve, ["--encoder", str(tmp_path / "no_encoder"), "--data", str(fixtures / "shards")], capsys)
    assert (code, err) == (2, [f"error: --encoder {tmp_path}/no_encoder: no such file or directory"])
    code, err = _cli(classify, ["--encoder", hf, "--data", str(fixtures / "folder" / "val"), "--eval-data",
                                str(fixtures / "folder" / "vall")], capsys)
    assert (code, err) == (2, [f"error: --eval-data {fixtures}/folder/vall: no such file or directory"])
    for colour in ("red", "blue"):  # every image unreadable: a rank's whole part of a batch, named, exit 2
        (tmp_path / "broken" / colour).mkdir(parents=True)
        (tmp_path / "broken" / colour / "0.png").write_bytes(b"not a png")
    code, err = _cli(classify, ["--encoder", hf, "--data", str(tmp_path / "broken"), "--eval-data",
                                str(tmp_path / "broken"), "--batch-size", "2", "--num-workers", "0"], capsys)
    assert code == 2 and err[-1].startswith("error: every sample of this rank's part of global batch 0 is "
                                            f"unreadable: {tmp_path}/broken/") and "cannot decode image" in err[-1]
    (tmp_path / "probe.pt").write_bytes(b"not a checkpoint")
    code, err = _cli(classify, ["--encoder", hf, "--data", str(fixtures / "folder"), "--steps", "1", "--batch-size",
                                "8", "--num-workers", "0", "--checkpoint", str(tmp_path / "probe.pt")], capsys)
    assert code == 2 and err[-1].startswith(f"error: --checkpoint {tmp_path}/probe.pt: not a checkpoint of this task")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n[1, 2]\nnot json\n')
    code, err = _cli(retrieve, ["--encoder", hf, "--data", str(tmp_path / "bad.jsonl")], capsys)
    assert code == 2 and err == [
        f"error: {tmp_path}/bad.jsonl: no {{image, caption}} pairs: 3 left out (missing key 'caption' 1, not JSON 1, "
        f"not a JSON object 1), e.g. {tmp_path}/bad.jsonl:1: missing key 'caption' (has keys ['image']); "
        f"{tmp_path}/bad.jsonl:2: not a JSON object (a list)"]


def test_bad_input_from_the_command_line_exits_2_without_traceback(fixtures):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "megatron_lcl.eval.retrieve", "--encoder", str(fixtures / "hf_vision"),
                           "--data", str(fixtures / "shards"), "--eval-data", str(fixtures / "coco" / "typo.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: --eval-data {fixtures}/coco/typo.json: no such file or directory"


def test_retrieval_trains_from_karpathy_json_with_overlap_warning(fixtures, tmp_path, capsys):
    """--data dataset_coco.json: train + restval, every caption a pair; tested on its test split (or
    --eval-split val); the training image that is also a test image is reported with counts."""
    coco = write_karpathy(tmp_path / "coco", train_per_colour=2)
    hf = str(fixtures / "hf_vision")
    result = retrieve.run_command_line(["--encoder", hf, "--data", str(coco), "--steps", "3", "--batch-size", "8",
                            "--num-workers", "0", "--output", str(tmp_path / "ret.json")])
    out = capsys.readouterr().out
    assert result["num_train"] == 2 * 4 * 2 * 5 + 1  # (train + restval) x colours x 2 images x 5 captions + 1
    assert list(result["recall_by_set"]) == ["dataset_coco.json:test"] and result["num_eval"] == 4
    assert result["overlap"]["dataset_coco.json:test"]["count"] == 1
    assert "warning: 1 of the 4 test images of dataset_coco.json:test are also training images (same file)" in out
    assert "note: warm-up 10 steps (default) is not shorter than the run (--steps 3: 3 steps): scaled to 0 (the " \
        "defaults' 1 of 30 epochs)" in out
    assert "training: 3 steps x batch 8 = 0.296 epochs of 81 examples; warm-up 0 steps" in out
    assert "bad samples: none" in out
    val = retrieve.run_command_line(["--encoder", hf, "--data", str(coco), "--eval-data", str(coco), "--eval-split", "val",
                         "--steps", "2", "--batch-size", "8", "--num-workers", "0"])
    assert val["recall_by_set"]["dataset_coco.json:val"]["num_images"] == 4 and not val["overlap"][
        "dataset_coco.json:val"]["count"]


def test_preset_prints_settings_and_scales_warmup_to_a_short_run(fixtures, capsys):
    result = retrieve.run_command_line(["--encoder", str(fixtures / "hf_vision"), "--data", str(fixtures / "shards"),
                            "--eval-data", str(fixtures / "coco" / "dataset_coco.json"), "--preset", "paper",
                            "--batch-size", "8", "--steps", "20", "--num-workers", "0"])
    out = capsys.readouterr().out
    settings = next(line for line in out.splitlines() if line.startswith("settings: "))
    for value in ("steps=20 ", "batch_size=8 ", "lr=0.001 ", "encoder_lr=1e-05 ", "weight_decay=0.0001 ",
                  "adam_beta2=0.95 ", "warmup_steps=2 "):  # the preset's, the flags', the warm-up fitted to the run
        assert value in settings, (value, settings)
    assert settings.endswith("(preset paper; set by flags: batch_size, num_workers, steps)")
    assert ("note: warm-up 500 steps (--preset) is not shorter than the run (--steps 20: 20 steps): scaled to 2 "
            "(the preset's 500 of 5000 steps)") in out
    assert result["config"]["warmup_steps"] == 2 and "warm-up 2 steps" in out
    # the bad samples of the run, counted by reason, at the end
    assert out.rstrip().endswith("bad samples (left out; the first 50 are named in the results JSON):\n"
                                 "  train index: 1 (no image member 1)\n"
                                 "  test index dataset_coco.json:test: 2 (missing file 1, no captions 1)")


def test_warmup_fitted_to_a_run_shorter_than_it():
    """Classification's preset counts epochs: on a small set its 90 epochs are shorter than its 1500
    warm-up steps, which then scale to the fraction they are of the paper's ImageNet run."""
    from megatron_lcl.eval.cli import config_from_args
    from megatron_lcl.eval.engine import fit_warmup_to_run
    from megatron_lcl.eval.errors import InputError

    def fitted(argv, num_examples):
        args = classify.parse_args(["--encoder", "e", "--data", "d"] + argv)
        cfg = config_from_args(classify.ProbeConfig, args)
        return cfg, fit_warmup_to_run(cfg, num_examples, args.preset_values, args.explicit)

    cfg, note = fitted(["--preset", "paper", "--batch-size", "64"], 1000)  # 90 epochs x 15 = 1350 steps
    assert cfg.warmup_steps == 144 and note.endswith("scaled to 144 (the preset's 1500 of 14040 steps)")
    cfg, note = fitted(["--preset", "paper", "--batch-size", "64"], 100_000)  # long enough: kept
    assert (cfg.warmup_steps, note) == (1500, None)
    with pytest.raises(InputError, match=r"^--warmup-steps 1500 is not shorter than the run \(--steps 100: 100 steps"):
        fitted(["--preset", "paper", "--batch-size", "64", "--steps", "100", "--warmup-steps", "1500"], 1000)
    with pytest.raises(InputError, match=r"^--warmup-epochs 2.0 \(30 steps\) is not shorter than the run \(--epochs 2"):
        fitted(["--batch-size", "64", "--epochs", "2", "--warmup-epochs", "2"], 1000)

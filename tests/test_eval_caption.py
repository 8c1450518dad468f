"""Captioning transfer: a tiny random OPT + MLP projector over a fixed encoder overfits 8 image-caption
pairs and decodes them back (greedy and beam); CIDEr/BLEU of references against themselves are
maximal and of shuffled ones low (with the Python tokenizer, and with PTB where Java exists); the CLI
on a Karpathy test set; a 2-rank captioning step equals 1 rank."""

import json

import pytest
import torch

from eval_fixtures import (EIGHT_CAPTIONS, assert_same_weights, patch_encoder, write_caption_pairs, write_karpathy,
                           write_tiny_lm)
from megatron_lcl.eval import caption
from megatron_lcl.eval.engine import Runtime
from megatron_lcl.eval.karpathy import as_test_set
from megatron_lcl.eval.streaming import pair_source
from multirank import run_torchrun

pytest.importorskip("pycocoevalcap")
from megatron_lcl.eval.caption_metrics import caption_scores, java_available, python_tokenize  # noqa: E402


@pytest.fixture(scope="module")
def caption_fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption")
    pairs = write_caption_pairs(root)
    write_karpathy(root / "coco")
    lm = write_tiny_lm(root / "lm", list(EIGHT_CAPTIONS.values()) + ["square", "colour", "block", "the"])
    return root, pairs, lm


REFS = {i: [f"a {c} {s} on a table", f"the {s} is {c}", f"{c} {s}", f"a small {c} {s}.", f"there is a {c} {s} here"]
        for i, (c, s) in enumerate((c, s) for c in ("red", "green", "blue", "black") for s in ("cube", "ball"))}


@pytest.mark.parametrize("tokenizer", ["python", "ptb"])
def test_cider_of_references_is_maximal_and_of_shuffled_low(tokenizer):
    if tokenizer == "ptb" and not java_available():
        pytest.skip("the PTB tokenizer needs Java")
    own = caption_scores(REFS, {i: r[0] for i, r in REFS.items()}, tokenizer)
    shuffled = caption_scores(REFS, {i: REFS[(i + 3) % 8][0] for i in REFS}, tokenizer)  # other colour/shape
    assert own["BLEU-4"] == pytest.approx(100.0) and own["CIDEr"] > 500
    assert shuffled["CIDEr"] < own["CIDEr"] / 4 and shuffled["BLEU-4"] < 1.0
    assert own["tokenizer"].startswith(tokenizer)
    assert python_tokenize("A man's dog, jumping -- over the fence...") == "a man 's dog jumping over the fence"


def test_captioning_overfits_eight_pairs_and_decodes_them(caption_fixtures):
    _, pairs, lm = caption_fixtures
    source = pair_source(str(pairs))
    for beams in (1, 3):
        cfg = caption.CaptionConfig(steps=150, batch_size=8, lr=3e-3, warmup_steps=10, num_workers=0,
                                    num_beams=beams, metric_tokenizer="python")
        result = caption.run_captioning(patch_encoder(), str(lm), source, [as_test_set(source, "train8")], cfg,
                                        Runtime())
        model, tokenizer = result["_model"], result["_tokenizer"]
        pixels = torch.stack([caption.CaptionedImages(source, 16)[i][0] for i in range(8)])
        decoded = caption.generate(model, pixels, tokenizer, cfg)
        assert decoded == [source.caption(i) for i in range(8)], (beams, decoded)
        assert result["scores_by_set"]["train8"]["BLEU-4"] == pytest.approx(100.0)
        assert result["encoder_unchanged"]


def test_caption_cli_on_karpathy_test_set(caption_fixtures, tmp_path, capsys):
    root, pairs, lm = caption_fixtures
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     image_size=16, patch_size=8)).save_pretrained(str(tmp_path / "clip"))
    result = caption.main(["--encoder", str(tmp_path / "clip"), "--lm", str(lm), "--data", str(pairs),
                           "--eval-data", str(root / "coco" / "dataset_coco.json"), "--steps", "3",
                           "--batch-size", "4", "--num-workers", "0", "--num-beams", "2",
                           "--checkpoint", str(tmp_path / "cap.pt"), "--output", str(tmp_path / "cap.json")])
    printed = capsys.readouterr().out
    assert "CIDEr" in printed and "metric tokenizer" in printed
    saved = json.loads((tmp_path / "cap.json").read_text())
    scores = saved["scores_by_set"]["dataset_coco.json:test"]
    assert scores["num_images"] == 4 and 0 <= scores["CIDEr"] and len(scores["examples"]) == 4
    assert torch.load(tmp_path / "cap.pt", weights_only=False)["step"] == 3 and result["encoder_unchanged"]


def test_two_rank_captioning_equals_one_rank(caption_fixtures):
    root, _, _ = caption_fixtures
    import eval_caption_checks

    out = run_torchrun("eval_caption_checks.py", 2, root / "ddp_out")
    two = torch.load(out / "caption_ddp.pt", weights_only=False)
    one = eval_caption_checks.caption_weights(str(root), Runtime())
    assert_same_weights(two, one, steps=3, lr=1e-3)

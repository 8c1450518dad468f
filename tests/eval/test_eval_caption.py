"""Captioning transfer: a tiny random OPT + MLP projector over a fixed encoder overfits 8 image-caption
pairs and decodes them back (greedy and beam); CIDEr/BLEU of references against themselves are
maximal and of shuffled ones low (with the Python tokenizer, and with PTB where Java exists); the CLI
on a Karpathy test set writes every prediction; an LM that cannot encode captions is refused; a 2-rank
captioning step equals 1 rank. (Captioning with a convert_to_hf export: tests/eval/test_eval.py.)"""

import json

import pytest
import torch

from eval_fixtures import (EIGHT_CAPTIONS, assert_same_weights, patch_encoder, write_caption_pairs, write_karpathy,
                           write_tiny_lm)
from megatron_lcl.eval import caption
from megatron_lcl.eval.karpathy import as_test_set
from megatron_lcl.eval.parallel import one_process
from megatron_lcl.eval.sources import pair_source
from multirank import run_torchrun

pytest.importorskip("pycocoevalcap")
from megatron_lcl.eval.caption_metrics import caption_scores, java_available, python_tokenize  # noqa: E402
from megatron_lcl.eval.errors import InputError  # noqa: E402


@pytest.fixture(scope="module")
def caption_fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption")
    pairs = write_caption_pairs(root)
    write_karpathy(root / "coco")
    lm = write_tiny_lm(root / "lm", list(EIGHT_CAPTIONS.values()) + ["square", "colour", "block", "the"])
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     image_size=16, patch_size=8)).save_pretrained(str(root / "clip"))
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
                                        one_process())
        model, tokenizer = result["_model"], result["_tokenizer"]
        pixels = torch.stack([caption.CaptionedImages(source, 16)[i][0] for i in range(8)])
        decoded = caption.generate(model, pixels, tokenizer, cfg)
        assert decoded == [source.caption(i) for i in range(8)], (beams, decoded)
        assert result["scores_by_set"]["train8"]["BLEU-4"] == pytest.approx(100.0)
        assert result["encoder_unchanged"]


def test_caption_cli_on_karpathy_test_set(caption_fixtures, tmp_path, capsys):
    root, pairs, lm = caption_fixtures
    result = caption.run_command_line(["--encoder", str(root / "clip"), "--lm", str(lm), "--data", str(pairs),
                           "--eval-data", str(root / "coco" / "dataset_coco.json"), "--steps", "3",
                           "--batch-size", "4", "--num-workers", "0", "--num-beams", "2",
                           "--checkpoint", str(tmp_path / "cap.pt"), "--output", str(tmp_path / "cap.json")])
    printed = capsys.readouterr().out
    assert "CIDEr" in printed and "metric tokenizer" in printed
    saved = json.loads((tmp_path / "cap.json").read_text())
    scores = saved["scores_by_set"]["dataset_coco.json:test"]
    assert scores["num_images"] == 4 and 0 <= scores["CIDEr"] and len(scores["examples"]) == 4
    assert torch.load(tmp_path / "cap.pt", weights_only=False)["step"] == 3 and result["encoder_unchanged"]
    # every prediction, beside the metrics, in COCO result format (image_id: the Karpathy cocoid)
    predictions = json.loads((tmp_path / "cap.predictions.dataset_coco_test.json").read_text())
    assert [p["image_id"] for p in predictions] == [0, 1, 2, 3] and all(set(p) == {"image_id", "caption"}
                                                                        for p in predictions)
    written = str(tmp_path / "cap.predictions.dataset_coco_test.json")
    assert saved["predictions_files"] == {"dataset_coco.json:test": written}
    assert f"predictions (4 captions of dataset_coco.json:test): {written}" in printed
    assert "bad samples: none" in printed


def test_caption_refuses_an_lm_without_tokenizer_and_empty_targets(caption_fixtures, tmp_path, capsys):
    """An LM folder without tokenizer files (AutoTokenizer then builds an empty tokenizer: every caption
    becomes no tokens, the run would learn only EOS) is refused before training, naming the folder;
    so is a run in which every training target was empty. One line each, exit status 2."""
    import shutil

    root, pairs, lm = caption_fixtures
    bare = tmp_path / "lm_without_tokenizer"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(lm / name, bare / name)
    common = ["--encoder", str(root / "clip"), "--eval-data", str(pairs), "--steps", "2", "--batch-size", "4",
              "--num-workers", "0"]
    assert caption.main(common + ["--lm", str(bare), "--data", str(pairs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # nothing but the error: refused before loading weights
    assert err == [f"error: --lm {bare}: its tokenizer turns every caption into no tokens (e.g. 'a red square' -> []; "
                   f"1 tokens in its vocabulary; tokenizer files here: none)"]
    (tmp_path / "empty.jsonl").write_text("".join(json.dumps({"image": f"{root}/img/{c}.png", "caption": ""}) + "\n"
                                                  for c in ("red", "green", "blue", "black")))
    assert caption.main(common + ["--lm", str(lm), "--data", str(tmp_path / "empty.jsonl")]) == 2
    err = capsys.readouterr().err  # after training (transformers' and the engine's progress bars before it)
    assert "Traceback" not in err and [line for line in err.splitlines() if "error" in line] == [
        f"error: --lm {lm}: every training target was empty (each caption tokenized to no tokens, only EOS was "
        f"learned): check the training captions and the LM's tokenizer"]


def test_two_rank_captioning_equals_one_rank(caption_fixtures):
    root, _, _ = caption_fixtures
    import eval_caption_checks

    out = run_torchrun("eval_caption_checks.py", 2, root / "ddp_out")
    two = torch.load(out / "caption_ddp.pt", weights_only=False)
    one = eval_caption_checks.caption_weights(str(root), one_process())
    assert_same_weights(two, one, steps=3, lr=1e-3)


# ------------------------------------------------------------------------------------------ drop path (Table 8)

def train_mode_latents(encoder, pixels, seed):
    torch.manual_seed(seed)
    encoder.train()
    return encoder(pixels)


def assert_drop_path_applied(encoder, pixels):
    """Without drop path, train-mode latents equal eval-mode ones whatever the seed; with it they differ
    across seeds, repeat for a seed, and eval mode is unaffected."""
    with torch.no_grad():
        caption.apply_drop_path(encoder, 0.0)
        reference = encoder.eval()(pixels)
        for seed in (0, 1):
            assert torch.equal(train_mode_latents(encoder, pixels, seed), reference)
        caption.apply_drop_path(encoder, 0.5)
        first, again, other = (train_mode_latents(encoder, pixels, s) for s in (0, 0, 1))
        assert torch.equal(first, again) and not torch.equal(first, other)
        assert not torch.equal(first, reference)
        assert torch.equal(encoder.eval()(pixels), reference)


def test_drop_path_on_a_clip_encoder_and_only_when_it_trains(caption_fixtures):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from megatron_lcl.eval.encoders import VisionEncoder, _clip_latents

    _, pairs, lm = caption_fixtures
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, image_size=16, patch_size=8))
    encoder = VisionEncoder(clip, _clip_latents, 32, 16, "clip3", "hf_clip")
    assert_drop_path_applied(encoder, torch.randn(8, 3, 16, 16))
    layers = clip.encoder.layers  # transformers 5.x (4.x: clip.vision_model.encoder)
    source = pair_source(str(pairs))
    for mode, rates in (("frozen", [0.0, 0.25, 0.5]), ("full", [0.0, 0.1, 0.2])):  # full: the default 0.2
        cfg = caption.CaptionConfig(mode=mode, steps=1, batch_size=8, num_workers=0, max_new_tokens=2,
                                    metric_tokenizer="python")
        caption.run_captioning(encoder, str(lm), source, [as_test_set(source, "train8")], cfg)
        assert [layer.mlp.drop_path_rate for layer in layers] == pytest.approx(rates)  # frozen: left as it was
        assert [layer.self_attn.drop_path_rate for layer in layers] == pytest.approx(rates)
    with pytest.raises(InputError, match=r"--drop-path 0.2: the encoder \(test: patches\) has no layers"):
        caption.run_captioning(patch_encoder(), str(lm), source, [], caption.CaptionConfig(mode="full", steps=1))


def test_drop_path_on_a_megatron_lcl_vit(single_rank):
    from common import tiny_model_config
    from megatron_lcl.config import ParallelConfig
    from megatron_lcl.eval.encoders import VisionEncoder, _lcl_latents
    from megatron_lcl.models.lcl_model import LCLModel

    torch.manual_seed(0)
    vit = LCLModel(tiny_model_config(num_layers=3), ParallelConfig()).vision
    encoder = VisionEncoder(vit, _lcl_latents, 32, 16, "tiny", "megatron_lcl")
    assert_drop_path_applied(encoder, torch.randn(8, 3, 16, 16))
    caption.apply_drop_path(encoder, 0.2)
    assert [layer.mlp.linear_fc2.drop_path_rate for layer in vit.decoder.layers] == pytest.approx([0.0, 0.1, 0.2])

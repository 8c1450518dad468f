"""Dialogue transfer from a megatron_lcl checkpoint with the project's own exported OPT (`convert_to_hf`'s
`lm/`, a sentencepiece tokenizer): the vision tower the dialogue task trains in is our ViT through
`hf.convert` (its last layer after the post-LayerNorm equals the checkpoint's latents to 1e-4), a
stage-2 run on the scenes corpus trains, and its LLaVA export loads in a fresh process with the same
input ids, logits within 1e-4 and the same greedy answers."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from common import tiny_model_config
from dialogue_fixtures import corpus_texts, expected_row
from megatron_lcl.eval.bad_samples import BadSampleLog
from megatron_lcl.eval.benchmarks import get
from megatron_lcl.eval.dialogue import task
from megatron_lcl.eval.dialogue.conversations import read_llava_json
from megatron_lcl.eval.dialogue.model import dialogue_encoder, load_vision_tower
from megatron_lcl.eval.parallel import one_process
from megatron_lcl.eval.dialogue.synthetic import write_dialogue_corpus

DIST = os.path.join(os.path.dirname(__file__), "..", "dist")
CFG = tiny_model_config(image_size=32)
CFG = replace(CFG, lm=replace(CFG.lm, max_position_embeddings=512))


@pytest.fixture(scope="module")
def exported(single_rank, tmp_path_factory):
    """A tiny LCL checkpoint (32 px ViT, the tokenizer trained on the corpus) and its convert_to_hf export."""
    from megatron_lcl.checkpoint import save_weights
    from megatron_lcl.config import LCLConfig, ParallelConfig
    from megatron_lcl.data.tokenizer import train_tokenizer
    from megatron_lcl.hf.export import export_to_hf
    from megatron_lcl.models.lcl_model import LCLModel
    from megatron_lcl.runtime import set_seed

    root = tmp_path_factory.mktemp("lcl_dialogue")
    corpus = write_dialogue_corpus(str(root / "corpus"), train_images=24, eval_images=4, seed=2)
    sp = train_tokenizer(corpus_texts(corpus), str(root / "sp"), 160)
    cfg = LCLConfig(model=replace(CFG, lm=replace(CFG.lm, vocab_size=160)))
    cfg = replace(cfg, data=replace(cfg.data, tokenizer=sp))
    set_seed(7)
    checkpoint = save_weights(LCLModel(cfg.model, ParallelConfig()), cfg, str(root / "checkpoint"))
    export_to_hf(checkpoint, str(root / "hf"), log=lambda *a: None)
    return root, checkpoint, corpus


def test_the_vision_tower_is_our_vit(exported):
    from megatron_lcl.eval.encoders import load_encoder
    from megatron_lcl.hf.convert import clip_latents

    root, checkpoint, _ = exported
    clip, source, kind = load_vision_tower(checkpoint)
    assert kind == "megatron_lcl"
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = load_encoder(checkpoint)(pixels)  # [2, 17, 32]: post-LN latents, class token first
        torch.testing.assert_close(clip_latents(clip.eval(), pixels), ours, rtol=0, atol=1e-4)
    exported_clip = load_vision_tower(str(root / "hf"))[0]  # the convert_to_hf folder gives the same tower
    assert all(torch.equal(a, b) for a, b in zip(clip.state_dict().values(), exported_clip.state_dict().values()))


def test_stage2_from_a_checkpoint_with_our_opt_and_its_llava_export(exported, tmp_path):
    root, checkpoint, corpus = exported
    result = task.run_command_line(["--stage", "2", "--encoder", checkpoint, "--lm", str(root / "hf" / "lm"),
                                    "--data", corpus["stage2"], "--steps", "4", "--batch-size", "4",
                                    "--num-workers", "0", "--export", str(tmp_path / "llava"),
                                    "--benchmark", f"pope={corpus['pope']}"])
    assert result["template"] == "vicuna_v1" and result["encoder_kind"] == "megatron_lcl"
    assert result["bad_samples"]["train_read"]["count"] == 0
    assert result["scores_by_benchmark"]["pope"]["num_answered"] == 24
    # the in-process model again (same seed, same 4 steps), then the export in a fresh process
    clip, source, kind = load_vision_tower(checkpoint)
    cfg = task.DialogueConfig(steps=4, batch_size=4, num_workers=0)
    again = task.run_dialogue(dialogue_encoder(clip, -2, "default", source, kind), str(root / "hf" / "lm"),
                              read_llava_json(corpus["stage2"]), cfg, one_process())
    questions = get("pope").read(corpus["pope"], None)[:4] + get("mmbench").read(corpus["mmbench"], None)[:2]
    answers = task.answer_questions(again["_model"], again["_tokens"], "check", questions, cfg, one_process(),
                                    BadSampleLog())
    rows = [expected_row(again["_model"], again["_tokens"], q, answers[q.key], cfg) for q in questions]
    torch.save(rows, tmp_path / "expected.pt")
    subprocess.run([sys.executable, os.path.join(DIST, "dialogue_export_check.py"), str(tmp_path / "llava"),
                    str(tmp_path / "expected.pt"), str(tmp_path / "check.json")], check=True, timeout=600)
    checked = json.loads((tmp_path / "check.json").read_text())
    assert all(r["same_input_ids"] for r in checked)
    assert max(r["max_abs_logit_diff"] for r in checked) <= 1e-4
    assert [r["answer"] for r in checked] == [r["expected_answer"] for r in checked]

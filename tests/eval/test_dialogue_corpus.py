"""The synthetic dialogue corpus is in the released formats: every benchmark reader takes its files
as they are, the ground truth scores 100 under each official scorer, and the LLaVA JSON holds caption
pairs (stage 1) and multi-turn and text-only conversations (stage 2)."""

import json
import os

import pytest

from megatron_lcl.eval.benchmarks import get
from megatron_lcl.eval.dialogue.synthetic import write_dialogue_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_dialogue_corpus(str(tmp_path_factory.mktemp("dialogue")), train_images=60, eval_images=12, seed=3)


def test_llava_json_stages(corpus):
    stage1, stage2 = (json.load(open(corpus[k])) for k in ("stage1", "stage2"))
    assert len(stage1) == 60 and all(len(e["conversations"]) == 2 for e in stage1)
    assert all("<image>" in e["conversations"][0]["value"] and os.path.exists(os.path.join(corpus["image_root"], e["image"]))
               for e in stage1)
    text_only = [e for e in stage2 if "image" not in e]
    assert text_only and all("<image>" not in t["value"] for e in text_only for t in e["conversations"])
    multi = [e for e in stage2 if len(e["conversations"]) > 2]
    assert multi and all([t["from"] for t in e["conversations"]] == ["human", "gpt"] * (len(e["conversations"]) // 2)
                         for e in stage2)


@pytest.mark.parametrize("name,headline,items", [("vqav2", "accuracy", 24), ("gqa", "accuracy", 24),
                                                 ("pope", "f1", 72), ("mmbench", "circular_accuracy", 12 * 4),
                                                 ("mme", "Perception", 12 * 4 * 2)])
def test_every_reader_takes_the_files_and_the_truth_scores_full(corpus, name, headline, items):
    bench = get(name)
    questions = bench.read(corpus[name], None)
    assert len(questions) == items
    assert all(isinstance(q.image, bytes) or os.path.exists(q.image) for q in questions)
    truth = {q.key: q.truth[0] if isinstance(q.truth, list) else q.truth for q in questions}
    score = bench.score(questions, truth)[headline]
    # MME: 4 subtasks x 200; VQAv2: an answer the annotators gave in two forms scores min(#matches/3, 1), so just under 100
    assert score == pytest.approx(800.0 if name == "mme" else 100.0, abs=2.0 if name == "vqav2" else 1e-9)

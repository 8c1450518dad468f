"""tools/ablation.py at its CI size (--small) on the scenes corpus: only what is robust at 3 steps —
every pre-training mode changes the encoder (and only the encoder's own run does), the held-out
evaluation really holds unseen combinations, the collapse monitor is finite, the table has every row."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                           "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "ablation.py"), "--out", str(out), "--small",
                           "--corpus", "scenes"], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, json.loads((out / "ablation.json").read_text())


def test_every_pretraining_mode_changes_the_encoder(ablation, single_rank):
    from megatron_lcl.eval.encoders import load_encoder, weights_fingerprint

    _, report = ablation
    prints = {r["mode"]: weights_fingerprint(load_encoder(r["checkpoint"])) for r in report["rows"]}
    assert set(prints) == {"lcl", "gen", "con", "random"}
    assert len(set(prints.values())) == 4  # each run moved the ViT away from the shared random init


def test_table_and_collapse_monitor(ablation):
    out, report = ablation
    table = (out / "ablation.md").read_text()
    for row in ("Gen. + Con. (LCL)", "Gen. only", "Con. only", "random init"):
        assert row in table
    assert "mean ± sd over seeds [1234]" in table and report["corpus"] == "scenes"
    assert [r["mode"] for r in report["rows"]] == ["lcl", "gen", "con", "random"]
    gen = next(r for r in report["rows"] if r["mode"] == "gen")["train"]
    assert gen["con_loss_last10"] is None  # not trained: shown as "-", not as a logged 0
    for r in report["rows"]:
        assert r["eval"]["classify_label"]["encoder_unchanged"] and r["eval"]["retrieval"]["encoder_unchanged"]
        assert math.isfinite(r["eval"]["latent_effective_rank"]) and r["eval"]["latent_effective_rank"] >= 1
        if r["mode"] != "random":
            assert 0 < r["train"]["effective_rank_frac_last10"] <= 1


def test_evaluation_corpus_holds_only_unseen_combinations(ablation):
    from megatron_lcl.data import labeled_images
    from megatron_lcl.data.scenes import is_held_out, COLOURS, SHAPES

    out, _ = ablation
    train, held = labeled_images(str(out / "data" / "corpus")), labeled_images(str(out / "data" / "eval_corpus"))
    assert train and held and all(it["held_out"] for it in held) and not any(it["held_out"] for it in train)
    seen = {(it["label_name"], it["colour"]) for it in train} | {(it["shape_b"], it["colour_b"]) for it in train}
    assert not any(is_held_out(SHAPES.index(s), COLOURS.index(c)) for s, c in seen)
    assert all(it["label_name"] in it["caption"] and it["relation"] in it["caption"] for it in held)

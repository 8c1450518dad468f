"""`model.vision.image_tokens=pooled_values` end to end, as a user (or a sweep arm) runs it: one override
on the demo config trains (M = patches image positions in the data), exports to HF, passes the HF
verifier within its bounds, and imports back from HF folders.

One 3-step training run in this process serves the module (the latents setting's run and export are
tests/test_hf_export.py's).
"""

import math
from pathlib import Path

import pytest
import torch

from megatron_lcl import train as pretrain_lcl
from megatron_lcl.checkpoint import read_metrics
from megatron_lcl.hf.verify import BOUNDS, max_kl
from test_training import argv, build_corpus

pytestmark = pytest.mark.usefixtures("restore_rendezvous_env")  # in-process runs set RANK, MASTER_*...
ARM = "model.vision.image_tokens=pooled_values"  # the sweep arm: one override on the demo config


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pooled_values_run")
    build_corpus(root / "data")
    assert pretrain_lcl.main(argv(root / "data", root / "run", "train.train_steps=3", ARM)) == 0
    return root


def test_the_run_trains_with_patch_positions_only(run):
    from megatron_lcl.checkpoint import load_pretrained

    rows = read_metrics(str(run / "run"))
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and math.isfinite(r["con_loss"]) for r in rows)
    lcl = load_pretrained(str(run / "run" / "checkpoints"))
    vision = lcl.cfg.model.vision
    assert vision.image_tokens == "pooled_values" and vision.num_image_tokens == vision.num_patches == 16
    assert not hasattr(lcl.model, "projector")


def test_export_passes_the_verifier(run, capsys):
    from megatron_lcl.hf.export import export_to_hf
    from megatron_lcl.hf import verify
    from safetensors import safe_open

    export_to_hf(str(run / "run" / "checkpoints"), str(run / "hf"), log=lambda *a: None)
    figures = verify.main(["--load", str(run / "run" / "checkpoints"), "--hf", str(run / "hf")])
    assert all(figures[k] <= bound for k, bound in BOUNDS.items()) and figures["tokenizer_ids_equal"]
    assert capsys.readouterr().out.splitlines()[-1] == "OK"
    with safe_open(str(run / "hf" / "lcl_heads.safetensors"), "pt") as f:
        assert '"image_tokens": "pooled_values"' in f.metadata()["config"]
        assert not any(k.startswith("projector.") for k in f.keys())
    card = (run / "hf" / "README.md").read_text()
    assert "image tokens: `pooled_values`" in card and "proj(v(norm_v(patches)))" in card


def test_import_from_hf_keeps_the_vit_and_lm_and_builds_the_pooling_block(run):
    """HF folders -> convert_from_hf with the arm's config: the same ViT/LM tensors, a fresh pooling block."""
    from megatron_lcl.checkpoint import load_pretrained
    from megatron_lcl.hf import from_hf

    cfg = load_pretrained(str(run / "run" / "checkpoints")).cfg
    assert cfg.model.vision.image_tokens == "pooled_values"
    ckpt = from_hf.convert(cfg, str(run / "hf" / "vision"), str(run / "hf" / "lm"), str(run / "imported"),
                           log=lambda *a: None)
    imported = load_pretrained(ckpt)
    trained = load_pretrained(str(run / "run" / "checkpoints"))
    images = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(3, 200, (2, 20))
    with torch.no_grad():
        ours, _ = imported.encode_images(images)
        theirs, _ = trained.encode_images(images)
        logits = imported.lm_logits(tokens), trained.lm_logits(tokens)
    assert (ours - theirs).abs().max().item() <= BOUNDS["vision_max_abs_diff"]
    assert max_kl(*logits) <= BOUNDS["text_logits_kl"]
    assert hasattr(imported.model.image_head, "values") and not hasattr(imported.model, "projector")


def test_transfer_encoders_give_the_patch_latents(run):
    """The transfer tools' encoder (`eval.encoders.load_encoder`) of a pooled_values model gives the
    latents its image tokens were made from, the patch tokens (no class token), from the checkpoint and
    from the HF export alike."""
    from megatron_lcl.checkpoint import load_pretrained
    from megatron_lcl.eval.encoders import load_encoder

    images = torch.randn(2, 3, 32, 32)
    lcl = load_pretrained(str(run / "run" / "checkpoints"))
    with torch.no_grad():
        vit_out = lcl.model.vision(images)  # [n, 1 + P, h]
        from_checkpoint = load_encoder(str(run / "run" / "checkpoints"))(images)
        from_export = load_encoder(str(run / "hf"))(images)
        from_vision_dir = load_encoder(str(run / "hf" / "vision"))
    assert from_checkpoint.shape == (2, 16, 64) and torch.equal(from_checkpoint, vit_out[:, 1:])
    assert (from_export - vit_out[:, 1:]).abs().max().item() <= BOUNDS["vision_max_abs_diff"]
    assert from_vision_dir.image_tokens == "pooled_values" and from_vision_dir.kind == "hf_clip"

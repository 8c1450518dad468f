"""Faithful HF import: a CLIP with `quick_gelu` (every openai/clip-vit-* release) converts, computes
transformers' latents and exports back with the same activation; every HF config field that changes
the function and that we cannot represent is refused, naming the field."""

import os
from types import SimpleNamespace

import pytest
import torch

from megatron_lcl.config import ConfigError, LCLConfig
from megatron_lcl.hf.convert import clip_latents

from common import tiny_model_config

BOUND = 1e-4  # max |ours - transformers| of the latents (hf.verify's vision bound)


def _clip(activation: str, seed: int = 0, **overrides):
    """A tiny random `CLIPVisionModel` with non-trivial LayerNorms (so eps and placement matter)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=16, patch_size=8, hidden_act=activation, **overrides)
    clip = CLIPVisionModel(config).eval()
    with torch.no_grad():
        for name, p in clip.named_parameters():
            is_norm = "norm" in name or "layrnorm" in name
            p.normal_(0.0, 0.2 if is_norm else 0.5)
            if is_norm and name.endswith("weight"):
                p.add_(1.0)
    return clip


def _run_config(activation: str) -> LCLConfig:
    return LCLConfig(model=tiny_model_config(activation=activation))


@pytest.fixture(scope="module")
def quick_gelu_import(tmp_path_factory, single_rank):
    """HF quick_gelu CLIP folder -> convert_from_hf -> our checkpoint -> convert_to_hf."""
    from megatron_lcl.checkpoint import load_pretrained
    from megatron_lcl.hf.export import export_to_hf

    root = tmp_path_factory.mktemp("hf_import")
    clip = _clip("quick_gelu")
    clip.save_pretrained(root / "clip")
    from megatron_lcl.hf import from_hf as tool
    ckpt = tool.convert(_run_config("quick_gelu"), str(root / "clip"), None, str(root / "ckpt"), log=lambda *a: None)
    export_to_hf(ckpt, str(root / "back"), log=lambda *a: None)
    images = torch.randn(3, 3, 16, 16)
    return SimpleNamespace(root=root, clip=clip, tool=tool, lcl=load_pretrained(ckpt), images=images)


def test_quick_gelu_clip_converts_and_matches_transformers(quick_gelu_import):
    t = quick_gelu_import
    assert t.lcl.cfg.model.vision.activation == "quick_gelu"
    with torch.no_grad():
        ours, _ = t.lcl.encode_images(t.images)
        theirs = clip_latents(t.clip, t.images)
    diff = (ours - theirs).abs().max().item()
    assert diff <= BOUND, diff


def test_the_comparison_catches_a_wrong_activation(quick_gelu_import, single_rank):
    """The same weights in a gelu ViT (what the old converter built silently) miss the bound."""
    from megatron_lcl.config import ParallelConfig
    from megatron_lcl.models.lcl_model import LCLModel

    t = quick_gelu_import
    model = LCLModel(tiny_model_config(activation="gelu"), ParallelConfig()).eval()
    model.load_state_dict(t.lcl.model.state_dict())
    with torch.no_grad():
        ours, _ = model.encode_images(t.images)
        theirs = clip_latents(t.clip, t.images)
    assert (ours - theirs).abs().max().item() > 10 * BOUND


def test_export_keeps_quick_gelu(quick_gelu_import):
    from transformers import CLIPVisionModel

    t = quick_gelu_import
    back = CLIPVisionModel.from_pretrained(t.root / "back" / "vision").eval()
    assert back.config.hidden_act == "quick_gelu"
    a, b = t.clip.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(clip_latents(back, t.images), clip_latents(t.clip, t.images))


def test_activation_mismatch_is_refused_naming_both_fields(quick_gelu_import, tmp_path):
    t = quick_gelu_import
    with pytest.raises(ConfigError) as e:
        t.tool.convert(_run_config("gelu"), str(t.root / "clip"), None, str(tmp_path / "ckpt"), log=lambda *a: None)
    assert "model.vision.activation is 'gelu', the HF model has hidden_act='quick_gelu'" in str(e.value)


def _clip_config(**kw):
    from transformers import CLIPVisionConfig

    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                patch_size=8, hidden_act="gelu")
    return CLIPVisionConfig(**{**base, **kw})


def _opt_config(**kw):
    from transformers import OPTConfig

    cfg = tiny_model_config().lm
    base = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, ffn_dim=cfg.ffn_hidden_size,
                num_attention_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
                word_embed_proj_dim=cfg.hidden_size)
    return OPTConfig(**{**base, **kw})


@pytest.mark.parametrize("side, overrides, field_name", [
    ("vision", dict(hidden_act="gelu_new"), "hidden_act"),
    ("vision", dict(hidden_act="quick_gelu"), "model.vision.activation"),
    ("vision", dict(layer_norm_eps=1e-6), "model.vision.layernorm_epsilon"),
    ("vision", dict(num_channels=1), "num_channels"),
    ("vision", dict(intermediate_size=128), "model.vision.ffn_hidden_size"),
    ("lm", dict(do_layer_norm_before=False), "do_layer_norm_before"),
    ("lm", dict(word_embed_proj_dim=16), "word_embed_proj_dim"),
    ("lm", dict(activation_function="gelu"), "activation_function"),
    ("lm", dict(enable_bias=False), "enable_bias"),
    ("lm", dict(layer_norm_elementwise_affine=False), "layer_norm_elementwise_affine"),
    ("lm", dict(tie_word_embeddings=False), "tie_word_embeddings"),
    ("lm", dict(_remove_final_layer_norm=True), "_remove_final_layer_norm"),
    ("lm", dict(ffn_dim=128), "model.lm.ffn_hidden_size"),
])
def test_each_function_changing_field_is_refused_by_name(quick_gelu_import, side, overrides, field_name):
    """One field off at a time: the tool refuses, and the message names exactly that field."""
    tool = quick_gelu_import.tool
    cfg = _run_config("gelu")
    tool.check_hf_configs(cfg, SimpleNamespace(config=_clip_config()), SimpleNamespace(config=_opt_config()))
    hf = SimpleNamespace(config=_clip_config(**overrides) if side == "vision" else _opt_config(**overrides))
    with pytest.raises(ConfigError) as e:
        tool.check_hf_configs(cfg, hf if side == "vision" else None, hf if side == "lm" else None)
    assert field_name in str(e.value), str(e.value)


def test_lm_layernorm_eps_other_than_opts_is_refused(quick_gelu_import):
    """transformers' OPT has no eps field (always 1e-5): a model.lm.layernorm_epsilon it cannot hold."""
    cfg = _run_config("gelu")
    cfg.model.lm.layernorm_epsilon = 1e-6
    with pytest.raises(ConfigError, match="model.lm.layernorm_epsilon"):
        quick_gelu_import.tool.check_hf_configs(cfg, None, SimpleNamespace(config=_opt_config()))


def test_import_refuses_an_existing_checkpoint_unless_overwrite(quick_gelu_import, tmp_path, capsys):
    """The same care as the export: a `--save` holding a checkpoint is refused (one line, exit 2) unless
    `--overwrite`, which replaces it whole; a folder that is not a checkpoint is never replaced; a config
    that does not match the HF model is one line, exit 2 (before: a traceback). The checkpoint's config
    records data.tokenizer as an absolute path."""
    import json

    from megatron_lcl.config import save_config

    t = quick_gelu_import
    save_config(_run_config("quick_gelu"), tmp_path / "run.yaml")
    ckpt = tmp_path / "ckpt"
    def command(save, *more):
        return ["--config", str(tmp_path / "run.yaml"), "--vision", str(t.root / "clip"), "--save", str(save),
                "data.tokenizer=tok/lcl.model", *more]


    assert t.tool.main(command(ckpt)) == 0
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["config"]["data"]["tokenizer"] == os.path.abspath("tok/lcl.model")
    capsys.readouterr()
    assert t.tool.main(command(ckpt)) == 2
    assert capsys.readouterr().err == f"error: --save {ckpt} already holds a checkpoint; --overwrite replaces it, " \
                                      "or choose another folder\n"
    (ckpt / "stale.txt").write_text("from the older checkpoint")
    assert t.tool.main(command(ckpt, "--overwrite")) == 0
    assert not (ckpt / "stale.txt").exists() and (ckpt / "meta.json").exists()
    capsys.readouterr()
    assert t.tool.main(command(tmp_path, "--overwrite")) == 2
    assert "exists and is not a megatron_lcl checkpoint; refusing to replace it" in capsys.readouterr().err
    assert t.tool.main(command(ckpt, "--overwrite", "model.vision.activation=gelu")) == 2
    err = capsys.readouterr().err  # after transformers' progress bar of the CLIP load
    assert err.splitlines()[-1].startswith("error: config does not match the HF weights: model.vision.activation "
                                           "is 'gelu'") and "Traceback" not in err, err

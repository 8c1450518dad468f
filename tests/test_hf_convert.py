"""HF export: our LCLModel and transformers' CLIPVisionModel / OPTForCausalLM compute the same thing."""

from dataclasses import replace

import pytest
import torch

from megatron_lcl.config import ParallelConfig
from megatron_lcl.hf.convert import (build_hf_models, image_token_module, lcl_heads_state, lm_from_hf, lm_to_hf,
                                     vision_from_hf, vision_to_hf)
from megatron_lcl.hf.verify import BOUNDS, compare, max_kl
from megatron_lcl.testing import random_batch

import pathlib  # noqa: E401
from common import tiny_model_config

CFG = tiny_model_config(layer_scale_init=0.3)
M = CFG.vision.num_image_tokens
# model.vision.image_tokens=pooled_values (the released code's tokens): v_i has the LM width (no W1)
POOLED = replace(tiny_model_config(layer_scale_init=0.3, image_tokens="pooled_values"),
                 heads=replace(CFG.heads, embed_dim=CFG.lm.hidden_size))


@pytest.fixture(scope="module")
def converted(single_rank):
    from megatron_lcl.models.lcl_model import LCLModel
    from megatron_lcl.runtime import set_seed

    set_seed(5)
    model = LCLModel(CFG, ParallelConfig()).eval()
    with torch.no_grad():  # make layer-scale non-trivial so folding is exercised
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.uniform_(0.2, 1.5)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    vocab = model.lm.embedding.word_embeddings.weight.shape[0]
    clip, opt = build_hf_models(state, CFG.vision, CFG.lm, vocab)
    return model, state, clip, opt


@pytest.fixture(scope="module")
def figures(converted):
    """Ours vs transformers (the numbers verify_hf prints): vision latents, text-only logits, and
    interleaved logits where HF CLIP latents -> our projector -> OPT `inputs_embeds`."""
    from megatron_lcl.checkpoint import LCLPretrained
    from megatron_lcl.config import LCLConfig

    model, _, clip, opt = converted
    batch = random_batch([[4, 20], [9]], seq_length=48, num_image_tokens=M, image_size=16,
                         vocab_size=192, seed=2)
    return compare(LCLPretrained(model, LCLConfig(model=CFG)), clip, opt, batch.tokens, batch.images,
                   batch.image_sample_index, batch.boi_positions, model.projector)


@pytest.mark.parametrize("key", sorted(BOUNDS))
def test_outputs_match_transformers(figures, key):
    assert figures[key] <= BOUNDS[key], (key, figures[key])


def test_pooled_values_outputs_match_transformers(single_rank):
    """image_tokens=pooled_values: HF CLIP latents -> the heads file's value path (class token dropped,
    `image_token_module`) -> OPT `inputs_embeds` gives our interleaved logits, within the same bounds."""
    from megatron_lcl.checkpoint import LCLPretrained
    from megatron_lcl.config import LCLConfig
    from megatron_lcl.models.lcl_model import LCLModel
    from megatron_lcl.runtime import set_seed

    set_seed(6)
    model = LCLModel(POOLED, ParallelConfig()).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    clip, opt = build_hf_models(state, POOLED.vision, POOLED.lm, model.lm.embedding.word_embeddings.weight.shape[0])
    tokens = image_token_module(lcl_heads_state(state), "pooled_values", POOLED.vision.layernorm_epsilon)
    m = POOLED.vision.num_image_tokens
    assert m == POOLED.vision.num_patches and "projector.weight" not in state
    batch = random_batch([[4, 8 + m], [9]], seq_length=48, num_image_tokens=m, image_size=16, vocab_size=192, seed=3)
    figures = compare(LCLPretrained(model, LCLConfig(model=POOLED)), clip, opt, batch.tokens, batch.images,
                      batch.image_sample_index, batch.boi_positions, tokens)
    assert all(figures[k] <= bound for k, bound in BOUNDS.items()), figures
    # the same check with the latents setting's projector instead misses the bound (it does measure)
    wrong = torch.nn.Linear(POOLED.vision.hidden_size, POOLED.lm.hidden_size)
    missed = compare(LCLPretrained(model, LCLConfig(model=POOLED)), clip, opt, batch.tokens, batch.images,
                     batch.image_sample_index, batch.boi_positions, lambda x: wrong(x[:, 1:]))
    assert missed["interleaved_logits_kl"] > 100 * BOUNDS["interleaved_logits_kl"]


def test_hf_to_ours_to_hf_is_identity(converted):
    _, _, clip, opt = converted
    clip_state = {k: v for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    opt_state = opt.state_dict()
    back_clip = vision_to_hf(vision_from_hf(clip_state, CFG.vision), CFG.vision)
    back_opt = lm_to_hf(lm_from_hf(opt_state, CFG.lm), CFG.lm)
    for theirs, back in ((clip_state, back_clip), (opt_state, back_opt)):
        assert theirs.keys() == back.keys()
        for k in theirs:
            if k == "model.decoder.embed_positions.weight":  # OPT's 2 offset rows are never used
                assert torch.equal(theirs[k][2:], back[k][2:])
                continue
            assert torch.equal(theirs[k], back[k]), k


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_exported_tokenizer_gives_sentencepiece_ids(tmp_path, byte_fallback):
    from transformers import AutoTokenizer

    from megatron_lcl.data.tokenizer import LCLTokenizer, train_tokenizer
    from megatron_lcl.hf.tokenizer import export_tokenizer

    texts = ["a red circle on a striped background", "the quick brown fox jumps over the lazy dog",
             "Hello World, numbers 12345 and ünïcödé!"] * 100
    ours = LCLTokenizer(train_tokenizer(texts, str(tmp_path / "sp"), 400, byte_fallback=byte_fallback))
    export_tokenizer(ours.model_path, str(tmp_path / "hf"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in ["a red circle", " leading space", "Hello World, 12345 ünïcödé!", "zzz  qqq", "ｆｕｌｌ",
                 "unseen: 漢字 ∑"]:
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    if byte_fallback:
        assert hf.decode(ours.encode("unseen: 漢字")) == ours.sp.decode(ours.encode("unseen: 漢字"))
    assert hf.convert_tokens_to_ids(["<BoI>", "<EoI>", "<img>"]) == [ours.boi_id, ours.eoi_id, ours.image_id]
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (ours.pad_id, ours.bos_id, ours.eos_id)
    sample = ours.encode("a red") + [ours.boi_id, ours.image_id, ours.eoi_id] + ours.encode("circle")
    assert hf.decode(sample, skip_special_tokens=True).split() == ["a", "red", "circle"]


def test_tp2_checkpoint_converts_and_matches_transformers(core_checks_dir, tmp_path, single_rank):
    """random init -> dist checkpoint at TP=2 -> convert_to_hf -> transformers loads both models ->
    their outputs match our TP=1 reload and the TP=2 model's own logits."""
    from megatron_lcl.hf.export import export_to_hf
    from megatron_lcl.checkpoint import load_pretrained
    from megatron_lcl.hf.verify import load_hf

    paths = export_to_hf(str(core_checks_dir / "tp2_checkpoint"), str(tmp_path / "hf"), log=lambda *a: None)
    assert (tmp_path / "hf" / "README.md").exists() and "tokenizer" not in paths  # config has none
    clip, opt, projector = load_hf(str(tmp_path / "hf"))
    lcl = load_pretrained(str(core_checks_dir / "tp2_checkpoint"))
    saved = torch.load(core_checks_dir / "tp2_checkpoint_outputs.pt", weights_only=False)
    batch = saved["batch"]
    figures = compare(lcl, clip, opt, batch.tokens, batch.images, batch.image_sample_index,
                      batch.boi_positions, projector)
    for key, bound in BOUNDS.items():
        assert figures[key] <= bound, (key, figures[key])
    # the TP=1 reload reproduces the TP=2 model that saved the checkpoint
    ours = lcl.lm_logits(batch.tokens, batch.images, batch.image_sample_index, batch.boi_positions)
    assert max_kl(saved["logits"], ours) <= 1e-6
    # and the command-line verifier agrees
    tool = _load_tool("verify_hf")
    printed = tool.main(["--load", str(core_checks_dir / "tp2_checkpoint"), "--hf", str(tmp_path / "hf")])
    assert all(printed[k] <= bound for k, bound in BOUNDS.items())


def test_convert_to_hf_names_a_missing_checkpoint(tmp_path, capsys):
    tool = _load_tool("convert_to_hf")
    assert tool.main(["--load", str(tmp_path / "runs" / "typo"), "--save", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --load {tmp_path}/runs/typo: no complete checkpoint there (a run directory, its checkpoints/ or one "
        f"step_* folder)"]
    assert not (tmp_path / "hf").exists()


def test_verify_and_convert_from_hf_name_a_missing_path(tmp_path, capsys):
    """verify_hf on a mistyped path was a traceback; convert_from_hf passed it to transformers, which
    took it for a hub repo id ("Repo id must use alphanumeric chars ...")."""
    verify = _load_tool("verify_hf")
    with pytest.raises(SystemExit) as stop:
        verify.main(["--load", str(tmp_path / "typo"), "--hf", str(tmp_path / "hf")])
    assert stop.value.code == 2 and capsys.readouterr().err.startswith(f"error: --load {tmp_path}/typo: no complete")
    (tmp_path / "hf" / "vision").mkdir(parents=True)
    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "step_00000001" / "meta.json").write_text("{}")  # what marks a complete checkpoint
    with pytest.raises(SystemExit) as stop:
        verify.main(["--load", str(tmp_path / "step_00000001"), "--hf", str(tmp_path / "hf")])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (f"error: --hf {tmp_path}/hf: not a megatron_lcl HuggingFace export "
                                       "(no lm, lcl_heads.safetensors)\n")
    from_hf = _load_tool("convert_from_hf")
    with pytest.raises(SystemExit) as stop:
        from_hf.main(["--config", str(pathlib.Path(__file__).parents[1] / "examples/configs/tiny_cpu.yaml"),
                      "--vision", str(tmp_path / "clip"), "--save", str(tmp_path / "ckpt")])
    assert stop.value.code == 2
    assert capsys.readouterr().err == \
        f"error: --vision {tmp_path}/clip: not a HuggingFace model folder (no config.json)\n"
    assert not (tmp_path / "ckpt").exists()


def _load_tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        name, pathlib.Path(__file__).parents[1] / f"tools/checkpoint/{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_hf_to_megatron_lcl_to_hf_gives_identical_tensors(converted, tmp_path):
    """HF folders -> convert_from_hf (a dist checkpoint) -> convert_to_hf -> the same tensors."""
    from transformers import CLIPVisionModel, OPTForCausalLM

    from megatron_lcl.hf.export import export_to_hf
    from megatron_lcl.config import LCLConfig

    _, _, clip, opt = converted
    clip.save_pretrained(tmp_path / "clip")
    opt.save_pretrained(tmp_path / "opt")
    from megatron_lcl.hf import from_hf as tool
    ckpt = tool.convert(LCLConfig(model=CFG), str(tmp_path / "clip"), str(tmp_path / "opt"),
                        str(tmp_path / "ckpt"), log=lambda *a: None)
    export_to_hf(ckpt, str(tmp_path / "back"), log=lambda *a: None)
    for cls, src, dst in ((CLIPVisionModel, "clip", "back/vision"), (OPTForCausalLM, "opt", "back/lm")):
        a, b = cls.from_pretrained(tmp_path / src).state_dict(), cls.from_pretrained(tmp_path / dst).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            if k == "model.decoder.embed_positions.weight":  # OPT's 2 offset rows are never read
                a[k], b[k] = a[k][2:], b[k][2:]
            assert torch.equal(a[k], b[k]), k

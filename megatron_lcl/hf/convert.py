"""Exact weight maps between a full (TP=1, PP=1) `LCLModel` state dict and HF `transformers` models.

- ViT <-> `CLIPVisionModel`: same layout; our post-LN is HF's `post_layernorm`, which we apply to all
  tokens (HF applies it to the pooled token only), so our latents = `post_layernorm(last_hidden_state)`.
  Layer-scale is folded into `out_proj` / `fc2` (gamma * (xW + b) = x(diag(gamma)W) + gamma*b).
- LM <-> `OPTForCausalLM`: OPT's learned positions are offset by 2 rows.
- megatron-core fuses q, k, v per head: `linear_qkv.weight` is `[heads, 3, head_dim, h]` flattened.
"""

from typing import Dict, Tuple

import torch

from megatron_lcl.config import LMConfig, VisionConfig

OPT_POSITION_OFFSET = 2
State = Dict[str, torch.Tensor]


def split_qkv(weight: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, ...]:
    """Fused `[3h, ...]` (megatron-core order: per head q, k, v) -> q, k, v each `[h, ...]`."""
    rest = weight.shape[1:]
    head_dim = weight.shape[0] // (3 * num_heads)
    w = weight.view(num_heads, 3, head_dim, *rest)
    return tuple(w[:, i].reshape(num_heads * head_dim, *rest) for i in range(3))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    rest = q.shape[1:]
    head_dim = q.shape[0] // num_heads
    return torch.stack([t.view(num_heads, head_dim, *rest) for t in (q, k, v)], dim=1).reshape(
        3 * num_heads * head_dim, *rest)


def _layer_scale(state: State, key: str, width: int) -> torch.Tensor:
    return state.get(key, torch.ones(width))


def vision_to_hf(state: State, vision: VisionConfig) -> State:
    """`vision.*` of an LCLModel state dict -> `CLIPVisionModel` state dict."""
    p, h = "vision.", vision.hidden_size
    out = {
        "embeddings.patch_embedding.weight": state[p + "conv1.weight"],
        "embeddings.class_embedding": state[p + "class_token"],
        "embeddings.position_embedding.weight": state[p + "position_embeddings"],
        "pre_layrnorm.weight": state[p + "ln_pre.weight"],
        "pre_layrnorm.bias": state[p + "ln_pre.bias"],
        "post_layernorm.weight": state[p + "decoder.final_layernorm.weight"],
        "post_layernorm.bias": state[p + "decoder.final_layernorm.bias"],
    }
    for i in range(vision.num_layers):
        src, dst = f"{p}decoder.layers.{i}.", f"encoder.layers.{i}."
        out.update(_layer_to_hf(state, src, dst, vision.num_attention_heads, h, layer_scale=True,
                                names=dict(ln1="layer_norm1", ln2="layer_norm2", attn="self_attn",
                                           out="out_proj", fc1="mlp.fc1", fc2="mlp.fc2")))
    return out


def lm_to_hf(state: State, lm: LMConfig) -> State:
    """`lm.*` of an LCLModel state dict -> `OPTForCausalLM` state dict (lm_head tied)."""
    p, h = "lm.", lm.hidden_size
    positions = state[p + "embedding.position_embeddings.weight"]
    out = {
        "model.decoder.embed_tokens.weight": state[p + "embedding.word_embeddings.weight"],
        "model.decoder.embed_positions.weight": torch.cat(
            [positions.new_zeros(OPT_POSITION_OFFSET, h), positions]),
        "model.decoder.final_layer_norm.weight": state[p + "decoder.final_layernorm.weight"],
        "model.decoder.final_layer_norm.bias": state[p + "decoder.final_layernorm.bias"],
    }
    for i in range(lm.num_layers):
        src, dst = f"{p}decoder.layers.{i}.", f"model.decoder.layers.{i}."
        out.update(_layer_to_hf(state, src, dst, lm.num_attention_heads, h, layer_scale=False,
                                names=dict(ln1="self_attn_layer_norm", ln2="final_layer_norm",
                                           attn="self_attn", out="out_proj", fc1="fc1", fc2="fc2")))
    out["lm_head.weight"] = out["model.decoder.embed_tokens.weight"]
    return out


def _layer_to_hf(state, src, dst, num_heads, h, layer_scale, names) -> State:
    out = {}
    for kind in ("weight", "bias"):
        out[f"{dst}{names['ln1']}.{kind}"] = state[f"{src}input_layernorm.{kind}"]
        out[f"{dst}{names['ln2']}.{kind}"] = state[f"{src}pre_mlp_layernorm.{kind}"]
        q, k, v = split_qkv(state[f"{src}self_attention.linear_qkv.{kind}"], num_heads)
        for name, t in zip("qkv", (q, k, v)):
            out[f"{dst}{names['attn']}.{name}_proj.{kind}"] = t
        out[f"{dst}{names['fc1']}.{kind}"] = state[f"{src}mlp.linear_fc1.{kind}"]
    for ours, theirs in (("self_attention.linear_proj", f"{names['attn']}.{names['out']}"),
                         ("mlp.linear_fc2", names["fc2"])):
        gamma = _layer_scale(state, f"{src}{ours}.layer_scale", h) if layer_scale else torch.ones(h)
        out[f"{dst}{theirs}.weight"] = gamma[:, None] * state[f"{src}{ours}.weight"]
        out[f"{dst}{theirs}.bias"] = gamma * state[f"{src}{ours}.bias"]
    return out


def vision_from_hf(hf: State, vision: VisionConfig) -> State:
    """`CLIPVisionModel` state dict -> `vision.*` entries (layer-scale set to 1: already folded)."""
    hf = {k.removeprefix("vision_model."): v for k, v in hf.items()}
    p = "vision."
    out = {
        p + "conv1.weight": hf["embeddings.patch_embedding.weight"],
        p + "class_token": hf["embeddings.class_embedding"],
        p + "position_embeddings": hf["embeddings.position_embedding.weight"],
        p + "ln_pre.weight": hf["pre_layrnorm.weight"],
        p + "ln_pre.bias": hf["pre_layrnorm.bias"],
        p + "decoder.final_layernorm.weight": hf["post_layernorm.weight"],
        p + "decoder.final_layernorm.bias": hf["post_layernorm.bias"],
    }
    for i in range(vision.num_layers):
        src, dst = f"encoder.layers.{i}.", f"{p}decoder.layers.{i}."
        out.update(_layer_from_hf(hf, src, dst, vision.num_attention_heads,
                                  dict(ln1="layer_norm1", ln2="layer_norm2", attn="self_attn",
                                       out="out_proj", fc1="mlp.fc1", fc2="mlp.fc2")))
        if vision.layer_scale_init is not None:
            for name in ("self_attention.linear_proj", "mlp.linear_fc2"):
                out[f"{dst}{name}.layer_scale"] = torch.ones(vision.hidden_size)
    return out


def lm_from_hf(hf: State, lm: LMConfig) -> State:
    p = "lm."
    out = {
        p + "embedding.word_embeddings.weight": hf["model.decoder.embed_tokens.weight"],
        p + "embedding.position_embeddings.weight":
            hf["model.decoder.embed_positions.weight"][OPT_POSITION_OFFSET:],
        p + "decoder.final_layernorm.weight": hf["model.decoder.final_layer_norm.weight"],
        p + "decoder.final_layernorm.bias": hf["model.decoder.final_layer_norm.bias"],
    }
    for i in range(lm.num_layers):
        out.update(_layer_from_hf(hf, f"model.decoder.layers.{i}.", f"{p}decoder.layers.{i}.",
                                  lm.num_attention_heads,
                                  dict(ln1="self_attn_layer_norm", ln2="final_layer_norm",
                                       attn="self_attn", out="out_proj", fc1="fc1", fc2="fc2")))
    return out


def _layer_from_hf(hf, src, dst, num_heads, names) -> State:
    out = {}
    for kind in ("weight", "bias"):
        out[f"{dst}input_layernorm.{kind}"] = hf[f"{src}{names['ln1']}.{kind}"]
        out[f"{dst}pre_mlp_layernorm.{kind}"] = hf[f"{src}{names['ln2']}.{kind}"]
        out[f"{dst}self_attention.linear_qkv.{kind}"] = fuse_qkv(
            *(hf[f"{src}{names['attn']}.{n}_proj.{kind}"] for n in "qkv"), num_heads)
        out[f"{dst}self_attention.linear_proj.{kind}"] = hf[f"{src}{names['attn']}.{names['out']}.{kind}"]
        out[f"{dst}mlp.linear_fc1.{kind}"] = hf[f"{src}{names['fc1']}.{kind}"]
        out[f"{dst}mlp.linear_fc2.{kind}"] = hf[f"{src}{names['fc2']}.{kind}"]
    return out


def clip_vision_config(vision: VisionConfig):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=vision.hidden_size, intermediate_size=vision.ffn_hidden_size,
        num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_attention_heads,
        image_size=vision.image_size, patch_size=vision.patch_size, hidden_act="gelu",
        layer_norm_eps=vision.layernorm_epsilon, attention_dropout=0.0, num_channels=3)


def opt_config(lm: LMConfig, vocab_size: int, pad_token_id: int = 0, bos_token_id: int = 1,
               eos_token_id: int = 2):
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=vocab_size, hidden_size=lm.hidden_size, num_hidden_layers=lm.num_layers,
        ffn_dim=lm.ffn_hidden_size, num_attention_heads=lm.num_attention_heads,
        max_position_embeddings=lm.max_position_embeddings, do_layer_norm_before=True,
        word_embed_proj_dim=lm.hidden_size, activation_function="relu", dropout=0.0,
        attention_dropout=0.0, layerdrop=0.0, enable_bias=True, layer_norm_elementwise_affine=True,
        tie_word_embeddings=True, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id)


def build_hf_models(state: State, vision: VisionConfig, lm: LMConfig, vocab_size: int):
    """-> (CLIPVisionModel, OPTForCausalLM) in eval mode with our weights loaded strictly."""
    from transformers import CLIPVisionModel, OPTForCausalLM

    clip = CLIPVisionModel(clip_vision_config(vision)).eval()
    _load_strict(clip, vision_to_hf(state, vision))
    opt = OPTForCausalLM(opt_config(lm, vocab_size)).eval()
    _load_strict(opt, lm_to_hf(state, lm))
    return clip, opt


def _match_prefix(module: torch.nn.Module, state: State) -> State:
    """transformers < 5 nests CLIPVisionModel's weights under `vision_model.`; 5.x does not."""
    if any(k.startswith("vision_model.") for k in module.state_dict()):
        return {"vision_model." + k: v for k, v in state.items()}
    return state


def _load_strict(module: torch.nn.Module, state: State) -> None:
    state = _match_prefix(module, state)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("position_ids")]
    unexpected = [k for k in state if k not in expected]
    assert not missing and not unexpected, f"weight map mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}"
    for k, v in state.items():
        assert expected[k].shape == v.shape, f"{k}: {tuple(v.shape)} vs HF {tuple(expected[k].shape)}"
    module.load_state_dict(state, strict=False)


def clip_latents(clip, pixel_values: torch.Tensor) -> torch.Tensor:
    """Our ViT latents from a converted `CLIPVisionModel`: post-LN applied to every token `[n, M, h]`."""
    inner = getattr(clip, "vision_model", clip)
    return inner.post_layernorm(clip(pixel_values=pixel_values).last_hidden_state)


def lcl_heads_state(state: State) -> State:
    """The LCL-specific weights that have no HF counterpart (saved beside the HF models)."""
    return {k: v for k, v in state.items() if k.startswith(("projector.", "image_head.", "text_head."))}

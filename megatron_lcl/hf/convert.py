"""Exact weight maps between a full (TP=1, PP=1) `LCLModel` state dict and HF `transformers` models.

Each model has ONE table of `(ours, theirs, rule)` entries (`_vision_table`, `_lm_table`, with
`_layer_table` per transformer layer); export and import both walk it (`_convert`). `ours` / `theirs`
name one key or a tuple of keys, and `rule` is a `Rule`: a named pair-wise transform whose `to_hf`
and `from_hf` are written next to each other. Besides plain copies (`COPY`):

- `_qkv_rule(heads)`: megatron-core fuses q, k, v per head: `linear_qkv.weight` is
  `[heads, 3, head_dim, h]` flattened to `[3h, h]` (bias `[3h]`); HF keeps `q_proj` / `k_proj` /
  `v_proj`, each `[h, h]`.
- `LAYER_SCALE` (ViT): gamma * (xW^T + b) = x(diag(gamma)W)^T + gamma*b, so layer-scale is folded into
  HF's `out_proj` / `fc2` on export and set to ones on import (it is already in the weights).
- `POSITION_OFFSET`: OPT's learned positions have 2 extra (never read) rows in front.
- `TIED`: OPT's `lm_head` is our word embedding.

Before weights move, `vision_import_errors` / `lm_import_errors` compare the HF configs with ours:
sizes and every field that changes the function (activation, LayerNorm eps, OPT's LayerNorm placement,
embedding projection, biases, tying); what we cannot represent is refused, naming the field.

ViT <-> `CLIPVisionModel`: same layout; our post-LN is HF's `post_layernorm`, which we apply to all
tokens (HF applies it to the pooled token only), so our latents = `post_layernorm(last_hidden_state)`.

The LCL heads have no HF counterpart: they are saved as they are (`lcl_heads_state`; with the sigmoid
loss `text_head.logit_bias` too, beside `text_head.logit_scale`), and
`image_token_module` rebuilds from them what turns those latents into the LM's image tokens, for both
settings of `model.vision.image_tokens`.
"""

import json
from typing import Callable, Dict, List, NamedTuple, Tuple, Union

import torch
from safetensors import safe_open
from transformers import CLIPVisionConfig, CLIPVisionModel, OPTConfig, OPTForCausalLM

from megatron_lcl.config import LMConfig, VisionConfig
from megatron_lcl.models.heads import ValuePoolingHead

OPT_POSITION_OFFSET = 2
State = Dict[str, torch.Tensor]
Tensors = Tuple[torch.Tensor, ...]


def split_qkv(weight: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, ...]:
    """Fused `[3h, ...]` (megatron-core order: per head q, k, v) -> q, k, v each `[h, ...]`."""
    rest = weight.shape[1:]
    head_dim = weight.shape[0] // (3 * num_heads)
    w = weight.view(num_heads, 3, head_dim, *rest)
    return tuple(w[:, i].reshape(num_heads * head_dim, *rest) for i in range(3))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q, k, v each `[h, ...]` -> fused `[3h, ...]` (`[heads, 3, head_dim, ...]` flattened)."""
    rest = q.shape[1:]
    head_dim = q.shape[0] // num_heads
    return torch.stack([t.view(num_heads, head_dim, *rest) for t in (q, k, v)], dim=1).reshape(
        3 * num_heads * head_dim, *rest)


# ---- pair-wise rules: `to_hf(*ours) -> theirs` and `from_hf(*theirs) -> ours`, side by side ----

class Rule(NamedTuple):
    name: str
    to_hf: Callable[..., Tensors]
    from_hf: Callable[..., Tensors]


COPY = Rule("copy", lambda t: (t,), lambda t: (t,))


def _qkv_rule(num_heads: int) -> Rule:
    """ours (linear_qkv,) `[3h, ...]` <-> theirs (q_proj, k_proj, v_proj) each `[h, ...]`."""
    return Rule("qkv", lambda qkv: split_qkv(qkv, num_heads),
                lambda q, k, v: (fuse_qkv(q, k, v, num_heads),))


def _fold_layer_scale(weight, bias, gamma) -> Tensors:
    """ours (weight `[h, in]`, bias `[h]`, layer_scale `[h]`) -> theirs (weight, bias) with gamma folded."""
    return gamma[:, None] * weight, gamma * bias


def _unit_layer_scale(weight, bias) -> Tensors:
    """theirs (weight, bias) -> ours with layer_scale = 1 (the scale is already inside the weights)."""
    return weight, bias, torch.ones(weight.shape[0])


LAYER_SCALE = Rule("layer_scale", _fold_layer_scale, _unit_layer_scale)


def _pad_positions(positions) -> Tensors:
    """ours `[max_pos, h]` -> OPT `[OFFSET + max_pos, h]` (zero rows in front, OPT never reads them)."""
    return (torch.cat([positions.new_zeros(OPT_POSITION_OFFSET, positions.shape[1]), positions]),)


def _unpad_positions(positions) -> Tensors:
    return (positions[OPT_POSITION_OFFSET:],)


POSITION_OFFSET = Rule("position_offset", _pad_positions, _unpad_positions)

# ours (word_embeddings `[vocab, h]`,) <-> theirs (embed_tokens, lm_head): the same tensor
TIED = Rule("tied", lambda embed: (embed, embed), lambda embed, _lm_head: (embed,))


# ---- the tables ----

Keys = Union[str, Tuple[str, ...]]
Table = List[Tuple[Keys, Keys, Rule]]


class LayerNames(NamedTuple):
    """HF module names inside one transformer layer (ours are megatron-core's)."""
    ln1: str
    ln2: str
    fc1: str
    fc2: str
    attn: str = "self_attn"


CLIP_LAYER = LayerNames(ln1="layer_norm1", ln2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2")
OPT_LAYER = LayerNames(ln1="self_attn_layer_norm", ln2="final_layer_norm", fc1="fc1", fc2="fc2")


def _copied(ours: str, theirs: str) -> Table:
    """weight and bias of a LayerNorm or Linear (`[out, in]` in both), copied as they are."""
    return [(f"{ours}.{kind}", f"{theirs}.{kind}", COPY) for kind in ("weight", "bias")]


def _qkv(ours: str, theirs: str, num_heads: int) -> Table:
    rule = _qkv_rule(num_heads)
    return [(f"{ours}.{kind}", tuple(f"{theirs}.{p}_proj.{kind}" for p in "qkv"), rule)
            for kind in ("weight", "bias")]


def _scaled(ours: str, theirs: str) -> Table:
    return [((f"{ours}.weight", f"{ours}.bias", f"{ours}.layer_scale"),
             (f"{theirs}.weight", f"{theirs}.bias"), LAYER_SCALE)]


def _layer_table(ours: str, theirs: str, hf: LayerNames, num_heads: int, layer_scale: bool) -> Table:
    """One pre-LN transformer layer; `layer_scale`: our out-projections carry a `layer_scale`."""
    out_proj = _scaled if layer_scale else _copied
    return [*_copied(ours + "input_layernorm", theirs + hf.ln1),
            *_qkv(ours + "self_attention.linear_qkv", theirs + hf.attn, num_heads),
            *out_proj(ours + "self_attention.linear_proj", f"{theirs}{hf.attn}.out_proj"),
            *_copied(ours + "pre_mlp_layernorm", theirs + hf.ln2),
            *_copied(ours + "mlp.linear_fc1", theirs + hf.fc1),
            *out_proj(ours + "mlp.linear_fc2", theirs + hf.fc2)]


def _vision_table(vision: VisionConfig) -> Table:
    """`vision.*` <-> `CLIPVisionModel` keys (without the `vision_model.` prefix of transformers < 5)."""
    table = [("vision.conv1.weight", "embeddings.patch_embedding.weight", COPY),  # [h, 3, p, p]
             ("vision.class_token", "embeddings.class_embedding", COPY),  # [h]
             ("vision.position_embeddings", "embeddings.position_embedding.weight", COPY),  # [1 + patches, h]
             *_copied("vision.ln_pre", "pre_layrnorm"),  # sic: HF's spelling
             *_copied("vision.decoder.final_layernorm", "post_layernorm")]
    for i in range(vision.num_layers):
        table += _layer_table(f"vision.decoder.layers.{i}.", f"encoder.layers.{i}.", CLIP_LAYER,
                              vision.num_attention_heads, vision.layer_scale_init is not None)
    return table


def _lm_table(lm: LMConfig) -> Table:
    """`lm.*` <-> `OPTForCausalLM` keys."""
    table = [("lm.embedding.word_embeddings.weight",  # [vocab, h]
              ("model.decoder.embed_tokens.weight", "lm_head.weight"), TIED),
             ("lm.embedding.position_embeddings.weight",  # ours [max_pos, h], OPT [2 + max_pos, h]
              "model.decoder.embed_positions.weight", POSITION_OFFSET),
             *_copied("lm.decoder.final_layernorm", "model.decoder.final_layer_norm")]
    for i in range(lm.num_layers):
        table += _layer_table(f"lm.decoder.layers.{i}.", f"model.decoder.layers.{i}.", OPT_LAYER,
                              lm.num_attention_heads, layer_scale=False)
    return table


def _convert(table: Table, src: State, to_hf: bool) -> State:
    """Apply every rule of `table` in one direction: ours -> theirs (`to_hf`) or theirs -> ours."""
    out = {}
    for ours, theirs, rule in table:
        read, write, fn = (ours, theirs, rule.to_hf) if to_hf else (theirs, ours, rule.from_hf)
        out.update(zip(_as_tuple(write), fn(*(src[k] for k in _as_tuple(read))), strict=True))
    return out


def _as_tuple(keys: Keys) -> Tuple[str, ...]:
    return (keys,) if isinstance(keys, str) else keys


def vision_to_hf(state: State, vision: VisionConfig) -> State:
    """`vision.*` of an LCLModel state dict -> `CLIPVisionModel` state dict."""
    return _convert(_vision_table(vision), state, to_hf=True)


def vision_from_hf(hf: State, vision: VisionConfig) -> State:
    """`CLIPVisionModel` state dict -> `vision.*` entries (layer-scale set to 1: already folded)."""
    hf = {k.removeprefix("vision_model."): v for k, v in hf.items()}
    return _convert(_vision_table(vision), hf, to_hf=False)


def lm_to_hf(state: State, lm: LMConfig) -> State:
    """`lm.*` of an LCLModel state dict -> `OPTForCausalLM` state dict (lm_head tied)."""
    return _convert(_lm_table(lm), state, to_hf=True)


def lm_from_hf(hf: State, lm: LMConfig) -> State:
    """`OPTForCausalLM` state dict -> `lm.*` entries (a saved file may omit the tied `lm_head`)."""
    hf = {"lm_head.weight": hf["model.decoder.embed_tokens.weight"], **hf}
    return _convert(_lm_table(lm), hf, to_hf=False)


# ---- configs: what the HF side must have for the weights to compute our function ----

OPT_LAYERNORM_EPS = 1e-5  # transformers' OPT builds nn.LayerNorm with its default eps (no config field)


def _mismatch(ours_name: str, ours, theirs_name: str, theirs) -> List[str]:
    return [] if ours == theirs else [f"{ours_name} is {ours!r}, the HF model has {theirs_name}={theirs!r}"]


def vision_import_errors(vision: VisionConfig, clip) -> List[str]:
    """Every `CLIPVisionConfig` field that differs from `vision` in size or in the function computed.

    CLIP's layers are pre-LN with `pre_layrnorm` and `post_layernorm` (fixed in transformers), as ours.
    """
    errors = []
    for ours, theirs in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                         ("num_attention_heads", "num_attention_heads"), ("ffn_hidden_size", "intermediate_size"),
                         ("patch_size", "patch_size"), ("image_size", "image_size")):
        errors += _mismatch(f"model.vision.{ours}", getattr(vision, ours), theirs, getattr(clip, theirs))
    act = clip.hidden_act
    if act not in ACTIVATIONS_HF:
        errors.append(f"hidden_act={act!r} of the HF vision model is not supported "
                      f"(model.vision.activation: one of {', '.join(ACTIVATIONS_HF)})")
    else:
        errors += _mismatch("model.vision.activation", vision.activation, "hidden_act", act)
    errors += _mismatch("model.vision.layernorm_epsilon", vision.layernorm_epsilon, "layer_norm_eps",
                        clip.layer_norm_eps)
    errors += _mismatch("the ViT's input channels", 3, "num_channels", clip.num_channels)
    return errors


def lm_import_errors(lm: LMConfig, opt) -> List[str]:
    """Every `OPTConfig` field that differs from `lm` in size or in the function computed (our LM is
    OPT-125M's architecture: pre-LN, ReLU, biases, affine LayerNorms with eps 1e-5, tied embeddings)."""
    errors = []
    for ours, theirs in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                         ("num_attention_heads", "num_attention_heads"), ("ffn_hidden_size", "ffn_dim"),
                         ("max_position_embeddings", "max_position_embeddings")):
        errors += _mismatch(f"model.lm.{ours}", getattr(lm, ours), theirs, getattr(opt, theirs))
    fixed = (("do_layer_norm_before", True, "post-LayerNorm OPT layers (OPT-350m) are not supported: ours are pre-LN"),
             ("_remove_final_layer_norm", False, "OPT without a final LayerNorm is not supported"),
             ("word_embed_proj_dim", opt.hidden_size,
              f"an embedding projection (word_embed_proj_dim != hidden_size {opt.hidden_size}) is not supported"),
             ("activation_function", "relu", "only relu is supported (model.lm is OPT's architecture)"),
             ("enable_bias", True, "OPT without linear biases is not supported"),
             ("layer_norm_elementwise_affine", True, "OPT LayerNorms without weight/bias are not supported"),
             ("tie_word_embeddings", True, "an untied lm_head is not supported (ours is tied to the embedding)"))
    for field_name, want, why in fixed:
        value = getattr(opt, field_name, want)
        if value != want:
            errors.append(f"{field_name}={value!r} of the HF language model: {why}")
    errors += _mismatch("model.lm.layernorm_epsilon", lm.layernorm_epsilon, "the fixed OPT LayerNorm eps",
                        OPT_LAYERNORM_EPS)
    return errors


ACTIVATIONS_HF = ("gelu", "quick_gelu")  # HF `hidden_act` names == ours (`VisionConfig.activation`)


def clip_vision_config(vision: VisionConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=vision.hidden_size, intermediate_size=vision.ffn_hidden_size,
        num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_attention_heads,
        image_size=vision.image_size, patch_size=vision.patch_size, hidden_act=vision.activation,
        layer_norm_eps=vision.layernorm_epsilon, attention_dropout=0.0, num_channels=3)


def opt_config(lm: LMConfig, vocab_size: int, pad_token_id: int = 0, bos_token_id: int = 1,
               eos_token_id: int = 2) -> OPTConfig:
    return OPTConfig(
        vocab_size=vocab_size, hidden_size=lm.hidden_size, num_hidden_layers=lm.num_layers,
        ffn_dim=lm.ffn_hidden_size, num_attention_heads=lm.num_attention_heads,
        max_position_embeddings=lm.max_position_embeddings, do_layer_norm_before=True,
        word_embed_proj_dim=lm.hidden_size, activation_function="relu", dropout=0.0,
        attention_dropout=0.0, layerdrop=0.0, enable_bias=True, layer_norm_elementwise_affine=True,
        tie_word_embeddings=True, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id)


def build_hf_models(state: State, vision: VisionConfig, lm: LMConfig, vocab_size: int,
                    special_ids: Dict[str, int] = None):
    """-> (CLIPVisionModel, OPTForCausalLM) in eval mode with our weights loaded strictly.
    `special_ids`: the tokenizer's {pad,bos,eos}_token_id for the OPT config (and so its generation
    defaults); without one, OPT's own 0 / 1 / 2."""
    clip_cfg, opt_cfg = clip_vision_config(vision), opt_config(lm, vocab_size, **(special_ids or {}))
    errors = vision_import_errors(vision, clip_cfg) + lm_import_errors(lm, opt_cfg)
    assert not errors, "cannot export to transformers without changing the function: " + "; ".join(errors)
    clip = CLIPVisionModel(clip_cfg).eval()
    _load_strict(clip, vision_to_hf(state, vision))
    opt = OPTForCausalLM(opt_cfg).eval()
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


def read_heads_config(path: str) -> dict:
    """The `config` metadata of an export's `lcl_heads.safetensors` (`{}` when it has none);
    `image_tokens` defaults to latents (exports made before the option)."""
    with safe_open(path, "pt") as f:
        config = json.loads((f.metadata() or {}).get("config", "{}"))
    return {"image_tokens": "latents", **config}


class PooledValueTokens(torch.nn.Module):
    """`image_tokens=pooled_values`: latents `[n, 1 + P, h_v]` -> O(V(LN_v(patches))) `[n, P, h]`, the
    class token dropped (`ValuePoolingHead`, loaded with the `image_head.*` weights it needs)."""

    def __init__(self, heads: State, eps: float):
        super().__init__()
        lm_width, vit_width = heads["image_head.v.weight"].shape
        self.head = ValuePoolingHead(vit_width, lm_width, num_heads=1, eps=eps)  # heads: the pooling only
        self.head.load_state_dict({k.removeprefix("image_head."): v for k, v in heads.items()
                                   if k.startswith("image_head.")})

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.head.tokens(self.head.values(latents[:, 1:]))


def image_token_module(heads: State, image_tokens: str = "latents", eps: float = 1e-5) -> torch.nn.Module:
    """From the `lcl_heads_state` weights (`lcl_heads.safetensors`): the module that turns `clip_latents`
    `[n, 1 + P, h_v]` into the LM's image tokens `[n, M, h]`: the linear projector (`latents`, M = 1 + P)
    or the released code's value path (`pooled_values`, M = P). `eps`: the ViT's LayerNorm epsilon."""
    if image_tokens == "pooled_values":
        return PooledValueTokens(heads, eps).eval()
    assert image_tokens == "latents", f"image_tokens {image_tokens!r}: latents or pooled_values"
    lm_width, vit_width = heads["projector.weight"].shape
    projector = torch.nn.Linear(vit_width, lm_width)
    projector.load_state_dict({"weight": heads["projector.weight"], "bias": heads["projector.bias"]})
    return projector.eval()

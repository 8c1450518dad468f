"""The FLOPs and parameter model of the LCL model: analytic counts per group, and counts of a built one.

Counting convention (Kaplan et al. 2020, Chinchilla, PaLM's MFU): a matmul of `[m, k] x [k, n]` is
2·m·k·n FLOPs; convolutions likewise; elementwise work (norms, softmax, activations, biases,
layer-scale, the loss) is not counted. Backward = 2x forward for every matmul whose two inputs both
need a gradient; the patchify convolution has a constant input (the image), so its backward is 1x.

Causal attention (`attention_count`): the LM's attention scores and context are counted as the kernels
run them, by default: `"causal"` counts s²/2 per layer (each position attends to half the sequence on
average), what SDPA's flash / memory-efficient kernels (`is_causal=True`, the local path's default) and
Transformer Engine's fused attention compute: they skip the masked blocks. `"full"` counts s² per
layer: the paper-comparable count (Kaplan's, Chinchilla's and Megatron-LM's formulas count the full
square) and what an unfused kernel (`model.attention=unfused`) or torch's FlopCounterMode sees. The
ViT and the pooling attend bidirectionally: full in both conventions. MFU (`mfu`) is the model FLOP/s
under the default over the accelerator's spec-sheet dense peak (`PEAK_FLOPS_PER_S`), not over a
measured matmul peak; every pass the step runs is counted, the feature pass below too (a plain-DDP
codebase runs none: compare with `feature_pass=False`). tests/models/test_flops_conventions.py holds
these conventions. The model mirrors `megatron_lcl.models` group by group:

    per image     vit        conv patchify, L_v x (QKV, scores, context, proj, FFN) over 1 + P tokens
                  projector  the M image tokens: latents -> LM width (`image_tokens=latents`), or the
                             pooling block's V and O over the P patches (`pooled_values`)
                  heads      attention pooling (1 query, M keys) + W1 (`pooled_values`: its Q, K,
                             attention and O), and W2 on the <BoI> output
    per sequence  lm         L x (QKV, scores, context, proj, FFN) over s positions (causal)
                  output     s x h x V_padded logits (tied weight: both gradients; skipped for loss=con)
    per image     contrastive  2 logit matrices of [n, N] over e (N = images in the contrastive batch:
                               the global micro-batch, or the whole step with contrastive_batch=step);
                               the sigmoid loss: 1 matrix, whose backward recomputes it on the ring
                               (x4 with backward: forward, recompute, the two gradient matmuls)
    feature pass  contrastive_batch=step with several micro-batches: one more forward of vit,
                  projector, lm layers and heads over every micro-batch of the step (no output
                  layer, no backward) that collects the step's features first (`uses_feature_pass`)

tests/test_scaling.py compares this with torch's FlopCounterMode on built models (with
`attention_count="full"`, what the counter sees); `parameter_counts` (analytic) matches
`count_parameters_by_group` (of a built model) exactly.
"""

from collections import OrderedDict
from typing import Optional

from megatron_lcl.config import LMConfig, ModelConfig, VisionConfig, padded_vocab_size

# Parameter groups of an `LCLModel`, by name prefix (a DDP wrapper's `module.` is stripped).
PARAMETER_GROUPS = OrderedDict([
    ("vit", ("vision.",)),
    ("projector", ("projector.",)),
    ("lm", ("lm.",)),
    ("heads", ("image_head.", "text_head.")),
])

# Spec-sheet dense peak FLOP/s per accelerator (no sparsity), the denominator of MFU. Pass your own to
# `mfu` for anything else. A measured matmul peak (~790-800 TFLOP/s bf16 on an H100/H200) is reported
# beside MFU by the benchmarks, never used as its denominator.
PEAK_FLOPS_PER_S = {
    "h100-sxm-bf16": 989e12,
    "h200-bf16": 989e12,
    "a100-bf16": 312e12,
    "a800-bf16": 312e12,  # the paper's GPUs (an A100 with a slower NVLink)
    "v100-fp16": 125e12,
}
# GPU name (as torch.cuda.get_device_name gives it) -> the key of its bf16 peak above.
_GPU_NAME_KEYS = (("H100", "h100-sxm-bf16"), ("H200", "h200-bf16"), ("A100", "a100-bf16"), ("A800", "a800-bf16"))

ATTENTION_COUNTS = ("causal", "full")  # see the module docstring


# ------------------------------------------------------------------------------------ parameters

def transformer_layer_params(h: int, ffn: int, layer_scale: bool = False) -> int:
    """One pre-LN megatron-core layer with biases: LN, QKV, proj, LN, fc1, fc2 (+ 2 layer-scale vectors)."""
    return (2 * h  # input LayerNorm
            + 3 * h * h + 3 * h  # linear_qkv
            + h * h + h  # linear_proj
            + 2 * h  # pre-MLP LayerNorm
            + h * ffn + ffn + ffn * h + h  # fc1, fc2
            + (2 * h if layer_scale else 0))


def vit_params(v: VisionConfig) -> int:
    h = v.hidden_size
    embed = 3 * v.patch_size ** 2 * h + h + v.num_vit_tokens * h + 2 * h  # conv, class token, positions, ln_pre
    layers = v.num_layers * transformer_layer_params(h, v.ffn_hidden_size, v.layer_scale_init is not None)
    return embed + layers + 2 * h  # final (post-)LayerNorm


def lm_params(lm: LMConfig, tensor_model_parallel_size: int = 1) -> int:
    h = lm.hidden_size
    embed = padded_vocab_size(lm, tensor_model_parallel_size) * h + lm.max_position_embeddings * h
    return embed + lm.num_layers * transformer_layer_params(h, lm.ffn_hidden_size) + 2 * h  # output tied


def heads_params(cfg: ModelConfig) -> int:
    hv, hl, e = cfg.vision.hidden_size, cfg.lm.hidden_size, cfg.heads.embed_dim
    image = hv + 2 * hv + (3 * hv * hv + 3 * hv) + (hv * hv + hv) + hv * e  # query, LN, MHA in/out, W1
    if cfg.vision.image_tokens == "pooled_values":
        image = hv + 3 * 2 * hv + 3 * (hv * hl + hl) + hl * hl  # query, LN q/k/v, Q/K/V, O (no bias, no W1)
    text = 2 * hl + hl * e + 1 + (cfg.heads.logit_bias_init is not None)  # LN, W2, logit_scale (, logit_bias)
    return image + text


def projector_params(cfg: ModelConfig) -> int:
    """The linear projector (`image_tokens=latents`); pooled_values has none (its head makes the tokens)."""
    if cfg.vision.image_tokens != "latents":
        return 0
    return cfg.vision.hidden_size * cfg.lm.hidden_size + cfg.lm.hidden_size


def parameter_counts(cfg: ModelConfig, tensor_model_parallel_size: int = 1) -> "OrderedDict[str, int]":
    """{vit, projector, lm, heads, total}: the same groups and numbers as `count_parameters_by_group`
    on a whole model (TP=PP=1), plus `lm_embedding` (word + position tables, included in `lm`)."""
    counts = OrderedDict([
        ("vit", vit_params(cfg.vision)),
        ("projector", projector_params(cfg)),
        ("lm", lm_params(cfg.lm, tensor_model_parallel_size)),
        ("heads", heads_params(cfg)),
    ])
    counts["total"] = sum(counts.values())
    counts["lm_embedding"] = (padded_vocab_size(cfg.lm, tensor_model_parallel_size)
                              + cfg.lm.max_position_embeddings) * cfg.lm.hidden_size
    return counts


def count_parameters_by_group(model) -> "OrderedDict[str, int]":
    """{group: number of parameters} of a built model on this rank, plus 'total'. The tied output
    layer counts once."""
    counts = OrderedDict((g, 0) for g in PARAMETER_GROUPS)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        name = name.removeprefix("module.")
        group = next((g for g, prefixes in PARAMETER_GROUPS.items() if name.startswith(prefixes)), None)
        assert group is not None, f"parameter {name} belongs to no group"
        counts[group] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


# ------------------------------------------------------------------------------------ forward FLOPs

def transformer_layer_flops(tokens: int, h: int, ffn: int, attended: float) -> float:
    """Forward FLOPs of one layer over `tokens` positions, each attending to `attended` positions."""
    dense = 2 * tokens * (3 * h * h + h * h + 2 * h * ffn)  # QKV, proj, fc1, fc2
    attention = 2 * 2 * tokens * attended * h  # scores Q K^T and context A V
    return dense + attention


def vit_forward_flops(v: VisionConfig) -> dict:
    """Per image: {'patchify': conv, 'vit_layers': transformer layers}."""
    m, h = v.num_vit_tokens, v.hidden_size
    patchify = 2 * v.num_patches * 3 * v.patch_size ** 2 * h
    layers = v.num_layers * transformer_layer_flops(m, h, v.ffn_hidden_size, attended=m)
    return {"patchify": patchify, "vit_layers": layers}


def heads_forward_flops(cfg: ModelConfig) -> float:
    """Per image: attention pooling (q, kv and out projections, 1 x M attention), W1 and W2.
    pooled_values: Q on the query, K over the P patches, 1 x P attention, O; its V is the projector's."""
    m, hv, hl, e = cfg.vision.num_image_tokens, cfg.vision.hidden_size, cfg.lm.hidden_size, cfg.heads.embed_dim
    if cfg.vision.image_tokens == "pooled_values":
        return 2 * hv * hl + 2 * m * hv * hl + 2 * 2 * m * hl + 2 * hl * hl + 2 * hl * e
    pooling = 2 * hv * hv + 2 * m * 2 * hv * hv + 2 * 2 * m * hv + 2 * hv * hv
    return pooling + 2 * hv * e + 2 * hl * e


def projector_forward_flops(cfg: ModelConfig) -> float:
    """Per image, the M image tokens: latents -> LM width, or (pooled_values) V then O over the P patches."""
    m, hv, hl = cfg.vision.num_image_tokens, cfg.vision.hidden_size, cfg.lm.hidden_size
    return 2 * m * hv * hl + (2 * m * hl * hl if cfg.vision.image_tokens == "pooled_values" else 0)


def spec_peak_flops_per_s(device_name: str, dtype: str = "bf16") -> Optional[float]:
    """The spec-sheet dense peak of a GPU named `device_name` in `dtype`; None when not in the table
    (a CPU, another GPU, or fp32)."""
    if dtype != "bf16":
        return None
    key = next((k for name, k in _GPU_NAME_KEYS if name in device_name.upper()), None)
    return PEAK_FLOPS_PER_S[key] if key else None


def lm_forward_flops(lm: LMConfig, seq_length: int, attention_count: str = "causal") -> float:
    """Per sequence of `seq_length` positions (text, image latents and padding all count)."""
    assert attention_count in ATTENTION_COUNTS, f"attention_count {attention_count!r}: one of {ATTENTION_COUNTS}"
    attended = seq_length / 2 if attention_count == "causal" else seq_length  # causal: s²/2 scores per layer
    return lm.num_layers * transformer_layer_flops(seq_length, lm.hidden_size, lm.ffn_hidden_size, attended)


def step_flops(cfg: ModelConfig, seq_length: int, images_per_sample: float, samples: int = 1, *,
               contrastive_negatives: Optional[int] = None, loss_mode: str = "lcl",
               backward: bool = True, tensor_model_parallel_size: int = 1,
               attention_count: str = "causal", feature_pass: bool = False,
               contrastive_loss: str = "infonce") -> "OrderedDict[str, float]":
    """FLOPs by group for `samples` sequences holding `images_per_sample` images each (on average).

    `contrastive_negatives` is N, the images one InfoNCE row is scored against (images of the global
    micro-batch); None leaves the [n, N] logit matmuls out (they are < 0.1% at realistic sizes).
    With `backward`, forward + backward (the training step); else forward only. `feature_pass`: the
    step-wide L_con's extra forward (`loss.contrastive_batch=step` with several micro-batches).
    `contrastive_loss`: infonce or sigmoid (`loss.contrastive_loss`: the module docstring's counts).
    `attention_count`: "causal" (the LM's attention as the kernels run it) or "full" (module docstring). Returns
    {vit, projector, lm, output, heads, contrastive, feature_pass, total}.
    """
    assert loss_mode in ("lcl", "gen", "con"), f"loss_mode {loss_mode!r}"
    v, lm = cfg.vision, cfg.lm
    images = images_per_sample * samples
    vit = vit_forward_flops(v)
    mult = 3 if backward else 1  # forward + 2x forward
    vocab = padded_vocab_size(lm, tensor_model_parallel_size)
    output = 0.0 if loss_mode == "con" else 2 * seq_length * lm.hidden_size * vocab * samples
    contrastive = 0.0 if contrastive_negatives is None or loss_mode == "gen" else \
        2 * 2 * images * contrastive_negatives * cfg.heads.embed_dim
    flops = OrderedDict([
        ("vit", images * (vit["patchify"] * (2 if backward else 1) + vit["vit_layers"] * mult)),
        ("projector", images * projector_forward_flops(cfg) * mult),
        ("lm", samples * lm_forward_flops(lm, seq_length, attention_count) * mult),
        ("output", output * mult),
        ("heads", images * heads_forward_flops(cfg) * mult),
        ("contrastive", contrastive * mult if contrastive_loss == "infonce" else contrastive / 2 * (4 if backward else 1)),
    ])
    forward_no_output = (images * (vit["patchify"] + vit["vit_layers"] + heads_forward_flops(cfg) +
                                   projector_forward_flops(cfg))
                         + samples * lm_forward_flops(lm, seq_length, attention_count))
    flops["feature_pass"] = forward_no_output if feature_pass and loss_mode != "gen" else 0.0
    flops["total"] = sum(flops.values())
    return flops


def run_flops_options(cfg, micro_batches: int) -> dict:
    """The `step_flops` options of a training run of the whole config `cfg` (`megatron_lcl.config.Config`)
    with `micro_batches` per rank and step: its loss mode and contrastive loss, the vocabulary padding of
    its TP size, and the step-wide L_con's feature pass (contrastive_batch=step over more than one
    micro-batch, `training.pipeline.uses_feature_pass`). The trainer's `model_flops_per_s` / `mfu` and a
    sweep's `train_flops` both count with these, so the two agree on every pass the run makes."""
    return dict(loss_mode=cfg.loss.mode, contrastive_loss=cfg.loss.contrastive_loss,
                tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
                feature_pass=cfg.loss.contrastive_batch == "step" and micro_batches > 1)


def flops_per_sample(cfg: ModelConfig, seq_length: int, images_per_sample: float, **kwargs) -> float:
    """Training FLOPs (forward + backward) of one sequence: the unit the sweeps multiply by samples."""
    return step_flops(cfg, seq_length, images_per_sample, samples=1, **kwargs)["total"]


def training_flops(cfg: ModelConfig, seq_length: int, samples: int, images: int, **kwargs) -> float:
    """Total training FLOPs of a run that consumed `samples` sequences holding `images` images."""
    if samples == 0:
        return 0.0
    return step_flops(cfg, seq_length, images / samples, samples=samples, **kwargs)["total"]


def mfu(model_flops_per_s: float, peak_flops_per_s: float, num_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of `num_devices` accelerators."""
    assert peak_flops_per_s > 0, "peak_flops_per_s must be > 0"
    return model_flops_per_s / (peak_flops_per_s * num_devices)


def model_flops_per_s(cfg: ModelConfig, seq_length: int, global_batch_size: int,
                      images_per_step: float, step_time_s: float, **kwargs) -> float:
    """What the training log reports: the step's model FLOPs divided by its wall time."""
    return training_flops(cfg, seq_length, global_batch_size, images_per_step, **kwargs) / step_time_s


def throughput_metrics(cfg: ModelConfig, seq_length: int, global_batch_size: int, images_per_step: float,
                       step_time_s: float, peak_flops_per_s: Optional[float] = None, num_devices: int = 1,
                       **kwargs) -> dict:
    """{model_flops_per_s, mfu (when a peak is given)} for one training-log line, e.g. in the trainer:

        row.update(throughput_metrics(cfg.model, cfg.data.seq_length, cfg.train.global_batch_size,
                                      images_per_step, row["step_time_s"], cfg.logging.peak_flops_per_s,
                                      dist.get_world_size(), loss_mode=cfg.loss.mode))
    """
    achieved = model_flops_per_s(cfg, seq_length, global_batch_size, images_per_step, step_time_s, **kwargs)
    out = {"model_flops_per_s": achieved}
    if peak_flops_per_s:
        out["mfu"] = mfu(achieved, peak_flops_per_s, num_devices)
    return out

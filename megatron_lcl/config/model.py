"""The model sections of the configuration (ViT, LM, heads, loss, parallel layout, precision) and their
presets: plain data. Validation of these sections lives in `megatron_lcl.config.validate`; the
megatron-core `TransformerConfig` made from them in `megatron_lcl.models.transformer_config`.
"""

from dataclasses import dataclass, field, replace
from typing import List, Optional

# --------------------------------------------------------------------------------------------------
# Presets. Sizes as published: ViT-B/16 and ViT-L/14 (CLIP), ViT-H/14 (OpenCLIP), OPT-125M (Zhang et al. 2022).
# --------------------------------------------------------------------------------------------------

VISION_PRESETS = {
    "tiny": dict(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_attention_heads=4,
                 ffn_hidden_size=256),
    "B/16": dict(image_size=224, patch_size=16, hidden_size=768, num_layers=12,
                 num_attention_heads=12, ffn_hidden_size=3072),
    "L/14": dict(image_size=224, patch_size=14, hidden_size=1024, num_layers=24,
                 num_attention_heads=16, ffn_hidden_size=4096),
    "H/14": dict(image_size=224, patch_size=14, hidden_size=1280, num_layers=32,
                 num_attention_heads=16, ffn_hidden_size=5120),
}

LM_PRESETS = {
    "tiny": dict(hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=256,
                 max_position_embeddings=256),
    "opt-125m": dict(hidden_size=768, num_layers=12, num_attention_heads=12, ffn_hidden_size=3072,
                     max_position_embeddings=2048),
}


@dataclass
class VisionConfig:
    """ViT encoder (CLIP layout: conv patchify, class token, learned positions, pre-LN, post-LN)."""

    preset: Optional[str] = None  # fills the size fields below that are left unset
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    ffn_hidden_size: int = 256
    layernorm_epsilon: float = 1e-5
    # MLP activation: gelu (exact erf, open_clip / HF `gelu`) | quick_gelu (x * sigmoid(1.702 x), the
    # `hidden_act` of every openai/clip-vit-* release; set it to continue from those weights).
    activation: str = "gelu"
    layer_scale_init: Optional[float] = 0.1  # None disables layer-scale
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over depth
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # What fills an image's M positions in the LM (docs/training.md "Image tokens"):
    # - latents (the paper's text, default): every ViT output token (class token first), through the
    #   linear projector; v_i = W1 · attention_pool(latents). M = 1 + patches.
    # - pooled_values (the released OpenGVLab/LCL code): the patch tokens only, through the pooling
    #   block's value projection and output projection (no attention); v_i = that block's pooled
    #   output, with no W1 (needs model.heads.embed_dim == model.lm.hidden_size). M = patches.
    image_tokens: str = "latents"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_vit_tokens(self) -> int:
        """Tokens the ViT runs on: the class token + the patches (both settings of `image_tokens`)."""
        return self.num_patches + 1

    @property
    def num_image_tokens(self) -> int:
        """M: LM positions one image occupies between <BoI> and <EoI>: class token + patches
        (`image_tokens=latents`) or the patches alone (`pooled_values`)."""
        return self.num_patches + (1 if self.image_tokens == "latents" else 0)


@dataclass
class LMConfig:
    """Causal LM with the OPT architecture (learned absolute positions, pre-LN, ReLU, tied embeddings)."""

    preset: Optional[str] = None
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    ffn_hidden_size: int = 256
    max_position_embeddings: int = 256
    vocab_size: int = 512  # the tokenizer's size; padded by `padded_vocab_size`
    make_vocab_size_divisible_by: int = 128
    layernorm_epsilon: float = 1e-5
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0


@dataclass
class HeadsConfig:
    """The LCL heads: attention pooling -> W1 -> v_i and LayerNorm -> W2 on the <BoI> output -> t_i
    (with `model.vision.image_tokens=pooled_values` the pooling block projects to embed_dim itself)."""

    embed_dim: int = 64  # dimension of v_i and t_i
    pool_num_heads: int = 4
    logit_scale_init: float = 1 / 0.07  # s at init (InfoNCE: 1/0.07; SigLIP's sigmoid loss: 10)
    logit_scale_max: float = 100.0
    # The learnable logit bias b of the sigmoid loss (SigLIP init: -10); null: no bias parameter (InfoNCE,
    # where a bias cancels in the softmax). loss.contrastive_loss=sigmoid needs it (SIGMOID_OVERRIDES).
    logit_bias_init: Optional[float] = None


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    # Which layer implementation: "auto" picks Transformer Engine when CUDA and TE are present.
    transformer_impl: str = "auto"  # auto | transformer_engine | local
    # Core attention of the local layers (Transformer Engine layers keep TE's): sdpa runs
    # torch's scaled_dot_product_attention (fused kernels); unfused is megatron-core's DotProductAttention.
    attention: str = "sdpa"  # sdpa | unfused
    init_method_std: float = 0.02


@dataclass
class LossConfig:
    mode: str = "lcl"  # lcl (L_gen + lambda * L_con) | gen | con
    con_weight: float = 0.1  # lambda; paper Table 6b: 0.1 best
    # Negatives of L_con. step (the paper's semantics): one InfoNCE over all images of all
    # micro-batches on all data-parallel ranks of the step (a feature cache, see
    # megatron_lcl.training.pipeline). micro_batch: each image against its micro-batch's images on all DP
    # ranks, averaged over the step's images (megatron_lcl.losses.lcl).
    contrastive_batch: str = "step"
    # The contrastive objective over that batch. infonce: symmetric softmax cross-entropy (the paper's).
    # sigmoid: SigLIP's pairwise loss sum_j -log sigmoid(z_ij (s v_i.t_j + b)), z_ij = +1 for i = j else -1,
    # summed over every image pair of the batch and divided by its images (as the InfoNCE), computed on
    # a ring over the DP ranks (megatron_lcl.losses.sigmoid); needs model.heads.logit_bias_init.
    contrastive_loss: str = "infonce"


# The sigmoid arm with SigLIP's init (s = 10, b = -10): `key=value` overrides for a run or a sweep arm.
SIGMOID_OVERRIDES = ("loss.contrastive_loss=sigmoid", "model.heads.logit_scale_init=10",
                     "model.heads.logit_bias_init=-10")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Uneven pipeline split for the LM: the first stage also holds the ViT.
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None
    virtual_pipeline_model_parallel_size: Optional[int] = None  # not supported: clear error
    # Split the LM's LayerNorm/dropout activations along the sequence over TP ranks (TP > 1, PP = 1).
    # The ViT runs without it: its token count (1 + patches, 257 for L/14) need not divide by TP.
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # ---- Performance knobs (docs/training.md "Performance knobs"; megatron-core's names). Each gives
    # the same losses and gradients as its default (tests/training/test_perf_knobs.py): less memory or more overlap.
    # Activation recomputation, applied to the ViT's and the LM's TransformerBlock alike:
    # - selective: recompute `recompute_modules` in backward (core_attn: the [b, heads, s, s] attention
    #   scores/probs/dropout, the large activation at long sequences);
    # - full: keep only the input of each chunk of layers and recompute the chunk in backward.
    #   `uniform`: every layer, in chunks of `recompute_num_layers` (must divide each block's layers);
    #   `block`: only the first `recompute_num_layers` layers of each block (the ViT's, and the LM's on
    #   each pipeline stage), the rest keep their activations.
    # Dropout and drop-path masks are redrawn identically (megatron-core restores the RNG states).
    recompute_granularity: Optional[str] = None  # null | selective | full
    recompute_method: Optional[str] = None  # full only: uniform | block
    recompute_num_layers: Optional[int] = None  # full only
    recompute_modules: List[str] = field(default_factory=lambda: ["core_attn"])  # selective only
    # DDP: start each bucket's gradient all-reduce (reduce-scatter with the distributed optimizer) while
    # the backward of the step's last micro-batch is still running, instead of after it.
    overlap_grad_reduce: bool = False
    bucket_size: Optional[int] = None  # parameters per bucket (overlap_grad_reduce only); null: max(40M, 1M x DP)
    # Distributed optimizer: all-gather the updated parameters bucket by bucket during the next forward
    # (forward pre-hooks) instead of at the end of the optimizer step. Needs overlap_grad_reduce (buckets).
    overlap_param_gather: bool = False


@dataclass
class PrecisionConfig:
    params_dtype: str = "fp32"  # fp32 | bf16
    # Transformer Engine's fp8 GEMMs in the LM's layers (the ViT's stay in params_dtype: its M x images
    # rows need not divide by 8); validated: LM rows and widths, TE layers (docs/gpu.md "Precision on a GPU").
    fp8: Optional[str] = None  # None | hybrid | e4m3


def apply_preset(section, presets: dict):
    """Return `section` with its preset's sizes (the YAML loader applies explicit keys after this)."""
    if section.preset is None:
        return section
    if section.preset not in presets:
        raise ValueError(f"unknown preset {section.preset!r}; choose from {sorted(presets)}")
    return replace(section, **presets[section.preset])


def padded_vocab_size(lm: LMConfig, tensor_model_parallel_size: int) -> int:
    """Pad the vocabulary so every tensor-parallel shard has the same size (as Megatron-LM does)."""
    multiple = lm.make_vocab_size_divisible_by * tensor_model_parallel_size
    return ((lm.vocab_size + multiple - 1) // multiple) * multiple

"""The FLOPs model's conventions: the LM's causal attention counted as the kernels run it (s²/2 per
layer) by default and in full on request, the ViT's bidirectional attention always in full, and MFU
over the spec-sheet peak."""

import pytest

from megatron_lcl.config import LM_PRESETS, VISION_PRESETS, HeadsConfig, LMConfig, ModelConfig, VisionConfig, apply_preset
from megatron_lcl.models.flops import (PEAK_FLOPS_PER_S, spec_peak_flops_per_s, step_flops, throughput_metrics,
                                       vit_forward_flops)


def paper_model() -> ModelConfig:
    return ModelConfig(vision=apply_preset(VisionConfig(preset="L/14"), VISION_PRESETS),
                       lm=apply_preset(LMConfig(preset="opt-125m", vocab_size=50272), LM_PRESETS),
                       heads=HeadsConfig(embed_dim=768, pool_num_heads=16))


def test_causal_counts_half_the_lm_attention_and_nothing_else():
    cfg, s = paper_model(), 2048
    causal = step_flops(cfg, s, 3, samples=2, feature_pass=True)
    full = step_flops(cfg, s, 3, samples=2, feature_pass=True, attention_count="full")
    lm = cfg.lm
    # scores Q K^T and context A V: 2 matmuls x 2 FLOPs x s x (s/2 attended) x h, per layer and sequence
    half_attention = lm.num_layers * 2 * 2 * s * (s / 2) * lm.hidden_size * 2
    assert full["lm"] - causal["lm"] == pytest.approx(3 * half_attention)  # forward + backward
    assert full["feature_pass"] - causal["feature_pass"] == pytest.approx(half_attention)  # forward only
    for group in ("vit", "projector", "output", "heads", "contrastive"):
        assert full[group] == causal[group], group  # the ViT attends bidirectionally: full in both
    assert causal == step_flops(cfg, s, 3, samples=2, feature_pass=True, attention_count="causal")  # the default


def test_vit_attention_is_counted_over_all_m_tokens():
    v = paper_model().vision
    m, h = v.num_image_tokens, v.hidden_size
    dense = 2 * m * (4 * h * h + 2 * h * v.ffn_hidden_size)
    assert vit_forward_flops(v)["vit_layers"] == pytest.approx(v.num_layers * (dense + 4 * m * m * h))


def test_an_unknown_convention_is_refused():
    with pytest.raises(AssertionError, match="attention_count 'half'"):
        step_flops(paper_model(), 128, 1, attention_count="half")


def test_spec_peaks_by_device_name():
    assert spec_peak_flops_per_s("NVIDIA H100 80GB HBM3") == 989e12
    assert spec_peak_flops_per_s("NVIDIA H200") == 989e12
    assert spec_peak_flops_per_s("NVIDIA A800-SXM4-80GB") == PEAK_FLOPS_PER_S["a800-bf16"] == 312e12
    assert spec_peak_flops_per_s("NVIDIA A100-SXM4-40GB") == 312e12
    assert spec_peak_flops_per_s("cpu") is None
    assert spec_peak_flops_per_s("NVIDIA H100 80GB HBM3", "fp32") is None  # only bf16 peaks are tabled
    assert spec_peak_flops_per_s("NVIDIA GeForce RTX 4090") is None


def test_the_training_log_uses_the_causal_count_over_the_spec_peak():
    cfg = paper_model()
    metrics = throughput_metrics(cfg, 2048, 16, 48, step_time_s=1.0, peak_flops_per_s=989e12, num_devices=2)
    causal = step_flops(cfg, 2048, 3, samples=16)["total"]
    assert metrics["model_flops_per_s"] == pytest.approx(causal)
    assert metrics["mfu"] == pytest.approx(causal / (2 * 989e12))

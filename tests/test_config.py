"""Config validation messages and backend selection (no distributed state needed)."""

import pytest

from megatron_lcl.config import (ConfigError, LMConfig, ModelConfig, ParallelConfig, PrecisionConfig,
                                 VisionConfig, VISION_PRESETS, apply_preset, padded_vocab_size,
                                 validate_model_config)
from megatron_lcl.models.specs import LOCAL, TRANSFORMER_ENGINE, select_transformer_impl


def test_valid_default_config_passes():
    validate_model_config(ModelConfig(), ParallelConfig(), PrecisionConfig(), seq_length=128)


def test_heads_not_divisible_by_tp_names_fields():
    cfg = ModelConfig(lm=LMConfig(hidden_size=60, num_attention_heads=12, ffn_hidden_size=120))
    with pytest.raises(ConfigError) as e:
        validate_model_config(cfg, ParallelConfig(tensor_model_parallel_size=5))
    assert "model.lm.num_attention_heads (12) must be divisible by parallel.tensor_model_parallel_size (5)" in str(e.value)


def test_image_not_divisible_by_patch_names_fields():
    with pytest.raises(ConfigError, match=r"model.vision.image_size \(30\) must be divisible by model.vision.patch_size \(8\)"):
        validate_model_config(ModelConfig(vision=VisionConfig(image_size=30)), ParallelConfig())


def test_pipeline_split_must_add_up():
    lm = LMConfig(num_layers=12)
    ok = ParallelConfig(pipeline_model_parallel_size=4, num_layers_in_first_pipeline_stage=2,
                        num_layers_in_last_pipeline_stage=4)  # 2 + 4 + 3 + 3
    validate_model_config(ModelConfig(lm=lm), ok)
    bad = ParallelConfig(pipeline_model_parallel_size=4, num_layers_in_first_pipeline_stage=2,
                         num_layers_in_last_pipeline_stage=5)  # 5 left over 2 stages
    with pytest.raises(ConfigError, match="pipeline split does not add up"):
        validate_model_config(ModelConfig(lm=lm), bad)


def test_virtual_pipeline_is_a_clear_error():
    with pytest.raises(ConfigError, match="virtual_pipeline_model_parallel_size"):
        validate_model_config(ModelConfig(), ParallelConfig(virtual_pipeline_model_parallel_size=2))


def test_sequence_too_short_for_an_image():
    with pytest.raises(ConfigError, match="one image needs"):
        validate_model_config(ModelConfig(), ParallelConfig(), seq_length=8)


def test_several_errors_reported_together():
    cfg = ModelConfig(vision=VisionConfig(image_size=30, hidden_size=66), transformer_impl="bogus")
    with pytest.raises(ConfigError) as e:
        validate_model_config(cfg, ParallelConfig())
    msg = str(e.value)
    assert "image_size" in msg and "model.vision.hidden_size (66)" in msg and "transformer_impl" in msg


def test_presets_have_published_sizes():
    b16 = apply_preset(VisionConfig(preset="B/16"), VISION_PRESETS)
    assert (b16.hidden_size, b16.num_layers, b16.num_image_tokens) == (768, 12, 197)
    with pytest.raises(ValueError, match="unknown preset"):
        apply_preset(VisionConfig(preset="H/99"), VISION_PRESETS)


def test_padded_vocab():
    assert padded_vocab_size(LMConfig(vocab_size=50265, make_vocab_size_divisible_by=128), 2) == 50432


@pytest.mark.parametrize("requested,cuda,te,expected", [
    ("auto", False, False, LOCAL), ("auto", True, False, LOCAL), ("auto", True, True, TRANSFORMER_ENGINE),
    ("local", True, True, LOCAL), ("transformer_engine", True, True, TRANSFORMER_ENGINE)])
def test_backend_selection(requested, cuda, te, expected):
    assert select_transformer_impl(requested, cuda=cuda, te=te) == expected


def test_forcing_te_without_cuda_is_a_clear_error():
    with pytest.raises(ConfigError, match="needs CUDA and an importable transformer_engine"):
        select_transformer_impl("transformer_engine", cuda=False, te=False)


def test_sequence_parallel_with_pipeline_is_rejected():
    with pytest.raises(ConfigError, match="sequence_parallel with parallel.pipeline_model_parallel_size > 1"):
        validate_model_config(ModelConfig(), ParallelConfig(tensor_model_parallel_size=2,
                                                            pipeline_model_parallel_size=2,
                                                            sequence_parallel=True))

"""Sequence parallelism: TP=2 + SP computes what TP=2 and TP=1 compute (losses and every gradient).

One torchrun launch (2 gloo ranks, tests/dist/sp_checks.py); megatron-core's local LayerNorm refuses SP,
so the local layers use `megatron_lcl.models.layers.LayerNorm` (SP-marked weights) and these runs
check that it, the sequence scatter of the LM input, the gathered `<BoI>` rows and the output layer's
gather all add up. The ViT runs without SP (its token count need not divide by TP).
"""

import pytest
import torch

from megatron_lcl.config import ConfigError, LCLConfig, ParallelConfig, validate_config
from megatron_lcl.config.model import LMConfig, VisionConfig
from megatron_lcl.models.transformer_config import build_transformer_config
from multirank import run_torchrun

LOSS_KEYS = ("loss", "lm_loss", "con_loss", "con_top1", "num_text_tokens", "num_images")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = run_torchrun("sp_checks.py", 2, tmp_path_factory.mktemp("sp"))
    return {name: torch.load(out / f"{name}.pt") for name in ("reference", "tp2", "tp2_sp")}


def _assert_all_close(expected: dict, actual: dict, atol=1e-5, rtol=1e-4):
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=rtol, msg=name)


def test_sp_is_on_for_the_lm_only(results):
    assert results["tp2_sp"]["flags"] == {"lm_sp": True, "vit_sp": False, "ln_marked": True}
    assert results["tp2"]["flags"] == {"lm_sp": False, "vit_sp": False, "ln_marked": False}


@pytest.mark.parametrize("key", LOSS_KEYS)
def test_sp_losses_equal_tp2_and_tp1(results, key):
    torch.testing.assert_close(results["tp2_sp"]["terms"][key], results["tp2"]["terms"][key])
    torch.testing.assert_close(results["tp2_sp"]["terms"][key], results["reference"]["terms"][key])


def test_sp_gradients_equal_tp2_and_tp1(results):
    grads = results["reference"]["grads"]
    assert not [n for n, g in grads.items() if g.abs().max() == 0], "every parameter must get a gradient"
    _assert_all_close(results["tp2"]["grads"], results["tp2_sp"]["grads"])
    _assert_all_close(grads, results["tp2_sp"]["grads"])


def test_sp_layernorm_gradients_are_summed_over_tp(results):
    """Without the TP all-reduce each rank would hold the gradient of its half of the sequence only."""
    ref = results["reference"]["grads"]["lm.decoder.final_layernorm.weight"]
    torch.testing.assert_close(results["tp2_sp"]["grads"]["lm.decoder.final_layernorm.weight"], ref,
                               atol=1e-6, rtol=1e-5)


def test_sp_needs_a_sequence_divisible_by_tp():
    cfg = LCLConfig(parallel=ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
    cfg.data.seq_length = 127
    with pytest.raises(ConfigError, match=r"data.seq_length \(127\) must be divisible by "
                                          r"parallel.tensor_model_parallel_size \(2\)"):
        validate_config(cfg)


def test_transformer_configs_put_sp_on_the_lm_only():
    parallel = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    assert build_transformer_config(LMConfig(), parallel).sequence_parallel
    assert not build_transformer_config(VisionConfig(), parallel, pipeline_split=False).sequence_parallel

"""TP=2 == TP=1 and DP=2 == DP=1 for the whole LCL model (ViT + LM + heads + both losses).

One torchrun launch (2 gloo ranks, tests/dist/core_checks.py) computes everything; the tests below
compare its result files.
"""

import pytest
import torch

LOSS_KEYS = ("loss", "lm_loss", "con_loss", "con_top1", "num_text_tokens", "num_images")


@pytest.fixture(scope="module")
def results(core_checks_dir):
    out = core_checks_dir
    return {name: torch.load(out / f"{name}.pt") for name in
            ("reference", "tp2", "dp2", "ragged_contrastive")}


def _assert_grads_close(expected: dict, actual: dict, atol=1e-5, rtol=1e-4):
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=rtol, msg=name)


def test_reference_has_signal_everywhere(results):
    """Every parameter (ViT included) gets a gradient, so the comparisons below cover all of them."""
    grads = results["reference"]["grads"]
    silent = [n for n, g in grads.items() if g.abs().max() == 0]
    assert not silent, f"parameters without gradient: {silent}"
    assert results["reference"]["terms"]["num_images"] == 3  # the image at position 0 is excluded


def test_tp2_starts_from_the_same_weights(results):
    _assert_grads_close(results["reference"]["params"], results["tp2"]["params"], atol=0, rtol=0)


@pytest.mark.parametrize("key", LOSS_KEYS)
def test_tp2_losses_equal_tp1(results, key):
    torch.testing.assert_close(results["tp2"]["terms"][key], results["reference"]["terms"][key])


def test_tp2_gradients_equal_tp1(results):
    _assert_grads_close(results["reference"]["grads"], results["tp2"]["grads"])


@pytest.mark.parametrize("key", LOSS_KEYS)
def test_dp2_losses_equal_dp1(results, key):
    """Ranks hold 2 samples each with 3 and 1 images: negatives must be gathered globally."""
    torch.testing.assert_close(results["dp2"]["terms"][key], results["reference"]["terms"][key])


def test_dp2_ddp_gradients_equal_dp1(results):
    _assert_grads_close(results["reference"]["grads"], results["dp2"]["grads"])


def _reference_infonce(features: torch.Tensor, scale: torch.Tensor):
    """Plain single-process symmetric InfoNCE (CLIP), mean over images."""
    v, t = features[:, 0], features[:, 1]
    logits = scale * v @ t.t()
    labels = torch.arange(len(v))
    return (torch.nn.functional.cross_entropy(logits, labels) +
            torch.nn.functional.cross_entropy(logits.t(), labels)) / 2


@pytest.mark.parametrize("case", ["ragged", "empty_rank"])
def test_gathered_contrastive_matches_single_process_reference(results, case):
    r = results["ragged_contrastive"][case]
    features = r["features"].clone().requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    loss = _reference_infonce(features, scale)
    loss.backward()
    torch.testing.assert_close(r["loss"], loss.detach())
    torch.testing.assert_close(r["v_grad"], features.grad[:, 0])
    torch.testing.assert_close(r["scale_grad"], scale.grad)

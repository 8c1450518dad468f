"""`model.vision.image_tokens=pooled_values` at TP=2 and at PP=2 equals its TP=PP=1 reference.

The 2-rank launch of tests/dist/core_checks.py (shared with test_core_parallel.py) runs one step of 2
micro-batches with L_con over the whole step through the training path (feature pass, 1F1B) at TP2 and
at PP2, and the same objective written out in one process; the tests compare losses and every gradient
(ViT, the pooling block that makes the image tokens, LM, heads).
"""

import pytest
import torch

LAYOUTS = ("pooled_values_tp2", "pooled_values_pp2")


@pytest.fixture(scope="module")
def results(core_checks_dir):
    return {name: torch.load(core_checks_dir / f"{name}.pt") for name in ("pooled_values_reference",) + LAYOUTS}


def test_the_reference_reaches_every_parameter(results):
    ref = results["pooled_values_reference"]
    silent = [n for n, g in ref["grads"].items() if g.abs().max() == 0]
    assert not silent, f"parameters without gradient: {silent}"
    # 6 images, the one at <BoI> 0 without context: 5 in L_con; no projector (the pooling block makes the tokens)
    assert ref["num_con_images"] == 5 and not any(n.startswith("projector.") for n in ref["grads"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_losses_equal_the_reference(results, layout):
    ref, terms = results["pooled_values_reference"], results[layout]["terms"]
    assert len(terms) == 2
    for k, term in enumerate(terms):
        torch.testing.assert_close(term["lm_loss"].float(), ref["lm_loss"][k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(term["con_loss"].float(), ref["con_loss"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_equal_the_reference(results, layout):
    ref, got = results["pooled_values_reference"]["grads"], results[layout]["grads"]
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)

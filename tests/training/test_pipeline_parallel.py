"""Vision-language pipeline: PP=2 and TP2 x PP2 x DP2 equal TP=PP=DP=1 (8 gloo ranks, one launch), with
the InfoNCE and with the ring sigmoid loss.

The ViT lives on the first stage and v_i crosses the pipeline in carried rows; the contrastive loss
is computed on the last stage with negatives gathered over data-parallel ranks.
"""

import pytest
import torch

from multirank import run_torchrun
from test_host_syncs import ALLOWED

LAYOUTS = ["tp1_pp2_dp4", "tp2_pp2_dp2"]
KEYS = ("loss", "lm_loss", "con_loss", "con_top1", "num_text_tokens", "num_images")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = run_torchrun("pipeline_checks.py", 8, tmp_path_factory.mktemp("pipeline"))
    return {p.stem: torch.load(p) for p in out.glob("*.pt")}


@pytest.mark.parametrize("layout", LAYOUTS + ["tp2_pp2_dp2_step"])
def test_losses_equal_single_rank_for_every_micro_batch(results, layout):
    ref, got = results["reference"]["terms"], results[layout]["terms"]
    assert len(got) == len(ref) == 4
    for k, (r, g) in enumerate(zip(ref, got)):
        for key in KEYS:
            torch.testing.assert_close(g[key], r[key], msg=f"micro-batch {k}, {key}")


def test_micro_batch_with_an_imageless_dp_rank_is_counted(results):
    """Micro-batch 2 has images only in its first two samples ([2, 18], [7]): at DP=2 and DP=4 some
    ranks hold none; the run neither hangs nor miscounts (losses above match)."""
    assert results["reference"]["terms"][2]["num_images"] == 3


@pytest.mark.parametrize("layout", LAYOUTS + ["tp2_pp2_dp2_step"])  # _step: reduce-scattered, then gathered
def test_gradients_equal_single_rank(results, layout):
    ref, got = results["reference"]["grads"], results[layout]["grads"]
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_vit_receives_gradient_through_the_pipeline(results):
    grads = results["tp2_pp2_dp2"]["grads"]
    vit = [n for n in grads if n.startswith(("vision.", "image_head."))]
    assert vit and all(grads[n].abs().max() > 0 for n in vit)


def test_uneven_split_puts_fewer_layers_on_the_first_stage(results):
    assert results["tp1_pp2_dp4"]["first_stage_lm_layers"] == 1


def test_distributed_optimizer_step_equals_reference_step(results):
    """TP2 x PP2 x DP2 with megatron-core's distributed optimizer (clip 1.0, AdamW, wd on >=2-D
    weights only) gives the weights a hand-written single-process AdamW step gives, from the same
    gradients (test_gradients_equal_single_rank) and the same global gradient norm."""
    ref, got = results["reference"], results["tp2_pp2_dp2_step"]["updated"]
    grad_norm = results["tp2_pp2_dp2_step"]["grad_norm"]
    assert grad_norm == pytest.approx(float(ref["grad_norm"]), rel=1e-5)
    assert ref["grad_norm"] > 1.0  # so clipping (to 1.0) was active in both
    assert ref["updated"].keys() == got.keys()
    for name, expected in ref["updated"].items():
        # Adam divides by |g| + eps: elements whose gradient is ~0 (e.g. attention key biases, which
        # cannot change a softmax) turn float noise into O(lr) updates; compare the others.
        well_conditioned = ref["grads"][name].abs() > 1e-6
        torch.testing.assert_close(got[name][well_conditioned], expected[well_conditioned],
                                   atol=1e-6, rtol=1e-5, msg=name)
    assert all(torch.isfinite(t).all() for t in got.values())


STEP_KEYS = ("loss", "lm_loss", "con_loss", "con_top1", "num_images", "con_batch")


def test_step_contrastive_losses_equal_one_infonce_over_the_step(results):
    """contrastive_batch=step at TP2 x PP2 x DP2, 4 micro-batches (one without any image, one with
    imageless DP ranks): every micro-batch reports the step's L_con over all N images, as the reference."""
    ref, got = results["reference_step_contrastive"]["terms"], results["tp2_pp2_dp2_stepcon"]["terms"]
    assert len(got) == len(ref) == 4
    # 13 images, one at <BoI> 0 (no context): 12 in the step's L_con; micro-batch 3 has none
    assert float(ref[0]["con_batch"]) == 12 and float(ref[3]["num_images"]) == 0
    for k, (r, g) in enumerate(zip(ref, got)):
        for key in STEP_KEYS:
            torch.testing.assert_close(g[key].float(), r[key].float(), atol=1e-5, rtol=1e-5,
                                       msg=f"micro-batch {k}, {key}")


def test_step_contrastive_gradients_equal_the_reference(results):
    ref, got = results["reference_step_contrastive"]["grads"], results["tp2_pp2_dp2_stepcon"]["grads"]
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)
    for name in ("text_head.logit_scale", "image_head.proj.weight", "vision.conv1.weight"):
        assert ref[name].abs().max() > 0, name  # the step L_con reaches the scale, the heads and the ViT


@pytest.mark.parametrize("layout", LAYOUTS + ["tp2_pp2_dp2_step", "tp2_pp2_dp2_stepcon"])
def test_no_host_sync_in_the_step_but_the_step_counts(results, layout):
    """Forward and backward of the step on every rank (ragged L_con gather over DP ranks, some without
    images; vocab-parallel L_gen; the carried rows; the feature pass): no op that makes a host wait for a
    GPU, but the once-per-step CPU read of the exchanged counts (test_host_syncs.ALLOWED says why)."""
    events = {tuple(e) for e in results[layout]["host_syncs"]}
    assert events <= ALLOWED, f"host syncs in the step: {sorted(events - ALLOWED)}"
    assert events, "the step counts are read once: the recorder saw the step"


SIGMOID_LAYOUTS = ["sigmoid_tp2_pp2_dp2_step", "sigmoid_tp2_pp2_dp2_micro", "sigmoid_tp1_pp2_dp4_step",
                   "sigmoid_tp2_pp1_dp4_step"]


def sigmoid_reference(results, layout):
    return results["reference_sigmoid_" + ("micro_batch" if layout.endswith("_micro") else "step")]


@pytest.mark.parametrize("layout", SIGMOID_LAYOUTS)
def test_ring_sigmoid_loss_equals_the_whole_steps_pairwise_loss(results, layout):
    """loss.contrastive_loss=sigmoid: the DP ring's L_con, top-1 and image count (logged step values) equal
    a single process scoring every image of the step (or of its micro-batch) against every <BoI> feature."""
    ref, got = sigmoid_reference(results, layout), results[layout]["step"]
    assert float(ref["images"]) == got["num_images"] == 12
    assert got["con_loss"] == pytest.approx(float(ref["con_loss"]), rel=1e-5)
    assert got["con_top1"] == pytest.approx(float(ref["con_top1"]), abs=1e-6)


@pytest.mark.parametrize("layout", SIGMOID_LAYOUTS)
def test_ring_sigmoid_gradients_equal_the_reference(results, layout):
    """...and every gradient (ViT, heads, the scale and the bias) equals the reference's."""
    ref, got = sigmoid_reference(results, layout)["grads"], results[layout]["grads"]
    assert ref.keys() == got.keys() and "text_head.logit_bias" in ref
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)
    for name in ("text_head.logit_bias", "text_head.logit_scale", "image_head.proj.weight", "vision.conv1.weight"):
        assert ref[name].abs().max() > 0, name


def test_ring_sigmoid_step_and_micro_batch_differ(results):
    """The two contrastive batches are different objectives (the comparison above can tell them apart)."""
    step, micro = results["reference_sigmoid_step"], results["reference_sigmoid_micro_batch"]
    assert abs(float(step["con_loss"]) - float(micro["con_loss"])) > 1e-3


@pytest.mark.parametrize("layout", SIGMOID_LAYOUTS)
def test_ring_sigmoid_makes_no_host_sync_but_the_step_counts(results, layout):
    events = {tuple(e) for e in results[layout]["host_syncs"]}
    assert events <= ALLOWED, f"host syncs in the step: {sorted(events - ALLOWED)}"

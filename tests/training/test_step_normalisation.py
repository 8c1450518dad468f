"""The step's objective does not depend on how the step is split into micro-batches (issue: a requeue on
fewer nodes with an unchanged config changed the losses by ~5e-4, because L_gen was a mean per
micro-batch). One step of 8 samples whose micro-batches hold very different numbers of text targets,
split 1 x 8, 2 x 4 and 4 x 2 through megatron-core's schedule: the same gradients and logged values.
(End to end, with the loader, DP/TP/PP and the optimizer: tests/training/test_loss_compare.py.)
"""

import pytest
import torch

SEQ = 48
# <BoI> positions per sample and where padding starts: some samples are mostly padding, so the
# micro-batches' target counts differ a lot (and a mean per micro-batch would weigh tokens unequally).
IMAGES = [[3, 20], [0], [9], [14], [5], [], [12, 25], []]
PAD_FROM = [None, 10, None, 30, 9, 6, None, 40]


def step(contrastive_batch: str, mode: str, micro_batch_size: int):
    """(gradients by parameter name, the step's logged values) of one step split into micro-batches."""
    from common import tiny_model_config
    from megatron_lcl.config import LossConfig, ParallelConfig
    from megatron_lcl.losses import LCLLoss
    from megatron_lcl.models.factory import build_model
    from megatron_lcl.runtime import ParallelLayout, set_seed
    from megatron_lcl.testing import random_batch, slice_batch
    from megatron_lcl.training.pipeline import PipelineShape, step_forward_backward, wrap_ddp

    cfg = tiny_model_config()
    set_seed(3)
    model = build_model(cfg, ParallelConfig())
    ddp = wrap_ddp(model, ParallelConfig())
    whole = random_batch(IMAGES, SEQ, cfg.vision.num_image_tokens, 16, 192, seed=4, pad_from=PAD_FROM)
    batches = [slice_batch(whole, slice(k, k + micro_batch_size)) for k in range(0, 8, micro_batch_size)]
    loss_fn = LCLLoss(LossConfig(contrastive_batch=contrastive_batch, mode=mode), ParallelLayout.current().dp_group)
    ddp.zero_grad_buffer()
    per_micro = step_forward_backward(ddp, batches, len(batches), loss_fn,
                                      PipelineShape.for_model(cfg, SEQ, micro_batch_size), ParallelLayout.current())
    grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    return grads, loss_fn.step_metrics(per_micro), per_micro


@pytest.mark.parametrize("contrastive_batch,mode", [("step", "lcl"), ("micro_batch", "gen")])
def test_a_step_trains_the_same_however_it_is_split(single_rank, contrastive_batch, mode):
    grads, values, _ = step(contrastive_batch, mode, 8)
    for micro_batch_size in (4, 2):
        other_grads, other_values, per_micro = step(contrastive_batch, mode, micro_batch_size)
        for key in ("loss", "lm_loss", "con_loss", "con_top1", "num_text_tokens", "num_images", "con_excluded"):
            assert other_values[key] == pytest.approx(values[key], rel=1e-6, abs=1e-7), (micro_batch_size, key)
        for name, g in grads.items():
            torch.testing.assert_close(other_grads[name], g, atol=1e-6, rtol=1e-5,  # summation order
                                       msg=f"{micro_batch_size}: {name}")
    # The batch tells the normalisations apart: the mean of the micro-batch means is another L_gen.
    per_micro_mean = sum(float(m["lm_loss"]) for m in per_micro) / len(per_micro)
    assert abs(per_micro_mean - values["lm_loss"]) > 1e-3 * values["lm_loss"]
    assert values["num_text_tokens"] == sum(int(m["num_text_tokens"]) for m in per_micro)


def test_micro_batch_negatives_average_over_the_steps_images(single_rank):
    """contrastive_batch=micro_batch: each image against its micro-batch's images, L_con the mean over the
    step's images (a micro-batch with one image counts once, not as much as a full one)."""
    _, values, per_micro = step("micro_batch", "lcl", 2)
    images = [float(m["num_images"]) for m in per_micro]
    assert images == [2.0, 2.0, 1.0, 2.0] and values["num_images"] == 7  # 9 images, 2 at <BoI> 0
    expected = sum(float(m["con_loss"]) * n for m, n in zip(per_micro, images)) / sum(images)
    assert values["con_loss"] == pytest.approx(expected, rel=1e-6)
    assert values["con_batch"] == pytest.approx(sum(images) / len(images))

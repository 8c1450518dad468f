"""No host-device sync in a training step's forward and backward (issue: the loss read sizes from the
device on every micro-batch). Recorded on the CPU by `tests/dist/host_syncs.py`; multi-rank layouts
(DP, TP, PP: the ragged gather, the vocab-parallel loss, the stage hand-over) are recorded by
tests/dist/pipeline_checks.py and asserted in tests/training/test_pipeline_parallel.py with the same list.

Outside the step's forward and backward, the trainer reads back once per step, after the schedule:
the step's logged values (`LCLLoss.step_metrics`: one `.tolist()` of all micro-batches' values), the
logit scale, and the one all-reduced stats vector every rank needs to agree on skipping a non-finite
step and stopping; at logging steps also the collapse monitor (its DP gather reads the counts from the
device). None of these is per micro-batch.
"""

import pytest
import torch

from host_syncs import HostSyncRecorder

# The only host reads a step makes, once per step each (not per micro-batch), and why they are fine.
ALLOWED = {
    # The step's counts (text targets, L_con images per micro-batch) are CPU ints from collate time;
    # one all-gather of a CPU tensor over the DP group (gloo) and its read: no device involved.
    ("tolist", "megatron_lcl/losses/lcl.py:step_counts"),
}


def step_syncs(contrastive_batch: str, micro_batches: int = 2, contrastive_loss: str = "infonce") -> set:
    from megatron_lcl.config import LossConfig, ParallelConfig
    from megatron_lcl.losses import LCLLoss
    from megatron_lcl.models.factory import build_model
    from megatron_lcl.runtime import ParallelLayout
    from megatron_lcl.testing import random_batch
    from megatron_lcl.training.pipeline import PipelineShape, step_forward_backward, wrap_ddp
    from common import tiny_model_config

    from dataclasses import replace

    cfg = tiny_model_config()
    if contrastive_loss == "sigmoid":  # the ring's P2P hops and its bias
        cfg = replace(cfg, heads=replace(cfg.heads, logit_scale_init=10.0, logit_bias_init=-10.0))
    torch.manual_seed(0)
    ddp = wrap_ddp(build_model(cfg, ParallelConfig()), ParallelConfig())
    layout = ParallelLayout.current()
    loss_fn = LCLLoss(LossConfig(contrastive_batch=contrastive_batch, contrastive_loss=contrastive_loss),
                      layout.dp_group)
    m = cfg.vision.num_image_tokens
    layouts = [[[0, 20], [9]], [[4], []], [[], []]][:micro_batches]  # an image without context, none at all
    batches = [random_batch(images, 48, m, 16, 192, seed=k) for k, images in enumerate(layouts)]
    shape = PipelineShape.for_model(cfg, 48, 2)
    ddp.zero_grad_buffer()
    with HostSyncRecorder() as recorder:
        metrics = step_forward_backward(ddp, batches, len(batches), loss_fn, shape, layout)
    assert len(metrics) == len(batches)
    assert ddp.module.vision.conv1.weight.main_grad.abs().sum() > 0  # the backward reached the ViT
    return recorder.events


def test_the_recorder_sees_what_syncs_a_gpu():
    x, mask = torch.arange(4.0), torch.tensor([True, False, True, False])
    with HostSyncRecorder() as recorder:
        x[mask], x.nonzero(), x.sum().item(), int(x[0]), x.tolist(), x.masked_select(mask)
        x.index_select(0, torch.tensor([0, 2]))  # an index tensor: no sync
        x[mask] = 0.0  # masked_fill_ in ATen: no sync
    assert {kind for kind, _ in recorder.events} == {"boolean-mask index", "nonzero", "read a value", "item", "int",
                                                     "tolist", "masked_select"}
    with HostSyncRecorder() as recorder:
        x[mask] = torch.ones(2)  # a tensor of values: index_put through nonzero
    assert {kind for kind, _ in recorder.events} == {"boolean-mask index"}


@pytest.mark.parametrize("contrastive_loss", ["infonce", "sigmoid"])
@pytest.mark.parametrize("contrastive_batch", ["step", "micro_batch"])
def test_a_training_step_makes_no_host_sync_but_the_step_counts(single_rank, contrastive_batch, contrastive_loss):
    """Three micro-batches (one image without context, one micro-batch without images), forward and
    backward through megatron-core's schedule, with the feature pass (step) or without (micro_batch),
    InfoNCE or the ring sigmoid loss (multi-rank rings: tests/training/test_pipeline_parallel.py)."""
    events = step_syncs(contrastive_batch, micro_batches=3, contrastive_loss=contrastive_loss)
    assert events <= ALLOWED, f"host syncs in the step: {sorted(events - ALLOWED)}"

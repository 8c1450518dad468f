"""The CPU adaptation of megatron-core (runtime/cpu.py) and the foreach multi-tensor ops
(runtime/mcore_compat.py).

The CUDA->CPU rewrite mode covers megatron-core's cold paths (construction, its optimizer wrapper,
checkpointing); the hot paths (model forward, megatron-core's backward step, torch's optimizer update)
run without it. Here: the mode is off exactly there and back after, the one CUDA literal of those paths
(the unfused attention's causal mask) is made on CPU with the same values, and a training step through
megatron-core's schedule with the unfused attention computes what the plain forward/backward does.
"""

import os
import time

import pytest
import torch

from common import tiny_model_config
from megatron_lcl.config import LossConfig, OptimizerConfig, ParallelConfig, PrecisionConfig
from megatron_lcl.runtime import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runtime is off under CUDA")


def test_native_torch_pops_the_rewrite_mode_and_puts_it_back(single_rank):
    assert torch.zeros(1, device="cuda").device.type == "cpu"  # rewritten
    with cpu.native_torch():
        with pytest.raises((AssertionError, RuntimeError)):  # "Torch not compiled with CUDA enabled"
            torch.zeros(1, device="cuda")
        with cpu.native_torch():  # nested: nothing more to pop
            pass
    assert torch.zeros(1, device="cuda").device.type == "cpu"


def test_native_torch_leaves_another_mode_alone(single_rank):
    """With another torch-function mode on top (a user's `with torch.device(...)`), nothing is popped."""
    with torch.device("cpu"):
        with cpu.native_torch():
            assert torch.zeros(1, device="cuda").device.type == "cpu"


def test_causal_mask_made_on_cpu_equals_megatron_cores(single_rank):
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    assert fused_softmax.get_default_causal_mask is cpu._causal_mask
    for sq in (1, 5, 17):
        expected = utils.get_default_causal_mask(sq)  # megatron-core's, device="cuda" rewritten by the mode
        assert torch.equal(cpu._causal_mask(sq), expected)


def _build(attention):
    from megatron_lcl.models.factory import build_model
    from megatron_lcl.training.optim import build_optimizer
    from megatron_lcl.training.pipeline import wrap_ddp

    cfg = tiny_model_config()
    cfg.attention = attention
    torch.manual_seed(0)
    model = build_model(cfg, ParallelConfig(), PrecisionConfig())
    ddp = wrap_ddp(model, ParallelConfig())
    optimizer = build_optimizer(ddp, OptimizerConfig(lr=1e-3, warmup_steps=0), ParallelConfig(), PrecisionConfig())
    return cfg, model, ddp, optimizer


@pytest.mark.parametrize("attention", ["unfused", "sdpa"])
def test_schedule_step_equals_plain_forward_backward(single_rank, attention):
    """A step through megatron-core's schedule (forward and backward without the mode) == forward_loss +
    backward under the mode, loss and every gradient; the torch optimizer's update runs natively."""
    from megatron.core.pipeline_parallel import schedules

    from megatron_lcl.losses import LCLLoss
    from megatron_lcl.runtime import ParallelLayout
    from megatron_lcl.testing import random_batch
    from megatron_lcl.training.pipeline import PipelineShape, forward_loss, step_forward_backward

    cfg, model, ddp, optimizer = _build(attention)
    assert getattr(schedules.backward_step, "native", False)
    assert all(getattr(o.optimizer.step, "native", False) for o in optimizer.chained_optimizers)
    layout = ParallelLayout.current()
    loss_fn = LCLLoss(LossConfig(), layout.dp_group)
    batch = random_batch([[2], [3, 30]], seq_length=48, num_image_tokens=cfg.vision.num_image_tokens,
                         image_size=cfg.vision.image_size, vocab_size=cfg.lm.vocab_size, seed=3)
    ddp.zero_grad_buffer()
    expected = forward_loss(ddp, batch, loss_fn)
    expected.total.backward()
    ddp.finish_grad_sync()
    expected_grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    ddp.zero_grad_buffer()
    shape = PipelineShape.for_model(cfg, 48, 2)
    logs = step_forward_backward(ddp, [batch], 1, loss_fn, shape, layout)
    torch.testing.assert_close(logs[0]["loss"], expected.loss.detach(), atol=0, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.main_grad, expected_grads[name], atol=0, rtol=0, msg=name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_foreach_multi_tensor_ops_equal_megatron_cores_local_ones(single_rank):
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    from megatron_lcl.runtime import mcore_compat

    # initialize_distributed (the single_rank fixture) installed them where megatron-core fell back to its
    # local ops
    assert clip_grads.l2_norm_impl is mcore_compat._foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is mcore_compat._foreach_scale
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=g) for shape in ((7,), (3, 5), (64, 32), (1,))]
    ours, _ = mcore_compat._foreach_l2_norm(0, None, [tensors], False)
    expected, _ = utils.local_multi_tensor_l2_norm(0, None, [tensors], False)
    torch.testing.assert_close(ours, expected.to(ours.device), atol=0, rtol=1e-6)
    # scale, out of place (src -> dst) and in place (the same list twice)
    dst, expected_dst = [torch.empty_like(t) for t in tensors], [torch.empty_like(t) for t in tensors]
    mcore_compat._foreach_scale(0, None, [tensors, dst], 0.25)
    utils.local_multi_tensor_scale(0, None, [tensors, expected_dst], 0.25)
    in_place = [t.clone() for t in tensors]
    mcore_compat._foreach_scale(0, None, [in_place, in_place], 0.25)
    for a, b, c in zip(dst, expected_dst, in_place):
        assert torch.equal(a, b) and torch.equal(c, b)
    # the mixed-precision copy: fp32 -> bf16 at scale 1
    bf16, expected_bf16 = ([torch.empty_like(t, dtype=torch.bfloat16) for t in tensors] for _ in range(2))
    mcore_compat._foreach_scale(0, None, [tensors, bf16], 1.0)
    utils.local_multi_tensor_scale(0, None, [tensors, expected_bf16], 1.0)
    assert all(torch.equal(a, b) for a, b in zip(bf16, expected_bf16))


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_kept_unless_the_user_set_malloc_options(single_rank, monkeypatch):
    for name in [k for k in __import__("os").environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    assert cpu._keep_freed_memory()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert not cpu._keep_freed_memory()


def gloo_threads() -> int:
    """This process's gloo connection threads (one set per live gloo process group)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:
            pass
    return sum(name == "gloo_tcp_loop" for name in names)


def test_laying_out_the_groups_again_leaves_no_groups_or_threads_behind(single_rank):
    """initialize_model_parallel again and again (in-process runs, the evaluation engine, tests) keeps
    one set of groups: megatron-core's destroy only drops its references, and every leaked gloo group
    keeps polling threads (measured before the fix: ~1000 after one test module, busy on both cores)."""
    from torch.distributed import distributed_c10d as c10d

    from megatron_lcl.config import ParallelConfig
    from megatron_lcl.runtime.distributed import initialize_model_parallel

    initialize_model_parallel(ParallelConfig(), seed=1)
    groups, threads = len(c10d._world.pg_map), gloo_threads()
    assert groups > 1 and threads > 0
    for seed in range(2, 7):
        initialize_model_parallel(ParallelConfig(), seed=seed)
    assert len(c10d._world.pg_map) == groups
    deadline = time.monotonic() + 30  # a destroyed group's threads end asynchronously; a hang guard
    while gloo_threads() > threads and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gloo_threads() == threads

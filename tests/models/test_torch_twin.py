"""The plain-PyTorch twin (tools/torch_twin.py) is the same model: with our weights it computes our
losses and gradients, and it does the same FLOPs (the benchmark's ratio compares like with like), with either
image path (`model.vision.image_tokens`: latents or pooled_values)."""

import pytest
import torch

from megatron_lcl.config import (LM_PRESETS, VISION_PRESETS, LMConfig, LossConfig, ModelConfig, ParallelConfig,
                                 VisionConfig, apply_preset)
from megatron_lcl.testing import random_batch

pytestmark = pytest.mark.usefixtures("single_rank")


IMAGE_TOKENS = ["latents", "pooled_values"]  # the paper's projector, the released code's pooling block


def tiny_config(image_tokens: str = "latents") -> ModelConfig:
    # layer-scale 0.5 (not 1): folding it into the HF weights is part of what is checked
    vision = VisionConfig(preset="tiny", layer_scale_init=0.5, image_tokens=image_tokens)
    return ModelConfig(vision=apply_preset(vision, VISION_PRESETS),
                       lm=apply_preset(LMConfig(preset="tiny", vocab_size=300, make_vocab_size_divisible_by=8),
                                       LM_PRESETS),
                       transformer_impl="local")


def batch(cfg: ModelConfig):
    # the image at position 0 has no context: it feeds L_gen only, in both models
    return random_batch([[0, 40, 90], [10, 60]], seq_length=128, num_image_tokens=cfg.vision.num_image_tokens,
                        image_size=32, vocab_size=300, pad_from=[None, 120])


@pytest.mark.parametrize("image_tokens", IMAGE_TOKENS)
def test_twin_with_our_weights_computes_our_losses_and_gradients(image_tokens):
    from torch_twin import TorchTwin

    from megatron_lcl.losses import LCLLoss
    from megatron_lcl.models.factory import build_model
    from megatron_lcl.training.pipeline import forward_loss

    cfg = tiny_config(image_tokens)
    b, loss_cfg = batch(cfg), LossConfig(contrastive_batch="micro_batch")
    torch.manual_seed(0)
    model = build_model(cfg, ParallelConfig())
    ours = forward_loss(model, b, LCLLoss(loss_cfg))
    ours.total.backward()
    twin = TorchTwin.from_lcl_state(cfg, model.state_dict())
    theirs = twin.loss(b, loss_cfg)
    theirs["total"].backward()
    for name in ("total", "lm_loss", "con_loss"):
        assert float(theirs[name].detach()) == pytest.approx(float(getattr(ours, name).detach()), rel=1e-5), name
    assert float(ours.con_excluded) == 1.0  # the image at position 0
    ours_grads = dict(model.named_parameters())
    pairs = [(n, p) for n, p in twin.named_parameters() if n.startswith(("projector.", "image_head.", "text_head."))]
    pairs.append(("lm.embedding.word_embeddings.weight", twin.lm.get_input_embeddings().weight))  # tied: both uses
    assert len(pairs) > 10
    for name, p in pairs:
        g = ours_grads[name].grad
        assert float((p.grad - g).norm() / g.norm()) < 1e-4, name


@pytest.mark.parametrize("image_tokens", IMAGE_TOKENS)
def test_twin_does_the_same_flops_as_our_model(image_tokens):
    from bench_vs_torch import count_flops
    from torch_twin import TorchTwin

    from megatron_lcl.losses import LCLLoss
    from megatron_lcl.models.factory import build_model
    from megatron_lcl.models.flops import step_flops
    from megatron_lcl.training.pipeline import forward_loss

    cfg = tiny_config(image_tokens)

    class Args:  # bench_vs_torch's batch layout: 3 images per sample, seq 128
        images_per_sample, seq_length = 3, 128

    model, twin = build_model(cfg, ParallelConfig()), TorchTwin(cfg)
    loss_fn, cpu = LCLLoss(LossConfig()), torch.device("cpu")
    ours = count_flops(lambda b: forward_loss(model, b, loss_fn).total, cfg, Args, cpu)
    theirs = count_flops(lambda b: twin.loss(b, LossConfig())["total"], cfg, Args, cpu)
    analytic = step_flops(cfg, 128, 3, samples=1, attention_count="full")["total"]  # what the counter sees
    assert ours == pytest.approx(analytic, rel=1e-3)
    assert theirs == pytest.approx(analytic, rel=1e-3)

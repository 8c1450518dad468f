"""`model.vision.image_tokens=pooled_values`: the released LCL code's image tokens and image latent.

The reference below is written from OpenGVLab/LCL's `src/open_clip/attentive.py` and `lcl_model.py`
(`AttentivePoolingProjection` with one query, `LCL._encode_image`): ln_post on every ViT token, the
class token dropped, then

    q = W_q LN_q(query) + b_q, k = W_k LN_k(x) + b_k, v = W_v LN_v(x) + b_v   (per head: reshape to heads)
    pooled = proj(softmax(q k^T * head_dim^-0.5) v)  -> image_latent, normalised for the contrastive loss
    tokens = proj(W_v LN_v(x) + b_v)                 -> the embeddings put at the <img_placehold> positions
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megatron_lcl.config import ConfigError, LossConfig, ParallelConfig
from megatron_lcl.config.validate import model_config_errors, validate_model_config
from megatron_lcl.models.flops import count_parameters_by_group, parameter_counts, step_flops
from megatron_lcl.testing import random_batch

from common import tiny_model_config


def pooled_values_config(**vision):
    base = tiny_model_config(hidden_size=48, image_tokens="pooled_values", **vision)  # ViT width 48 != LM width 32
    return replace(base, heads=replace(base.heads, embed_dim=base.lm.hidden_size))


CFG = pooled_values_config()
M = CFG.vision.num_image_tokens


@pytest.fixture(scope="module")
def model(single_rank):
    from megatron_lcl.models.lcl_model import LCLModel
    from megatron_lcl.runtime import set_seed

    set_seed(0)
    model = LCLModel(CFG, ParallelConfig()).eval()
    with torch.no_grad():  # LayerNorms away from their (1, 0) init, so a swapped norm would show
        for name, p in model.image_head.named_parameters():
            if name.startswith("norm_"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def released_pool_project(state: dict, x: torch.Tensor, num_heads: int, eps: float):
    """The released `AttentivePoolingProjection` (num_query=1, qkv_bias, no out bias) on patch tokens
    x `[B, N, C]`, with explicit matmuls: -> (pooled `[B, D]`, tokens `[B, N, D]`)."""
    def norm(name, t):
        return F.layer_norm(t, t.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)

    def heads(t):  # [B, N, D] -> [B, heads, N, D/heads], the released reshape/permute
        b, n, _ = t.shape
        return t.reshape(b, n, 1, num_heads, -1).permute(2, 0, 3, 1, 4).squeeze(0)

    b = x.shape[0]
    query = state["query"].expand(b, -1, -1)  # [B, 1, C]
    q = heads(F.linear(norm("norm_q", query + 0), state["q.weight"], state["q.bias"]))
    k = heads(F.linear(norm("norm_k", x + 0), state["k.weight"], state["k.bias"]))
    v = heads(F.linear(norm("norm_v", x), state["v.weight"], state["v.bias"]))
    attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, heads, 1, N]
    pooled = (attn @ v).transpose(1, 2).reshape(b, 1, -1) @ state["proj.weight"].T  # [B, 1, D]
    tokens = F.linear(F.linear(norm("norm_v", x), state["v.weight"], state["v.bias"]), state["proj.weight"])
    return pooled.squeeze(1), tokens


def test_tokens_and_latent_equal_the_released_computation(model):
    batch = random_batch([[5], [3]], seq_length=M + 12, num_image_tokens=M, image_size=16, vocab_size=192)
    state = {k: v.detach() for k, v in model.image_head.state_dict().items()}
    with torch.no_grad():
        vit_out = model.vision(batch.images)  # [n, 1 + P, h_v], ln_post on every token
        pooled, tokens = released_pool_project(state, vit_out[:, 1:], CFG.heads.pool_num_heads,
                                               CFG.vision.layernorm_epsilon)
        ours_tokens, ours_v = model.image_tokens_and_features(vit_out)
        hidden, v = model.embed(batch.tokens, batch.position_ids, batch.images, batch.image_sample_index,
                                batch.boi_positions)
    assert tokens.shape == (2, CFG.vision.num_patches, CFG.lm.hidden_size) and M == CFG.vision.num_patches
    torch.testing.assert_close(ours_tokens, tokens, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours_v, F.normalize(pooled, dim=-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(v, ours_v, atol=0, rtol=0)
    # What the LM reads at image j's positions boi+1 .. boi+M: its tokens plus the learned positions.
    positions = model.lm.embedding.position_embeddings.weight.detach()
    for j, (b, boi) in enumerate(zip(batch.image_sample_index.tolist(), batch.boi_positions.tolist())):
        expect = tokens[j] + positions[boi + 1: boi + 1 + M]
        torch.testing.assert_close(hidden[boi + 1: boi + 1 + M, b], expect, atol=1e-5, rtol=1e-5)


def test_the_class_token_does_not_reach_the_lm_or_v(model):
    """No class token: changing the ViT's class-token output changes neither the tokens nor v."""
    latents = torch.randn(3, 1 + CFG.vision.num_patches, CFG.vision.hidden_size)
    changed = latents.clone()
    changed[:, 0] += 5.0
    with torch.no_grad():
        a, b = model.image_tokens_and_features(latents), model.image_tokens_and_features(changed)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_gradients_reach_the_vit_through_tokens_and_v(model):
    from megatron_lcl.losses import LCLLoss
    from megatron_lcl.training.pipeline import forward_loss

    batch = random_batch([[3], [4]], seq_length=M + 12, num_image_tokens=M, image_size=16, vocab_size=192)
    for mode, reached in (("gen", ("image_head.v.", "image_head.proj.")), ("con", ("image_head.q.", "image_head.k."))):
        model.zero_grad(set_to_none=True)
        forward_loss(model, batch, LCLLoss(LossConfig(mode=mode))).total.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if n.startswith(("vision.", "image_head."))}
        assert grads["vision.conv1.weight"].abs().sum() > 0, mode
        for prefix in reached:
            assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), mode
    model.zero_grad(set_to_none=True)


def test_parameters_and_flops_match_the_built_model(model):
    """The FLOPs model's pooled_values arm: parameters exactly, a training step within 2% of torch's counter."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_lcl.losses import LCLLoss
    from megatron_lcl.training.pipeline import forward_loss

    predicted = dict(parameter_counts(CFG))
    predicted.pop("lm_embedding")
    assert predicted == dict(count_parameters_by_group(model)) and predicted["projector"] == 0
    seq = 2 * (M + 8)
    batch = random_batch([[3, M + 9], [6]], seq_length=seq, num_image_tokens=M, image_size=16, vocab_size=192)
    counter = FlopCounterMode(display=False)
    model.train()
    with counter, sdpa_kernel(SDPBackend.MATH):
        forward_loss(model, batch, LCLLoss(LossConfig())).total.backward()
    model.eval().zero_grad(set_to_none=True)
    flops = step_flops(CFG, seq, 1.5, samples=2, contrastive_negatives=3, attention_count="full")
    assert flops["total"] == pytest.approx(counter.get_total_flops(), rel=0.02)
    latents = step_flops(replace(CFG, vision=replace(CFG.vision, image_tokens="latents")), seq, 1.5, samples=2)
    assert latents["vit"] == step_flops(CFG, seq, 1.5, samples=2)["vit"]  # the ViT runs 1 + P tokens in both


def test_validation_names_the_fields():
    bad = replace(CFG, heads=replace(CFG.heads, embed_dim=16))
    (error,) = model_config_errors(bad, ParallelConfig())
    assert "model.heads.embed_dim (16) must equal model.lm.hidden_size (32)" in error
    unknown = replace(CFG, vision=replace(CFG.vision, image_tokens="patches"))
    with pytest.raises(ConfigError, match="model.vision.image_tokens \\('patches'\\) must be one of latents, "
                                          "pooled_values"):
        validate_model_config(unknown, ParallelConfig())
    assert model_config_errors(CFG, ParallelConfig(), seq_length=M + 3) == []
    assert tiny_model_config().vision.num_image_tokens == M + 1  # latents: the class token too


def test_a_micro_batch_without_images_runs_the_block_with_weight_zero(model):
    """As with the projector: the blank image's tokens and v enter with weight 0, so every image-path
    parameter gets a (zero) gradient and the LM input equals the text-only embedding."""
    batch = random_batch([[], []], seq_length=16, num_image_tokens=M, image_size=16, vocab_size=192)
    hidden, v = model.embed(batch.tokens, batch.position_ids, batch.images, batch.image_sample_index,
                            batch.boi_positions)
    assert v.shape == (0, CFG.heads.embed_dim)
    torch.testing.assert_close(hidden, model.lm.embed(batch.tokens, batch.position_ids), atol=0, rtol=0)
    model.zero_grad(set_to_none=True)
    (hidden.sum() + v.sum()).backward()
    grads = {n: p.grad for n, p in model.image_head.named_parameters()}
    assert all(g is not None and not g.any() for g in grads.values()), [n for n, g in grads.items() if g is None]
    model.zero_grad(set_to_none=True)

"""Single-rank behaviour of the LCL model and losses: causality, loss modes, bidirectional ViT."""

import pytest
import torch
import torch.nn.functional as F

from megatron_lcl.config import LossConfig, ParallelConfig
from megatron_lcl.losses import LCLLoss
from megatron_lcl.testing import IMG, random_batch
from megatron_lcl.training.pipeline import forward_loss

from common import tiny_model_config

CFG = tiny_model_config()
M = CFG.vision.num_image_tokens


@pytest.fixture(scope="module")
def model(single_rank):
    from megatron_lcl.models.lcl_model import LCLModel
    from megatron_lcl.runtime import set_seed

    set_seed(0)
    return LCLModel(CFG, ParallelConfig()).eval()


def _batch(seed=0):
    # sample 0: images at 5 and 25; sample 1: image at 12
    return random_batch([[5, 25], [12]], seq_length=48, num_image_tokens=M, image_size=16,
                        vocab_size=192, seed=seed)


def _run(model, batch):
    with torch.no_grad():
        return model(batch.tokens, batch.position_ids, batch.images, batch.image_sample_index,
                     batch.boi_positions)


def test_text_after_an_image_does_not_change_its_t(model):
    batch = _batch()
    base = _run(model, batch)
    changed = _batch()
    # change text after the second image of sample 0 (EoI at 25 + M + 1)
    after = 25 + M + 2
    changed.tokens[0, after:] = (changed.tokens[0, after:] + 7) % 150 + 6
    out = _run(model, changed)
    torch.testing.assert_close(out.text_features, base.text_features, atol=0, rtol=0)
    assert not torch.equal(out.hidden[after:, 0], base.hidden[after:, 0])  # the change did propagate


def test_an_image_changes_lm_outputs_only_after_its_boi(model):
    batch = _batch()
    base = _run(model, batch)
    changed = _batch()
    changed.images[1] = torch.randn_like(changed.images[1])  # second image of sample 0, <BoI> at 25
    out = _run(model, changed)
    torch.testing.assert_close(out.hidden[:26, 0], base.hidden[:26, 0], atol=0, rtol=0)
    assert (out.hidden[26:, 0] - base.hidden[26:, 0]).abs().amax(-1).min() > 0  # every later position
    torch.testing.assert_close(out.hidden[:, 1], base.hidden[:, 1], atol=0, rtol=0)  # other sample
    assert not torch.equal(out.image_features[1], base.image_features[1])


def test_vit_attention_is_bidirectional(model):
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        base = model.vision(images)
        images[:, :, 8:, 8:] += 1.0  # only the last patch
        out = model.vision(images)
    assert not torch.allclose(out[:, 0], base[:, 0])  # class token sees the last patch


def test_images_without_context_are_excluded_from_contrastive(model):
    batch = random_batch([[0, 20], [9]], seq_length=48, num_image_tokens=M, image_size=16,
                         vocab_size=192, seed=3)
    with torch.no_grad():
        terms = forward_loss(model, batch, LCLLoss(LossConfig()))
    assert float(terms.num_images) == 2 and float(terms.con_excluded) == 1 and float(terms.con_batch) == 2


def _grads(model, mode):
    model.zero_grad(set_to_none=True)
    model.train()
    terms = forward_loss(model, _batch(1), LCLLoss(LossConfig(mode=mode)))
    terms.total.backward()
    model.eval()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_loss_gen_gives_no_gradient_to_contrastive_heads(model):
    grads = _grads(model, "gen")
    heads = [n for n in grads if n.startswith(("image_head.", "text_head."))]
    assert heads and all(grads[n].abs().max() == 0 for n in heads)
    assert grads["lm.decoder.layers.0.mlp.linear_fc1.weight"].abs().max() > 0


def test_loss_con_gives_no_gradient_to_lm_head(model):
    """The output layer is tied to the embedding: rows of tokens absent from the input are reached
    only through the output softmax, so under loss=con they must get exactly zero gradient."""
    batch = _batch(1)
    unused = torch.ones(192, dtype=torch.bool)
    unused[batch.tokens.unique()] = False
    unused[IMG] = True  # replaced by image latents
    con = _grads(model, "con")["lm.embedding.word_embeddings.weight"][:192]
    gen = _grads(model, "gen")["lm.embedding.word_embeddings.weight"][:192]
    assert con[unused].abs().max() == 0
    assert gen[unused].abs().max() > 0  # control: the same rows do get gradient from L_gen
    assert _grads(model, "con")["text_head.proj.weight"].abs().max() > 0


def test_loss_terms_equal_plain_torch_losses(model):
    """L_gen is plain cross-entropy over the micro-batch's text targets taken together, L_con the
    symmetric CLIP loss over the images with context, the total their weighted sum (single rank)."""
    batch = _batch(2)
    terms = forward_loss(model, batch, LCLLoss(LossConfig(mode="lcl", con_weight=0.1)))
    with torch.no_grad():
        out = model(batch.tokens, batch.position_ids, batch.images, batch.image_sample_index,
                    batch.boi_positions, with_logits=True)
    logits = out.logits.transpose(0, 1).reshape(-1, out.logits.shape[-1]).float()  # [s, b, v] -> [b * s, v]
    keep = batch.loss_mask.reshape(-1).bool()
    lm_loss = F.cross_entropy(logits[keep], batch.labels.reshape(-1)[keep])
    context = batch.image_has_context
    v, t = out.image_features[context].float(), out.text_features[context].float()  # [n_con, e]
    similarity = out.logit_scale * v @ t.t()  # [n_con, n_con], image rows
    positives = torch.arange(v.shape[0])
    con_loss = (F.cross_entropy(similarity, positives) + F.cross_entropy(similarity.t(), positives)) / 2
    assert v.shape[0] >= 2 and terms.num_images == v.shape[0] and terms.num_text_tokens == keep.sum()
    torch.testing.assert_close(terms.lm_loss, lm_loss)
    torch.testing.assert_close(terms.con_loss, con_loss)
    torch.testing.assert_close(terms.total.detach(), lm_loss + 0.1 * con_loss)


def test_logit_scale_init_and_clamp(model):
    assert model.text_head.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.text_head.logit_scale.fill_(10.0)
        assert model.text_head.scale().item() == pytest.approx(100.0, rel=1e-6)  # exp(ln 100 in fp32)
        model.text_head.logit_scale.fill_(torch.log(torch.tensor(1 / 0.07)).item())


def test_drop_path_and_layer_scale(model):
    """Layer-scale multiplies the branch; drop-path zeroes whole samples at train time only."""
    layer = model.vision.decoder.layers[1]
    proj = layer.self_attention.linear_proj
    assert proj.layer_scale is not None and torch.all(proj.layer_scale == CFG.vision.layer_scale_init)
    model.vision.set_drop_path_rate(0.999)
    assert layer.mlp.linear_fc2.drop_path_rate == pytest.approx(0.999)
    assert model.vision.decoder.layers[0].mlp.linear_fc2.drop_path_rate == 0.0  # linear in depth
    x = torch.randn(5, 64, proj.input_size)  # [s, b, h]
    proj.train()
    out, bias = proj(x)
    proj.eval()
    assert bias is None
    dropped = (out.abs().amax(dim=(0, 2)) == 0).sum()
    assert dropped > 50  # ~all 64 samples dropped at rate 0.999
    out_eval, _ = proj(x)
    assert (out_eval.abs().amax(dim=(0, 2)) > 0).all()
    model.vision.set_drop_path_rate(0.0)


def test_bf16_model_matches_fp32_within_bf16_precision(single_rank):
    """precision.params_dtype=bf16 builds every module (megatron-core layers, ViT stem, heads) in
    bf16; the losses stay fp32 and agree with the fp32 model up to bf16 rounding."""
    from megatron_lcl.config import PrecisionConfig
    from megatron_lcl.models.lcl_model import LCLModel
    from megatron_lcl.runtime import set_seed

    losses = {}
    for dtype in ("fp32", "bf16"):
        set_seed(11)
        model = LCLModel(CFG, ParallelConfig(), PrecisionConfig(params_dtype=dtype))
        assert {p.dtype for p in model.parameters()} == {torch.float32 if dtype == "fp32" else torch.bfloat16}
        terms = forward_loss(model, _batch(4), LCLLoss(LossConfig()))
        terms.total.backward()
        assert terms.total.dtype == torch.float32
        losses[dtype] = terms
    for key in ("lm_loss", "con_loss"):
        torch.testing.assert_close(getattr(losses["bf16"], key), getattr(losses["fp32"], key), rtol=3e-2, atol=3e-2)


def _step_reference(model, batches, rng, con_weight=0.1):
    """L_gen over the step's text targets + lambda x one InfoNCE over all images of the step, in one pass."""
    import torch.nn.functional as F

    from megatron_lcl.losses import generation_loss_sum
    from megatron_lcl.runtime.distributed import set_rng_state

    set_rng_state(rng)
    model.zero_grad(set_to_none=True)
    gen, image_features, text_features = 0.0, [], []
    targets = sum(b.loss_mask.sum() for b in batches)
    for b in batches:
        o = model(b.tokens, b.position_ids, b.images, b.image_sample_index, b.boi_positions)
        gen = gen + generation_loss_sum(o.logits, b.labels, b.loss_mask)[0] / targets
        image_features.append(o.image_features[b.image_has_context])
        text_features.append(o.text_features[b.image_has_context])
    v, t = torch.cat(image_features), torch.cat(text_features)
    logits = o.logit_scale * v @ t.T
    target = torch.arange(len(v))
    con = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    (gen + con_weight * con).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _step_feature_cache(model, batches, rng):
    from megatron_lcl.runtime import ParallelLayout
    from megatron_lcl.runtime.distributed import set_rng_state
    from megatron_lcl.training.pipeline import PipelineShape, step_forward_backward

    set_rng_state(rng)
    model.zero_grad(set_to_none=True)
    shape = PipelineShape(seq_length=48, micro_batch_size=2, carry_rows=1)
    metrics = step_forward_backward(model, batches, len(batches), LCLLoss(LossConfig(contrastive_batch="step")),
                                    shape, ParallelLayout.current())
    return {n: p.grad.clone() for n, p in model.named_parameters()}, metrics


def test_step_contrastive_replays_dropout_and_drop_path(single_rank):
    """contrastive_batch=step in one process with dropout, attention dropout and drop-path on: the
    feature-cache step (forward-only pass, RNG put back, training pass + surrogate) gives the gradient
    of the one-pass reference that draws the same masks; another RNG state gives another gradient."""
    from megatron_lcl.models.lcl_model import LCLModel
    from megatron_lcl.runtime import set_seed
    from megatron_lcl.runtime.distributed import get_rng_state

    cfg = tiny_model_config(drop_path_rate=0.3, hidden_dropout=0.1, attention_dropout=0.1)
    cfg.lm.hidden_dropout = cfg.lm.attention_dropout = 0.1
    set_seed(5)
    model = LCLModel(cfg, ParallelConfig()).train()
    batches = [random_batch(layout, 48, M, 16, 192, seed=20 + k)
               for k, layout in enumerate([[[0, 20], [9]], [[4], []], [[], []]])]
    rng = get_rng_state()
    expected = _step_reference(model, batches, rng)
    got, metrics = _step_feature_cache(model, batches, rng)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
    assert [float(m["con_batch"]) for m in metrics] == [3.0] * 3  # 4 images, one at <BoI> 0
    torch.manual_seed(123)
    other = _step_reference(model, batches, get_rng_state())
    assert not torch.allclose(other["vision.conv1.weight"], expected["vision.conv1.weight"])  # masks matter

"""SDPAttention (model.attention=sdpa) equals megatron-core's DotProductAttention (unfused).

In this process (TP=1): the core attention alone (causal, no_mask, grouped-query, explicit scale),
under selective recompute inside a TransformerBlock, and the whole tiny LCL model; dropout draws from
the tensor-parallel RNG tracker. On 2 gloo ranks (tests/dist/attention_checks.py, launched once for this
module): TP=2 head shards against the TP=1 reference, and the whole model at TP=2 against TP=1 unfused.
All in fp32, max abs difference <= 1e-5.
"""

from dataclasses import replace

import pytest
import torch

from common import tiny_model_config
from megatron_lcl.config import ConfigError, LMConfig, LossConfig, ModelConfig, ParallelConfig
from megatron_lcl.config import validate_model_config
from megatron_lcl.losses import LCLLoss
from megatron_lcl.models.transformer_config import build_transformer_config
from megatron_lcl.testing import random_batch
from megatron_lcl.training.pipeline import forward_loss
from multirank import run_torchrun

ATOL = 1e-5
HEADS, HEAD_DIM, SEQ, BATCH_SIZE = 4, 16, 24, 2
LM = LMConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS)


def _mask_type(name):
    from megatron.core.transformer.enums import AttnMaskType

    return AttnMaskType[name]


def _core_attention(cls, mask="causal", layer_number=1, **config_changes):
    config = replace(build_transformer_config(LM, ParallelConfig()), **config_changes)
    return cls(config, layer_number=layer_number, attn_mask_type=_mask_type(mask), attention_type="self")


def _out_and_grads(attention, groups=HEADS, seed=0):
    """Output `[s, b, np * hn]` and the gradients of q, k, v for a fixed random upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(SEQ, BATCH_SIZE, HEADS, HEAD_DIM, generator=g).requires_grad_(True)
    key, value = (torch.randn(SEQ, BATCH_SIZE, groups, HEAD_DIM, generator=g).requires_grad_(True)
                  for _ in range(2))
    out = attention(query, key, value, attention_mask=None)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return out.detach(), [t.grad for t in (query, key, value)]


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# --- the core attention, TP=1 -------------------------------------------------------------------------

@pytest.mark.parametrize("mask", ["causal", "no_mask"])
@pytest.mark.parametrize("case", ["plain", "grouped_query", "explicit_scale", "query_key_layer_scaling"])
def test_sdpa_equals_dot_product_attention(single_rank, mask, case):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_lcl.models.attention import SDPAttention

    changes, groups, layer_number = {}, HEADS, 1
    if case == "grouped_query":
        changes, groups = {"num_query_groups": 2}, 2
    elif case == "explicit_scale":
        changes = {"softmax_scale": 0.3}
    elif case == "query_key_layer_scaling":
        changes, layer_number = {"apply_query_key_layer_scaling": True}, 3
    reference, reference_grads = _out_and_grads(_core_attention(DotProductAttention, mask, layer_number, **changes),
                                                groups)
    out, grads = _out_and_grads(_core_attention(SDPAttention, mask, layer_number, **changes), groups)
    assert out.shape == (SEQ, BATCH_SIZE, HEADS * HEAD_DIM)
    assert _max_diff(out, reference) <= ATOL
    for name, grad, expected in zip("qkv", grads, reference_grads):
        assert grad.abs().max() > 0, name
        assert _max_diff(grad, expected) <= ATOL, name


def test_causal_and_no_mask_differ(single_rank):
    """The mask type is honoured: the last position sees the same keys either way, the first does not."""
    from megatron_lcl.models.attention import SDPAttention

    causal, _ = _out_and_grads(_core_attention(SDPAttention, "causal"))
    bidirectional, _ = _out_and_grads(_core_attention(SDPAttention, "no_mask"))
    assert _max_diff(causal[-1], bidirectional[-1]) <= ATOL
    assert _max_diff(causal[0], bidirectional[0]) > 0.1


def test_dropout_draws_from_the_tensor_parallel_rng_tracker(single_rank):
    """With dropout, the default generator is untouched (the draw is inside the tracker's fork) and
    the same tracker state gives the same output."""
    from megatron.core import tensor_parallel

    from megatron_lcl.models.attention import SDPAttention

    attention = _core_attention(SDPAttention, attention_dropout=0.5).train()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker_states, default_state = tracker.get_states(), torch.get_rng_state()
    first, _ = _out_and_grads(attention)
    assert torch.equal(torch.get_rng_state(), default_state)
    tracker.set_states(tracker_states)
    again, _ = _out_and_grads(attention)
    assert torch.equal(first, again)
    no_dropout, _ = _out_and_grads(attention.eval())
    assert _max_diff(first, no_dropout) > 0.1


@pytest.mark.parametrize("what", ["mask_type", "attention_mask"])
def test_unsupported_input_names_the_config_field(single_rank, what):
    from megatron_lcl.models.attention import SDPAttention

    with pytest.raises(ValueError, match="model.attention=unfused"):
        if what == "mask_type":
            _core_attention(SDPAttention, "padding")
        else:
            q = torch.zeros(SEQ, BATCH_SIZE, HEADS, HEAD_DIM)
            _core_attention(SDPAttention)(q, q, q, attention_mask=torch.zeros(1, 1, SEQ, SEQ, dtype=torch.bool))


# --- inside megatron-core layers, TP=1 ---------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:If you are using transformer_engine as the transformer implementation")
def test_selective_recompute_of_core_attention(single_rank):
    """A causal TransformerBlock with SDPA under selective recompute (`core_attn`, megatron-core's
    `_checkpointed_attention_forward`) == the unfused block without recompute, output and gradients."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_lcl.models.specs import LOCAL, SDPA, UNFUSED, lm_layer_spec

    config = build_transformer_config(LM, ParallelConfig())
    recompute = replace(config, recompute_granularity="selective", recompute_modules=["core_attn"])
    unfused = TransformerBlock(config, lm_layer_spec(LOCAL, UNFUSED))
    sdpa = TransformerBlock(recompute, lm_layer_spec(LOCAL, SDPA))
    sdpa.load_state_dict(unfused.state_dict())  # same keys: checkpoints do not depend on the choice
    assert sdpa.layers[0].self_attention.checkpoint_core_attention
    hidden = torch.randn(SEQ, BATCH_SIZE, LM.hidden_size)  # [s, b, h]
    results = []
    for block in (unfused, sdpa):
        x = hidden.clone().requires_grad_(True)
        out = block(x, attention_mask=None)
        out.square().sum().backward()
        results.append((out.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}))
    (ref_out, ref_x_grad, ref_grads), (out, x_grad, grads) = results
    assert _max_diff(out, ref_out) <= ATOL and _max_diff(x_grad, ref_x_grad) <= ATOL
    for name, grad in grads.items():
        assert _max_diff(grad, ref_grads[name]) <= ATOL * max(1.0, ref_grads[name].abs().max().item()), name


def _model_loss_and_grads(attention: str):
    from megatron_lcl.models.lcl_model import LCLModel
    from megatron_lcl.runtime import set_seed

    cfg = tiny_model_config()
    set_seed(0)
    model = LCLModel(replace(cfg, attention=attention), ParallelConfig())
    batch = random_batch([[5, 25], [12]], seq_length=48, num_image_tokens=cfg.vision.num_image_tokens,
                         image_size=16, vocab_size=192, seed=0, pad_from=[None, 40])
    terms = forward_loss(model, batch, LCLLoss(LossConfig()))
    terms.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return model, terms.metrics(), grads


def test_whole_model_sdpa_equals_unfused(single_rank):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_lcl.models.attention import SDPAttention

    unfused, unfused_terms, unfused_grads = _model_loss_and_grads("unfused")
    sdpa, sdpa_terms, sdpa_grads = _model_loss_and_grads("sdpa")
    assert isinstance(unfused.lm.decoder.layers[0].self_attention.core_attention, DotProductAttention)
    for model in (sdpa.lm, sdpa.vision):
        assert isinstance(model.decoder.layers[0].self_attention.core_attention, SDPAttention)
    assert sdpa.state_dict().keys() == unfused.state_dict().keys()
    assert sdpa.sharded_state_dict().keys() == unfused.sharded_state_dict().keys()  # checkpoints
    for key in ("loss", "lm_loss", "con_loss"):
        torch.testing.assert_close(sdpa_terms[key], unfused_terms[key], rtol=1e-5, atol=0)
    assert sdpa_grads.keys() == unfused_grads.keys()
    for name, grad in unfused_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(sdpa_grads[name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item(),
                                   msg=name)


# --- config --------------------------------------------------------------------------------------------

def test_bad_attention_value_names_the_field():
    with pytest.raises(ConfigError, match=r"model.attention \('flash'\) must be sdpa or unfused"):
        validate_model_config(ModelConfig(attention="flash"), ParallelConfig())


def test_local_spec_follows_the_choice():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_lcl.models.attention import SDPAttention
    from megatron_lcl.models.specs import LOCAL, SDPA, UNFUSED, lm_layer_spec, vit_layer_spec

    def core(spec):
        return spec.submodules.self_attention.submodules.core_attention

    assert core(lm_layer_spec(LOCAL)) is SDPAttention and core(vit_layer_spec(LOCAL, 0.1)) is SDPAttention
    assert core(lm_layer_spec(LOCAL, UNFUSED)) is DotProductAttention
    assert core(vit_layer_spec(LOCAL, None, UNFUSED)) is DotProductAttention
    assert core(vit_layer_spec(LOCAL, None, SDPA)) is SDPAttention


# --- TP=2 on 2 gloo ranks -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tp2_dir(tmp_path_factory):
    return run_torchrun("attention_checks.py", 2, tmp_path_factory.mktemp("attention"))


@pytest.mark.parametrize("mask", ["causal", "no_mask"])
@pytest.mark.parametrize("rank", [0, 1])
def test_tp2_heads_equal_tp1_slice(tp2_dir, mask, rank):
    saved = torch.load(tp2_dir / f"core_rank{rank}.pt")
    heads, reference, shard = slice(*saved["heads"]), saved["reference"][mask], saved["tp2"][mask]
    columns = slice(heads.start * HEAD_DIM, heads.stop * HEAD_DIM)
    assert shard["out"].shape == (SEQ, BATCH_SIZE, HEADS // 2 * HEAD_DIM)
    assert _max_diff(shard["out"], reference["out"][:, :, columns]) <= ATOL
    for name, grad, expected in zip("qkv", shard["grads"], reference["grads"]):
        assert grad.abs().max() > 0, name
        assert _max_diff(grad, expected[:, :, heads]) <= ATOL, name


def test_tp2_whole_model_sdpa_equals_tp1_unfused(tp2_dir):
    reference = torch.load(tp2_dir / "model_unfused_tp1.pt")
    tp2 = torch.load(tp2_dir / "model_sdpa_tp2.pt")
    for key in ("loss", "lm_loss", "con_loss"):
        torch.testing.assert_close(tp2["terms"][key], reference["terms"][key], rtol=1e-5, atol=0)
    assert tp2["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(tp2["grads"][name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item(),
                                   msg=name)

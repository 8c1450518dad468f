"""The direct path of megatron_lcl's tensor-parallel linears and L_gen's unsplit cross-entropy equal
megatron-core's own (TP = 1, fp32): outputs, input gradients and weight/bias gradients.

The split path (TP = 2) is megatron-core's unchanged; the TP2 == TP1 model checks
(tests/training/test_core_parallel.py, tests/models/test_attention.py) compare it against this one end to end.
"""

import pytest
import torch

from megatron_lcl.config import LMConfig, ParallelConfig
from megatron_lcl.models.transformer_config import build_transformer_config

SEQ, BATCH_SIZE, IN, OUT = 12, 3, 32, 48


def _config(**changes):
    config = build_transformer_config(LMConfig(hidden_size=IN, num_attention_heads=4), ParallelConfig())
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def _pair(kind, skip_bias_add, bias=True, **config_changes):
    """(megatron-core's layer, ours) with the same weights."""
    from megatron.core import tensor_parallel

    from megatron_lcl.models import layers

    config = _config(**config_changes)
    kwargs = dict(config=config, init_method=torch.nn.init.normal_, bias=bias, skip_bias_add=skip_bias_add)
    if kind == "column":
        kwargs.update(gather_output=False)
        theirs, ours = tensor_parallel.ColumnParallelLinear, layers.ColumnParallelLinear
    else:
        kwargs.update(input_is_parallel=True)
        theirs, ours = tensor_parallel.RowParallelLinear, layers.RowParallelLinear
    reference, layer = theirs(IN, OUT, **kwargs), ours(IN, OUT, **kwargs)
    layer.load_state_dict(reference.state_dict())
    return reference, layer


def _run(layer, x, upstream, weight=None):
    """-> (output with any returned bias added, input grad, {name: param grad})."""
    x = x.clone().requires_grad_(True)
    out, bias = layer(x) if weight is None else layer(x, weight=weight)
    if bias is not None:
        out = out + bias
    (out * upstream).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    for p in layer.parameters():
        p.grad = None
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("skip_bias_add", [False, True])
def test_direct_linear_equals_megatron_core(single_rank, kind, skip_bias_add):
    reference, layer = _pair(kind, skip_bias_add)
    assert layer.whole
    g = torch.Generator().manual_seed(0)
    x, upstream = torch.randn(SEQ, BATCH_SIZE, IN, generator=g), torch.randn(SEQ, BATCH_SIZE, OUT, generator=g)
    expected, expected_dx, expected_grads = _run(reference, x, upstream)
    out, dx, grads = _run(layer, x, upstream)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(dx, expected_dx, atol=1e-5, rtol=1e-6)
    assert grads.keys() == expected_grads.keys() == {"weight", "bias"}
    for name in grads:
        assert expected_grads[name].abs().max() > 0, name
        torch.testing.assert_close(grads[name], expected_grads[name], atol=1e-4, rtol=1e-6, msg=name)


def test_direct_linear_returns_the_bias_added(single_rank):
    """skip_bias_add callers get the bias inside the output and None as the bias, which megatron-core's
    bias-dropout-add and MLP treat as 'nothing to add'."""
    _, layer = _pair("row", skip_bias_add=True)
    x = torch.randn(SEQ, BATCH_SIZE, IN)
    out, bias = layer(x)
    assert bias is None
    torch.testing.assert_close(out, x @ layer.weight.t() + layer.bias)


def test_output_layer_with_a_given_weight(single_rank):
    """The LM output layer (no bias, the tied embedding weight passed in) on the direct path."""
    reference, layer = _pair("column", skip_bias_add=False, bias=False)
    tied = torch.nn.Parameter(torch.randn(OUT, IN))
    x, upstream = torch.randn(SEQ, BATCH_SIZE, IN), torch.randn(SEQ, BATCH_SIZE, OUT)
    expected, expected_dx, _ = _run(reference, x, upstream, weight=tied)
    expected_tied_grad, tied.grad = tied.grad.clone(), None
    out, dx, _ = _run(layer, x, upstream, weight=tied)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(dx, expected_dx)
    torch.testing.assert_close(tied.grad, expected_tied_grad)


@pytest.mark.parametrize("field", ["defer_embedding_wgrad_compute", "delay_wgrad_compute"])
def test_settings_the_direct_path_does_not_cover_take_megatron_cores(single_rank, field):
    _, layer = _pair("column", skip_bias_add=False, **{field: True})
    assert not layer.whole


def test_unsplit_cross_entropy_equals_vocab_parallel(single_rank):
    """L_gen at TP = 1 (torch's fused cross_entropy) == megatron-core's vocab-parallel cross-entropy."""
    from megatron.core import tensor_parallel

    from megatron_lcl.losses.generation import generation_loss_sum

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(SEQ, BATCH_SIZE, 50, generator=g)  # [s, b, v]
    labels = torch.randint(0, 50, (BATCH_SIZE, SEQ), generator=g)
    mask = (torch.rand(BATCH_SIZE, SEQ, generator=g) > 0.3).float()
    ours = logits.clone().requires_grad_(True)
    loss_sum, count = generation_loss_sum(ours, labels, mask)
    loss_sum.backward()
    # megatron-core's works in place on its input: give it its own copy
    theirs = logits.clone().requires_grad_(True)
    per_token = tensor_parallel.vocab_parallel_cross_entropy(theirs * 1.0, labels.t().contiguous())
    expected = (per_token * mask.t()).sum()
    expected.backward()
    assert count == mask.sum()
    torch.testing.assert_close(loss_sum, expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-5)

"""Small building blocks megatron-core does not have: layer-scale + drop-path on a residual branch,
an SP-ready LayerNorm, and tensor-parallel linears with a direct path when the matrix is not split."""

import functools

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a residual branch laid out `[s, b, h]`: drop whole samples (dim 1).

    Drawn from the default generator, which is identical across tensor-parallel ranks.
    """
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = torch.empty((1, x.shape[1], 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


@functools.lru_cache(maxsize=None)
def layer_scale_linear(row_parallel_cls: type) -> type:
    """Subclass a row-parallel linear (local or TE) so its output is `drop_path(gamma * (xW + b))`.

    The bias is added here rather than returned, so dropped samples lose the bias too; the
    bias-dropout-add that follows receives `bias=None`. `gamma` (layer-scale, CaiT) is one value per
    hidden unit, replicated over tensor-parallel ranks (the row-parallel output is full width).
    `drop_path_rate` is set per layer by the model after construction.
    """

    class LayerScaleRowParallelLinear(row_parallel_cls):
        def __init__(self, input_size, output_size, *args, layer_scale_init=None, **kwargs):
            super().__init__(input_size, output_size, *args, **kwargs)
            self.drop_path_rate = 0.0
            if layer_scale_init is None:
                self.layer_scale = None
            else:
                config = kwargs["config"]
                self.layer_scale = torch.nn.Parameter(
                    torch.full((output_size,), float(layer_scale_init), dtype=config.params_dtype))
                # Under sequence parallelism the output is split over TP ranks: reduce its grad there.
                setattr(self.layer_scale, "sequence_parallel", config.sequence_parallel)

        def forward(self, x):
            out, bias = super().forward(x)  # [s, b, h]
            if bias is not None:
                out = out + bias
            if self.layer_scale is not None:
                out = out * self.layer_scale
            return drop_path(out, self.drop_path_rate, self.training), None

    LayerScaleRowParallelLinear.__name__ = f"LayerScale{row_parallel_cls.__name__}"
    LayerScaleRowParallelLinear.__qualname__ = LayerScaleRowParallelLinear.__name__
    return LayerScaleRowParallelLinear


class LayerNorm(torch.nn.LayerNorm):
    """torch's LayerNorm with megatron-core's norm signature, usable under sequence parallelism.

    megatron-core's local norm (`WrappedTorchNorm`) refuses sequence parallelism; all SP needs from a
    norm is that its weight and bias, replicated over TP ranks but fed different sequence chunks, get
    their gradients summed over the TP group. Marking them `sequence_parallel` makes megatron-core's
    `finalize_model_grads` do exactly that (as it does for Apex / Transformer Engine norms).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in (self.weight, self.bias):
            setattr(p, "sequence_parallel", config.sequence_parallel)


def _holds_whole_matrix(linear) -> bool:
    """True when this rank holds the whole weight and the forward has nothing to communicate or defer:
    tensor-parallel size 1, no sequence parallelism, no expert parallelism, no fused or deferred weight
    gradient, no activation offloading."""
    cfg = linear.config
    return (linear.tp_group.size() == 1 and not linear.sequence_parallel and not linear.is_expert
            and not linear.gradient_accumulation_fusion and not cfg.defer_embedding_wgrad_compute
            and not cfg.delay_wgrad_compute and not cfg.cpu_offloading)


class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """megatron-core's column-parallel linear; unsplit (`_holds_whole_matrix`) its forward is one
    `F.linear` with the bias inside the matmul.

    At TP = 1 megatron-core's forward runs a Python autograd Function around the matmul and two
    identity communication Functions, and adds the bias as a separate op (on GPU, a kernel per
    linear); the direct path shortens the CPU step (measured in docs/gpu.md, `tools/bench_vs_torch.py`).
    It computes the same product with the same gradients (`tests/models/test_layers.py`). Returning the bias
    already added (and `None` as the bias) is what `skip_bias_add` callers expect too: megatron-core's
    bias-dropout-add and MLP add a returned bias only when it is not None.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.whole = _holds_whole_matrix(self)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not self.whole:
            return super().forward(input_, weight, runtime_gather_output)
        return F.linear(input_, self.weight if weight is None else weight, self.bias), None


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's row-parallel linear with the direct path of `ColumnParallelLinear`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.whole = _holds_whole_matrix(self)

    def forward(self, input_):
        if not self.whole:
            return super().forward(input_)
        return F.linear(input_, self.weight, self.bias), None

"""Numerics of the GPU paths that can be checked on CPU (docs/gpu.md, "Precision on a GPU").

- The temperature clamp holds in bf16 under both megatron-core optimizers: it clamps the optimizer's
  fp32 copy too. The temperature the optimizer keeps reaches the bound, stays on it and comes back
  down, as in the fp32 run; clamping the bf16 parameter alone (the clamp before) lets the copy drift
  past the bound, so the check does catch the fault.
- fp8: the ViT never runs it (its rows M x n are odd); the LM's rows and widths that Transformer
  Engine's fp8 GEMMs refuse are refused by validation, one line naming the fields.
- Fused weight-gradient accumulation: on with Transformer Engine layers, off with local ones and on the
  LM's local output layer; decided from the backend without importing Transformer Engine.
"""

import os
import sys
from dataclasses import replace

import pytest
import torch

from megatron_lcl.config import ConfigError, ParallelConfig, PrecisionConfig, config_errors, load_config
from megatron_lcl.config.validate import backend_errors
from megatron_lcl.models.factory import build_model
from megatron_lcl.models.lcl_model import LCLModel, transformer_configs
from megatron_lcl.models.specs import LOCAL, TRANSFORMER_ENGINE, select_transformer_impl
from megatron_lcl.models.transformer_config import output_layer_config

from common import tiny_model_config
from multirank import run_torchrun
from precision_checks import BOUND, MAX_SCALE, PUSHES, clamp_parameter_only, temperature_run

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "configs", "tiny_cpu.yaml")
CFG = tiny_model_config()


@pytest.fixture(scope="module")
def temperature_runs(single_rank):
    return {(dtype, distributed): temperature_run(dtype, distributed)
            for dtype in ("fp32", "bf16") for distributed in (False, True)}


@pytest.fixture(scope="module")
def dp2_runs(tmp_path_factory):
    out = run_torchrun("precision_checks.py", 2, tmp_path_factory.mktemp("precision"))
    return torch.load(out / "precision.pt")


@pytest.mark.parametrize("distributed", [False, True], ids=["mixed_precision", "distributed_optimizer"])
def test_bf16_clamp_holds_on_the_kept_value(temperature_runs, distributed):
    run = temperature_runs["bf16", distributed]
    kept = run["kept"]
    assert run["main_copy"]  # the optimizer keeps an fp32 copy of the bf16 parameter
    assert max(kept) <= BOUND and max(run["model"]) <= BOUND, kept
    first_at_bound = kept.index(BOUND)  # reached it while pushed up ...
    assert first_at_bound < PUSHES.index(1.0)
    assert kept[-1] < BOUND - 1.0, kept  # ... and came back down once pushed down
    # the fp32 run's temperature, up to the bf16 rounding of the parameter the loss reads
    assert kept == pytest.approx(temperature_runs["fp32", distributed]["kept"], abs=0.01)


@pytest.mark.parametrize("distributed", [False, True], ids=["mixed_precision", "distributed_optimizer"])
def test_fp32_clamp_holds(temperature_runs, distributed):
    run = temperature_runs["fp32", distributed]
    assert not run["main_copy"] and run["kept"] == run["model"]  # the parameter is its own master
    assert max(run["kept"]) == BOUND and run["kept"][-1] < BOUND - 1.0


@pytest.mark.parametrize("distributed", [False, True], ids=["mixed_precision", "distributed_optimizer"])
def test_clamping_the_bf16_parameter_alone_lets_the_kept_value_drift(single_rank, distributed):
    """The control: the clamp before the fix leaves the optimizer's fp32 copy unclamped (it reaches
    5.2 here; the bf16 parameter holds the clamp only until the next step copies that back)."""
    run = temperature_run("bf16", distributed, clamp=clamp_parameter_only)
    assert max(run["kept"]) > BOUND + 0.5, run["kept"]


def test_dp2_clamp_holds_on_the_rank_that_keeps_the_copy(dp2_runs, temperature_runs):
    """The distributed optimizer keeps the fp32 copy on one of the 2 ranks only; the mixed-precision one
    on both. Wherever kept, it never exceeds the bound, and it follows the DP=1 run (the same loss on both
    ranks, so the same averaged gradient); both ranks' parameters agree."""
    for name, distributed, copies in (("distributed", True, 1), ("mixed", False, 2)):
        ranks = dp2_runs[name]
        assert [r["main_copy"] for r in ranks].count(True) == copies, name
        assert ranks[0]["model"] == ranks[1]["model"] and max(ranks[0]["model"]) <= BOUND
        for kept in [r["kept"] for r in ranks if r["main_copy"]]:
            assert kept == pytest.approx(temperature_runs["bf16", distributed]["kept"], abs=1e-6), name
    control = [r["kept"] for r in dp2_runs["parameter_only"] if r["main_copy"]]
    assert len(control) == 1 and max(control[0]) > BOUND + 0.5


def test_scale_passes_its_gradient_at_the_bound(single_rank):
    """At the bound (where the clamp leaves it) the loss still moves the temperature: s = exp(clamped
    logit_scale), not clamp(exp(logit_scale)) (exp(fp32 ln 100) = 100.0000076 would be clamped, grad 0)."""
    model = build_model(CFG, ParallelConfig())
    with torch.no_grad():
        model.text_head.logit_scale.fill_(BOUND)
    model.text_head.scale().backward()
    assert model.text_head.logit_scale.grad == pytest.approx(MAX_SCALE)
    assert model.text_head.scale().item() == pytest.approx(MAX_SCALE)


# ---------------------------------------------------------------------------------------------- fp8

def _fp8_config(*overrides):
    return load_config(TINY, ["precision.params_dtype=bf16", "precision.fp8=hybrid",
                              "model.transformer_impl=transformer_engine", *overrides])


def _fp8_errors(cfg) -> list:
    return [e for e in config_errors(cfg) if e.startswith("precision.fp8")]


def test_fp8_accepts_lm_rows_divisible_by_8():
    assert _fp8_errors(_fp8_config("data.seq_length=128", "data.micro_batch_size=4")) == []
    assert _fp8_errors(_fp8_config("data.seq_length=100", "data.micro_batch_size=2")) == []  # 200 rows


def test_fp8_refuses_lm_rows_not_divisible_by_8():
    assert _fp8_errors(_fp8_config("data.seq_length=100", "data.micro_batch_size=1")) == [
        "precision.fp8: Transformer Engine's fp8 GEMMs need the LM's rows, data.seq_length (100) x "
        "data.micro_batch_size (1) = 100, divisible by 8"]
    assert config_errors(_fp8_config("data.seq_length=100", "data.micro_batch_size=1",
                                     "precision.fp8=null")) == config_errors(_fp8_config())  # fp8 only


def test_fp8_rows_per_rank_under_sequence_parallelism():
    """Each TP rank's qkv/fc1 input holds seq_length / tp of the rows: 36 x 2 = 72 rows, 36 per rank."""
    sp = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true", "data.seq_length=36",
          "data.micro_batch_size=2"]
    assert _fp8_errors(_fp8_config(*sp)) == [
        "precision.fp8: Transformer Engine's fp8 GEMMs need the LM's rows, data.seq_length (36) / "
        "parallel.tensor_model_parallel_size x data.micro_batch_size (2) = 36, divisible by 8"]
    assert _fp8_errors(_fp8_config(*sp[:2], "data.seq_length=32", "data.micro_batch_size=2")) == []


def test_fp8_refuses_lm_widths_not_divisible_by_16():
    errors = _fp8_errors(_fp8_config("model.lm.ffn_hidden_size=200", "parallel.tensor_model_parallel_size=1"))
    assert errors == ["precision.fp8: Transformer Engine's fp8 GEMMs need model.lm.ffn_hidden_size (200) / "
                      "parallel.tensor_model_parallel_size (1) divisible by 16"]
    assert _fp8_errors(_fp8_config("model.lm.ffn_hidden_size=80", "parallel.tensor_model_parallel_size=2")) == [
        "precision.fp8: Transformer Engine's fp8 GEMMs need model.lm.ffn_hidden_size (80) / "
        "parallel.tensor_model_parallel_size (2) divisible by 16"]


def test_fp8_reaches_the_lm_only():
    """The ViT's rows (M x images, M = 17 here, and 1 blank image without images) are never a multiple
    of 8 for sure: its Transformer Engine layers run in bf16."""
    cfg = _fp8_config()
    lm, vit = transformer_configs(cfg.model, cfg.parallel, cfg.precision, TRANSFORMER_ENGINE)
    assert (lm.fp8, vit.fp8) == ("hybrid", None)
    assert cfg.model.vision.num_image_tokens % 2 == 1


def test_fp8_needs_the_backend_to_resolve_to_transformer_engine(single_rank):
    precision = PrecisionConfig(params_dtype="bf16", fp8="hybrid")
    assert backend_errors(precision, TRANSFORMER_ENGINE) == []
    assert backend_errors(PrecisionConfig(params_dtype="bf16"), LOCAL) == []
    with pytest.raises(ConfigError, match=r"precision.fp8 needs Transformer Engine layers; "
                                          r"model.transformer_impl resolved to 'local'"):
        LCLModel(replace(CFG, transformer_impl="auto"), ParallelConfig(), precision)  # no CUDA here


# ------------------------------------------------------------------------- weight-gradient fusion

@pytest.mark.parametrize("cuda, te, fused", [(True, True, True), (True, False, False), (False, False, False)])
def test_wgrad_fusion_follows_the_backend(cuda, te, fused):
    """Asked for by the trainer (megatron-core DDP allocates the main_grad it adds into), fusion is on
    with Transformer Engine layers only; a model nobody wraps so (evaluation, benchmarks, gpu_check's TE
    step) never gets it, whatever the backend."""
    impl = select_transformer_impl("auto", cuda=cuda, te=te)
    bf16 = PrecisionConfig(params_dtype="bf16")
    lm, vit = transformer_configs(CFG, ParallelConfig(), bf16, impl, fuse_wgrad_accumulation=True)
    assert (lm.gradient_accumulation_fusion, vit.gradient_accumulation_fusion) == (fused, fused)
    unwrapped = transformer_configs(CFG, ParallelConfig(), bf16, impl)
    assert [c.gradient_accumulation_fusion for c in unwrapped] == [False, False]
    out = output_layer_config(lm)
    assert not out.gradient_accumulation_fusion
    assert (out.hidden_size, out.params_dtype, out.sequence_parallel) == (lm.hidden_size, lm.params_dtype,
                                                                          lm.sequence_parallel)
    assert "transformer_engine" not in sys.modules


def test_the_local_output_layer_needs_its_config_without_fusion(single_rank):
    """megatron-core's local ColumnParallelLinear refuses the fusion without Apex (absent here), so the
    LM's output layer takes `output_layer_config` on every backend."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    lm, _ = transformer_configs(CFG, ParallelConfig(), None, TRANSFORMER_ENGINE, fuse_wgrad_accumulation=True)
    kwargs = dict(init_method=lm.init_method, bias=False, gather_output=False)
    with pytest.raises(RuntimeError, match="gradient_accumulation_fusion"):
        ColumnParallelLinear(lm.hidden_size, 192, config=lm, **kwargs)
    assert not ColumnParallelLinear(lm.hidden_size, 192, config=output_layer_config(lm), **kwargs).gradient_accumulation_fusion
    assert not LCLModel(CFG, ParallelConfig()).lm.output_layer.gradient_accumulation_fusion

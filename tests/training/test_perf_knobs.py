"""Performance knobs (activation recomputation, overlapped grad reduce / param gather) == their defaults.

One torchrun launch (2 gloo ranks, DP=2, tests/dist/perf_knob_checks.py) trains the same tiny model with
dropout and drop-path for 2 steps through `Trainer.train_step` per setting. Equality is exact (0 ulp):
recomputation repeats the same CPU kernels on the same inputs with the RNG states put back, and the
bucketed reduce sums the same two values per element (and scales by 1/2, exact), so nothing changes
the arithmetic. The distributed optimizer's gradient norm sums per-shard squares, so its bucket layout
is held fixed and only `overlap_param_gather` varies there.
Then the config rules for combinations that cannot work, each naming its fields.
"""

import os

import pytest
import torch

from megatron_lcl.config import config_errors, load_config
from multirank import run_torchrun

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples",
                    "configs", "tiny_cpu.yaml")
# (setting, the default it must equal)
PAIRS = [("selective", "reference"), ("full_uniform", "reference"), ("full_block", "reference"),
         ("overlap_grad", "reference"), ("distopt_overlap_param", "distopt_overlap_grad"),
         ("pp2_knobs", "pp2_reference")]
STAT_KEYS = ("loss", "lm_loss", "con_loss", "con_top1", "grad_norm")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = run_torchrun("perf_knob_checks.py", 2, tmp_path_factory.mktemp("perf_knobs"))
    names = {name for pair in PAIRS for name in pair}
    return {name: torch.load(out / f"{name}.pt") for name in names}


def _assert_equal(expected: dict, actual: dict, what: str):
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=0, rtol=0, msg=f"{what} {name}")


@pytest.mark.parametrize("default", ["reference", "pp2_reference"])
def test_reference_trains_every_parameter(results, default):
    """Every parameter (of every rank) has a gradient and moved, so the comparisons cover all of them."""
    ref = results[default]
    assert not [n for n, g in ref["main_grads"].items() if g.abs().max() == 0]
    assert not [n for n in ref["params"] if torch.equal(ref["params"][n], ref["initial"][n])]
    assert all(s["loss"] > 1.0 and s["grad_norm"] > 1.0 for s in ref["stats"])  # clipping at 1.0 is active


@pytest.mark.parametrize("setting, default", PAIRS)
def test_losses_and_grad_norms_equal_default(results, setting, default):
    for step, (a, b) in enumerate(zip(results[setting]["stats"], results[default]["stats"])):
        assert {k: a[k] for k in STAT_KEYS} == {k: b[k] for k in STAT_KEYS}, f"step {step + 1}"


@pytest.mark.parametrize("setting, default", PAIRS)
def test_gradients_and_parameters_equal_default(results, setting, default):
    _assert_equal(results[default]["initial"], results[setting]["initial"], "initial weights")
    _assert_equal(results[default]["main_grads"], results[setting]["main_grads"], "step-2 gradient")
    _assert_equal(results[default]["params"], results[setting]["params"], "weights after 2 steps")


def _calls(result: dict, part: str) -> dict:
    return {k.split(":")[0]: v for k, v in result["forward_calls"].items() if k.endswith(":" + part)}


def test_recompute_settings_recompute_what_they_say(results):
    """Per layer and step: 2 micro-batches x (feature pass + training pass) = 4 forwards, +2 recomputed."""
    ref = _calls(results["reference"], "layer")
    assert set(ref.values()) == {8}  # 2 steps
    assert _calls(results["selective"], "layer") == ref
    assert set(_calls(results["selective"], "core_attn").values()) == {12}
    assert set(_calls(results["full_uniform"], "layer").values()) == {12}
    first = {n for n in ref if n.endswith("layers.0")}  # block, 1 layer: the first of the ViT and the LM
    assert first == {"vision.decoder.layers.0", "lm.decoder.layers.0"}
    assert set(_calls(results["pp2_knobs"], "layer").values()) == {12}  # stage 0: ViT + 2 LM layers
    assert {n: 12 if n in first else 8 for n in ref} == _calls(results["full_block"], "layer")


def test_overlap_settings_are_in_effect(results):
    """bucket_size 3000 gives several buckets; with overlap_param_gather the step leaves other ranks'
    shards stale until the next forward (or `sync_params`), without it the step gathers them."""
    assert results["reference"]["bucket_groups"] == 1
    assert results["overlap_grad"]["bucket_groups"] > 4
    assert results["distopt_overlap_param"]["stale_before_sync"] > 1e-5
    assert results["distopt_overlap_grad"]["stale_before_sync"] == 0.0


# ------------------------------------------------------------------------------ config rules

@pytest.mark.parametrize("overrides, message", [
    (["parallel.recompute_granularity=sometimes"],
     "parallel.recompute_granularity ('sometimes') must be null, selective or full"),
    (["parallel.recompute_granularity=full"],
     "parallel.recompute_granularity=full needs parallel.recompute_method uniform or block (got None) and "
     "parallel.recompute_num_layers >= 1 (got None)"),
    (["parallel.recompute_granularity=selective", "parallel.recompute_num_layers=1"],
     "parallel.recompute_method (None) and parallel.recompute_num_layers (1) apply to "
     "parallel.recompute_granularity=full only (it is 'selective'); leave them null"),
    (["parallel.recompute_granularity=selective", "parallel.recompute_modules=[core_attn, mlp]"],
     "parallel.recompute_modules (['core_attn', 'mlp']) must be a non-empty list of core_attn"),
    (["parallel.recompute_granularity=full", "parallel.recompute_method=uniform", "parallel.recompute_num_layers=3",
      "model.vision.num_layers=6"],
     "parallel.recompute_method=uniform recomputes chunks of parallel.recompute_num_layers (3) layers: it must "
     "divide the model.lm.num_layers of each pipeline stage ([2])"),
    (["parallel.recompute_granularity=full", "parallel.recompute_method=uniform", "parallel.recompute_num_layers=2",
      "model.lm.num_layers=4", "parallel.pipeline_model_parallel_size=2",
      "parallel.num_layers_in_first_pipeline_stage=1"],
     "parallel.recompute_method=uniform recomputes chunks of parallel.recompute_num_layers (2) layers: it must "
     "divide the model.lm.num_layers of each pipeline stage ([1, 3])"),
    (["parallel.bucket_size=1000000"],
     "parallel.bucket_size (1000000) must be >= 1 and needs parallel.overlap_grad_reduce=true "
     "(megatron-core uses one bucket without it)"),
    (["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"],
     "parallel.overlap_param_gather needs parallel.use_distributed_optimizer=true and "
     "parallel.overlap_grad_reduce=true (the parameters are gathered per gradient bucket)"),
    (["parallel.use_distributed_optimizer=true", "parallel.overlap_param_gather=true"],
     "parallel.overlap_param_gather needs parallel.use_distributed_optimizer=true and "
     "parallel.overlap_grad_reduce=true (the parameters are gathered per gradient bucket)"),
    (["parallel.overlap_grad_reduce=true", "loss.mode=gen"],
     "parallel.overlap_grad_reduce needs loss.mode=lcl: with loss.mode=gen some heads get no gradient, and "
     "megatron-core's overlapped reduce waits for every parameter's"),
])
def test_bad_knob_combinations_name_their_fields(overrides, message):
    assert config_errors(load_config(TINY, overrides)) == [message]


@pytest.mark.parametrize("overrides", [
    ["parallel.recompute_granularity=selective"],
    ["parallel.recompute_granularity=full", "parallel.recompute_method=uniform", "parallel.recompute_num_layers=1"],
    ["parallel.recompute_granularity=full", "parallel.recompute_method=block", "parallel.recompute_num_layers=8"],
    ["parallel.use_distributed_optimizer=true", "parallel.overlap_grad_reduce=true", "parallel.bucket_size=4000",
     "parallel.overlap_param_gather=true"],
])
def test_good_knob_combinations_pass(overrides):
    assert config_errors(load_config(TINY, overrides)) == []

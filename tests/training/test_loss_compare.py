"""Loss compare across parallel layouts (torchtitan's loss-compare CI, run here on CPU): the whole driver
(loader + model + pipeline schedule + optimizer) trains the same at DP1, DP2, TP2, PP2 and TP2 x DP2,
and a run that changes its DP size mid-way (DP2 for 10 steps, then DP1) trains as DP1 throughout.

Per step: total, lm and con losses and the gradient norm within 1e-4 (relative) of DP1's. The DP=1
runs (the reference, the initial weights, the resumed half) run in this process; the others in two
torchrun launches of tests/dist/loss_compare_checks.py (2 ranks: dp2, tp2, pp2; 4 ranks: tp2_dp2),
which describes the set-up.
"""

import pytest

import loss_compare_checks as lc  # tests/dist (on pytest's pythonpath)
from multirank import run_torchrun
from test_training import build_corpus

KEYS = ("loss", "lm_loss", "con_loss", "grad_norm")
RTOL = 1e-4

pytestmark = pytest.mark.usefixtures("restore_rendezvous_env")  # in-process runs set RANK, MASTER_*...


def in_process(work):
    """Run `work()` in this process (world size 1), then tear its process group down."""
    from megatron_lcl.runtime import destroy_distributed

    try:
        return work()
    finally:
        destroy_distributed()


def save_initial_weights(out: str) -> None:
    from megatron_lcl.checkpoint import save_weights
    from megatron_lcl.training.trainer import Trainer

    cfg = lc.tiny_run_config(out, "init_run", "model.vision.drop_path_rate=0")
    trainer = Trainer(cfg).setup()
    try:
        save_weights(trainer.model, cfg, f"{out}/init", trainer.layout)
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def metrics(tmp_path_factory) -> dict:
    from megatron_lcl.checkpoint import checkpoint_name, read_metrics

    out = tmp_path_factory.mktemp("loss_compare")
    build_corpus(out)
    in_process(lambda: save_initial_weights(str(out)))
    dp, overrides = lc.LAYOUTS[1]["dp1"]
    in_process(lambda: lc.train(lc.layout_config(str(out), "dp1", dp, *overrides)))
    run_torchrun("loss_compare_checks.py", 2, out, timeout_s=600)
    (out / "done").unlink()
    run_torchrun("loss_compare_checks.py", 4, out, timeout_s=600)
    step10 = f"dp2/checkpoints/{checkpoint_name(10)}"
    in_process(lambda: lc.train(lc.layout_config(str(out), "dp2_then_dp1", 1, "data.num_workers=1", weights=step10)))
    runs = ["dp1", "dp2", "tp2", "pp2", "tp2_dp2", "dp2_then_dp1"]
    return {run: read_metrics(str(out / run)) for run in runs}


def assert_same_training(rows, reference, what: str) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in reference], what
    for row, ref in zip(rows, reference):
        for key in KEYS:
            assert row[key] == pytest.approx(ref[key], rel=RTOL), \
                f"{what}: step {row['step']} {key} {row[key]!r} vs DP1 {ref[key]!r}"


@pytest.mark.parametrize("layout", ["dp2", "tp2", "pp2", "tp2_dp2"])
def test_every_layout_trains_as_dp1(metrics, layout):
    reference = metrics["dp1"]
    assert len(reference) == lc.STEPS and all(r["lm_loss"] > 0 for r in reference)
    assert sum(r["con_loss"] > 0 for r in reference) >= 15  # 0: a step with one image with context
    assert reference[-1]["loss"] < reference[0]["loss"]  # it trains
    assert_same_training(metrics[layout], reference, layout)


def test_a_dp_size_change_mid_run_trains_as_dp1(metrics):
    """DP2 for 10 steps, saved, resumed at DP1 for 10: the samples continue exactly, so every step equals
    the uninterrupted DP1 run's (and the first 10 are DP2's own)."""
    resumed = metrics["dp2_then_dp1"]
    assert [r["step"] for r in resumed] == list(range(11, lc.STEPS + 1))
    assert_same_training(metrics["dp2"][:10] + resumed, metrics["dp1"], "DP2 -> DP1")

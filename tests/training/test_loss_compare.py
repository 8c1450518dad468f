"""Loss compare across parallel layouts and micro-batch splits (torchtitan's loss-compare CI, run here on
CPU): the whole driver (loader + model + pipeline schedule + optimizer) trains the same at DP1 with 2
micro-batches a step, DP1 with 1 (only the micro-batch size differs), DP4, TP2 x DP2, PP2 x DP2 and
TP2 x PP2 (1, 2 or 4 micro-batches a step), and a run that changes its DP size mid-way (DP4 for 6 steps,
then DP1) trains as DP1 throughout.

Per step: total, lm and con losses and the gradient norm within 1e-4 (relative) of DP1's. The world-size-1
runs (the reference, the initial weights, the other micro-batch size, the resumed half) run in this
process; the others in one torchrun launch of tests/dist/loss_compare_checks.py (4 ranks), which
describes the set-up.
"""

import pytest

import loss_compare_checks as lc  # tests/dist (on pytest's pythonpath)
from multirank import run_torchrun
from test_training import build_corpus

KEYS = ("loss", "lm_loss", "con_loss", "grad_norm")
RTOL = 1e-4
MULTI_RANK = list(lc.LAYOUTS[4])

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
    for run, (micro_batch_size, overrides) in lc.LAYOUTS[1].items():
        in_process(lambda: lc.train(lc.layout_config(str(out), run, micro_batch_size, *overrides)))
    run_torchrun("loss_compare_checks.py", 4, out, timeout_s=900)
    saved = f"dp4/checkpoints/{checkpoint_name(lc.SAVE_STEP)}"
    in_process(lambda: lc.train(lc.layout_config(str(out), "dp4_then_dp1", 4, "data.num_workers=1", weights=saved)))
    runs = [*lc.LAYOUTS[1], *MULTI_RANK, "dp4_then_dp1"]
    return {run: read_metrics(str(out / run)) for run in runs}


def assert_same_training(rows, reference, what: str) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in reference], what
    for row, ref in zip(rows, reference):
        for key in KEYS:
            assert row[key] == pytest.approx(ref[key], rel=RTOL), \
                f"{what}: step {row['step']} {key} {row[key]!r} vs DP1 {ref[key]!r}"


def test_the_reference_trains(metrics):
    reference = metrics["dp1"]
    assert len(reference) == lc.STEPS and all(r["lm_loss"] > 0 for r in reference)
    assert sum(r["con_loss"] > 0 for r in reference) >= lc.STEPS - 3  # 0: a step with one image with context
    assert reference[-1]["loss"] < reference[0]["loss"]  # it trains


def test_another_micro_batch_size_trains_as_dp1(metrics):
    """1 micro-batch of 8 instead of 2 of 4 at DP 1 (the split a requeue on fewer nodes changes): the
    step's text targets are weighted the same (L_gen over the step's targets), so every step equals."""
    assert_same_training(metrics["dp1_mb8"], metrics["dp1"], "micro-batch 8")


@pytest.mark.parametrize("layout", MULTI_RANK)
def test_every_layout_trains_as_dp1(metrics, layout):
    assert_same_training(metrics[layout], metrics["dp1"], layout)


def test_a_dp_size_change_mid_run_trains_as_dp1(metrics):
    """DP4 for 6 steps, saved, resumed at DP1 for 6: the samples continue exactly, so every step equals
    the uninterrupted DP1 run's (and the first 6 are DP4's own)."""
    resumed = metrics["dp4_then_dp1"]
    assert [r["step"] for r in resumed] == list(range(lc.SAVE_STEP + 1, lc.STEPS + 1))
    assert_same_training(metrics["dp4"][:lc.SAVE_STEP] + resumed, metrics["dp1"], "DP4 -> DP1")

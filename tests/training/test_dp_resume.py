"""A run continues at another data-parallel size (a job requeued on fewer or more nodes): DP 1 -> 2 and
DP 2 -> 1, with the distributed optimizer (dp_reshardable on CPU).

The DP=1 halves run in this process (world size 1), the DP=2 halves in ONE torchrun launch of
tests/dist/dp_checks.py. Checked: the model and optimizer state after the load equal those saved
(layout-independent sums), training goes on from the saved step, and the data position continues:
no document is read twice (that the samples are exactly an uninterrupted run's: test_loss_compare.py
and tests/data/test_data_order.py).
"""

import json
import shutil

import pytest

import dp_checks  # tests/dist (on pytest's pythonpath): the helpers the DP=2 launch shares
from multirank import run_torchrun
from test_training import build_corpus


pytestmark = pytest.mark.usefixtures("restore_rendezvous_env")  # in-process runs set RANK, MASTER_*...


def run_here(out, run: str, steps: int) -> dict:
    """One DP=1 run in this process (then its process group is torn down)."""
    from megatron_lcl.runtime import destroy_distributed

    try:
        return dp_checks.recorded_run(dp_checks.dp_resume_config(str(out), run, f"train.train_steps={steps}"))
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp_resume")
    build_corpus(out)
    dp1 = run_here(out, "dp1", 3)
    run_torchrun("dp_checks.py", 2, out, timeout_s=400)
    dist_results = json.loads((out / "dp_checks.json").read_text())
    shutil.copytree(out / "dp2", out / "down")
    down = run_here(out, "down", 6)
    return {"dp1": dp1, "up": dist_results["up"], "dp2": dist_results["down"], "down": down}


@pytest.mark.parametrize("before, after", [("dp1", "up"), ("dp2", "down")])
def test_training_continues_at_another_data_parallel_size(results, before, after):
    saved, loaded = results[before], results[after]
    assert loaded["start"]["step"] == 3
    assert loaded["start"]["params"] == pytest.approx(saved["end"]["params"], rel=1e-12)
    assert loaded["start"]["moments"] == pytest.approx(saved["end"]["moments"], rel=1e-12)
    assert saved["end"]["moments"] > 0
    assert len(saved["consumed"]) == len(loaded["consumed"]) == 12  # 3 steps x global batch 4
    # The data position: nothing twice.
    everything = saved["consumed"] + loaded["consumed"]
    assert len(set(everything)) == len(everything)

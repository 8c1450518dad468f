"""tools/gpu_check.py in its CPU mode (`--device cpu --small`): every part that can run on a CPU, one
launch for the module. What a GPU run would show as device-vs-CPU differences is CPU-vs-CPU here:
exactly zero. Also: one part failing keeps the others' results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "tools" / "gpu_check.py")


def gpu_check(tmp: Path, *extra: str, env: dict = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, "--out", str(tmp / "out"), "--work", str(tmp / "work"),
                           "--device", "cpu", "--small", *extra], capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    proc = gpu_check(tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp / "out" / "report.json").read_text()), tmp


def test_report_structure(cpu_run):
    report, tmp = cpu_run
    assert report["device"] == "cpu" and report["small"] is True
    assert list(report["parts"]) == ["a", "b", "c", "d"]
    assert [p["status"] for p in report["parts"].values()] == ["passed", "passed", "passed", "skipped"]
    for part in report["parts"].values():
        assert 0 <= part["elapsed_s"] <= part["budget_s"]
    summary = (tmp / "out" / "summary.md").read_text()
    for row in ("| a equivalence | passed |", "| b training | passed |", "| c benchmark | passed |",
                "| d te | skipped | Transformer Engine absent"):
        assert row in summary
    assert "== (b) torchrun again" in (tmp / "out" / "gpu_check.log").read_text()


def test_equivalence_on_the_cpu_is_exact(cpu_run):
    a = cpu_run[0]["parts"]["a"]
    assert a["losses"] == a["reference_losses"]
    assert set(a["loss_rel_diff"]) == {"total", "lm_loss", "con_loss"}
    assert all(diff == 0.0 for diff in a["loss_rel_diff"].values())
    assert a["grad_max_rel_diff"] == 0.0
    assert a["num_gradients"] >= 40  # every parameter of the tiny model's ViT, LM and heads
    assert 5.0 < a["losses"]["lm_loss"] < 7.5  # ~ln(512) at init: a real forward ran


def test_training_falls_saves_and_resumes(cpu_run):
    b = cpu_run[0]["parts"]["b"]
    assert b["launch_start_steps"] == [0, 8] and b["resumed_from"] == 8
    assert b["steps"] == [2, 4, 6, 8, 10, 12]
    assert b["last_loss"] < b["first_loss"] and b["loss_fell"]
    assert "step_00000008" in b["checkpoints"] and "step_00000012" in b["checkpoints"]


def test_benchmark_counts_the_same_flops_in_both_models(cpu_run):
    c = cpu_run[0]["parts"]["c"]
    flops = c["flops_per_sample"]
    assert flops["counted_megatron_lcl"] == pytest.approx(flops["analytic"], rel=1e-3)
    assert flops["counted_torch_twin"] == pytest.approx(flops["analytic"], rel=1e-3)
    assert c["config"]["micro_batch"] == 2 and c["config"]["seq_length"] == 128
    ours, twin = c["megatron_lcl"], c["torch_twin"]
    assert c["ratio_images_per_s"] == pytest.approx(ours["images_per_s"] / twin["images_per_s"])
    assert ours["images_per_s"] == pytest.approx(6 / ours["step_time_s"])  # 2 samples x 3 images
    assert set(c["targets"]) == {"no_slower_than_twin"}


def test_a_part_out_of_time_keeps_the_others_results(tmp_path):
    proc = gpu_check(tmp_path, "--parts", "a,d", "--budget", "a=1")  # importing megatron-core alone takes longer
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    a, d = report["parts"]["a"], report["parts"]["d"]
    assert proc.returncode == 1
    assert a["status"] == "timeout" and a["budget_s"] == 1.0 and "time budget" in a["error"]
    assert a["elapsed_s"] < 30  # the reference process was killed at the budget, not waited for
    assert d["status"] == "skipped"
    assert "| a equivalence | timeout |" in (tmp_path / "out" / "summary.md").read_text()


def test_equivalence_measure_sees_a_difference():
    import torch
    from gpu_check import TOLERANCE, compare

    ref_grads = {"a": torch.tensor([3.0, 4.0]), "b": torch.ones(4)}
    grads = {"a": torch.tensor([3.0, 4.0 + 5e-3]), "b": torch.ones(4)}  # |diff| / |ref| = 5e-3 / 5
    r = compare({"total": 2.0004}, grads, {"total": 2.0}, ref_grads, "cuda:0")
    assert r["loss_rel_diff"]["total"] == pytest.approx(2e-4)
    assert r["grad_max_rel_diff"] == pytest.approx(1e-3, rel=1e-4) and r["grad_worst_parameter"] == "a"
    assert r["grad_max_rel_diff"] > TOLERANCE

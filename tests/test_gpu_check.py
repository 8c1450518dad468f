"""tools/gpu_check.py on the CPU, one launch per mode for the module:

- `--device cpu --small`: parts a-c run for real at tiny sizes (what a GPU run would show as
  device-vs-CPU differences is CPU-vs-CPU here: exactly zero), d in its dry form;
- `--dry`: every part builds the GPU run's batches and configs (ViT-L/14 + OPT-125M at 2048, the
  training config with its overrides, the Transformer Engine batch) and runs nothing heavy.

No verdict here depends on time: on the CPU a part's budget is only reported, and the processes are
killed only at a hang guard (a test forces that guard to 0 to see the kill path). Also: one part
failing keeps the others' results, a child's output is echoed and logged as it comes, and the parent
process never imports torch (so it holds no CUDA context on a GPU)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "tools" / "gpu_check.py")
HANG_GUARD_S = 1800  # the whole command, for a loaded 2-core machine; never a pass criterion


def gpu_check(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, "--out", str(tmp / "out"), "--work", str(tmp / "work"), *extra],
                          capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def report_of(tmp: Path) -> dict:
    return json.loads((tmp / "out" / "report.json").read_text())


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    proc = gpu_check(tmp, "--device", "cpu", "--small")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return report_of(tmp), tmp, proc.stdout


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """`--dry --parts b,c` with part b's budget at 0, through `gpu_check.main` in a process that then
    reports whether torch was imported (the parent only starts processes: it must not import torch, nor
    so create a CUDA context). Parts a and d have no dry form beyond the `--small` run's: its a builds
    the same CPU reference, its d is the same dry TE batch."""
    tmp = tmp_path_factory.mktemp("gpu_check_dry")
    argv = ["--out", str(tmp / "out"), "--work", str(tmp / "work"), "--dry", "--parts", "b,c", "--budget", "b=0"]
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tools')!r}); import gpu_check; "
            f"rc = gpu_check.main({argv!r}); print('torch imported:', 'torch' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return report_of(tmp), tmp, proc.stdout


def test_report_structure(cpu_run):
    report, tmp, stdout = cpu_run
    assert report["device"] == "cpu" and report["small"] is True and report["dry"] is False
    assert list(report["parts"]) == ["a", "b", "c", "d"]
    assert [p["status"] for p in report["parts"].values()] == ["passed", "passed", "passed", "dry"]
    for part in report["parts"].values():  # on the CPU the budget is compared, the hang guard kills
        assert part["limit_s"] == 900 and isinstance(part["over_budget"], bool)  # over: still passed
    summary = (tmp / "out" / "summary.md").read_text()
    for row in ("| a equivalence | passed |", "| b training | passed |", "| c benchmark | passed |",
                "| d te | dry | Transformer Engine absent (CPU mode"):
        assert row in summary
    log = (tmp / "out" / "gpu_check.log").read_text()
    assert "== (b) torchrun again" in log
    assert "  | FLOPs per sample (fwd+bwd)" in stdout  # the benchmark's lines, echoed as they came
    assert stdout.index("  | FLOPs per sample") < stdout.index("[gpu_check] part c: passed")


def test_equivalence_on_the_cpu_is_exact(cpu_run):
    a = cpu_run[0]["parts"]["a"]
    assert a["losses"] == a["reference_losses"]
    assert set(a["loss_rel_diff"]) == {"total", "lm_loss", "con_loss"}
    assert all(diff == 0.0 for diff in a["loss_rel_diff"].values())
    assert a["grad_max_rel_diff"] == 0.0
    assert a["num_gradients"] >= 40  # every parameter of the tiny model's ViT, LM and heads
    assert 5.0 < a["losses"]["lm_loss"] < 7.5  # ~ln(512) at init: a real forward ran


def test_training_falls_saves_in_the_background_and_resumes(cpu_run):
    b = cpu_run[0]["parts"]["b"]
    assert b["launch_start_steps"] == [0, 8] and b["resumed_from"] == 8
    assert b["steps"] == [2, 4, 6, 8, 10, 12]
    assert b["last_loss"] < b["first_loss"] and b["loss_fell"]
    assert "step_00000008" in b["checkpoints"] and "step_00000012" in b["checkpoints"]
    saves = b["saves"]
    assert saves["fallback"] is None  # background saves ran (this machine has the shared memory)
    assert 4 in [s["step"] for s in saves["background"]]  # save_interval 4: step 4 written in the background
    assert saves["stall_s_max"] == max(s["paused_s"] for s in saves["background"]) >= 0.0


def test_benchmark_counts_the_same_flops_in_both_models(cpu_run):
    c = cpu_run[0]["parts"]["c"]
    flops = c["flops_per_sample"]
    # torch's counter sees the full s^2 of the math kernel; MFU's count takes the causal half of the LM's
    assert flops["counted_megatron_lcl"] == pytest.approx(flops["analytic_full_attention"], rel=1e-3)
    assert flops["counted_torch_twin"] == pytest.approx(flops["analytic_full_attention"], rel=1e-3)
    assert flops["analytic"] < flops["analytic_full_attention"]
    assert c["config"]["micro_batch"] == 2 and c["config"]["seq_length"] == 128
    ours, twin = c["megatron_lcl"], c["torch_twin"]
    assert c["ratio_images_per_s"] == pytest.approx(ours["images_per_s"] / twin["images_per_s"])
    assert ours["images_per_s"] == pytest.approx(6 / ours["step_time_s"])  # 2 samples x 3 images
    assert c["peaks"]["spec_flops_per_s"] is None and ours["mfu"] is None  # a CPU has no spec-sheet peak
    achieved = ours["model_tflops_per_s"] * 1e12
    assert ours["of_matmul_peak"] == pytest.approx(achieved / c["peaks"]["matmul_flops_per_s"])
    assert set(c["targets"]) == {"no_slower_than_twin"}


def test_dry_mode_builds_the_gpu_runs_batches_and_configs(dry_run):
    report, tmp, _ = dry_run
    assert report["dry"] is True and report["device"] == "cpu"
    parts = report["parts"]
    assert list(parts) == ["b", "c"] and [p["status"] for p in parts.values()] == ["dry"] * 2
    b = parts["b"]
    assert b["config_errors"] == [] and (b["train_steps"], b["first_launch_steps"], b["save_interval"]) == (60, 50, 10)
    assert b["async_save"] is True and b["params_dtype"] == "bf16"
    c = parts["c"]
    assert (c["config"]["vision"], c["config"]["lm"], c["config"]["seq_length"]) == ("L/14", "opt-125m", 2048)
    m = c["config"]["image_tokens"]
    assert m == 257 and all(p + m + 1 < 2048 for p in c["batch_of_one"]["boi_positions"])
    assert c["batch_of_one"]["images"] == [3, 3, 224, 224]


def test_the_dry_te_part_builds_the_batch_that_once_did_not_fit(cpu_run):
    d = cpu_run[0]["parts"]["d"]  # dry in --small as in --dry (issue 32)
    assert d["config_errors"] == [] and d["batch"]["images"] == 16 and d["local_step"]["finite"]
    assert all(p + 17 + 1 < 128 for p in d["batch"]["boi_positions"])


def test_over_budget_on_the_cpu_still_passes(dry_run):
    report, tmp, _ = dry_run
    b = report["parts"]["b"]
    assert b["status"] == "dry" and b["over_budget"] is True and b["budget_s"] == 0
    summary = (tmp / "out" / "summary.md").read_text()
    assert "| b training | dry |" in summary and ", over)" in summary


def test_the_parent_process_imports_no_torch(dry_run):
    assert "torch imported: False" in dry_run[2]


def test_a_part_killed_at_the_hang_guard_keeps_the_others_results(tmp_path):
    proc = gpu_check(tmp_path, "--dry", "--parts", "a,b", "--hang-guard", "a=0")
    report = report_of(tmp_path)
    a, b = report["parts"]["a"], report["parts"]["b"]
    assert proc.returncode == 1
    assert a["status"] == "timeout" and a["limit_s"] == 0 and "no time left" in a["error"]
    assert b["status"] == "dry" and b["config_errors"] == []
    assert "| a equivalence | timeout |" in (tmp_path / "out" / "summary.md").read_text()


def runner_for(tmp_path: Path, limit_s: float):
    from gpu_check import Runner

    runner = Runner(SimpleNamespace(out=str(tmp_path), enforce_budgets=False), dict(os.environ))
    runner.deadline = time.monotonic() + limit_s
    return runner


def test_runner_kills_a_hung_child_and_its_group(tmp_path):
    from gpu_check import PartTimeout

    runner = runner_for(tmp_path, limit_s=10)  # bash starts in milliseconds, also on a loaded machine
    pid_file = tmp_path / "grandchild.pid"
    hang = f"sleep 600 & echo $! > {pid_file}; echo started; wait"
    with pytest.raises(PartTimeout, match="hang guard") as caught:
        runner.run(["bash", "-c", hang], "a hung child")
    assert "started" in caught.value.output
    grandchild = int(pid_file.read_text())
    for _ in range(100):  # SIGKILL to the group: the grandchild goes too (a zombie until reaped)
        stat = Path(f"/proc/{grandchild}/stat")
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {grandchild} outlived its group's kill")


def test_runner_echoes_and_logs_each_line_and_names_the_failure(tmp_path, capsys):
    from gpu_check import PartFailed

    runner = runner_for(tmp_path, limit_s=300)
    script = "print('figure 1', flush=True); print('figure 2'); raise ValueError('the reason')"
    with pytest.raises(PartFailed, match="exited with status 1: ValueError: the reason"):
        runner.python(["-c", script], "a child")
    out = capsys.readouterr().out
    assert "  | figure 1\n  | figure 2\n" in out
    log = (tmp_path / "gpu_check.log").read_text()
    assert "figure 1\nfigure 2\n" in log and "===== a child: exit 1" in log


def test_failure_line_prefers_a_torchrun_workers_exception():
    from gpu_check import failure_line

    output = ("[rank0]: Traceback (most recent call last):\n[rank0]: AssertionError: shapes differ\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n====\n  <NO_OTHER_FAILURES>\n====\n")
    assert failure_line(output) == "AssertionError: shapes differ"
    assert failure_line("a\nKeyError: 'x'\n") == "KeyError: 'x'"
    assert failure_line("no exception here\n=====\n") == "no exception here"


def test_save_stalls_read_from_the_trainers_lines():
    from gpu_check import save_stalls

    output = ("saving step 4 in the background (training paused 0.31 s)\n"
              "saved checkpoint /r/checkpoints/step_00000004 (written in the background; completing it took 0.02 s)\n"
              "saved checkpoint /r/checkpoints/step_00000008 (1.25 s)\n")
    saves = save_stalls(output)
    assert saves["background"] == [{"step": 4, "paused_s": 0.31}] and saves["stall_s_max"] == 0.31
    assert saves["completion_waits_s"] == [0.02] and saves["at_once"] == [{"step": 8, "took_s": 1.25}]
    fallback = save_stalls("checkpoint.async_save: no shared memory; this save and the later ones are written at once\n")
    assert fallback["fallback"].startswith("checkpoint.async_save: no shared memory") and fallback["stall_s_max"] is None


def test_equivalence_measure_sees_a_difference():
    import torch
    from gpu_check import TOLERANCE, compare

    ref_grads = {"a": torch.tensor([3.0, 4.0]), "b": torch.ones(4)}
    grads = {"a": torch.tensor([3.0, 4.0 + 5e-3]), "b": torch.ones(4)}  # |diff| / |ref| = 5e-3 / 5
    r = compare({"total": 2.0004}, grads, {"total": 2.0}, ref_grads, "cuda:0")
    assert r["loss_rel_diff"]["total"] == pytest.approx(2e-4)
    assert r["grad_max_rel_diff"] == pytest.approx(1e-3, rel=1e-4) and r["grad_worst_parameter"] == "a"
    assert r["grad_max_rel_diff"] > TOLERANCE

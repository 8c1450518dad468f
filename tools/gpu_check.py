"""The one-command GPU check: equivalence, a short bf16 training run with resume, the benchmark
against plain PyTorch, and Transformer Engine; a JSON report and a markdown summary (docs/gpu.md).

    python tools/gpu_check.py --out gpu_report                     # a node with megatron_lcl's requirements
    python tools/gpu_check.py --out gpu_report --wheels .whl       # offline: missing wheels from a folder
    python tools/gpu_check.py --out /tmp/check --device cpu --small   # the CPU mode (tests/test_gpu_check.py)

Parts (each in its own processes, under a hard time budget; one that fails or runs out of time is
recorded with the tail of its output and the next part runs; report.json and summary.md in --out
are rewritten after every part, gpu_check.log holds every process's output):

  a  equivalence  the tiny model's fp32 forward/backward on the device equals the CPU run on the same
                  weights and batch (loss terms and every gradient within 1e-4 relative; TF32 off)
  b  training     pretrain_lcl.py under torchrun (1 process) trains the tiny config in bf16 on a
                  synthetic corpus (50 steps), the loss falls, it saves; a second launch resumes
  c  benchmark    tools/bench_vs_torch.py: ViT-L/14 + OPT-125M, seq 2048, bf16, the largest micro-batch
                  that fits, megatron_lcl vs the plain-PyTorch twin; MFU against a measured matmul peak
  d  te           where transformer_engine imports: the TE spec builds and runs a bf16 step (and fp8 on
                  GPUs of compute capability >= 8.9); otherwise the report says TE was absent

--wheels DIR installs the wheels of DIR whose distributions are not installed (pip --no-index
--no-deps --target SITE; tools/gpu_wheels.sh prepares DIR) and puts SITE on every process's path. The
repository is used from its working tree (PYTHONPATH), not installed. Exit status 0 when no part failed.
"""

import argparse
import glob
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # on every child's PYTHONPATH

PARTS = ("a", "b", "c", "d")
PART_NAMES = {"a": "equivalence", "b": "training", "c": "benchmark", "d": "te"}
# Seconds per part on the GPU; together with the wheel install they stay under 8 minutes.
BUDGET_S = {"install": 30, "a": 60, "b": 150, "c": 180, "d": 60}
TOLERANCE = 1e-4  # (a): relative, losses and gradients
TAIL_CHARS = 3000
REFERENCE = "a_reference.pt"  # (a): the CPU run's weights, batch, losses and gradients


class PartFailed(Exception):
    """A child process of the part failed; `output` is what it printed."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


class PartTimeout(PartFailed):
    """The part ran past its time budget (its processes were killed)."""


# ------------------------------------------------------------------------------------ processes

class Runner:
    """Runs this check's child processes: the environment they share, the part's deadline, one log."""

    def __init__(self, args, env: dict):
        self.args, self.env, self.deadline = args, env, None
        self.log_path = os.path.join(args.out, "gpu_check.log")

    def run(self, cmd: list, what: str, extra_env: dict = None) -> str:
        """Run `cmd` in its own process group; kill the group at the part's deadline. -> its output."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise PartTimeout(f"no time left for {what}")
        proc = subprocess.Popen(cmd, cwd=REPO, env=dict(self.env, **(extra_env or {})), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=remaining)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
            output, _ = proc.communicate()
            self._log(what, cmd, output, "killed at the time budget")
            raise PartTimeout(f"{what} ran past the part's time budget", output) from None
        self._log(what, cmd, output, f"exit {proc.returncode}")
        if proc.returncode != 0:
            last = next((line for line in reversed(output.splitlines()) if line.strip()), "")
            raise PartFailed(f"{what} exited with status {proc.returncode}: {last.strip()[-300:]}", output)
        return output

    def python(self, argv: list, what: str, **kw) -> str:
        return self.run([sys.executable, *argv], what, **kw)

    def worker(self, name: str, path: str, what: str, **kw) -> dict:
        """Run `gpu_check.py --worker name --file path`; -> the JSON it wrote to `path`."""
        self.python([os.path.abspath(__file__), "--worker", name, "--file", path], what, **kw)
        with open(path) as f:
            return json.load(f)

    def _log(self, what: str, cmd: list, output: str, status: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(f"\n===== {what}: {' '.join(cmd)} ({status})\n{output}")


def child_env(args, site: str) -> dict:
    paths = [p for p in (site, REPO, os.environ.get("PYTHONPATH")) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1" if args.device == "cpu" else "8")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # also on a GPU machine: every part on the CPU
    return env


def install_wheels(wheels: str, site: str) -> dict:
    """pip-install (offline, into `site`) the wheels of `wheels` whose distributions are missing."""
    files = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if not files:
        raise FileNotFoundError(f"--wheels {wheels} holds no .whl files (tools/gpu_wheels.sh prepares it)")
    missing = [w for w in files if not _installed(os.path.basename(w).split("-")[0])]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--root-user-action=ignore", "--target", site, *missing],
                       check=True, timeout=BUDGET_S["install"])
    return {"installed": [os.path.basename(w) for w in missing],
            "already_present": [os.path.basename(w) for w in files if w not in missing], "site": site}


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# ------------------------------------------------------------------------------------ parts

def part_equivalence(runner: Runner) -> dict:
    """(a): reference on the CPU (a process that sees no GPU), then the same weights and batch on the device."""
    work = runner.args.work
    runner.worker("reference", os.path.join(work, "a_reference.json"), "(a) CPU fp32 reference",
                  extra_env={"CUDA_VISIBLE_DEVICES": ""})
    result = runner.worker("compare", os.path.join(work, "a_compare.json"), f"(a) {runner.args.device} fp32 run")
    worst = max(result["loss_rel_diff"].values()) if result["loss_rel_diff"] else float("inf")
    result["passed"] = worst <= TOLERANCE and result["grad_max_rel_diff"] <= TOLERANCE
    return result


def part_training(runner: Runner) -> dict:
    """(b): synthetic corpus + tokenizer + shards, then two torchrun launches: the second resumes."""
    args, work = runner.args, runner.args.work
    steps, first = (12, 8) if args.small else (60, 50)
    runner.worker("corpus", os.path.join(work, "b_corpus.json"), "(b) synthetic corpus, tokenizer, shards")
    run_dir = os.path.join(work, "b_run")
    subprocess.run(["rm", "-rf", run_dir], check=True)
    overrides = [f"run_dir={run_dir}", f"data.path={work}/b_data/shards",
                 f"data.tokenizer={work}/b_data/tokenizer/lcl.model", "precision.params_dtype=bf16",
                 f"train.train_steps={steps}", "optimizer.warmup_steps=2", "logging.console=false",
                 f"logging.log_interval={2 if args.small else 5}", "checkpoint.save_interval=null",
                 "train.drop_path_ramp_steps=0"] + (["data.num_workers=0"] if args.small else [])
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
              "pretrain_lcl.py", "--config", "examples/configs/tiny_cpu.yaml", *overrides]
    runner.run(launch + [f"train.exit_after_steps={first}"], f"(b) torchrun: steps 1-{first}")
    runner.run(launch, f"(b) torchrun again: resume, steps {first + 1}-{steps}")
    return training_result(run_dir, first, steps)


def training_result(run_dir: str, first: int, steps: int) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    launches = [json.loads(line) for line in open(os.path.join(run_dir, "launches.jsonl"))]
    before = [r for r in rows if r["step"] <= first]
    losses = [r["loss"] for r in before]
    saved = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "checkpoints", "step_*")))
    result = {"steps": [r["step"] for r in rows], "loss": [r["loss"] for r in rows],
              "first_loss": losses[0], "last_loss": losses[-1], "checkpoints": saved,
              "launch_start_steps": [launch["start_step"] for launch in launches]}
    result["loss_fell"] = sum(losses[-2:]) < sum(losses[:2])
    result["resumed_from"] = launches[-1]["start_step"] if len(launches) > 1 else None
    result["passed"] = (result["loss_fell"] and result["resumed_from"] == first
                        and rows[-1]["step"] == steps and f"step_{first:08d}" in saved)
    return result


def part_benchmark(runner: Runner) -> dict:
    """(c): tools/bench_vs_torch.py at the GPU defaults (or tiny sizes with --small)."""
    path = os.path.join(runner.args.work, "c_bench.json")
    small = ["--steps", "2", "--warmup", "1", "--seq-length", "128", "--micro-batch", "2"]
    full = ["--steps", "10", "--warmup", "3"]
    runner.python([os.path.join(REPO, "tools", "bench_vs_torch.py"), "--json", path,
                   *(small if runner.args.small else full)], "(c) bench_vs_torch.py")
    with open(path) as f:
        result = json.load(f)
    on_gpu = result["device"] != "cpu"
    result["targets"] = {"mfu_at_least_0.40": result["megatron_lcl"]["mfu"] >= 0.40,
                         "ratio_at_least_1.3": result["ratio_images_per_s"] >= 1.3} if on_gpu else \
        {"no_slower_than_twin": result["ratio_images_per_s"] >= 1.0}
    result["passed"] = True  # figures; the targets above are reported, not enforced
    return result


def part_te(runner: Runner) -> dict:
    """(d): the Transformer Engine spec, where TE imports (never on the CPU)."""
    if runner.args.device == "cpu":
        return {"status": "skipped", "message": "Transformer Engine absent: CPU mode (TE needs CUDA); not run"}
    return runner.worker("te", os.path.join(runner.args.work, "d_te.json"), "(d) Transformer Engine step")


PART_FUNCTIONS = {"a": part_equivalence, "b": part_training, "c": part_benchmark, "d": part_te}


def run_part(runner: Runner, part: str) -> dict:
    start, budget_s = time.monotonic(), runner.args.budget_s[part]
    runner.deadline = start + budget_s
    try:
        result = PART_FUNCTIONS[part](runner)
        status = result.pop("status", None) or ("passed" if result.get("passed") else "failed")
    except PartFailed as e:
        status = "timeout" if isinstance(e, PartTimeout) else "failed"
        result = {"error": str(e), "output_tail": e.output[-TAIL_CHARS:]}
    except Exception as e:  # a part's own bug must not lose the other parts' results
        result, status = {"error": f"{type(e).__name__}: {e}"}, "failed"
    return dict(result, status=status, elapsed_s=round(time.monotonic() - start, 1), budget_s=budget_s)


# ------------------------------------------------------------------------------------ report

def write_report(out: str, report: dict) -> None:
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary_markdown(report))


def summary_markdown(report: dict) -> str:
    lines = [f"# gpu_check: {report['device_name']}", "",
             f"{report['started']}, torch {report.get('torch', '?')}, device `{report['device']}`"
             + (", --small" if report["small"] else ""), "",
             *setup_lines(report["setup"]), "| part | status | result | seconds |", "| --- | --- | --- | --- |"]
    for part, r in report["parts"].items():
        lines.append(f"| {part} {PART_NAMES[part]} | {r['status']} | {part_line(part, r)} | {r['elapsed_s']} |")
    return "\n".join(lines) + "\n"


def setup_lines(setup: dict) -> list:
    if not setup:
        return []
    if "error" in setup:
        return [f"wheels: **not installed**: {setup['error']}", ""]
    return [f"wheels installed into {setup['site']}: {', '.join(setup['installed']) or 'none'}; already "
            f"present: {', '.join(setup['already_present']) or 'none'}", ""]


def part_line(part: str, r: dict) -> str:
    if "error" in r:
        return r["error"].replace("|", "/")
    if part == "a":
        return (f"loss max rel diff {max(r['loss_rel_diff'].values()):.2e}, gradient max rel diff "
                f"{r['grad_max_rel_diff']:.2e} (tolerance {TOLERANCE:g}) on {r['device']}")
    if part == "b":
        return (f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f} by step {r['steps'][-1]}; saved "
                f"{', '.join(r['checkpoints'])}; second launch resumed from step {r['resumed_from']}")
    if part == "c":
        ours, twin = r["megatron_lcl"], r["torch_twin"]
        return (f"micro-batch {r['config']['micro_batch']}: megatron_lcl {ours['images_per_s']:.1f} images/s "
                f"({ours['mfu']:.1%} MFU, {ours['core_attention']}), twin {twin['images_per_s']:.1f} images/s "
                f"({twin['mfu']:.1%} MFU); ratio {r['ratio_images_per_s']:.3f}; peak "
                f"{r['peak_flops_per_s'] / 1e12:.0f} TFLOP/s measured")
    return r.get("message", "")


# ------------------------------------------------------------------------------------ workers

def tiny_model_config():
    from megatron_lcl.config import LM_PRESETS, VISION_PRESETS, LMConfig, ModelConfig, VisionConfig, apply_preset

    return ModelConfig(vision=apply_preset(VisionConfig(preset="tiny"), VISION_PRESETS),
                       lm=apply_preset(LMConfig(preset="tiny", vocab_size=512), LM_PRESETS),
                       transformer_impl="local")


def tiny_batch(samples: int = 2, images_per_sample: int = 3):
    from megatron_lcl.testing import random_batch

    positions = [4 + 40 * j for j in range(images_per_sample)]
    return random_batch([positions] * samples, seq_length=128, num_image_tokens=17, image_size=32,
                        vocab_size=512)


def loss_and_grads(model, batch) -> tuple:
    """fp32 forward + backward of the tiny model -> ({term: value}, {parameter: gradient on the CPU})."""
    from megatron_lcl.config import LossConfig
    from megatron_lcl.losses import LCLLoss
    from megatron_lcl.training.pipeline import forward_loss

    terms = forward_loss(model, batch, LCLLoss(LossConfig()))
    terms.total.backward()
    losses = {k: float(getattr(terms, k).detach()) for k in ("total", "lm_loss", "con_loss")}
    return losses, {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}


def worker_reference(path: str) -> None:
    """(a), on the CPU: weights, batch, loss terms and gradients -> `path` (+ .pt beside it)."""
    import torch

    from megatron_lcl.config import ParallelConfig
    from megatron_lcl.models.factory import build_model
    from megatron_lcl.runtime import initialize_distributed

    initialize_distributed(ParallelConfig(), seed=1234)
    model, batch = build_model(tiny_model_config(), ParallelConfig()), tiny_batch()
    losses, grads = loss_and_grads(model, batch)
    torch.save({"state": model.state_dict(), "batch": batch, "losses": losses, "grads": grads},
               os.path.join(os.path.dirname(path), REFERENCE))
    write_json(path, {"losses": losses})


def worker_compare(path: str) -> None:
    """(a), on this process's device: the reference's weights and batch, compared with its results."""
    import torch

    from megatron_lcl.config import ParallelConfig
    from megatron_lcl.models.factory import build_model
    from megatron_lcl.runtime import device, initialize_distributed

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on Ampere and later
    torch.backends.cudnn.allow_tf32 = False
    initialize_distributed(ParallelConfig(), seed=1234)
    ref = torch.load(os.path.join(os.path.dirname(path), REFERENCE), weights_only=False)
    model = build_model(tiny_model_config(), ParallelConfig())
    model.load_state_dict(ref["state"])
    losses, grads = loss_and_grads(model, ref["batch"].to(device()))
    write_json(path, compare(losses, grads, ref["losses"], ref["grads"], str(device())))


def compare(losses: dict, grads: dict, ref_losses: dict, ref_grads: dict, device_name: str) -> dict:
    """Relative differences: per loss term, and max over parameters of |g - g_ref| / |g_ref| (L2 norms)."""
    assert grads.keys() == ref_grads.keys(), f"different parameters have gradients: {grads.keys() ^ ref_grads.keys()}"
    loss_rel = {k: abs(losses[k] - ref_losses[k]) / max(abs(ref_losses[k]), 1e-12) for k in ref_losses}
    grad_rel = {n: float((grads[n] - g).norm() / g.norm().clamp(min=1e-12)) for n, g in ref_grads.items()}
    worst = max(grad_rel, key=grad_rel.get)
    return {"device": device_name, "losses": losses, "reference_losses": ref_losses, "loss_rel_diff": loss_rel,
            "grad_max_rel_diff": grad_rel[worst], "grad_worst_parameter": worst, "num_gradients": len(grads)}


def worker_corpus(path: str) -> None:
    """(b): a small synthetic MMC4 corpus, its tokenizer and prepared shards (what examples/demo.sh does)."""
    from megatron_lcl.data.prepare import PrepareOptions, prepare
    from megatron_lcl.data.skips import SkipCounter
    from megatron_lcl.data.sources import read_mmc4
    from megatron_lcl.data.synthetic import write_corpus
    from megatron_lcl.data.tokenizer import train_tokenizer

    root = os.path.join(os.path.dirname(path), "b_data")
    corpus = os.path.join(root, "corpus")
    files = write_corpus(corpus, num_docs=80, image_size=40, seed=0, docs_per_shard=40)
    texts = [t for p in files for doc in read_mmc4(p, corpus, SkipCounter()) for t in doc.texts]
    os.makedirs(os.path.join(root, "tokenizer"), exist_ok=True)
    train_tokenizer(texts, os.path.join(root, "tokenizer", "lcl"), vocab_size=300, character_coverage=1.0)
    prepare("mmc4", [corpus], os.path.join(root, "shards"), options=PrepareOptions(shard_size=20), progress=False)
    write_json(path, {"documents": 80})


def worker_te(path: str) -> None:
    """(d): a bf16 (and fp8 where supported) forward + backward with Transformer Engine layers."""
    import torch

    from megatron_lcl.config import ParallelConfig
    from megatron_lcl.models.specs import transformer_engine_available
    from megatron_lcl.runtime import initialize_distributed

    if not transformer_engine_available():
        write_json(path, {"status": "skipped", "message": "Transformer Engine absent: transformer_engine does "
                          "not import here (or no CUDA); the TE path was not run"})
        return
    initialize_distributed(ParallelConfig())
    runs = {"bf16": te_step(fp8=None)}
    if torch.cuda.get_device_capability() >= (8, 9):
        runs["fp8"] = te_step(fp8="hybrid")
    ok = all(r["finite"] for r in runs.values())
    write_json(path, {"runs": runs, "passed": ok, "message": ", ".join(
        f"{k}: loss {r['loss']:.4f}, grad norm {r['grad_norm']:.3g}" for k, r in runs.items())})


def te_step(fp8) -> dict:
    """One forward + backward of the tiny model built from TE specs (16 images: fp8 GEMMs want
    multiples of 16 rows)."""
    import math
    from dataclasses import replace

    import torch

    from megatron_lcl.config import ParallelConfig, PrecisionConfig
    from megatron_lcl.models.factory import build_model
    from megatron_lcl.runtime import to_device

    cfg = replace(tiny_model_config(), transformer_impl="transformer_engine")
    model = build_model(cfg, ParallelConfig(), PrecisionConfig(params_dtype="bf16", fp8=fp8))
    losses, grads = loss_and_grads(model, to_device(tiny_batch(samples=4, images_per_sample=4)))
    grad_norm = float(torch.stack([g.float().norm() for g in grads.values()]).norm())
    return {"loss": losses["total"], "grad_norm": grad_norm,
            "finite": math.isfinite(losses["total"]) and math.isfinite(grad_norm),
            "layer": type(model.lm.decoder.layers[0].self_attention.linear_qkv).__name__}


WORKERS = {"reference": worker_reference, "compare": worker_compare, "corpus": worker_corpus, "te": worker_te}


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


# ------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for report.json, summary.md and gpu_check.log")
    parser.add_argument("--wheels", help="offline node: install the missing distributions' wheels from here")
    parser.add_argument("--site", default="/tmp/megatron_lcl_site", help="where --wheels are installed")
    parser.add_argument("--work", help="scratch folder (corpus, runs); default: a fresh folder under /tmp")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--small", action="store_true", help="tiny sizes (the CPU test mode)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of a,b,c,d")
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                        help=f"change a part's time budget (defaults: {BUDGET_S})")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None and not args.out:
        parser.error("--out is required")
    args.budget_s = dict(BUDGET_S)
    for item in args.budget:
        part, _, seconds = item.partition("=")
        if part not in PARTS or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--budget {item}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        args.budget_s[part] = float(seconds)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        # Here, not at the top: the parent runs where only the standard library may import (an offline
        # node before --wheels); the package's import filters megatron-core's known warnings.
        import megatron_lcl  # noqa: F401

        WORKERS[args.worker](args.file)
        return 0
    import tempfile

    os.makedirs(args.out, exist_ok=True)
    args.work = args.work or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(args.work, exist_ok=True)
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "small": args.small, "parts": {}}
    try:
        setup = install_wheels(args.wheels, args.site) if args.wheels else {}
    except (OSError, subprocess.SubprocessError) as e:  # recorded; the parts then say what is missing
        setup = {"error": f"--wheels {args.wheels}: {type(e).__name__}: {e}", "site": args.site}
    report.update(environment(args), setup=setup)
    write_report(args.out, report)
    runner = Runner(args, child_env(args, setup.get("site")))
    for part in args.parts.split(","):
        print(f"[gpu_check] part {part} ({PART_NAMES[part]}), budget {args.budget_s[part]} s ...", flush=True)
        report["parts"][part] = result = run_part(runner, part)
        print(f"[gpu_check] part {part}: {result['status']} in {result['elapsed_s']} s: {part_line(part, result)}",
              flush=True)
        write_report(args.out, report)
    print(summary_markdown(report))
    return 1 if any(r["status"] in ("failed", "timeout") for r in report["parts"].values()) else 0


def environment(args) -> dict:
    """Resolves `args.device` (cuda when torch sees a GPU) and describes this machine."""
    import torch

    cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda else "cpu")
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: torch sees no GPU here (use --device cpu)")
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    return {"device": args.device, "device_name": name, "torch": torch.__version__, "python": sys.version.split()[0]}


if __name__ == "__main__":
    sys.exit(main())

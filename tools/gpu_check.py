"""The one-command GPU check: equivalence, a short bf16 training run with background saves and a
resume, the benchmark against plain PyTorch, and Transformer Engine; a JSON report and a markdown
summary (docs/gpu.md). At most 5 minutes on one H100/H200, wheel installs included.

    python tools/gpu_check.py --out gpu_report                     # a node with megatron_lcl's requirements
    python tools/gpu_check.py --out gpu_report --wheels .whl       # offline: missing wheels from a folder
    python tools/gpu_check.py --out /tmp/check --device cpu --small   # the CPU mode (tests/test_gpu_check.py)
    python tools/gpu_check.py --out /tmp/dry --dry                 # the GPU run's batches and configs, on the CPU

Parts (each in its own processes; one that fails or is killed is recorded with the tail of its
output and the next part runs; report.json and summary.md in --out are rewritten after every part,
gpu_check.log as the processes print, and every line they print is echoed here as it comes, so a run
cut short still shows the figures it reached):

  a  equivalence  the tiny model's fp32 forward/backward on the device equals the CPU run on the same
                  weights and batch (loss terms and every gradient within 1e-4 relative; TF32 off)
  b  training     pretrain_lcl.py under torchrun (1 process) trains the tiny config in bf16 on a
                  synthetic corpus (50 steps) with background checkpoint saves every 10 steps (their
                  stall reported), the loss falls, it saves; a second launch resumes
  c  benchmark    tools/bench_vs_torch.py: ViT-L/14 + OPT-125M, seq 2048, bf16, the largest micro-batch
                  that fits, megatron_lcl vs the plain-PyTorch twin; MFU against the spec-sheet peak
                  (the fraction of a measured matmul peak on its own line)
  d  te           where transformer_engine imports: the TE spec builds and runs a bf16 step (and fp8 on
                  GPUs of compute capability >= 8.9). Elsewhere (a CPU; the project's lent GPU machine,
                  which cannot carry TE's wheels) its dry form: the same batch and TE configs built and
                  checked, the batch run through the local layers on the CPU

Time: on a GPU each part has a budget (BUDGET_S, 5 minutes in all with the install) at which its
processes are killed and it is reported `timeout`. On the CPU (--device cpu, --dry) a budget is only
compared with: a part over it still passes (`over_budget` in the report); its processes are killed
only at a generous hang guard (CPU_HANG_GUARD_S, `--hang-guard PART=SECONDS`).

--dry runs every part on the CPU at the GPU run's sizes without the heavy work: (a) the CPU reference,
(b) the training config with every override resolved and validated, (c) the benchmark's config, batch
and FLOPs counts, (d) the dry form above. CI runs it (tests/test_gpu_check.py).

--wheels DIR installs the wheels of DIR whose distributions are not installed (pip --no-index
--no-deps --target SITE; tools/gpu_wheels.sh prepares DIR) and puts SITE on every process's path. The
repository is used from its working tree (PYTHONPATH), not installed. This process imports only the
standard library and never touches CUDA (a probe process reads the device), so no CUDA context of
its own holds GPU memory while the parts run. Exit status 0 when no part failed or was killed.
"""

import argparse
import glob
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # on every child's PYTHONPATH

PARTS = ("a", "b", "c", "d")
PART_NAMES = {"a": "equivalence", "b": "training", "c": "benchmark", "d": "te"}
# Seconds per part on a GPU (planned, not yet measured there): with the install, 300 s in all.
BUDGET_S = {"install": 20, "a": 40, "b": 100, "c": 110, "d": 30}
CPU_HANG_GUARD_S = 900  # per part on the CPU: kills a hung part; never a pass criterion
TOLERANCE = 1e-4  # (a): relative, losses and gradients
TAIL_CHARS = 3000
REFERENCE = "a_reference.pt"  # (a): the CPU run's weights, batch, losses and gradients
ECHO_PREFIX = "  | "


class PartFailed(Exception):
    """A child process of the part failed; `output` is what it printed."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


class PartTimeout(PartFailed):
    """The part ran past its time limit (its processes were killed)."""


# ------------------------------------------------------------------------------------ processes

class Runner:
    """Runs this check's child processes: the environment they share, the part's deadline, one log."""

    def __init__(self, args, env: dict):
        self.args, self.env, self.deadline = args, env, None
        self.log_path = os.path.join(args.out, "gpu_check.log")

    def run(self, cmd: list, what: str, extra_env: dict = None) -> str:
        """Run `cmd` in its own process group, its lines echoed and logged as they come; kill the group
        at the part's deadline. -> its output."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise PartTimeout(f"no time left for {what}")
        with open(self.log_path, "a") as log:
            log.write(f"\n===== {what}: {' '.join(cmd)}\n")
            proc = subprocess.Popen(cmd, cwd=REPO, env=dict(self.env, **(extra_env or {})), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            lines = []
            reader = threading.Thread(target=_pump, args=(proc.stdout, log, lines), daemon=True)
            reader.start()
            killed = False
            try:
                proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
                proc.wait()
                killed = True
            reader.join(timeout=10)
            log.write(f"===== {what}: {'killed at the time limit' if killed else f'exit {proc.returncode}'}\n")
        output = "".join(lines)
        if killed:
            raise PartTimeout(f"{what} ran past the part's time limit ({self.limit_word()})", output)
        if proc.returncode != 0:
            raise PartFailed(f"{what} exited with status {proc.returncode}: {failure_line(output)}", output)
        return output

    def limit_word(self) -> str:
        return "its budget" if self.args.enforce_budgets else "the hang guard"

    def python(self, argv: list, what: str, **kw) -> str:
        return self.run([sys.executable, *argv], what, **kw)

    def worker(self, name: str, path: str, what: str, **kw) -> dict:
        """Run `gpu_check.py --worker name --file path`; -> the JSON it wrote to `path`."""
        self.python([os.path.abspath(__file__), "--worker", name, "--file", path], what, **kw)
        with open(path) as f:
            return json.load(f)


EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit)\b.*")
RANK_PREFIX = re.compile(r"^\[(default)?rank\d+\]: ")


def failure_line(output: str) -> str:
    """The line that says why a child failed: a torchrun worker's exception (the agent's own report
    follows it and ends in decoration), else the last exception line, else the last line with a word."""
    lines = [line.strip() for line in output.splitlines()]
    ranks = [RANK_PREFIX.sub("", line) for line in lines if RANK_PREFIX.match(line)]
    for candidates in (ranks, lines):
        reason = next((line for line in reversed(candidates) if EXCEPTION_LINE.match(line)), None)
        if reason:
            return reason[-300:]
    return next((line for line in reversed(lines) if re.search(r"\w", line)), "")[-300:]


def _pump(stream, log, lines: list) -> None:
    """Copy a child's output line by line: to the log (flushed) and to this process's stdout."""
    for line in stream:
        lines.append(line)
        log.write(line)
        log.flush()
        print(ECHO_PREFIX + line, end="", flush=True)


def child_env(args, site: str) -> dict:
    paths = [p for p in (site, REPO, os.environ.get("PYTHONPATH")) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1" if args.device == "cpu" else "8")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # also on a GPU machine: every part on the CPU
    return env


# What the probe process prints: this process does not import torch (nor initialise CUDA).
PROBE = """import importlib.util, json, sys
import torch
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "python": sys.version.split()[0], "cuda": cuda,
                  "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
                  "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
                  "transformer_engine_found": importlib.util.find_spec("transformer_engine") is not None}))
"""


def probe_device(args, env: dict) -> dict:
    """The machine as a child process sees it (with `env`: the CPU mode's hides the GPU)."""
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_check: the probe process (import torch) failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def install_wheels(wheels: str, site: str) -> dict:
    """pip-install (offline, into `site`) the wheels of `wheels` whose distributions are missing."""
    started = time.monotonic()
    files = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if not files:
        raise FileNotFoundError(f"--wheels {wheels} holds no .whl files (tools/gpu_wheels.sh prepares it)")
    missing = [w for w in files if not _installed(os.path.basename(w).split("-")[0])]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--root-user-action=ignore", "--target", site, *missing],
                       check=True, timeout=BUDGET_S["install"] * 3)
    return {"installed": [os.path.basename(w) for w in missing],
            "already_present": [os.path.basename(w) for w in files if w not in missing], "site": site,
            "elapsed_s": round(time.monotonic() - started, 1), "budget_s": BUDGET_S["install"]}


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
    reference = runner.worker("reference", os.path.join(work, "a_reference.json"), "(a) CPU fp32 reference",
                              extra_env={"CUDA_VISIBLE_DEVICES": ""})
    if runner.args.dry:
        return dict(reference, status="dry", message="the CPU reference (model, batch, losses, gradients) built; "
                    "the device run skipped (--dry)")
    result = runner.worker("compare", os.path.join(work, "a_compare.json"), f"(a) {runner.args.device} fp32 run")
    worst = max(result["loss_rel_diff"].values()) if result["loss_rel_diff"] else float("inf")
    result["passed"] = worst <= TOLERANCE and result["grad_max_rel_diff"] <= TOLERANCE
    return result


def training_sizes(small: bool) -> tuple:
    """(b): (train_steps, steps of the first launch, save_interval)."""
    return (12, 8, 4) if small else (60, 50, 10)


def training_overrides(work: str, small: bool) -> list:
    """(b): the `key=value` overrides of both launches (tiny_cpu.yaml, bf16, background saves)."""
    steps, _, interval = training_sizes(small)
    return [f"run_dir={work}/b_run", f"data.path={work}/b_data/shards",
            f"data.tokenizer={work}/b_data/tokenizer/lcl.model", "precision.params_dtype=bf16",
            f"train.train_steps={steps}", "optimizer.warmup_steps=2", "logging.console=false",
            f"logging.log_interval={2 if small else 5}", f"checkpoint.save_interval={interval}",
            "checkpoint.async_save=true", "train.drop_path_ramp_steps=0"] + \
        (["data.num_workers=0"] if small else [])


TRAINING_CONFIG = "examples/configs/tiny_cpu.yaml"


def part_training(runner: Runner) -> dict:
    """(b): synthetic corpus + tokenizer + shards, then two torchrun launches: the second resumes."""
    args, work = runner.args, runner.args.work
    if args.dry:
        return runner.worker("training_config", os.path.join(work, "b_config.json"), "(b) training config")
    steps, first, _ = training_sizes(args.small)
    runner.worker("corpus", os.path.join(work, "b_corpus.json"), "(b) synthetic corpus, tokenizer, shards")
    run_dir = os.path.join(work, "b_run")
    subprocess.run(["rm", "-rf", run_dir], check=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
              "pretrain_lcl.py", "--config", TRAINING_CONFIG, *training_overrides(work, args.small)]
    output = runner.run(launch + [f"train.exit_after_steps={first}"], f"(b) torchrun: steps 1-{first}")
    output += runner.run(launch, f"(b) torchrun again: resume, steps {first + 1}-{steps}")
    return dict(training_result(run_dir, first, steps), saves=save_stalls(output))


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


# The trainer's save lines (training/trainer.py, checkpoint/state.py).
BACKGROUND_SAVE = re.compile(r"saving step (\d+) in the background \(training paused ([\d.]+) s\)")
COMPLETED_SAVE = re.compile(r"written in the background; completing it took ([\d.]+) s")
AT_ONCE_SAVE = re.compile(r"saved checkpoint \S*step_(\d+)\S* \(([\d.]+) s\)")
ASYNC_FALLBACK = re.compile(r"checkpoint\.async_save: .*")


def save_stalls(output: str) -> dict:
    """(b): how long each save held training: background saves (the stall: staging the copies), the
    waits to complete them, saves written at once (the exit's), and why background saves fell back."""
    background = [{"step": int(step), "paused_s": float(s)} for step, s in BACKGROUND_SAVE.findall(output)]
    fallback = ASYNC_FALLBACK.search(output)
    return {"background": background,
            "stall_s_max": max((b["paused_s"] for b in background), default=None),
            "completion_waits_s": [float(s) for s in COMPLETED_SAVE.findall(output)],
            "at_once": [{"step": int(step), "took_s": float(s)} for step, s in AT_ONCE_SAVE.findall(output)],
            "fallback": fallback.group(0) if fallback else None}


def part_benchmark(runner: Runner) -> dict:
    """(c): tools/bench_vs_torch.py at the GPU defaults (tiny sizes with --small; config only with --dry)."""
    args, path = runner.args, os.path.join(runner.args.work, "c_bench.json")
    if args.dry:  # the GPU defaults, named (this process sees no GPU)
        sizes = ["--dry", "--vision", "L/14", "--lm", "opt-125m", "--seq-length", "2048", "--dtype", "bf16",
                 "--micro-batch", "auto"]
    elif args.small:
        sizes = ["--steps", "2", "--warmup", "1", "--seq-length", "128", "--micro-batch", "2"]
    else:
        sizes = ["--steps", "10", "--warmup", "3"]
    runner.python([os.path.join(REPO, "tools", "bench_vs_torch.py"), "--json", path, *sizes], "(c) bench_vs_torch.py")
    with open(path) as f:
        result = json.load(f)
    if args.dry:
        return dict(result, status="dry", message="config, batch and FLOPs counts built; no model (--dry)")
    ours = result["megatron_lcl"]
    result["targets"] = {"no_slower_than_twin": result["ratio_images_per_s"] >= 1.0} if result["device"] == "cpu" \
        else {"mfu_at_least_0.40": ours["mfu"] is not None and ours["mfu"] >= 0.40,
              "ratio_at_least_1.3": result["ratio_images_per_s"] >= 1.3}
    result["passed"] = True  # figures; the targets above are reported, not enforced
    return result


def part_te(runner: Runner) -> dict:
    """(d): the Transformer Engine spec where TE can run; its dry form elsewhere."""
    path = os.path.join(runner.args.work, "d_te.json")
    machine = runner.args.machine
    if runner.args.dry or runner.args.device == "cpu" or not machine["transformer_engine_found"]:
        why = ("--dry" if runner.args.dry else "CPU mode: TE needs CUDA" if runner.args.device == "cpu"
               else "transformer_engine is not installed here")
        result = runner.worker("te_dry", path, "(d) TE batch and configs, dry")
        return dict(result, status="dry", message=f"Transformer Engine absent ({why}): {result['message']}")
    return runner.worker("te", path, "(d) Transformer Engine step")


PART_FUNCTIONS = {"a": part_equivalence, "b": part_training, "c": part_benchmark, "d": part_te}


def run_part(runner: Runner, part: str) -> dict:
    args = runner.args
    start, budget_s = time.monotonic(), args.budget_s[part]
    limit_s = budget_s if args.enforce_budgets else args.hang_guard_s[part]
    runner.deadline = start + limit_s
    try:
        result = PART_FUNCTIONS[part](runner)
        status = result.pop("status", None) or ("passed" if result.get("passed") else "failed")
    except PartFailed as e:
        status = "timeout" if isinstance(e, PartTimeout) else "failed"
        result = {"error": str(e), "output_tail": e.output[-TAIL_CHARS:]}
    except Exception as e:  # a part's own bug must not lose the other parts' results
        result, status = {"error": f"{type(e).__name__}: {e}"}, "failed"
    elapsed_s = time.monotonic() - start
    return dict(result, status=status, elapsed_s=round(elapsed_s, 1), budget_s=budget_s, limit_s=limit_s,
                over_budget=elapsed_s > budget_s)


# ------------------------------------------------------------------------------------ report

def write_report(out: str, report: dict) -> None:
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary_markdown(report))


def summary_markdown(report: dict) -> str:
    mode = ", --dry" if report["dry"] else ", --small" if report["small"] else ""
    lines = [f"# gpu_check: {report['device_name']}", "",
             f"{report['started']}, torch {report.get('torch', '?')}, Python {report.get('python', '?')}, "
             f"device `{report['device']}`{mode}", "",
             *setup_lines(report["setup"]), "| part | status | result | seconds (budget) |",
             "| --- | --- | --- | --- |"]
    for part, r in report["parts"].items():
        lines.append(f"| {part} {PART_NAMES[part]} | {r['status']} | {part_line(part, r)} | {seconds_cell(r)} |")
    return "\n".join(lines) + "\n"


def seconds_cell(r: dict) -> str:
    return f"{r['elapsed_s']} ({r['budget_s']:g}{', over' if r['over_budget'] else ''})"


def setup_lines(setup: dict) -> list:
    if not setup:
        return []
    if "error" in setup:
        return [f"wheels: **not installed**: {setup['error']}", ""]
    return [f"wheels installed into {setup['site']} in {setup['elapsed_s']} s (budget {setup['budget_s']}): "
            f"{', '.join(setup['installed']) or 'none'}; already present: "
            f"{', '.join(setup['already_present']) or 'none'}", ""]


def part_line(part: str, r: dict) -> str:
    if "error" in r:
        return r["error"].replace("|", "/")
    if r["status"] == "dry" and part != "d":
        return r.get("message", "")
    return PART_LINES[part](r).replace("|", "/")


def equivalence_line(r: dict) -> str:
    return (f"loss max rel diff {max(r['loss_rel_diff'].values()):.2e}, gradient max rel diff "
            f"{r['grad_max_rel_diff']:.2e} (tolerance {TOLERANCE:g}) on {r['device']}")


def training_line(r: dict) -> str:
    saves = r["saves"]
    stall = (f"background saves at steps {[b['step'] for b in saves['background']]}, training paused "
             f"<= {saves['stall_s_max']:.2f} s" if saves["background"] else "no background save")
    return (f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f} by step {r['steps'][-1]}; saved "
            f"{', '.join(r['checkpoints'])}; {stall}" + (f" ({saves['fallback']})" if saves["fallback"] else "")
            + f"; second launch resumed from step {r['resumed_from']}")


def benchmark_line(r: dict) -> str:
    ours, twin, peaks = r["megatron_lcl"], r["torch_twin"], r["peaks"]
    spec = (f"MFU over the {peaks['spec_flops_per_s'] / 1e12:.0f} TFLOP/s spec-sheet peak" if peaks["spec_flops_per_s"]
            else "no MFU (no spec-sheet peak for this device)")
    return (f"micro-batch {r['config']['micro_batch']}: megatron_lcl {ours['images_per_s']:.1f} images/s "
            f"({_percent(ours['mfu'])} MFU, {ours['core_attention']}), twin {twin['images_per_s']:.1f} images/s "
            f"({_percent(twin['mfu'])} MFU); ratio {r['ratio_images_per_s']:.3f}; {spec}, causal attention "
            f"at s^2/2. Of the measured matmul peak "
            f"({peaks['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s): megatron_lcl {_percent(ours['of_matmul_peak'])}, "
            f"twin {_percent(twin['of_matmul_peak'])}")


def _percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


PART_LINES = {"a": equivalence_line, "b": training_line, "c": benchmark_line, "d": lambda r: r.get("message", "")}


# ------------------------------------------------------------------------------------ workers

TINY_SEQ_LENGTH = 128
TE_BATCH = dict(samples=4, images_per_sample=4)  # (d): 16 images, 512 LM rows: multiples of 16 for fp8 GEMMs


def tiny_model_config():
    from megatron_lcl.config import LM_PRESETS, VISION_PRESETS, LMConfig, ModelConfig, VisionConfig, apply_preset

    return ModelConfig(vision=apply_preset(VisionConfig(preset="tiny"), VISION_PRESETS),
                       lm=apply_preset(LMConfig(preset="tiny", vocab_size=512), LM_PRESETS),
                       transformer_impl="local")


def tiny_batch(samples: int = 2, images_per_sample: int = 3):
    """`samples` sequences of 128 positions, each with `images_per_sample` images of the tiny ViT (M = 17
    positions) spread over it, text before each (all enter L_con)."""
    from megatron_lcl.testing import random_batch, spread_image_positions

    cfg = tiny_model_config()
    m, seq_length = cfg.vision.num_image_tokens, TINY_SEQ_LENGTH
    positions = spread_image_positions(seq_length, m, images_per_sample)
    return random_batch([positions] * samples, seq_length=seq_length, num_image_tokens=m,
                        image_size=cfg.vision.image_size, vocab_size=cfg.lm.vocab_size)


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
    write_json(path, {"losses": losses, "num_gradients": len(grads), "boi_positions": batch.boi_positions.tolist()})


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


def te_configs(fp8) -> tuple:
    """(d): the tiny model on Transformer Engine layers and its precision (bf16 parameters; fp8 or not)."""
    from dataclasses import replace

    from megatron_lcl.config import PrecisionConfig

    return (replace(tiny_model_config(), transformer_impl="transformer_engine"),
            PrecisionConfig(params_dtype="bf16", fp8=fp8))


def te_step(fp8) -> dict:
    """One forward + backward of the tiny model built from TE specs on the TE batch."""
    from megatron_lcl.config import ParallelConfig
    from megatron_lcl.models.factory import build_model
    from megatron_lcl.runtime import to_device

    cfg, precision = te_configs(fp8)
    model = build_model(cfg, ParallelConfig(), precision)
    losses, grads = loss_and_grads(model, to_device(tiny_batch(**TE_BATCH)))
    return dict(finite_step(losses, grads), layer=type(model.lm.decoder.layers[0].self_attention.linear_qkv).__name__)


def finite_step(losses: dict, grads: dict) -> dict:
    import math

    import torch

    grad_norm = float(torch.stack([g.float().norm() for g in grads.values()]).norm())
    return {"loss": losses["total"], "grad_norm": grad_norm,
            "finite": math.isfinite(losses["total"]) and math.isfinite(grad_norm)}


def worker_te_dry(path: str) -> None:
    """(d) without Transformer Engine: the TE run's configs (bf16 and fp8 hybrid) pass the config
    validation (fp8 widths and rows included), its batch builds, and that batch runs a forward +
    backward through the local layers (fp32, CPU) with finite loss and gradients."""
    from dataclasses import replace

    from megatron_lcl.config import ParallelConfig
    from megatron_lcl.config.validate import fp8_row_errors, model_config_errors
    from megatron_lcl.models.factory import build_model
    from megatron_lcl.runtime import initialize_distributed

    batch = tiny_batch(**TE_BATCH)
    samples = batch.tokens.shape[0]
    errors = []
    for fp8 in (None, "hybrid"):
        cfg, precision = te_configs(fp8)
        errors += model_config_errors(cfg, ParallelConfig(), precision, TINY_SEQ_LENGTH)
        errors += fp8_row_errors(precision, ParallelConfig(), TINY_SEQ_LENGTH, samples)
    initialize_distributed(ParallelConfig(), seed=1234)
    model = build_model(replace(te_configs(None)[0], transformer_impl="local"), ParallelConfig())
    step = finite_step(*loss_and_grads(model, batch))
    passed = not errors and step["finite"]
    write_json(path, {"config_errors": errors, "batch": {"samples": samples, "images": batch.num_images,
                                                         "boi_positions": batch.boi_positions.tolist()},
                      "local_step": step, "passed": passed,
                      "message": f"the TE batch ({samples} x {TINY_SEQ_LENGTH} positions, {batch.num_images} images) "
                                 f"and the bf16 / fp8 configs built and checked"
                                 + ("" if not errors else f" with errors: {'; '.join(errors)}")
                                 + f"; the batch through the local layers: loss {step['loss']:.4f}, grad norm "
                                   f"{step['grad_norm']:.3g}; TE not run (on a cluster with TE: docs/gpu.md)"})


def worker_training_config(path: str) -> None:
    """(b) --dry: both launches' configs resolved from tiny_cpu.yaml + the overrides and validated."""
    from megatron_lcl.config import load_config
    from megatron_lcl.config.validate import config_errors

    steps, first, interval = training_sizes(small=False)
    overrides = training_overrides(os.path.dirname(path), small=False)
    errors = []
    for extra in ([f"train.exit_after_steps={first}"], []):
        cfg = load_config(os.path.join(REPO, TRAINING_CONFIG), overrides + extra)
        errors += config_errors(cfg, world_size=1)
    write_json(path, {"status": "dry" if not errors else "failed", "config_errors": errors,
                      "train_steps": cfg.train.train_steps, "first_launch_steps": first,
                      "save_interval": cfg.checkpoint.save_interval, "async_save": cfg.checkpoint.async_save,
                      "params_dtype": cfg.precision.params_dtype,
                      "message": f"both launches' configs resolved and validated: {steps} steps (first launch "
                                 f"{first}), bf16, background saves every {interval} steps"
                                 + (f"; errors: {'; '.join(errors)}" if errors else "")})


WORKERS = {"reference": worker_reference, "compare": worker_compare, "corpus": worker_corpus, "te": worker_te,
           "te_dry": worker_te_dry, "training_config": worker_training_config}


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
    parser.add_argument("--dry", action="store_true",
                        help="every part on the CPU, the GPU run's batches and configs built and checked, no heavy run")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of a,b,c,d")
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                        help=f"change a part's time budget (defaults: {BUDGET_S})")
    parser.add_argument("--hang-guard", action="append", default=[], metavar="PART=SECONDS",
                        help=f"on the CPU: when a part is killed (default {CPU_HANG_GUARD_S} s each)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None and not args.out:
        parser.error("--out is required")
    if args.dry and args.device == "cuda":
        parser.error("--dry runs on the CPU: leave out --device cuda")
    args.parts = args.parts.split(",")
    if set(args.parts) - set(PARTS):
        parser.error(f"--parts {','.join(args.parts)}: each one of {', '.join(PARTS)}")
    args.budget_s = dict(BUDGET_S, **part_seconds(parser, "--budget", args.budget))
    args.hang_guard_s = dict(dict.fromkeys(PARTS, CPU_HANG_GUARD_S), **part_seconds(parser, "--hang-guard",
                                                                                      args.hang_guard))
    return args


def part_seconds(parser, flag: str, items: list) -> dict:
    """`PART=SECONDS` items -> {part: seconds}."""
    out = {}
    for item in items:
        part, _, seconds = item.partition("=")
        if part not in PARTS or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"{flag} {item}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        out[part] = float(seconds)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        # Here, not at the top: the parent imports only the standard library (an offline node before
        # --wheels; no CUDA context in it); the package's import filters megatron-core's known warnings.
        import megatron_lcl  # noqa: F401

        WORKERS[args.worker](args.file)
        return 0
    import tempfile

    os.makedirs(args.out, exist_ok=True)
    args.work = args.work or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(args.work, exist_ok=True)
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "small": args.small, "dry": args.dry, "parts": {}}
    setup = set_up(args)
    report.update(environment(args, setup.get("site")), setup=setup)
    write_report(args.out, report)
    runner = Runner(args, child_env(args, setup.get("site")))
    for part in args.parts:
        print(f"[gpu_check] part {part} ({PART_NAMES[part]}), budget {args.budget_s[part]:g} s ...", flush=True)
        report["parts"][part] = result = run_part(runner, part)
        print(f"[gpu_check] part {part}: {result['status']} in {result['elapsed_s']} s"
              f"{' (over its budget)' if result['over_budget'] else ''}: {part_line(part, result)}", flush=True)
        write_report(args.out, report)
    print(summary_markdown(report))
    return 1 if any(r["status"] in ("failed", "timeout") for r in report["parts"].values()) else 0


def set_up(args) -> dict:
    """The --wheels install (recorded, also when it fails: the parts then say what is missing)."""
    if not args.wheels:
        return {}
    try:
        setup = install_wheels(args.wheels, args.site)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"--wheels {args.wheels}: {type(e).__name__}: {e}", "site": args.site}
    print(f"[gpu_check] wheels: {len(setup['installed'])} installed in {setup['elapsed_s']} s", flush=True)
    return setup


def environment(args, site: str) -> dict:
    """Resolves `args.device` (cuda when a child process sees a GPU) and describes this machine;
    sets `args.machine` (the probe's answer) and `args.enforce_budgets` (on a GPU, not --dry)."""
    cpu_only = args.dry or args.device == "cpu"
    args.device = "cpu" if cpu_only else args.device
    machine = probe_device(args, child_env(args, site))
    args.device = args.device or ("cuda" if machine["cuda"] else "cpu")
    if args.device == "cuda" and not machine["cuda"]:
        raise SystemExit("--device cuda: torch sees no GPU here (use --device cpu)")
    args.machine, args.enforce_budgets = machine, args.device == "cuda"
    print(f"[gpu_check] {machine['device_name']}, torch {machine['torch']}, Python {machine['python']}; "
          + ("budgets enforced" if args.enforce_budgets else "budgets reported only (CPU), hang guard "
             f"{max(args.hang_guard_s.values()):g} s"), flush=True)
    return {"device": args.device, "device_name": machine["device_name"], "torch": machine["torch"],
            "python": machine["python"], "capability": machine["capability"],
            "transformer_engine_found": machine["transformer_engine_found"]}


if __name__ == "__main__":
    sys.exit(main())

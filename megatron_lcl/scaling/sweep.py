"""Scaling sweeps: a spec (YAML) over arms x model sizes x compute budgets x seeds -> one run per point.

    spec = load_spec("examples/scaling/tiny_ladder.yaml")
    run_sweep(spec)                      # runs what is missing, appends to OUTPUT/results.csv
    write_slurm_array(spec, "sweep.sbatch")

A spec (see examples/scaling/tiny_ladder.yaml):

    name, base_config        the experiment YAML every point starts from
    output_dir               OUTPUT/configs/<point>.yaml, OUTPUT/runs/<point>/, OUTPUT/results.csv
    overrides                `a.b=c` applied to every point; `{output_dir}` is substituted
    models                   [{name, vision: {...}, lm: {...}, heads: {...}}]: model.* keys
    arms                     optional [{name, overrides: [a.b=c, ...]}]: named override sets compared
                             at matched data and compute (e.g. loss.mode=lcl | con | gen)
    seeds                    optional [int]: each point runs once per seed (train.seed)
    order                    `seed` (default: seeds outer, then budgets) or `budget` (budgets outer, then
                             seeds): the order points run and are numbered in; `budget` suits a study run
                             over several sessions (each finished budget has every seed)
    budgets                  [{global_batch_size, train_steps | flops | samples | images}]: a FLOPs
                             budget becomes train_steps through the FLOPs model (IsoFLOP sweeps),
                             `samples` (sequences seen) samples / global_batch_size steps, `images`
                             (images seen, as papers count) images / (images_per_sample x
                             global_batch_size) steps; optional
                             `name`; optional `models: [names]` / `arms: [names]` / `seeds: [ints]`
                             restrict a budget to some sizes / arms / seeds, optional
                             `overrides` apply to its points only, optional `contrastive_batch` (samples
                             whose images share one InfoNCE, over all DP ranks) makes the contrastive
                             batch an axis: = global_batch_size -> loss.contrastive_batch=step, smaller ->
                             micro_batch with data.micro_batch_size = contrastive_batch / DP;
                             `untrained: true` (no steps key) makes each of its points the model at
                             its initialisation (seed), not trained: the untrained-encoder baseline
                             its trained points are measured against (train_steps and FLOPs 0)
    images_per_sample        expected images per sequence, to turn a FLOPs budget into steps
    warmup_fraction          optimizer.warmup_steps = round(fraction x train_steps) (optional)
    final_loss_window        the final loss is the mean over this last fraction of logged steps
    nproc                    processes per point (torchrun --nproc_per_node; 1 runs plain python)
    setup                    [{creates: PATH, run: SHELL}] run once before the points, skipped if PATH exists
    eval_command             shell command run after a point trains ({run_dir}, {config}, {output_dir},
                             {python}, {seed}, {arm}); it writes RUN_DIR/eval.json ({"metrics": {name:
                             number}}, e.g. megatron_lcl.eval.transfer's --output: every metric becomes
                             a results.csv column), RUN_DIR/retrieval.json (megatron_lcl.eval.retrieve's
                             --output) and/or RUN_DIR/probe.json ({"probe_accuracy": top-1} or
                             megatron_lcl.eval.classify's --output). Columns stay empty when there is
                             none; `tools/sweep.py SPEC --eval-only` fills them in later
    slurm                    {partition, account, time, gpus_per_node, cpus_per_task, max_parallel, extra}

Points are named `<model>-<budget>`, with arms and seeds `<arm>-<model>-<budget>-s<seed>`. A point is finished when results.csv has an `ok` (or
`diverged`) row for it; anything else is (re)run. The driver resumes an interrupted point from its
own checkpoint in its run directory, so a sweep can be stopped and restarted at any moment.
"""

import csv
import fcntl
import json
import os
import shlex
import string
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import yaml

from megatron_lcl.checkpoint.run_dir import read_metrics
from megatron_lcl.config import load_config, save_config
from megatron_lcl.models.flops import flops_per_sample, parameter_counts, run_flops_options, training_flops
from megatron_lcl.train import EXIT_STATUS_FILE_ENV

DRIVER = "megatron_lcl.train"  # the module pretrain_lcl.py runs
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for tools/sweep.py
FINISHED = ("ok", "diverged")
ORDERS = ("seed", "budget")
EXIT_STATUS = {0: "ok", 2: "config_error"}  # 1: `diverged` only when the driver's exit-status file says so
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")

CSV_COLUMNS = [  # then one column per evaluation metric (eval.json), in the order first seen
    "point", "arm", "model", "budget", "seed", "status",
    "vit_hidden", "vit_layers", "vit_ffn", "image_size", "patch_size", "image_tokens",
    "lm_hidden", "lm_layers", "lm_ffn", "vocab_size", "seq_length", "global_batch_size", "train_steps", "lr",
    "params_vit", "params_projector", "params_lm", "params_heads", "params_total", "params_non_embedding",
    "flops_per_sample", "train_flops", "samples", "tokens", "text_tokens", "images", "images_per_sample",
    "contrastive_batch", "con_batch",
    "loss", "lm_loss", "con_loss", "con_top1", "loss_last", "probe_accuracy",
    "step_time_s", "model_flops_per_s", "wall_s", "run_dir",
]


@dataclass
class SweepSpec:
    name: str
    base_config: str
    output_dir: str
    models: List[dict]
    budgets: List[dict]
    overrides: List[str] = field(default_factory=list)
    images_per_sample: float = 1.0
    warmup_fraction: Optional[float] = None
    final_loss_window: float = 0.1
    nproc: int = 1
    setup: List[dict] = field(default_factory=list)
    eval_command: Optional[str] = None
    slurm: dict = field(default_factory=dict)
    arms: List[dict] = field(default_factory=list)
    seeds: List[int] = field(default_factory=list)
    order: str = "seed"
    spec_path: Optional[str] = None

    @property
    def results_csv(self) -> str:
        return os.path.join(self.output_dir, "results.csv")


@dataclass
class SweepPoint:
    index: int
    name: str  # <model>-<budget>, or <arm>-<model>-<budget>-s<seed>
    model: str
    budget: str
    overrides: List[str]  # everything but run_dir, applied on top of base_config
    config_path: str  # the resolved config written for this point
    run_dir: str
    arm: str = ""
    seed: Optional[int] = None
    untrained: bool = False  # the model at its initialisation (an `untrained` budget): not trained


def load_spec(path: str) -> SweepSpec:
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a sweep spec is a mapping of keys, got {type(raw).__name__}")
    known = set(SweepSpec.__dataclass_fields__) - {"spec_path"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown sweep keys {unknown}; known: {sorted(known)}")
    missing = [k for k in ("name", "base_config", "output_dir", "models", "budgets") if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing sweep keys {missing}")
    for key in ("models", "budgets", "arms", "setup"):
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ValueError(f"{path}: `{key}` is a list of mappings, got {value!r}")
    spec = SweepSpec(**raw, spec_path=path)
    names = [m.get("name") for m in spec.models]
    if None in names or len(set(names)) != len(names):
        raise ValueError(f"{path}: every entry of `models` needs a unique `name`, got {names}")
    arm_names = [a.get("name") for a in spec.arms]
    if None in arm_names or len(set(arm_names)) != len(arm_names) or \
            any(set(a) - {"name", "overrides"} for a in spec.arms):
        raise ValueError(f"{path}: every entry of `arms` is {{name, overrides: [...]}} with a unique name, "
                         f"got {spec.arms}")
    if len(set(spec.seeds)) != len(spec.seeds) or not all(isinstance(s, int) for s in spec.seeds):
        raise ValueError(f"{path}: `seeds` must be distinct integers, got {spec.seeds}")
    if spec.order not in ORDERS:
        raise ValueError(f"{path}: `order` is one of {', '.join(ORDERS)}, got {spec.order!r}")
    for b in spec.budgets:
        if b.get("untrained") and any(k in b for k in BUDGET_KINDS):
            raise ValueError(f"{path}: budget {b} is untrained: it takes none of {', '.join(BUDGET_KINDS)}")
        if not b.get("untrained") and ("global_batch_size" not in b or sum(k in b for k in BUDGET_KINDS) != 1):
            raise ValueError(f"{path}: budget {b} needs global_batch_size and one of {', '.join(BUDGET_KINDS)}")
        for key, defined in (("models", names), ("arms", arm_names), ("seeds", spec.seeds)):
            unknown = sorted(set(b.get(key, [])) - set(defined))
            if unknown:
                raise ValueError(f"{path}: budget {b} names {key} {unknown} that `{key}` does not define")
    _check_templates(spec, path)
    return spec


# The {placeholders} each templated field may use (filled per point, at run time: a typo there would
# stop the sweep after a point had trained).
TEMPLATE_FIELDS = {"overrides": ("output_dir",), "setup.creates": ("output_dir",),
                   "setup.run": ("output_dir", "python"),
                   "eval_command": ("run_dir", "config", "python", "output_dir", "seed", "arm")}


def _check_templates(spec: SweepSpec, path: str) -> None:
    """Every {placeholder} of the spec's templated strings is one its field fills, every setup step
    has `creates` and `run`."""
    for step in spec.setup:
        if set(step) != {"creates", "run"}:
            raise ValueError(f"{path}: every `setup` step is {{creates: PATH, run: COMMAND}}, got {step}")
    overrides = spec.overrides + [o for group in (spec.arms, spec.budgets) for entry in group
                                  for o in entry.get("overrides", [])]
    templates = [("overrides", o) for o in overrides] + \
        [(f"setup.{key}", step[key]) for step in spec.setup for key in ("creates", "run")] + \
        ([("eval_command", spec.eval_command)] if spec.eval_command else [])
    for field_name, text in templates:
        try:
            names = {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(str(text))
                     if name is not None}  # "" is a positional {}: nothing fills it
        except ValueError as e:  # an unmatched brace
            raise ValueError(f"{path}: {field_name} {text!r}: {e}") from None
        unknown = sorted(names - set(TEMPLATE_FIELDS[field_name]))
        if unknown:
            raise ValueError(f"{path}: {field_name} {text!r} uses {{{', '.join(unknown)}}}; it may use "
                             f"{{{'}, {'.join(TEMPLATE_FIELDS[field_name])}}} (literal braces: {{{{ }}}})")


BUDGET_KINDS = ("train_steps", "flops", "samples", "images")


# ---------------------------------------------------------------------------------- points

def _flatten(prefix: str, tree: dict) -> List[str]:
    """{'vision': {'hidden_size': 32}} under 'model' -> ['model.vision.hidden_size=32']."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _flatten(f"{prefix}.{key}", value)
        else:
            out.append(f"{prefix}.{key}={json.dumps(value)}")
    return out


def _budget_name(budget: dict) -> str:
    if "name" in budget:
        return str(budget["name"])
    if budget.get("untrained"):
        return "untrained"
    suffix = f"-c{budget['contrastive_batch']}" if "contrastive_batch" in budget else ""
    if "flops" in budget:
        return f"{float(budget['flops']):.2g}".replace("+", "") + suffix
    for kind in ("samples", "images"):
        if kind in budget:
            return f"{float(budget[kind]):.2g}".replace("+", "") + kind + suffix
    return f"{budget['global_batch_size']}x{budget['train_steps']}" + suffix


def data_parallel_size(cfg, nproc: int) -> int:
    p = cfg.parallel
    return max(nproc // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size), 1)


def flops_kwargs(cfg, nproc: int) -> dict:
    """The `models.flops` options of a run of `cfg` on `nproc` ranks: every pass it runs, the step-wide
    L_con's feature pass included (`models.flops.run_flops_options`)."""
    micro_batches = cfg.train.global_batch_size // (cfg.data.micro_batch_size * data_parallel_size(cfg, nproc))
    return run_flops_options(cfg, micro_batches)


def _contrastive_overrides(spec: SweepSpec, budget: dict, overrides: List[str]) -> List[str]:
    """A budget's `contrastive_batch` (samples) as config overrides (see the module docstring)."""
    if "contrastive_batch" not in budget:
        return []
    size, gbs = int(budget["contrastive_batch"]), int(budget["global_batch_size"])
    if size == gbs:
        return ["loss.contrastive_batch=step"]
    dp = data_parallel_size(load_config(spec.base_config, overrides), spec.nproc)
    if size > gbs or size % dp or gbs % size:
        raise ValueError(f"{spec.spec_path}: budget {budget}: contrastive_batch ({size}) must equal "
                         f"global_batch_size ({gbs}) or divide it and be a multiple of the DP size ({dp})")
    return ["loss.contrastive_batch=micro_batch", f"data.micro_batch_size={size // dp}"]


def contrastive_batch_samples(cfg, nproc: int) -> int:
    """Samples whose images share one InfoNCE (over all DP ranks) in a run of this config."""
    if cfg.loss.contrastive_batch == "step":
        return cfg.train.global_batch_size
    return cfg.data.micro_batch_size * data_parallel_size(cfg, nproc)


def _steps_for(spec: SweepSpec, budget: dict, overrides: List[str]) -> int:
    """train_steps of a budget; a FLOPs budget is divided by the point's FLOPs per step (of its loss
    mode: matched compute across arms), a samples or images budget by the global batch."""
    if budget.get("untrained"):
        return 1  # a valid config; the point is not trained (`untrained`)
    if "train_steps" in budget:
        return int(budget["train_steps"])
    if "samples" in budget:
        return max(1, round(float(budget["samples"]) / budget["global_batch_size"]))
    if "images" in budget:
        return max(1, round(float(budget["images"]) / (spec.images_per_sample * budget["global_batch_size"])))
    cfg = load_config(spec.base_config, overrides)
    per_step = flops_per_sample(cfg.model, cfg.data.seq_length, spec.images_per_sample,
                                loss_mode=cfg.loss.mode) * budget["global_batch_size"]
    return max(1, round(float(budget["flops"]) / per_step))


def expand_points(spec: SweepSpec) -> List[SweepPoint]:
    """seeds x budgets x models x arms, in spec order: seeds outer (a stopped sweep has whole seeds),
    then budgets (cheap points of every size first), arms inner (every arm of a size and budget runs
    before the next, so finished points always compare arms at matched compute). `order: budget` puts
    budgets outer (a stopped sweep has whole budgets, every seed)."""
    seeds = spec.seeds or [None]
    pairs = [(seed, budget) for seed in seeds for budget in spec.budgets] if spec.order == "seed" else \
        [(seed, budget) for budget in spec.budgets for seed in seeds]
    points = []
    for seed, budget in pairs:
        for model in spec.models:
            for arm in spec.arms or [None]:
                if "models" in budget and model["name"] not in budget["models"] or \
                        arm is not None and "arms" in budget and arm["name"] not in budget["arms"] or \
                        seed is not None and "seeds" in budget and seed not in budget["seeds"]:
                    continue
                points.append(_point(spec, len(points), budget, model, arm, seed))
    return points


def _point(spec: SweepSpec, index: int, budget: dict, model: dict, arm: Optional[dict],
           seed: Optional[int]) -> SweepPoint:
    """One point's overrides, in order: spec, model, budget, arm, contrastive batch, seed, steps."""
    fill = lambda items: [str(o).format(output_dir=spec.output_dir) for o in items]  # noqa: E731
    overrides = fill(spec.overrides) + _flatten("model", {k: v for k, v in model.items() if k != "name"})
    overrides += [f"train.global_batch_size={budget['global_batch_size']}"] if "global_batch_size" in budget else []
    overrides += fill(budget.get("overrides", []))
    overrides += fill(arm["overrides"]) if arm else []
    overrides += _contrastive_overrides(spec, budget, overrides)
    overrides += [f"train.seed={seed}"] if seed is not None else []
    steps = _steps_for(spec, budget, overrides)
    overrides.append(f"train.train_steps={steps}")
    if spec.warmup_fraction is not None:
        overrides.append(f"optimizer.warmup_steps={round(spec.warmup_fraction * steps)}")
    parts = ([arm["name"]] if arm else []) + [model["name"], _budget_name(budget)] + \
        ([f"s{seed}"] if seed is not None else [])
    name = "-".join(parts)
    return SweepPoint(index, name, model["name"], _budget_name(budget), overrides,
                      os.path.join(spec.output_dir, "configs", f"{name}.yaml"),
                      os.path.join(spec.output_dir, "runs", name), arm["name"] if arm else "", seed,
                      bool(budget.get("untrained")))


def write_point_config(point: SweepPoint, spec: SweepSpec):
    """The point's resolved config (presets and overrides applied), as a YAML the driver can run."""
    cfg = load_config(spec.base_config, point.overrides + [f"run_dir={point.run_dir}"])
    os.makedirs(os.path.dirname(point.config_path), exist_ok=True)
    save_config(cfg, point.config_path)
    return cfg


# ---------------------------------------------------------------------------------- running

def run_point(config_path: str, overrides: List[str], run_dir: str, nproc: int = 1) -> int:
    """Train one point with the real driver in a fresh process; returns its exit status.

    A new process per point keeps megatron-core's global state and memory from leaking between
    points. `nproc > 1` launches torchrun on this machine.
    """
    argv = ["--config", config_path, f"run_dir={run_dir}", *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", DRIVER, *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", DRIVER, *argv]
    # A point is its own job: drop torch.distributed variables this process may carry (e.g. a
    # MASTER_PORT its own process group is bound to), so the child picks fresh ones.
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and not k.startswith("TORCHELASTIC_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env[EXIT_STATUS_FILE_ENV] = exit_status_path(run_dir)
    os.makedirs(run_dir, exist_ok=True)  # the driver writes it there even when it stops before making the run
    if os.path.exists(env[EXIT_STATUS_FILE_ENV]):
        os.remove(env[EXIT_STATUS_FILE_ENV])  # a previous attempt's
    return subprocess.run(cmd, env=env, cwd=os.getcwd()).returncode


def exit_status_path(run_dir: str) -> str:
    """Where the driver writes "<code> <reason>" (megatron_lcl.train, $LCL_EXIT_STATUS_FILE)."""
    return os.path.join(run_dir, "exit_status")


def point_status(code: int, run_dir: str) -> str:
    """A row's status from the driver's exit code: 1 is `diverged` only when the driver's exit-status
    file says so; a crash (a Python traceback also exits 1) or a checkpoint error is failed(1 ...) and
    runs again on the next sweep."""
    if code in EXIT_STATUS:
        return EXIT_STATUS[code]
    reason = ""
    if os.path.exists(exit_status_path(run_dir)):
        with open(exit_status_path(run_dir)) as f:
            reason = f.read().split(maxsplit=1)[-1].strip()
    return "diverged" if code == 1 and reason == "diverged" else f"failed({code}{' ' + reason if reason else ''})"


Runner = Callable[[str, List[str], str, int], int]


def run_setup(spec: SweepSpec) -> None:
    """Run each `setup` command whose `creates` path is missing (under a lock: array tasks race)."""
    if not spec.setup:
        return
    os.makedirs(spec.output_dir, exist_ok=True)
    with _locked(os.path.join(spec.output_dir, ".setup.lock")):
        for step in spec.setup:
            creates = step["creates"].format(output_dir=spec.output_dir)
            if os.path.exists(creates):
                continue
            command = step["run"].format(output_dir=spec.output_dir, python=shlex.quote(sys.executable))
            print(f"[sweep] setup: {command}", flush=True)
            subprocess.run(command, shell=True, check=True, cwd=os.getcwd())
            assert os.path.exists(creates), f"setup step did not create {creates}: {command}"


def run_eval(spec: SweepSpec, point: SweepPoint) -> None:
    """The spec's eval_command for a trained point (it writes RUN_DIR/eval.json or probe.json);
    failures are logged and leave the metric columns empty."""
    seed = point.seed if point.seed is not None else load_config(point.config_path).train.seed
    command = spec.eval_command.format(run_dir=shlex.quote(point.run_dir), config=shlex.quote(point.config_path),
                                       python=shlex.quote(sys.executable), output_dir=shlex.quote(spec.output_dir),
                                       seed=seed, arm=shlex.quote(point.arm))
    code = subprocess.run(command, shell=True, cwd=os.getcwd()).returncode
    if code != 0:
        print(f"[sweep] {point.name}: eval_command exited {code}; its metrics are left empty", flush=True)


def run_sweep(spec: SweepSpec, runner: Runner = run_point, only: Optional[List[int]] = None,
              log=print) -> List[dict]:
    """Run every unfinished point (or those in `only`) one after another; returns the rows appended.

    A point another process is running (its lock is held: a second local sweep, an array task) is
    skipped; the next run of the sweep picks it up if that process did not finish it.
    """
    run_setup(spec)
    done = finished_points(spec.results_csv)
    appended = []
    points = expand_points(spec)
    for point in points:
        if only is not None and point.index not in only:
            continue
        if point.name in done:
            log(f"[sweep] {point.name}: finished, skipped")
            continue
        with _point_lock(spec, point) as held:
            if not held:
                log(f"[sweep] {point.name}: running in another process, skipped")
                continue
            if point.name in finished_points(spec.results_csv):  # finished while we were busy
                continue
            log(f"[sweep] {point.name} ({point.index + 1}/{len(points)}): training")
            row = _train_point(spec, point, runner)
        append_row(spec.results_csv, row)
        appended.append(row)
        log(f"[sweep] {point.name}: {row['status']}, loss {row['loss']}, {row['train_flops']} FLOPs")
    return appended


def backfill_eval(spec: SweepSpec, only: Optional[List[int]] = None, log=print) -> List[dict]:
    """Run the eval_command on finished points whose run directory has no evaluation yet (e.g. points
    trained before an evaluation was configured, whose evaluation failed, or whose eval.json was
    removed to evaluate again), and append an updated row for every finished point whose row lacks
    metrics its evaluation has or holds other values."""
    assert spec.eval_command, "the spec has no eval_command"
    latest = {r["point"]: r for r in read_results(spec.results_csv)}
    appended = []
    for point in expand_points(spec):
        row = latest.get(point.name)
        if (only is not None and point.index not in only) or row is None or row["status"] != "ok":
            continue
        if not read_eval_metrics(point.run_dir):
            log(f"[sweep] {point.name}: evaluating")
            run_eval(spec, point)
        metrics = read_eval_metrics(point.run_dir)
        if not metrics or all(_same_value(row.get(k), v) for k, v in metrics.items()):
            continue
        new = collect_result(point, load_config(point.config_path), spec, "ok", float(row["wall_s"] or 0.0))
        append_row(spec.results_csv, new)
        appended.append(new)
    return appended


def write_untrained(config_path: str, run_dir: str, seed: Optional[int]) -> int:
    """An untrained point's model at its initialisation, as a weights-only checkpoint in
    RUN_DIR/checkpoints (what eval_command reads), written in a fresh process; returns its exit status."""
    # os._exit once the checkpoint is written: the interpreter's teardown can abort the process
    # afterwards (gloo's threads; seen here: SIGABRT, "terminate called without an active exception")
    code = (f"import os, sys; from megatron_lcl.eval.encoders import random_init_checkpoint as w; "
            f"w({config_path!r}, {os.path.join(run_dir, 'checkpoints')!r}, seed={seed!r}); "
            f"sys.stdout.flush(); sys.stderr.flush(); os._exit(0)")
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and not k.startswith("TORCHELASTIC_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=os.getcwd()).returncode


def _same_value(cell, value: float) -> bool:
    """A results.csv cell holds `value` (as written: floats round-trip through their repr)."""
    try:
        return cell not in (None, "") and float(cell) == float(value)
    except ValueError:
        return False


def _train_point(spec: SweepSpec, point: SweepPoint, runner: Runner) -> dict:
    cfg = write_point_config(point, spec)
    t0 = time.time()
    if point.untrained:
        code = write_untrained(point.config_path, point.run_dir, point.seed)
    else:
        code = runner(point.config_path, [], point.run_dir, spec.nproc)
    if code == 0 and spec.eval_command:
        run_eval(spec, point)
    return collect_result(point, cfg, spec, point_status(code, point.run_dir), time.time() - t0)


@contextmanager
def _point_lock(spec: SweepSpec, point: SweepPoint):
    """Yields True while this process holds the point's lock, False if another process does."""
    os.makedirs(os.path.join(spec.output_dir, "locks"), exist_ok=True)
    with open(os.path.join(spec.output_dir, "locks", f"{point.name}.lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------- results

def read_eval_metrics(run_dir: str) -> Dict[str, float]:
    """Every metric the point's evaluation wrote: RUN_DIR/eval.json ({"metrics": {name: number}} or a
    flat {name: number}), `probe_accuracy` from RUN_DIR/probe.json and `retrieval_tr1/ir1/tr5/ir5`
    (fractions) from RUN_DIR/retrieval.json (`python -m megatron_lcl.eval.retrieve --output`, e.g. on
    Karpathy COCO). {} when there is none."""
    # Here, not at the top: eval.transfer imports the evaluation stack (encoders, megatron-core), which the
    # sweep driver (it runs each point in a subprocess) otherwise never needs.
    from megatron_lcl.eval.transfer import RECALL_KEYS

    metrics = {}
    probe = read_probe_accuracy(run_dir)
    if probe is not None:
        metrics["probe_accuracy"] = probe
    retrieval = os.path.join(run_dir, "retrieval.json")
    if os.path.exists(retrieval):
        with open(retrieval) as f:
            recall = json.load(f).get("recall_pct", {})
        metrics.update({name: recall[k] / 100.0 for k, name in RECALL_KEYS.items()
                        if isinstance(recall.get(k), (int, float))})
    path = os.path.join(run_dir, "eval.json")
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
        values = result.get("metrics", result)
        metrics.update({k: float(v) for k, v in values.items() if isinstance(v, (int, float))
                        and not isinstance(v, bool)})
    return metrics


def read_probe_accuracy(run_dir: str) -> Optional[float]:
    """Top-1 in [0, 1] from RUN_DIR/probe.json (written by the spec's eval_command), else None.

    Either {"probe_accuracy": 0.41} or the JSON of `python -m megatron_lcl.eval.classify --output`
    ({"accuracy_pct": {"acc-1": 41.0}, ...}).
    """
    path = os.path.join(run_dir, "probe.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    value = result.get("probe_accuracy")
    if value is None and isinstance(result.get("accuracy_pct"), dict):
        pct = result["accuracy_pct"].get("acc-1")
        value = pct / 100.0 if isinstance(pct, (int, float)) else None
    return float(value) if isinstance(value, (int, float)) else None


def final_losses(rows: List[dict], window: float) -> Dict[str, float]:
    """Mean of each loss term over the last `window` fraction of logged steps (at least one row):
    one step's loss is one batch's loss, too noisy to fit."""
    tail = rows[-max(1, round(window * len(rows))):]
    keys = ("loss", "lm_loss", "con_loss", "con_top1") + (("con_batch",) if all("con_batch" in r for r in tail) else ())
    return {k: sum(r[k] for r in tail) / len(tail) for k in keys}


def collect_result(point: SweepPoint, cfg, spec: SweepSpec, status: str, wall_s: float) -> dict:
    """One CSV row: sizes, parameter counts, FLOPs, consumed data and final loss terms of a point."""
    rows = read_metrics(point.run_dir, missing_ok=True)
    m, d, t = cfg.model, cfg.data, cfg.train
    tp = cfg.parallel.tensor_model_parallel_size
    params = parameter_counts(m, tp)
    row = dict.fromkeys(CSV_COLUMNS, "")
    row.update(point=point.name, arm=point.arm, model=point.model, budget=point.budget,
               seed="" if point.seed is None else point.seed, status=status, run_dir=point.run_dir,
               vit_hidden=m.vision.hidden_size, vit_layers=m.vision.num_layers, vit_ffn=m.vision.ffn_hidden_size,
               image_size=m.vision.image_size, patch_size=m.vision.patch_size,
               image_tokens=m.vision.num_image_tokens, lm_hidden=m.lm.hidden_size, lm_layers=m.lm.num_layers,
               lm_ffn=m.lm.ffn_hidden_size, vocab_size=m.lm.vocab_size, seq_length=d.seq_length,
               global_batch_size=t.global_batch_size, train_steps=t.train_steps, lr=cfg.optimizer.lr,
               contrastive_batch=contrastive_batch_samples(cfg, spec.nproc),
               params_vit=params["vit"], params_projector=params["projector"], params_lm=params["lm"],
               params_heads=params["heads"], params_total=params["total"],
               params_non_embedding=params["total"] - params["lm_embedding"], wall_s=round(wall_s, 2))
    if point.untrained:
        row.update(train_steps=0, samples=0, images=0, tokens=0, text_tokens=0, train_flops=0)
        row.update(read_eval_metrics(point.run_dir))
        return row
    if status == "ok" and (not rows or rows[-1]["step"] != t.train_steps):
        row["status"] = status = "incomplete"
    if not rows:
        return row
    last = rows[-1]
    samples, images = last["consumed_samples"], last["consumed_images"]
    options = flops_kwargs(cfg, spec.nproc)
    per_sample = flops_per_sample(m, d.seq_length, images / max(samples, 1), **options)
    step_times = [r["step_time_s"] for r in rows[1:]] or [rows[0]["step_time_s"]]  # row 0 holds warm-up
    step_time_s = sum(step_times) / len(step_times)
    row.update(samples=samples, images=images, tokens=last["consumed_tokens"],
               text_tokens=last["consumed_text_tokens"], images_per_sample=round(images / max(samples, 1), 4),
               flops_per_sample=f"{per_sample:.6g}",
               train_flops=f"{training_flops(m, d.seq_length, samples, images, **options):.6g}",
               loss_last=last["loss"], step_time_s=round(step_time_s, 4),
               model_flops_per_s=f"{per_sample * t.global_batch_size / step_time_s:.6g}")
    row.update({k: round(v, 6) for k, v in final_losses(rows, spec.final_loss_window).items()})
    row.update(read_eval_metrics(point.run_dir))
    return row


@contextmanager
def _locked(path: str):
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_row(csv_path: str, row: dict) -> None:
    """Append one row (header first when the file is new); locked, so slurm array tasks can share it.
    A row with a column the file lacks (a new evaluation metric) rewrites the file with the wider
    header first (atomically: older rows get the column empty)."""
    os.makedirs(os.path.dirname(csv_path) or ".", exist_ok=True)
    with _locked(csv_path + ".lock"):
        header = _csv_header(csv_path)
        wider = list(dict.fromkeys(header + list(CSV_COLUMNS) + list(row)))
        if header and wider != header:
            _rewrite_csv(csv_path, wider)
        with open(csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=wider)
            if not header:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in wider})
            f.flush()
            os.fsync(f.fileno())


def _csv_header(csv_path: str) -> List[str]:
    if not os.path.exists(csv_path) or os.path.getsize(csv_path) == 0:
        return []
    with open(csv_path, newline="") as f:
        return next(csv.reader(f), [])


def _rewrite_csv(csv_path: str, columns: List[str]) -> None:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    tmp = csv_path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: r.get(k) or "" for k in columns} for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, csv_path)


def read_results(csv_path: str) -> List[dict]:
    """The latest row of each point (a retried point appends a new row)."""
    if not os.path.exists(csv_path):
        return []
    with open(csv_path, newline="") as f:
        latest = {row["point"]: row for row in csv.DictReader(f)}
    return list(latest.values())


def finished_points(csv_path: str) -> set:
    return {row["point"] for row in read_results(csv_path) if row["status"] in FINISHED}


# ---------------------------------------------------------------------------------- slurm

def write_slurm_array(spec: SweepSpec, path: str) -> str:
    """An sbatch script with one array task per point; each runs `tools/sweep.py SPEC --index I`,
    which skips the point if it is finished. Returns the script text."""
    s, n = spec.slurm, len(expand_points(spec))
    limit = f"%{s['max_parallel']}" if s.get("max_parallel") else ""
    lines = ["#!/bin/bash", f"#SBATCH --job-name=sweep-{spec.name}", f"#SBATCH --array=0-{n - 1}{limit}",
             "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --output={os.path.abspath(os.path.join(spec.output_dir, 'slurm', '%A_%a.out'))}"]
    for key, flag in (("partition", "partition"), ("account", "account"), ("time", "time"),
                      ("gpus_per_node", "gpus-per-node"), ("cpus_per_task", "cpus-per-task"),
                      ("mem", "mem")):
        if s.get(key) is not None:
            lines.append(f"#SBATCH --{flag}={s[key]}")
    lines += [f"#SBATCH {extra}" for extra in s.get("extra", [])]
    spec_path = os.path.abspath(spec.spec_path) if spec.spec_path else "SPEC.yaml"
    lines += ["", "# Generated by tools/sweep.py --emit-slurm. Resubmitting runs only unfinished points.",
              "set -euo pipefail", f"cd {shlex.quote(os.getcwd())}",
              f"{shlex.quote(sys.executable)} {shlex.quote(os.path.join(REPO_ROOT, 'tools', 'sweep.py'))} "
              f"{shlex.quote(spec_path)} --index \"$SLURM_ARRAY_TASK_ID\"", ""]
    text = "\n".join(lines)
    os.makedirs(os.path.join(spec.output_dir, "slurm"), exist_ok=True)  # sbatch opens --output before the script runs
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return text

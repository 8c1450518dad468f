"""The paper's loss ablation (Table 6a) at small scale, with seeds: pre-train the tiny model on a
synthetic MMC4 corpus with loss.mode = lcl, gen and con (same steps and data per seed), add the
random-init baseline, and evaluate every vision encoder by frozen transfer (attention-probe
classification and retrieval with a new text encoder) on a separate synthetic corpus. Every mode runs
with each of `--seeds` seeds (model init, data order, evaluation split); the table reports mean ± sd.
Writes OUT/ablation.{json,md}.

    python tools/ablation.py --out runs/ablation                 # the measured table in docs/eval.md
    python tools/ablation.py --out /tmp/ablation --small          # CI size: a few steps, ~1-2 min

`--modes` picks the arms: the paper's loss modes `lcl`, `gen`, `con`, and `lcl_sigmoid` / `con_sigmoid`
(the same modes with `loss.contrastive_loss=sigmoid`, SigLIP's init: `megatron_lcl.config.model.SIGMOID_OVERRIDES`).

`--corpus scenes` (default): two-object scenes pre-trained on the `train` split and evaluated on the
`heldout` split, whose counted object is always a (shape, colour) pair pre-training never showed
(`megatron_lcl/data/scenes.py`). `--corpus shapes`: the demo's one-shape pictures.

OUT/ holds data/ (pre-training corpus, tokenizer, shards; evaluation corpus), runs/<mode>/seed<k>/
(each pre-training run dir), random_init/seed<k>/ and eval/<mode>_seed<k>.json. A rerun skips
pre-training runs and evaluations that already finished (delete their folders to redo).
"""

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_lcl import train  # run in this process: the runs share one megatron-core import and process group
from megatron_lcl.checkpoint import read_meta, read_metrics, resolve_checkpoint
from megatron_lcl.config import load_config
from megatron_lcl.config.model import SIGMOID_OVERRIDES
from megatron_lcl.data.prepare import PrepareOptions, prepare
from megatron_lcl.data.skips import SkipCounter
from megatron_lcl.data.sources import read_mmc4
from megatron_lcl.data.synthetic import write_corpus
from megatron_lcl.data.tokenizer import train_tokenizer
from megatron_lcl.eval import transfer
from megatron_lcl.eval.encoders import load_encoder, random_init_checkpoint
from megatron_lcl.runtime import destroy_distributed

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
MODES = ("lcl", "gen", "con")
# arm -> (loss.mode, its overrides): the paper's modes, and L_con as SigLIP's sigmoid loss
ARMS = {**{mode: (mode, ()) for mode in MODES}, "lcl_sigmoid": ("lcl", SIGMOID_OVERRIDES),
        "con_sigmoid": ("con", SIGMOID_OVERRIDES)}
# Paper Table 6a: ViT-B/16 pre-trained on MMC4, frozen transfer, COCO retrieval TR@1.
PAPER_TR1 = {"lcl": 48.5, "gen": 10.3, "con": 46.4}
TASK_NAMES = {"lcl": "Gen. + Con. (LCL)", "gen": "Gen. only", "con": "Con. only", "random": "random init",
              "lcl_sigmoid": "Gen. + Con. (LCL), sigmoid L_con", "con_sigmoid": "Con. only, sigmoid L_con"}


@dataclass
class Sizes:
    docs: int = 600  # pre-training corpus documents (~2.5 images each)
    eval_docs: int = 300  # evaluation corpus (a different seed: no image is shared)
    steps: int = 300
    seq_length: int = 128
    micro_batch_size: int = 4
    global_batch_size: int = 16  # 4 micro-batches: the step's L_con sees all ~40 images
    warmup_steps: int = 25
    probe_epochs: int = 30
    retrieval_epochs: int = 30
    seeds: int = 3


SMALL = Sizes(docs=40, eval_docs=30, steps=3, seq_length=64, micro_batch_size=2, global_batch_size=4,
              warmup_steps=1, probe_epochs=2, retrieval_epochs=2, seeds=1)


def log(msg: str) -> None:
    print(f"[ablation {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ data

def build_data(data_dir: Path, sizes: Sizes, seed: int, corpus: str) -> dict:
    """Synthetic MMC4 corpus -> tokenizer -> prepared shards, plus an evaluation corpus (seed + 1;
    scenes: the held-out split)."""
    paths = {"corpus": data_dir / "corpus", "tokenizer": data_dir / "tokenizer" / "lcl.model",
             "shards": data_dir / "shards", "eval": data_dir / "eval_corpus"}
    if (data_dir / ".done").exists():
        return paths
    jsonl = write_corpus(str(paths["corpus"]), num_docs=sizes.docs, image_size=32, seed=seed, kind=corpus)
    write_corpus(str(paths["eval"]), num_docs=sizes.eval_docs, image_size=32, seed=seed + 1, kind=corpus,
                 split="heldout" if corpus == "scenes" else "train")
    texts = [t for p in jsonl for doc in read_mmc4(p, str(paths["corpus"]), SkipCounter()) for t in doc.texts]
    paths["tokenizer"].parent.mkdir(parents=True, exist_ok=True)
    train_tokenizer(texts, str(paths["tokenizer"])[:-len(".model")], vocab_size=400, character_coverage=1.0)
    prepare("mmc4", [str(paths["corpus"])], str(paths["shards"]), options=PrepareOptions(shard_size=50),
            progress=False)
    (data_dir / ".done").touch()
    return paths


# ------------------------------------------------------------------------------------------ pre-training

def overrides(sizes: Sizes, data: dict, seed: int) -> list:
    return [f"data.path={data['shards']}", f"data.tokenizer={data['tokenizer']}",
            f"data.seq_length={sizes.seq_length}", f"data.micro_batch_size={sizes.micro_batch_size}",
            "data.num_workers=0", f"data.seed={seed}", f"train.seed={seed}",
            f"train.global_batch_size={sizes.global_batch_size}", f"train.train_steps={sizes.steps}",
            f"train.drop_path_ramp_steps={max(1, sizes.steps // 2)}",
            f"optimizer.warmup_steps={sizes.warmup_steps}", "logging.log_interval=1",
            "checkpoint.save_interval=null", "logging.tensorboard=false"]


def finished(run_dir: Path, steps: int) -> bool:
    """The run's latest complete checkpoint is the one at `steps`."""
    found = resolve_checkpoint(str(run_dir / "checkpoints"))
    return found is not None and read_meta(found)["step"] == steps


def pretrain(mode: str, run_dir: Path, sizes: Sizes, data: dict, seed: int, extra=()) -> None:
    """One pre-training run of arm `mode` (`ARMS`)."""
    if finished(run_dir, sizes.steps):
        log(f"{mode} seed {seed}: finished run found in {run_dir}")
        return
    loss_mode, arm = ARMS[mode]
    argv = ["--config", str(TINY_CONFIG), f"run_dir={run_dir}", f"loss.mode={loss_mode}", "logging.console=false",
            *overrides(sizes, data, seed), *arm, *extra]
    log(f"{mode} seed {seed}: pre-training {sizes.steps} steps -> {run_dir}")
    t0 = time.time()

    code = train.main(argv)
    if code != 0 or not finished(run_dir, sizes.steps):
        raise RuntimeError(f"pre-training {mode} failed (exit {code}); see {run_dir}/metrics.jsonl")
    log(f"{mode} seed {seed}: done in {time.time() - t0:.0f} s")


def training_summary(run_dir: Path) -> dict:
    """Last logged losses and the collapse monitor (mean over the last 10 logged steps: noisy)."""
    rows = read_metrics(str(run_dir))
    tail = rows[-10:]

    def mean(key):
        values = [r[key] for r in tail if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    keys = ("loss", "lm_loss", "con_loss", "con_top1", "effective_rank", "effective_rank_frac")
    summary = {"steps": rows[-1]["step"], **{f"{k}_last10": mean(k) for k in keys}}
    mode = config_loss_mode(run_dir)
    not_trained = {"gen": ("con_loss", "con_top1"), "con": ("lm_loss",)}.get(mode, ())
    for k in not_trained:  # logged as 0 when the loss mode does not compute the term
        summary[f"{k}_last10"] = None
    return summary


def config_loss_mode(run_dir: Path) -> str:
    return load_config(str(run_dir / "config.yaml"), []).loss.mode


# ------------------------------------------------------------------------------------------ evaluation

# Attention-probe tasks per corpus (image_info fields). Scenes add two that need more than one
# object's colour: `count` (one or two copies of object A) and `colour_b` (the colour of object B, the
# one A is left of / above: the colour bound to its place in the scene).
PROBE_FIELDS = {"shapes": ("label", "colour"), "scenes": ("label", "colour", "count", "colour_b")}


def evaluate(name: str, checkpoint: Path, eval_corpus: Path, out: Path, sizes: Sizes, seed: int,
             corpus: str = "scenes") -> dict:
    """Frozen transfer of one encoder (megatron_lcl.eval.transfer); a rerun adds only what it lacks."""
    path = out / f"{name}.json"
    result = json.loads(path.read_text()) if path.exists() else {"name": name, "checkpoint": str(checkpoint)}
    have = {k: v for k, v in result.items() if k.startswith("classify_") or k == "retrieval"}
    if all(f"classify_{f}" in have for f in PROBE_FIELDS[corpus]) and "retrieval" in have:
        return result
    t0 = time.time()
    encoder = load_encoder(str(checkpoint))
    details = transfer.evaluate(encoder, str(eval_corpus), PROBE_FIELDS[corpus], sizes.probe_epochs, seed, have,
                                retrieval_epochs=sizes.retrieval_epochs)
    result.update(details)
    result["latent_effective_rank"] = details["retrieval"]["latent_effective_rank"]
    result["eval_time_s"] = round(result.get("eval_time_s", 0.0) + time.time() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"{name}: evaluated in {result['eval_time_s']} s")
    return result


# ------------------------------------------------------------------------------------------ table

def fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _recall(key):
    return lambda r: r["eval"]["retrieval"]["recall_pct"][key]


def _probe(field):
    return lambda r: (r["eval"].get(f"classify_{field}") or {}).get("accuracy_pct", {}).get("acc-1")


def _train(key):
    return lambda r: (r.get("train") or {}).get(key)


# (column, value of one run, digits)
COLUMNS = [
    ("shape acc-1", lambda r: r["eval"]["classify_label"]["accuracy_pct"]["acc-1"], 1),
    ("colour acc-1", lambda r: r["eval"]["classify_colour"]["accuracy_pct"]["acc-1"], 1),
    ("count acc-1", _probe("count"), 1), ("colour B acc-1", _probe("colour_b"), 1),  # scenes only
    ("TR@1", _recall("TR@1"), 1), ("IR@1", _recall("IR@1"), 1), ("TR@5", _recall("TR@5"), 1),
    ("IR@5", _recall("IR@5"), 1),
    ("latent erank (eval)", lambda r: r["eval"]["latent_effective_rank"], 1),
    ("v erank frac (train)", _train("effective_rank_frac_last10"), 2),
    ("lm_loss", _train("lm_loss_last10"), 2), ("con_loss", _train("con_loss_last10"), 2),
    ("con_top1", _train("con_top1_last10"), 2),
]


def mean_sd(values: list, digits: int) -> str:
    """`mean ± sd` over seeds (sample sd; a single value alone), `-` when not measured."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0], digits)
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarise(rows: list) -> dict:
    """{mode: {column: [value per seed]}} in mode order."""
    out = {}
    for r in rows:
        per = out.setdefault(r["mode"], {name: [] for name, _, _ in COLUMNS})
        for name, get, _ in COLUMNS:
            per[name].append(get(r))
    return out


def markdown_table(rows: list) -> str:
    head = "| pre-training loss | " + " | ".join(name for name, _, _ in COLUMNS) + " | paper TR@1 |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for mode, per in summarise(rows).items():
        cells = [mean_sd(per[name], digits) for name, _, digits in COLUMNS]
        lines.append(f"| {TASK_NAMES[mode]} | " + " | ".join(cells) + f" | {fmt(PAPER_TR1.get(mode))} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, rows: list, sizes: Sizes, args) -> str:
    table = markdown_table(rows)
    seeds = sorted({r["seed"] for r in rows})
    header = (f"Loss ablation (paper Table 6a) at small scale: tiny model (examples/configs/tiny_cpu.yaml), "
              f"{sizes.steps} pre-training steps x {sizes.global_batch_size} sequences of {sizes.seq_length} "
              f"tokens (micro-batch {sizes.micro_batch_size}, step-wide contrastive negatives) on {sizes.docs} "
              f"synthetic `{args.corpus}` documents; frozen transfer on a separate {sizes.eval_docs}-document "
              f"corpus{' (held-out attribute combinations)' if args.corpus == 'scenes' else ''}, 80/20 split, "
              f"percent; mean ± sd over seeds {seeds}."
              f"{' Overrides: ' + ' '.join(args.overrides) + '.' if args.overrides else ''}\n\n")
    (out / "ablation.md").write_text(header + table)
    (out / "ablation.json").write_text(json.dumps({"sizes": vars(sizes), "seeds": seeds, "corpus": args.corpus,
                                                   "overrides": args.overrides, "rows": rows},
                                                  indent=1) + "\n")
    return header + table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--small", action="store_true", help="CI size: a few steps and epochs, one seed")
    p.add_argument("--corpus", choices=("scenes", "shapes"), default="scenes")
    p.add_argument("--steps", type=int, help="pre-training steps (default 300; 3 with --small)")
    p.add_argument("--docs", type=int, help="pre-training corpus documents")
    p.add_argument("--seeds", type=int, help="seeds per mode (default 3; 1 with --small)")
    p.add_argument("--micro-batch-size", type=int, help="sequences per micro-batch (default 4)")
    p.add_argument("--global-batch-size", type=int, help="sequences per step (default 16): the step's images "
                   "are the contrastive negatives")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(ARMS),
                   help="arms: loss modes, and the same with the sigmoid L_con (default: lcl gen con)")
    p.add_argument("--no-random-init", action="store_true", help="skip the random-init baseline")
    p.add_argument("--seed", type=int, default=1234, help="first seed (the data's); seeds are seed, seed+1, ...")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="extra pre-training overrides for every run (after the driver's own)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a busy shared machine)")
    return p.parse_args(argv)


def pretrained_rows(args, sizes: Sizes, data: dict, out: Path) -> list:
    rows = []
    for seed in range(args.seed, args.seed + sizes.seeds):
        for mode in args.modes:
            run_dir = out / "runs" / mode / f"seed{seed}"
            pretrain(mode, run_dir, sizes, data, seed, args.overrides)
            rows.append({"mode": mode, "seed": seed, "checkpoint": str(run_dir / "checkpoints"),
                         "train": training_summary(run_dir)})
        if not args.no_random_init:
            random_dir = out / "random_init" / f"seed{seed}"
            if not (random_dir / "meta.json").exists():
                random_init_checkpoint(str(TINY_CONFIG), str(random_dir),
                                       overrides(sizes, data, seed) + list(args.overrides), seed=seed)
            rows.append({"mode": "random", "seed": seed, "checkpoint": str(random_dir), "train": None})
    return rows


def main(argv=None) -> list:
    args = parse_args(argv)
    sizes = SMALL if args.small else Sizes()
    given = {k: getattr(args, k) for k in ("steps", "docs", "micro_batch_size", "global_batch_size", "seeds")}
    sizes = Sizes(**{**vars(sizes), **{k: v for k, v in given.items() if v}})
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    t0 = time.time()
    data = build_data(out / "data", sizes, args.seed, args.corpus)
    log(f"data ready in {out / 'data'}")
    rows = pretrained_rows(args, sizes, data, out)
    for row in rows:
        name = f"{row['mode']}_seed{row['seed']}"
        row["eval"] = evaluate(name, Path(row["checkpoint"]), data["eval"], out / "eval", sizes, row["seed"],
                               args.corpus)
    print(write_report(out, rows, sizes, args))
    log(f"wrote {out / 'ablation.md'} and ablation.json in {time.time() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()

    destroy_distributed()

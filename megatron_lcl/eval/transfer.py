"""Frozen transfer of a pre-trained vision encoder as a flat table of metrics: attention-probe
top-1 for each labelled field and image-text retrieval recall, on one labelled corpus split 80/20.
What sweeps and ablations compare across pre-training runs.

    python -m megatron_lcl.eval.transfer --encoder RUN/checkpoints --data EVAL_CORPUS \
        --probes label colour count colour_b --seed 1 --output RUN/transfer.json

`--output` gets {"metrics": {name: value in [0, 1]}, "details": {...}}: `probe_<field>` (top-1),
`retrieval_tr1`, `retrieval_ir1`, `retrieval_tr5`, `retrieval_ir5`, `probe_mean` (mean over the
probes), and `latent_effective_rank` (collapse check, not a fraction). A sweep turns every metric into
a results.csv column (megatron_lcl.scaling.sweep.read_eval_metrics).

The evaluation corpus should be held out from pre-training: for the scenes corpus, its `heldout`
split (object pairs pre-training never shows; `python -m megatron_lcl.data.synthetic --kind scenes
--split heldout`). `--seed` initialises the heads and, without `--split-seed`, picks the 80/20
split; to compare encoders on the same test items give the test items their own corpus
(`--probe-eval-data`, `--retrieval-eval-data`; examples/scaling/lcl_vs_con_pilot.yaml trains the
heads on one held-out corpus and tests on 1126 images of another) or fix `--split-seed`. Retrieval
counts identical captions as matches (`--same-caption-matches`, on by default here: the synthetic
corpora repeat captions; see retrieve.correct_pairs). `--per-item PATH` writes one CSV row per test
item (`probe_<field>` 1/0, `tr_rank`, `ir_rank`) for paired comparisons
(megatron_lcl.scaling.study). Real benchmarks give
each task its own sets (what classify / retrieve take as --data and --eval-data):

    python -m megatron_lcl.eval.transfer --encoder RUN/checkpoints --probes label \
        --probe-data /data/imagenet_10pct --retrieval-data pairs_train.jsonl \
        --retrieval-eval-data pairs_test.jsonl --output RUN/eval.json

It runs in one process, without a checkpoint of the heads; at benchmark size (Karpathy COCO, ImageNet)
run `megatron_lcl.eval.retrieve` / `classify` under torchrun, whose --output JSONs a sweep also reads
(see examples/scaling/paper_ladder.yaml).
"""

import argparse
import csv
import os
import sys
import time
from typing import Dict, List, Sequence

import torch

from megatron_lcl.eval.classify import ProbeConfig, classification_sets, run_classification
from megatron_lcl.eval.cli import check_paths, run_cli
from megatron_lcl.eval.datasets import LabeledImages
from megatron_lcl.eval.encoders import load_encoder
from megatron_lcl.eval.parallel import eval_batches, one_process
from megatron_lcl.eval.report import write_json
from megatron_lcl.eval.retrieve import RetrievalConfig, retrieval_sets, run_retrieval
from megatron_lcl.losses.contrastive import singular_value_stats
from megatron_lcl.runtime.device import device as compute_device

RECALL_KEYS = {"TR@1": "retrieval_tr1", "IR@1": "retrieval_ir1", "TR@5": "retrieval_tr5", "IR@5": "retrieval_ir5"}


@torch.no_grad()
def latent_spread(encoder, images) -> dict:
    """Collapse check: effective rank of the centred, token-averaged latents of the source `images`'
    readable images (1 = every image looks the same to the encoder; up to the hidden width)."""
    batches = eval_batches(LabeledImages(images, encoder.image_size), 256, one_process(), num_workers=0)
    pooled = torch.cat([encoder(b["inputs"]).mean(dim=1) for b in batches if len(b["index"])])  # [n, h]
    stats = singular_value_stats(pooled - pooled.mean(dim=0))
    return {"latent_effective_rank": stats["effective_rank"],
            "latent_effective_rank_frac": stats["effective_rank"] / encoder.hidden_size}


@torch.no_grad()
def probe_hits(model, source) -> dict:
    """The trained probe's per-item result on `source`: {"image": origins, "correct": 1 | 0 (top-1)}, over
    its readable items in order."""
    model.eval()
    images, correct = [], []
    for batch in eval_batches(LabeledImages(source, model.encoder.image_size), 256, one_process(), num_workers=0):
        if len(batch["labels"]):
            hits = model(batch["inputs"].to(compute_device())).argmax(dim=1).cpu() == batch["labels"]  # [b]
            images += [item_name(source.origin(i)) for i in batch["index"].tolist()]
            correct += hits.int().tolist()
    return {"image": images, "correct": correct}


def item_name(origin: str) -> str:
    """An evaluation item's key in per-item files: its file name (unique within a synthetic corpus)."""
    return os.path.basename(origin)


def probe(encoder, data: str, field: str, epochs: int, seed: int, eval_fraction: float = 0.2,
          eval_data: str = None, split_seed: int = None) -> dict:
    """Frozen attention probe on `data`'s `field` labels (classify's result dict, with `per_item`);
    batches of 64, or the whole training set when it is smaller. `seed` initialises the head,
    `split_seed` (default `seed`) picks the 80/20 split when there is no `eval_data`."""
    train, test = classification_sets(data, eval_data, field, eval_fraction, seed if split_seed is None else split_seed)
    cfg = ProbeConfig(epochs=epochs, seed=seed, batch_size=min(ProbeConfig.batch_size, len(train)), num_workers=0)
    result = run_classification(encoder, train, test, cfg)
    result["per_item"] = probe_hits(result["_model"], test)
    return result


def retrieval(encoder, data: str, epochs: int, seed: int, eval_fraction: float = 0.2,
              eval_data: str = None, split_seed: int = None, same_caption_matches: bool = True) -> dict:
    """Frozen retrieval transfer (a new text encoder) on `data`'s captions (retrieve's result dict, with
    `per_item` ranks, plus the latent spread of the evaluation images); batches of 64, or the whole
    training set when it is smaller. Identical captions match each other (`same_caption_matches`: the
    synthetic corpora repeat captions; see retrieve.correct_pairs)."""
    train, tests = retrieval_sets([data], [eval_data] if eval_data else None, None, eval_fraction,
                                  seed if split_seed is None else split_seed)
    cfg = RetrievalConfig(epochs=epochs, seed=seed, batch_size=min(RetrievalConfig.batch_size, len(train)),
                          num_workers=0, same_caption_matches=same_caption_matches)
    result = run_retrieval(encoder, train, tests, cfg)
    per_item = result["_per_item"]
    result["per_item"] = {"image": [item_name(o) for o in per_item["image"]], "tr_rank": per_item["tr_rank"],
                          "ir_rank": per_item["ir_rank"]}
    result.update(latent_spread(encoder, tests[0]))
    return result


def flat_metrics(details: dict) -> Dict[str, float]:
    """{probe_<field>, probe_mean, retrieval_*, latent_effective_rank} from `evaluate`'s details."""
    metrics = {}
    for key, result in details.items():
        if key.startswith("classify_"):
            metrics["probe_" + key[len("classify_"):]] = result["accuracy_pct"]["acc-1"] / 100.0
    probes = [v for k, v in metrics.items() if k.startswith("probe_")]
    if probes:
        metrics["probe_mean"] = sum(probes) / len(probes)
    if "retrieval" in details:
        recall = details["retrieval"]["recall_pct"]
        metrics.update({name: recall[k] / 100.0 for k, name in RECALL_KEYS.items() if k in recall})
        metrics["latent_effective_rank"] = details["retrieval"]["latent_effective_rank"]
    return metrics


def evaluate(encoder, data: str, probes: Sequence[str], epochs: int, seed: int, details: dict = None,
             retrieval_epochs: int = None, sets: Dict[str, str] = None, split_seed: int = None,
             same_caption_matches: bool = True) -> dict:
    """Probe every field in `probes` and run retrieval, skipping what `details` already holds (a rerun
    adds only what is missing). `sets` may name other data per task (probe_data, probe_eval_data,
    retrieval_data, retrieval_eval_data); else `data` split 80/20 by `split_seed` (default `seed`, which
    always initialises the heads). Returns the details dict ({classify_<field>: ..., retrieval: ...},
    each with its `per_item` results)."""
    details, sets = dict(details or {}), sets or {}
    for field in probes:
        if f"classify_{field}" not in details:
            details[f"classify_{field}"] = _public(probe(encoder, sets.get("probe_data") or data, field, epochs, seed,
                                                         eval_data=sets.get("probe_eval_data"), split_seed=split_seed))
    if "retrieval" not in details:
        details["retrieval"] = _public(retrieval(encoder, sets.get("retrieval_data") or data,
                                                 retrieval_epochs or epochs, seed,
                                                 eval_data=sets.get("retrieval_eval_data"), split_seed=split_seed,
                                                 same_caption_matches=same_caption_matches))
    return details


def per_item_rows(details: dict) -> List[dict]:
    """One row per evaluation item (the union over tasks, by item name): `probe_<field>` (1 | 0: top-1
    correct), `tr_rank` and `ir_rank` (0: a top-1 hit), blank where a task did not see the item."""
    rows: Dict[str, dict] = {}
    for key, result in details.items():
        items = result.get("per_item")
        if not items:
            continue
        columns = {"probe_" + key[len("classify_"):]: items["correct"]} if key.startswith("classify_") else \
            {"tr_rank": items["tr_rank"], "ir_rank": items["ir_rank"]}
        for name, values in columns.items():
            for image, value in zip(items["image"], values):
                rows.setdefault(image, {"item": image})[name] = value
    return [rows[k] for k in sorted(rows)]


def write_per_item(path: str, details: dict) -> int:
    """`per_item_rows` as a CSV (atomically); returns the number of items."""
    rows = per_item_rows(details)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return len(rows)


def _public(result: dict) -> dict:
    """A task's result without the keys for callers in Python (the trained model)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True, help="megatron_lcl checkpoint (folder or run's checkpoints/) "
                   "or HF CLIPVisionModel folder")
    p.add_argument("--data", help="labelled synthetic corpus (held out from pre-training), split 80/20 for "
                   "every task without its own sets below")
    for task in ("probe", "retrieval"):
        p.add_argument(f"--{task}-data", help=f"{task} training set (default --data)")
        p.add_argument(f"--{task}-eval-data", help=f"{task} evaluation set (default: a split of the training set)")
    p.add_argument("--probes", nargs="*", default=["label", "colour"], help="image_info fields to probe")
    p.add_argument("--epochs", type=int, default=30, help="probe and retrieval training epochs")
    p.add_argument("--seed", type=int, default=0, help="head initialisation (and the 80/20 split without "
                   "--split-seed)")
    p.add_argument("--split-seed", type=int, help="the 80/20 split of --data (default --seed); fix it to "
                   "compare encoders on the same test items")
    p.add_argument("--same-caption-matches", action=argparse.BooleanOptionalAction, default=True,
                   help="retrieval: identical captions match each other (ties between images that share a "
                        "caption count as hits)")
    p.add_argument("--output", required=True, help="JSON file: {metrics, details}")
    p.add_argument("--per-item", help="CSV file: one row per test item (probe_<field> 1/0, tr_rank, ir_rank)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    if not args.data and not (args.retrieval_data and (args.probe_data or not args.probes)):
        p.error("give --data, or --retrieval-data and (--probe-data or no --probes)")
    return args


def run_command_line(argv=None) -> dict:
    """The command's work -> its results dict (`main` wraps it for the shell)."""
    args = parse_args(argv)
    for flag in ("data", "probe_data", "probe_eval_data", "retrieval_data", "retrieval_eval_data"):
        if getattr(args, flag):
            check_paths(f"--{flag.replace('_', '-')}", getattr(args, flag))
    torch.set_num_threads(args.threads)
    t0 = time.time()
    encoder = load_encoder(args.encoder)
    sets = {k: getattr(args, k) for k in ("probe_data", "probe_eval_data", "retrieval_data", "retrieval_eval_data")}
    details = evaluate(encoder, args.data, args.probes, args.epochs, args.seed, sets=sets, split_seed=args.split_seed,
                       same_caption_matches=args.same_caption_matches)
    if args.per_item:
        write_per_item(args.per_item, details)
    out = {"encoder": args.encoder, "data": args.data, **{k: v for k, v in sets.items() if v}, "seed": args.seed,
           "split_seed": args.seed if args.split_seed is None else args.split_seed,
           "same_caption_matches": args.same_caption_matches, "epochs": args.epochs,
           "metrics": flat_metrics(details), "details": details, "eval_time_s": round(time.time() - t0, 1)}
    tmp = args.output + ".tmp"
    write_json(tmp, out)
    os.replace(tmp, args.output)
    print(" ".join(f"{k}={v:.4g}" for k, v in out["metrics"].items()), flush=True)
    return out


def main(argv=None) -> int:
    """Exit status: 0, or 2 with one line on stderr for bad input (a missing path, an unreadable
    encoder or corpus), as every evaluation command (`megatron_lcl.eval.cli.run_cli`)."""
    return run_cli(run_command_line, argv)


if __name__ == "__main__":
    sys.exit(main())

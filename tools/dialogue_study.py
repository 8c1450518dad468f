"""Dialogue transfer study (issue 34's must-show): LLaVA-1.5's two stages and the benchmark scoring on the
synthetic dialogue corpus, from a pre-trained megatron_lcl checkpoint against an untrained encoder of the
same architecture, frozen and full, over seeds; one CSV row per (encoder, mode, seed, benchmark metric).

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python tools/dialogue_study.py --out runs/dialogue_study \
        --encoder pretrained=runs/scaling/lcl_vs_con_pilot/runs/lcl-m-p450-lr1e-3-s2/checkpoints \
        --encoder untrained=runs/scaling/lcl_vs_con_pilot/runs/lcl-m-untrained-s1/checkpoints
    .venv/bin/python tools/dialogue_study.py --out runs/dialogue_study --report   # mean ± sd per cell

Restartable: the corpus and the LM are written once; a stage-1 projector or a stage-2 run whose result
file exists is not run again, and an interrupted stage resumes from its `--checkpoint`. The grid runs
seed-major (every arm of seed 0, then seed 1, ...), so a study cut short still compares all arms.

The LM is a small random OPT (2 layers, width 64, 512 positions) with a word-level tokenizer over the
corpus's words, the same starting point for every arm and seed (stage 2 trains it), long enough
for LLaVA's vicuna_v1 template (a 128-position LM with a 180-piece tokenizer, as the scaling pilot's, is
not: a one-question vicuna_v1 conversation is ~220 of its pieces).
"""

import argparse
import csv
import json
import os
import statistics
import sys
from typing import Dict, List

from megatron_lcl.eval import benchmarks
from megatron_lcl.eval.dialogue import task
from megatron_lcl.eval.dialogue.conversations import VICUNA_SYSTEM
from megatron_lcl.eval.dialogue.synthetic import TEXT_ONLY, write_dialogue_corpus

BENCHMARKS = ("vqav2", "gqa", "pope", "mmbench", "mme")
METRICS = {"vqav2": ["accuracy"], "gqa": ["accuracy"], "pope": ["accuracy", "f1"],
           "mmbench": ["single_pass_accuracy", "circular_accuracy"], "mme": ["Perception"]}
FIELDS = ["encoder", "mode", "seed", "benchmark", "metric", "value", "num_questions", "num_answered",
          "stage1_steps", "stage2_steps", "time_s"]


def corpus(out: str, train_images: int, eval_images: int) -> dict:
    """The synthetic dialogue corpus under OUT/corpus (written once) -> its parts' paths."""
    root = os.path.join(out, "corpus")
    paths_file = os.path.join(root, "paths.json")
    if not os.path.exists(paths_file):
        paths = write_dialogue_corpus(root, train_images=train_images, eval_images=eval_images, seed=0)
        with open(paths_file, "w") as f:
            json.dump(paths, f)
    with open(paths_file) as f:
        return json.load(f)


def corpus_words(paths: dict) -> List[str]:
    texts = [VICUNA_SYSTEM, "USER: ASSISTANT: A. B. C. D."] + [f"{q} {a}" for q, a in TEXT_ONLY]
    for stage in ("stage1", "stage2"):
        with open(paths[stage]) as f:
            texts += [t["value"] for e in json.load(f) for t in e["conversations"]]
    for name in BENCHMARKS:
        texts += [q.prompt for q in benchmarks.get(name).read(paths[name], None)]
    return sorted({w for t in texts for w in t.replace("<image>", " ").split()})


def write_lm(path: str, words: List[str], seed: int = 0) -> str:
    """A random OPT + a word-level tokenizer over `words` (written once)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                            bos_token="</s>").save_pretrained(path)
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                    max_position_embeddings=512, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1,
                    eos_token_id=1, dropout=0.0, attention_dropout=0.0)
    OPTForCausalLM(cfg).save_pretrained(path)
    return path


def stage_argv(args, paths: dict, lm: str, encoder: str, stage: int, seed: int, run_dir: str) -> List[str]:
    steps = args.stage1_steps if stage == 1 else args.stage2_steps
    return ["--stage", str(stage), "--encoder", encoder, "--lm", lm, "--data", paths[f"stage{stage}"],
            "--steps", str(steps), "--batch-size", str(args.batch_size), "--num-workers", "0",
            "--seed", str(seed), "--checkpoint", os.path.join(run_dir, f"stage{stage}.pt")]


def stage1(args, paths, lm, name, encoder, seed) -> str:
    """The seed's stage-1 projector for `name` (shared by frozen and full) -> its checkpoint."""
    run_dir = os.path.join(args.out, "runs", f"{name}-s{seed}")
    done = os.path.join(run_dir, "stage1.json")
    if not os.path.exists(done):
        os.makedirs(run_dir, exist_ok=True)
        task.run_command_line(stage_argv(args, paths, lm, encoder, 1, seed, run_dir) + ["--output", done])
    return os.path.join(run_dir, "stage1.pt")


def stage2(args, paths, lm, name, encoder, seed, mode, projector) -> dict:
    run_dir = os.path.join(args.out, "runs", f"{name}-s{seed}", mode)
    result_file = os.path.join(run_dir, "stage2.json")
    if not os.path.exists(result_file):
        os.makedirs(run_dir, exist_ok=True)
        specs = [f"{b}={paths[b]}" for b in BENCHMARKS]
        task.run_command_line(stage_argv(args, paths, lm, encoder, 2, seed, run_dir) + [
            "--mode", mode, "--projector", projector, "--output", result_file, "--benchmark", *specs])
    with open(result_file) as f:
        return json.load(f)


def rows_of(args, name: str, mode: str, seed: int, result: dict) -> List[dict]:
    rows = []
    for bench, metrics in METRICS.items():
        scored = result["scores_by_benchmark"][bench]
        for metric in metrics:
            rows.append(dict(encoder=name, mode=mode, seed=seed, benchmark=bench, metric=metric,
                             value=scored["scores"][metric], num_questions=scored["num_questions"],
                             num_answered=scored["num_answered"], stage1_steps=args.stage1_steps,
                             stage2_steps=args.stage2_steps, time_s=result["time_s"]))
    return rows


def recorded(csv_path: str) -> set:
    if not os.path.exists(csv_path):
        return set()
    with open(csv_path) as f:
        return {(r["encoder"], r["mode"], r["seed"]) for r in csv.DictReader(f)}


def append(csv_path: str, rows: List[dict]) -> None:
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def run_grid(args) -> None:
    paths = corpus(args.out, args.train_images, args.eval_images)
    lm = write_lm(os.path.join(args.out, "lm"), corpus_words(paths))
    encoders = dict(spec.split("=", 1) for spec in args.encoder)  # checked by parse_args
    csv_path = os.path.join(args.out, "results.csv")
    for seed in args.seeds:
        for name, encoder in encoders.items():
            projector = stage1(args, paths, lm, name, encoder, seed)
            for mode in args.modes:
                if (name, mode, str(seed)) in recorded(csv_path):
                    continue
                result = stage2(args, paths, lm, name, encoder, seed, mode, projector)
                append(csv_path, rows_of(args, name, mode, seed, result))
                print(f"[dialogue_study] {name} {mode} seed {seed}: recorded", flush=True)


def report(csv_path: str) -> str:
    """A markdown table: per (benchmark metric) row, mean ± sd over seeds of each (encoder, mode) arm."""
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    arms = sorted({(r["encoder"], r["mode"]) for r in rows}, key=lambda a: (a[1], a[0]))
    cells: Dict[tuple, List[float]] = {}
    for r in rows:
        cells.setdefault((r["benchmark"], r["metric"], r["encoder"], r["mode"]), []).append(float(r["value"]))
    lines = ["| benchmark metric | " + " | ".join(f"{e} {m}" for e, m in arms) + " |",
             "|---|" + "---|" * len(arms)]
    for bench, metrics in METRICS.items():
        for metric in metrics:
            out = []
            for e, m in arms:
                v = cells.get((bench, metric, e, m), [])
                sd = statistics.stdev(v) if len(v) > 1 else float("nan")
                out.append(f"{statistics.mean(v):.1f} ± {sd:.1f} (n={len(v)})" if v else "-")
            lines.append(f"| {bench} {metric} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="study folder: corpus/, lm/, runs/, results.csv")
    p.add_argument("--encoder", nargs="*", default=[], help="NAME=CHECKPOINT (megatron_lcl or HF CLIP folder)")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--modes", nargs="*", default=["frozen", "full"])
    p.add_argument("--train-images", type=int, default=600)
    p.add_argument("--eval-images", type=int, default=60)
    p.add_argument("--stage1-steps", type=int, default=60)
    p.add_argument("--stage2-steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--report", action="store_true", help="print the results table and exit")
    args = p.parse_args(argv)
    names = []
    for spec in args.encoder:  # before the corpus and the LM are built
        name, _, path = spec.partition("=")
        if not name or not path:
            p.error(f"--encoder {spec!r}: give NAME=CHECKPOINT")
        if not os.path.exists(path):
            p.error(f"--encoder {spec!r}: {path}: no such file or directory")
        names.append(name)
    if len(set(names)) != len(names):
        p.error(f"--encoder: each NAME once, got {names}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        print(report(os.path.join(args.out, "results.csv")))
        return 0
    if not args.encoder:
        print("error: --encoder NAME=CHECKPOINT (at least one)", file=sys.stderr)
        return 2
    run_grid(args)
    print(report(os.path.join(args.out, "results.csv")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

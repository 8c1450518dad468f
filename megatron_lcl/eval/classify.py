"""Classification transfer (paper Appendix A.2): a randomly initialised attention pooling + LayerNorm +
Linear on the vision encoder's latents. `frozen`: only that head trains (the encoder's weights are
checked bitwise unchanged); `full`: the encoder trains too (at `--encoder-lr`).

    python -m megatron_lcl.eval.classify --encoder runs/tiny/checkpoints --data data/synth_eval
    python -m megatron_lcl.eval.classify --encoder hf_out/vision --data imagenet/ --mode full \
        --output results/cls.json
    # --data: a synthetic corpus (shape classes; --label-field colour|background), an ImageFolder
    # (with train/ and val/ sub-folders, or split by --eval-fraction), or webdataset shards with a
    # class (.cls or json[--label-field]); --eval-data gives a separate evaluation set.

Python (e.g. for sweeps): `linear_probe_accuracy(checkpoint, data) -> top-1 in [0, 1]`.
"""

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_lcl.eval.cli import (bad_samples_lines, check_paths, is_main_rank, parse_with_preset, run_cli,
                                   start_run)
from megatron_lcl.eval.common import (MODES, LatentSource, add_config_args, config_from_args, fit_heads,
                                      format_table, frozen_guard, seed_everything, write_json)
from megatron_lcl.eval.datasets import ImageSet, is_image_folder, is_synthetic_corpus, load_labeled, split
from megatron_lcl.eval.encoders import VisionEncoder, load_encoder
from megatron_lcl.eval.engine import (EngineConfig, Runtime, TransferModel, eval_batches, fit, init_runtime,
                                      merge_bad_logs)
from megatron_lcl.eval.streaming import (BadSampleLog, ImageSetSource, LabeledImages, SubsetSource,
                                         labeled_source)
from megatron_lcl.models.heads import AttentionPooling
from megatron_lcl.runtime.mcore_compat import filter_known_warnings

# Paper Table 8 (classification): IN-1K train, 90 epochs (~14k steps) of 8192, AdamW lr 1e-4 (one
# rate: used for the encoder too in full mode), wd 1e-4, betas (0.9, 0.95), 1500 warm-up steps, cosine.
# _run_steps: that run's length (1,281,167 // 8192 x 90), the scale of its warm-up on other data.
PRESETS = {"paper": dict(epochs=90, steps=0, batch_size=8192, lr=1e-4, encoder_lr=1e-4, weight_decay=1e-4,
                         adam_beta2=0.95, warmup_steps=1500, engine="stream", _run_steps=156 * 90)}


@dataclass
class ProbeConfig(EngineConfig):
    mode: str = "frozen"  # frozen | full
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3  # new (head) parameters
    encoder_lr: float = 1e-5  # pre-trained parameters, full mode only
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    pool_heads: Optional[int] = None  # None: hidden / 64, at least 1 (CLIP's head width)
    seed: int = 0


class ProbeHead(torch.nn.Module):
    """latents `[n, M, h]` -> attention pooling `[n, h]` -> LayerNorm -> Linear -> logits `[n, C]`."""

    def __init__(self, hidden_size: int, num_classes: int, num_heads: int):
        super().__init__()
        self.pool = AttentionPooling(hidden_size, num_heads)
        self.norm = torch.nn.LayerNorm(hidden_size)
        self.linear = torch.nn.Linear(hidden_size, num_classes)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(self.pool(latents)))


def default_pool_heads(hidden_size: int) -> int:
    heads = max(1, hidden_size // 64)
    while hidden_size % heads:
        heads -= 1
    return heads


def topk_accuracy_pct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percent of rows whose label is among the k highest logits (k capped at the class count)."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * hits.float().mean().item()


def train_probe(encoder: VisionEncoder, train_set: ImageSet, num_classes: int, cfg: ProbeConfig) -> ProbeHead:
    """A new ProbeHead fitted with cross-entropy on `train_set`'s labels (`fit_heads`, every batch kept,
    the last one possibly short); in full mode the encoder trains too. Returns the head in eval mode."""
    seed_everything(cfg.seed)
    head = ProbeHead(encoder.hidden_size, num_classes, cfg.pool_heads or default_pool_heads(encoder.hidden_size))
    latents = LatentSource(encoder, train_set, cfg.mode)
    labels = torch.tensor(train_set.labels)  # [n]

    def loss_fn(idx):
        return F.cross_entropy(head(latents(idx, train=True)), labels[idx])  # logits [b, C]

    return fit_heads(head, encoder, cfg, len(train_set), loss_fn, drop_last=False)


@torch.no_grad()
def evaluate_probe(encoder: VisionEncoder, head: ProbeHead, eval_set: ImageSet, mode: str,
                   batch_size: int = 256) -> dict:
    latents = LatentSource(encoder, eval_set, mode)
    logits = torch.cat([head(latents(list(range(i, min(i + batch_size, len(eval_set)))), train=False))
                        for i in range(0, len(eval_set), batch_size)])
    labels = torch.tensor(eval_set.labels)
    return {"acc-1": topk_accuracy_pct(logits, labels, 1), "acc-5": topk_accuracy_pct(logits, labels, 5)}


def run_classification(encoder: VisionEncoder, train_set: ImageSet, eval_set: ImageSet, cfg: ProbeConfig) -> dict:
    """Train the probe (and, in full mode, the encoder) on `train_set`; evaluate on `eval_set`.
    Frozen mode raises RuntimeError if the encoder's weights changed (`frozen_guard`)."""
    num_classes = max(max(train_set.labels), max(eval_set.labels)) + 1
    with frozen_guard(encoder, cfg.mode) as guard:
        t0 = time.time()
        head = train_probe(encoder, train_set, num_classes, cfg)
        accuracy = evaluate_probe(encoder, head, eval_set, cfg.mode)
    return {"task": "classification", "encoder": encoder.source, "encoder_kind": encoder.kind,
            "accuracy_pct": accuracy, "num_classes": num_classes, "num_train": len(train_set),
            "num_eval": len(eval_set), "encoder_unchanged": guard.unchanged, "time_s": round(time.time() - t0, 1),
            "config": asdict(cfg)}


# ------------------------------------------------------------------------------------------ streaming, DDP

def classification_step(model, batch: dict, runtime: Runtime) -> torch.Tensor:
    """Cross-entropy: local sum x world / global count (DDP's average is then the global mean)."""
    pixels, labels = batch["pixels"].to(runtime.device), batch["labels"].to(runtime.device)
    logits = model(pixels).float()  # [b, C]
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    (count,) = runtime.all_sum([len(labels)])
    return loss_sum * runtime.world / max(count, 1.0)


@torch.no_grad()
def evaluate_streaming(model: TransferModel, dataset, runtime: Runtime, batch_size: int, num_workers: int,
                       bad: BadSampleLog) -> dict:
    """acc-1 / acc-5 (percent) over every readable item of `dataset`, counted over all ranks."""
    model.eval()
    hits, count = [0.0, 0.0], 0
    for batch in eval_batches(dataset, batch_size, runtime, num_workers):
        bad.extend(batch["bad"])
        if not len(batch["labels"]):
            continue
        with runtime.autocast():
            logits = model(batch["pixels"].to(runtime.device)).float().cpu()  # [b, C]
        for j, k in enumerate((1, 5)):
            hits[j] += topk_accuracy_pct(logits, batch["labels"], k) * len(batch["labels"]) / 100
        count += len(batch["labels"])
    top1, top5, total = runtime.all_sum(hits + [count])
    return {"acc-1": 100.0 * top1 / max(total, 1.0), "acc-5": 100.0 * top5 / max(total, 1.0)}


def run_classification_streaming(encoder: VisionEncoder, train_source, eval_source, cfg: ProbeConfig,
                                 runtime: Runtime, checkpoint: Optional[str] = None) -> dict:
    """The probe on streamed data, data-parallel over `runtime`'s ranks (engine.fit); resumable from
    `checkpoint`. Bad images are skipped, counted and named in the result's `bad_samples`."""
    num_classes = max(len(train_source.class_names), int(train_source.labels.max()) + 1)
    torch.manual_seed(cfg.seed)  # the head's initialisation: equal on every rank
    head = ProbeHead(encoder.hidden_size, num_classes, cfg.pool_heads or default_pool_heads(encoder.hidden_size))
    model = TransferModel(encoder, head, cfg.mode)
    train_bad, eval_bad = BadSampleLog(), BadSampleLog()
    with frozen_guard(encoder, cfg.mode) as guard:
        t0 = time.time()
        fit(model, LabeledImages(train_source, encoder.image_size),
            lambda m, b: classification_step(m, b, runtime), cfg, runtime, train_bad, checkpoint, "probe")
        accuracy = evaluate_streaming(model, LabeledImages(eval_source, encoder.image_size), runtime,
                                      min(cfg.batch_size, 1024), cfg.num_workers, eval_bad)
    return {"task": "classification", "encoder": encoder.source, "encoder_kind": encoder.kind,
            "accuracy_pct": accuracy, "num_classes": num_classes, "num_train": len(train_source),
            "num_eval": len(eval_source), "encoder_unchanged": guard.unchanged, "time_s": round(time.time() - t0, 1),
            "world_size": runtime.world, "bad_samples": bad_samples_report(train_source, eval_source,
                                                                           train_bad, eval_bad, runtime),
            "config": asdict(cfg), "_model": model}


def bad_samples_report(train_source, eval_source, train_bad: BadSampleLog, eval_bad: BadSampleLog,
                       runtime: Runtime) -> dict:
    """Index-time problems and read/decode failures (summed over ranks; names from every rank)."""
    return {"train_index": train_source.problems.as_dict(), "eval_index": eval_source.problems.as_dict(),
            "train_read": merge_bad_logs(train_bad, runtime), "eval_read": merge_bad_logs(eval_bad, runtime)}


def stream_splits(data: str, eval_data: Optional[str], label_field: str, eval_fraction: float, seed: int):
    """(train, eval) sources for the streaming engine, chosen as `load_splits` chooses."""
    def source(path, field=label_field):
        return ImageSetSource(load_labeled(path, field)) if is_synthetic_corpus(path) else labeled_source(path, field)

    if eval_data:
        return source(data), source(eval_data)
    if is_image_folder(os.path.join(data, "train")) and is_image_folder(os.path.join(data, "val")):
        return source(os.path.join(data, "train")), source(os.path.join(data, "val"))
    full = source(data)
    train_idx, eval_idx = split(len(full), eval_fraction, seed)
    return SubsetSource(full, train_idx), SubsetSource(full, eval_idx)


def load_splits(data: str, eval_data: Optional[str], label_field: str, eval_fraction: float, seed: int):
    """(train, eval) ImageSets: --eval-data if given; an ImageFolder's train/ and val/; else a seeded split."""
    if eval_data:
        return load_labeled(data, label_field), load_labeled(eval_data, label_field)
    if is_image_folder(os.path.join(data, "train")) and is_image_folder(os.path.join(data, "val")):
        return load_labeled(os.path.join(data, "train")), load_labeled(os.path.join(data, "val"))
    full = load_labeled(data, label_field)
    train_idx, eval_idx = split(len(full), eval_fraction, seed)
    return full.subset(train_idx), full.subset(eval_idx)


def linear_probe_accuracy(checkpoint: str, data: str, label_field: str = "label", mode: str = "frozen",
                          eval_data: Optional[str] = None, eval_fraction: float = 0.2, **probe) -> float:
    """Top-1 accuracy in [0, 1] of the attention probe (frozen by default) on `checkpoint`'s encoder
    (a megatron_lcl checkpoint or a HF CLIPVisionModel folder); `probe` overrides ProbeConfig fields."""
    cfg = ProbeConfig(mode=mode, **probe)
    train_set, eval_set = load_splits(data, eval_data, label_field, eval_fraction, cfg.seed)
    result = run_classification(load_encoder(checkpoint), train_set, eval_set, cfg)
    return result["accuracy_pct"]["acc-1"] / 100.0


def results_table(results: list) -> str:
    rows = [[r.get("name", r["encoder"]), r["mode"], r["data"], r["accuracy_pct"]["acc-1"],
             r["accuracy_pct"]["acc-5"]] for r in results]
    return format_table(["Vision encoder", "transfer", "data"], [("classification", ["acc-1", "acc-5"])], rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True, help="megatron_lcl checkpoint or HF CLIPVisionModel folder")
    p.add_argument("--data", required=True, help="synthetic corpus, ImageFolder or webdataset shards")
    p.add_argument("--eval-data", help="separate evaluation set (default: train/val folders or a split)")
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--label-field", default="label")
    p.add_argument("--mode", choices=MODES, default="frozen")
    add_config_args(p, ProbeConfig)  # --epochs --batch-size --lr --encoder-lr --weight-decay ... --seed
    p.add_argument("--engine", choices=("auto", "memory", "stream"), default="auto",
                   help="memory: small in-memory sets, latents cached; stream: lazy data, DDP under torchrun, "
                        "checkpoints (auto: stream unless --data is a synthetic corpus in one process)")
    p.add_argument("--checkpoint", help="stream engine: save/resume the probe here (e.g. OUT/probe.pt)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast on GPU (CPU: fp32)")
    p.add_argument("--name", help="row name in the printed table (default: the encoder path)")
    p.add_argument("--output", help="write the results JSON here")
    return parse_with_preset(p, argv, PRESETS)


def use_stream_engine(args) -> bool:
    if args.engine != "auto":
        return args.engine == "stream"
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or not is_synthetic_corpus(args.data)


def run_from_args(args, cfg: ProbeConfig) -> dict:
    for flag in ("encoder", "data", "eval_data"):
        check_paths("--" + flag.replace("_", "-"), getattr(args, flag))
    if not use_stream_engine(args):
        train_set, eval_set = load_splits(args.data, args.eval_data, args.label_field, args.eval_fraction, args.seed)
        started = start_run(args, cfg)
        return dict(run_classification(load_encoder(args.encoder), train_set, eval_set, cfg), **started)
    train_source, eval_source = stream_splits(args.data, args.eval_data, args.label_field, args.eval_fraction,
                                              args.seed)
    separate = args.eval_data is not None  # a split of --data (or its train/ and val/) is checked by nothing
    started = start_run(args, cfg, len(train_source), train_source if separate else None,
                        {args.eval_data: eval_source} if separate else None)
    runtime = init_runtime(args.precision)
    result = run_classification_streaming(load_encoder(args.encoder), train_source, eval_source, cfg, runtime,
                                          args.checkpoint)
    return dict(result, **started)


def main(argv=None) -> dict:
    filter_known_warnings()  # the CLI's process imports megatron.core after this
    args = parse_args(argv)
    cfg = config_from_args(ProbeConfig, args)
    result = run_from_args(args, cfg)
    result.pop("_model", None)  # the trained TransferModel (stream engine; for callers in Python)
    if not is_main_rank():
        return result
    result.update(name=args.name or args.encoder, mode=args.mode, data=args.data, label_field=args.label_field)
    print(results_table([result]))
    print(f"{result['num_train']} train / {result['num_eval']} eval images, {result['num_classes']} classes, "
          f"{result['time_s']} s; encoder weights unchanged: {result['encoder_unchanged']}")
    if "bad_samples" in result:
        print("\n".join(bad_samples_lines(result["bad_samples"])))
    write_json(args.output, result)
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Classification transfer (paper Appendix A.2): a randomly initialised attention pooling + LayerNorm +
Linear on the vision encoder's latents. `frozen`: only that head trains (the encoder's weights are
checked bitwise unchanged); `full`: the encoder trains too (at `--encoder-lr`).

    python -m megatron_lcl.eval.classify --encoder runs/tiny/checkpoints --data data/synth_eval
    python -m megatron_lcl.eval.classify --encoder hf_out/vision --data imagenet/ --mode full \
        --output results/cls.json
    # --data: a synthetic corpus (shape classes; --label-field colour|background), an ImageFolder
    # (with train/ and val/ sub-folders, or split by --eval-fraction), or webdataset shards with a
    # class (.cls or json[--label-field]); --eval-data gives a separate evaluation set.

Data-parallel under torchrun, resumable with --checkpoint; unreadable images are skipped, counted and
named. Python (e.g. for sweeps): `linear_probe_accuracy(checkpoint, data) -> top-1 in [0, 1]`.
"""

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_lcl.eval.bad_samples import BadSampleLog
from megatron_lcl.eval.cli import (Command, TaskData, add_config_args, common_args, entry_points,
                                   parse_with_preset)
from megatron_lcl.eval.datasets import LabeledImages
from megatron_lcl.eval.encoders import VisionEncoder, frozen_guard, load_encoder
from megatron_lcl.eval.engine import EngineConfig, TransferModel, autocast, fit
from megatron_lcl.eval.parallel import all_sum, eval_batches, merge_bad_logs, one_process
from megatron_lcl.eval.sources import SubsetSource, is_image_folder, labeled_source, split
from megatron_lcl.models.heads import AttentionPooling
from megatron_lcl.runtime.device import device as compute_device
from megatron_lcl.runtime.layout import ParallelLayout

# Paper Table 8 (classification): IN-1K train, 90 epochs (~14k steps) of 8192, AdamW lr 1e-4 (one
# rate: used for the encoder too in full mode), wd 1e-4, betas (0.9, 0.95), 1500 warm-up steps, cosine.
# _run_steps: that run's length (1,281,167 // 8192 x 90), the scale of its warm-up on other data.
PRESETS = {"paper": dict(epochs=90, steps=0, batch_size=8192, lr=1e-4, encoder_lr=1e-4, weight_decay=1e-4,
                         adam_beta2=0.95, warmup_steps=1500, _run_steps=156 * 90)}


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


def classification_step(model, batch: dict, layout: ParallelLayout) -> torch.Tensor:
    """Cross-entropy: local sum x world / global count (DDP's average is then the global mean)."""
    device = compute_device()
    inputs, labels = batch["inputs"].to(device), batch["labels"].to(device)
    logits = model(inputs).float()  # [b, C]
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    (count,) = all_sum([len(labels)], layout)
    return loss_sum * layout.dp_size / max(count, 1.0)


@torch.no_grad()
def evaluate(model: TransferModel, dataset: LabeledImages, cfg: ProbeConfig, layout: ParallelLayout,
             bad: BadSampleLog) -> dict:
    """acc-1 / acc-5 (percent) over every readable item of `dataset`, counted over all ranks."""
    model.eval()
    hits, count = [0.0, 0.0], 0
    for batch in eval_batches(dataset, min(cfg.batch_size, 1024), layout, cfg.num_workers):
        bad.extend(batch["bad"])
        if not len(batch["labels"]):
            continue
        with autocast(cfg.precision):
            logits = model(batch["inputs"].to(compute_device())).float().cpu()  # [b, C]
        for j, k in enumerate((1, 5)):
            hits[j] += topk_accuracy_pct(logits, batch["labels"], k) * len(batch["labels"]) / 100
        count += len(batch["labels"])
    top1, top5, total = all_sum(hits + [count], layout)
    return {"acc-1": 100.0 * top1 / max(total, 1.0), "acc-5": 100.0 * top5 / max(total, 1.0)}


def run_classification(encoder: VisionEncoder, train_source, eval_source, cfg: ProbeConfig,
                       layout: Optional[ParallelLayout] = None, checkpoint: Optional[str] = None) -> dict:
    """Train the probe (and, in full mode, the encoder) on `train_source`'s labels (engine.fit,
    data-parallel over `layout`'s ranks, resumable from `checkpoint`); top-1/top-5 on `eval_source`.
    Bad images are skipped, counted and named in the result's `bad_samples`; frozen mode raises
    RuntimeError if the encoder's weights changed (`frozen_guard`)."""
    layout = layout or one_process()
    num_classes = max(len(train_source.class_names), int(train_source.labels.max()) + 1,
                      int(eval_source.labels.max()) + 1)
    torch.manual_seed(cfg.seed)  # the head's initialisation: equal on every rank
    head = ProbeHead(encoder.hidden_size, num_classes, cfg.pool_heads or default_pool_heads(encoder.hidden_size))
    model = TransferModel(encoder, head, cfg.mode)
    train_bad, eval_bad = BadSampleLog(), BadSampleLog()
    with frozen_guard(encoder, cfg.mode) as guard:
        t0 = time.time()
        fit(model, LabeledImages(train_source, encoder.image_size),
            lambda m, b: classification_step(m, b, layout), cfg, layout, train_bad, checkpoint, "probe")
        accuracy = evaluate(model, LabeledImages(eval_source, encoder.image_size), cfg, layout, eval_bad)
    return {"task": "classification", "encoder": encoder.source, "encoder_kind": encoder.kind,
            "accuracy_pct": accuracy, "num_classes": num_classes, "num_train": len(train_source),
            "num_eval": len(eval_source), "encoder_unchanged": guard.unchanged, "time_s": round(time.time() - t0, 1),
            "world_size": layout.dp_size,
            "bad_samples": {"train_index": train_source.problems.as_dict(),
                            "eval_index": eval_source.problems.as_dict(),
                            "train_read": merge_bad_logs(train_bad, layout),
                            "eval_read": merge_bad_logs(eval_bad, layout)},
            "config": asdict(cfg), "_model": model}


def classification_sets(data: str, eval_data: Optional[str], label_field: str, eval_fraction: float, seed: int):
    """(train, eval) sources: --eval-data if given; an ImageFolder's train/ and val/; else a seeded split."""
    if eval_data:
        return labeled_source(data, label_field), labeled_source(eval_data, label_field)
    if is_image_folder(os.path.join(data, "train")) and is_image_folder(os.path.join(data, "val")):
        return labeled_source(os.path.join(data, "train")), labeled_source(os.path.join(data, "val"))
    full = labeled_source(data, label_field)
    train_idx, eval_idx = split(len(full), eval_fraction, seed)
    return SubsetSource(full, train_idx), SubsetSource(full, eval_idx)


def linear_probe_accuracy(checkpoint: str, data: str, label_field: str = "label", mode: str = "frozen",
                          eval_data: Optional[str] = None, eval_fraction: float = 0.2, **probe) -> float:
    """Top-1 accuracy in [0, 1] of the attention probe (frozen by default) on `checkpoint`'s encoder
    (a megatron_lcl checkpoint or a HF CLIPVisionModel folder); `probe` overrides ProbeConfig fields."""
    cfg = ProbeConfig(mode=mode, **probe)
    train, test = classification_sets(data, eval_data, label_field, eval_fraction, cfg.seed)
    result = run_classification(load_encoder(checkpoint), train, test, cfg)
    return result["accuracy_pct"]["acc-1"] / 100.0


# ------------------------------------------------------------------------------------------ command line

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True, help="megatron_lcl checkpoint or HF CLIPVisionModel folder")
    p.add_argument("--data", required=True, help="synthetic corpus, ImageFolder or webdataset shards")
    p.add_argument("--eval-data", help="separate evaluation set (default: train/val folders or a split)")
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--label-field", default="label")
    add_config_args(p, ProbeConfig)  # --epochs --batch-size --lr --encoder-lr --weight-decay ... --seed --mode
    common_args(p)
    return parse_with_preset(p, argv, PRESETS)


def load_data(args) -> TaskData:
    train, test = classification_sets(args.data, args.eval_data, args.label_field, args.eval_fraction, args.seed)
    # a split of --data (or its train/ and val/) is checked by nothing; a separate --eval-data is
    return TaskData(train, test, {args.eval_data: test} if args.eval_data else {})


def summary(result: dict) -> str:
    return (f"{result['num_train']} train / {result['num_eval']} eval images, {result['num_classes']} classes, "
            f"{result['time_s']} s; encoder weights unchanged: {result['encoder_unchanged']}")


def run(args, encoder: VisionEncoder, data: TaskData, cfg: ProbeConfig, layout: ParallelLayout) -> dict:
    return run_classification(encoder, data.train, data.tests, cfg, layout, args.checkpoint)


COMMAND = Command(parse_args, ProbeConfig, ("encoder", "data", "eval_data"), load_data, run, summary,
                  result_fields=("label_field",))


run_command_line, main = entry_points(COMMAND)  # `python -m megatron_lcl.eval.classify`, the console script


if __name__ == "__main__":
    sys.exit(main())

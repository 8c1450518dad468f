"""Shared by the transfer tasks: where latents come from (frozen: computed once; full: with gradients),
the learning-rate schedule, seeding, the head-fitting loop, the frozen-weights guard, the config
dataclass <-> argparse bridge, and the Table-1-style text table (what the commands print around a
run, presets included: cli.py)."""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import typing
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_lcl.eval.datasets import ImageSet
from megatron_lcl.eval.encoders import VisionEncoder, freeze, weights_fingerprint

MODES = ("frozen", "full")
CACHE_MAX_ELEMENTS = 250_000_000  # frozen latents kept in memory up to ~1 GB of float32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class LatentSource:
    """Latents `[n, M, h]` of an ImageSet's images for a transfer mode.

    frozen: the encoder is frozen (eval mode, no grad) and the latents of every image are computed
    once and cached (when they fit in CACHE_MAX_ELEMENTS, else recomputed per batch without grad).
    full: latents are computed per batch with gradients; the encoder is in train mode while training.
    """

    def __init__(self, encoder: VisionEncoder, images: ImageSet, mode: str, batch_size: int = 256):
        assert mode in MODES, f"mode ({mode!r}) must be one of {MODES}"
        self.encoder, self.images, self.mode = encoder, images, mode
        self._cache: Optional[torch.Tensor] = None
        if mode == "frozen":
            freeze(encoder)
            first = self._encode([0])
            if len(images) * first[0].numel() <= CACHE_MAX_ELEMENTS:
                self._cache = torch.cat([self._encode(range(i, min(i + batch_size, len(images))))
                                         for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def _encode(self, indices) -> torch.Tensor:
        return self.encoder(self.images.pixels(list(indices), self.encoder.image_size)).float()

    def __call__(self, indices: Sequence[int], train: bool) -> torch.Tensor:
        if self.mode == "frozen":
            if self._cache is not None:
                return self._cache[torch.as_tensor(list(indices), dtype=torch.long)]
            return self._encode(indices)
        self.encoder.train(train)
        pixels = self.images.pixels(list(indices), self.encoder.image_size)
        with torch.set_grad_enabled(train):
            return self.encoder(pixels).float()


def encoder_param_groups(encoder: VisionEncoder, mode: str, encoder_lr: float, weight_decay: float) -> list:
    """Optimizer groups for the encoder: none when frozen; all its weights at `encoder_lr` when full
    (the paper fine-tunes pre-trained weights at 1e-5 and new ones at 1e-3)."""
    if mode == "frozen":
        return []
    params = [p for p in encoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    return [{"params": params, "lr": encoder_lr, "base_lr": encoder_lr, "weight_decay": weight_decay}]


def set_cosine_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, warmup_steps: int) -> None:
    """Linear warm-up then cosine decay to 0 of every group's `base_lr`."""
    if step < warmup_steps:
        factor = (step + 1) / warmup_steps
    else:
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        factor = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = False) -> List[List[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    out = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and len(out) > 1 and len(out[-1]) < batch_size:
        out.pop()
    return out


def fit_heads(head: torch.nn.Module, encoder: VisionEncoder, cfg, num_examples: int,
              loss_fn: Callable[[List[int]], torch.Tensor], drop_last: bool) -> torch.nn.Module:
    """Train the new `head` (and, when `cfg.mode == "full"`, the encoder) and return `head` in eval mode.

    AdamW over one group of all of `head`'s parameters at `cfg.lr` plus `encoder_param_groups` (full
    mode: the encoder at `cfg.encoder_lr`), both with `cfg.weight_decay`; `set_cosine_lr` before every
    step, with `round(cfg.warmup_epochs * steps_per_epoch)` warm-up steps. Each of the `cfg.epochs`
    epochs is a fresh `batches(num_examples, cfg.batch_size, generator, drop_last)`, the generator
    seeded with `cfg.seed`; one extra draw before the first epoch counts the steps per epoch.
    `loss_fn(indices)` returns the scalar loss of those examples (it computes the latents itself).
    `cfg`: a ProbeConfig / RetrievalConfig (mode, epochs, batch_size, lr, encoder_lr, weight_decay,
    warmup_epochs, seed).
    """
    groups = [{"params": list(head.parameters()), "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    optimizer = torch.optim.AdamW(groups + encoder_param_groups(encoder, cfg.mode, cfg.encoder_lr, cfg.weight_decay),
                                  betas=(0.9, getattr(cfg, "adam_beta2", 0.999)))
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = len(batches(num_examples, cfg.batch_size, generator, drop_last))
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    step = 0
    head.train()
    for _ in range(cfg.epochs):
        for idx in batches(num_examples, cfg.batch_size, generator, drop_last):
            set_cosine_lr(optimizer, step, total, warmup)
            loss = loss_fn(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return head.eval()


class FrozenCheck:
    """What `frozen_guard` found: `unchanged` is None inside the block, then whether the encoder's
    weights are bitwise equal to those at the block's start."""

    unchanged: Optional[bool] = None


@contextlib.contextmanager
def frozen_guard(encoder: VisionEncoder, mode: str) -> Iterator[FrozenCheck]:
    """Fingerprint the encoder's weights (`weights_fingerprint`) around a transfer run.

    On leaving the block (not when it raised) sets the yielded check's `unchanged`; in `frozen` mode a
    change raises RuntimeError("frozen transfer changed the encoder's weights").
    """
    before = weights_fingerprint(encoder)
    check = FrozenCheck()
    yield check
    check.unchanged = weights_fingerprint(encoder) == before
    if mode == "frozen" and not check.unchanged:
        raise RuntimeError("frozen transfer changed the encoder's weights")


def add_config_args(parser: argparse.ArgumentParser, config_cls, exclude: Iterable[str] = ()) -> None:
    """Add `--field-name` (dest `field_name`) for every field of the dataclass `config_cls`, with the
    field's type and default; `Optional[T]` fields take a T (default None), bool fields --x/--no-x.
    Skips `mode` (the CLIs add it with its `choices`) and the names in `exclude`."""
    hints = typing.get_type_hints(config_cls)
    skip = {"mode", *exclude}
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) is typing.Union and len(args) == 1:  # Optional[T]
            kind = args[0]
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{config_cls.__name__}.{f.name} (default: %(default)s)"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def config_from_args(config_cls, args: argparse.Namespace):
    """The dataclass `config_cls` from parsed `args`: each field whose name is an attribute of `args`
    (e.g. `mode` and those `add_config_args` added) takes that value, the others their defaults."""
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
                         if hasattr(args, f.name)})


def format_table(label_columns: Sequence[str], groups: Sequence[Tuple[str, Sequence[str]]],
                 rows: Sequence[Sequence]) -> str:
    """A plain-text table laid out like the paper's Table 1: a row of group titles over the metric
    names, then one row per model. Each row: the label cells, then one number per metric column."""
    metric_names = [name for _, names in groups for name in names]
    cells = [[str(c) for c in row[:len(label_columns)]] +
             [("-" if v is None else f"{v:.1f}") for v in row[len(label_columns):]] for row in rows]
    header = list(label_columns) + metric_names
    widths = [max(len(header[i]), *(len(r[i]) for r in cells)) for i in range(len(header))]
    col = len(label_columns)
    for title, names in groups:  # widen a group's last column until its title fits above it
        span = sum(widths[col:col + len(names)]) + 2 * (len(names) - 1)
        widths[col + len(names) - 1] += max(0, len(title) - span)
        col += len(names)
    label_width = sum(widths[:len(label_columns)]) + 2 * len(label_columns)
    top = " " * label_width
    col = len(label_columns)
    for title, names in groups:
        span = sum(widths[col:col + len(names)]) + 2 * (len(names) - 1)
        top += title[:span].center(span) + "  "
        col += len(names)

    def line(values):
        return "  ".join(v.ljust(widths[i]) if i < len(label_columns) else v.rjust(widths[i])
                         for i, v in enumerate(values))

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([top.rstrip(), line(header), rule] + [line(r) for r in cells])


def write_json(path: Optional[str], obj: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")

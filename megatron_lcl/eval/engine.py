"""The transfer-training engine shared by classification, retrieval and captioning: one loop (`fit`)
for every task and every data source, in one process or data-parallel under torchrun.

- data: a Dataset over a source (datasets.py) read through `parallel.GlobalBatches` (W ranks see
  exactly the samples of the 1-rank run), decoded in DataLoader workers;
- frozen latents: with a frozen encoder the training set's latents do not change between epochs, so
  `fit` computes them once (`cache_frozen_latents`, when they fit in CACHE_MAX_ELEMENTS) and the
  epochs read them instead of decoding and encoding every image again;
- model: `TransferModel` (encoder frozen or trained + a new head) wrapped in torch DDP when there
  are several ranks (gloo on CPU, nccl on GPU);
- loss: each task's `step_loss` returns its local sum x world / global count, so DDP's gradient
  average is the gradient of the global-batch mean (W ranks == 1 rank on the same global batch);
- AdamW (beta2 configurable) with warm-up + cosine (`set_cosine_lr`), bf16 autocast on GPU;
- resumable: `EvalCheckpoint` saves {step, trainable weights, optimizer, bad-sample log} every
  `save_every_steps` and at the end (torch.save to a tmp file + os.replace), and a restarted run
  continues at that step with the same batches (resume == no resume);
- a progress bar with ETA on rank 0 (tqdm).
"""

import contextlib
import dataclasses
import math
import os
import pickle
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from tqdm import tqdm

from megatron_lcl.eval.bad_samples import BadSampleLog
from megatron_lcl.eval.datasets import FrozenLatents, SourceImages
from megatron_lcl.eval.encoders import VisionEncoder, freeze
from megatron_lcl.eval.errors import InputError
from megatron_lcl.eval.parallel import GlobalBatches, all_gather_objects, eval_batches, loader
from megatron_lcl.runtime.device import device as compute_device
from megatron_lcl.runtime.layout import ParallelLayout

MODES = ("frozen", "full")
CACHE_MAX_ELEMENTS = 250_000_000  # frozen latents kept in memory up to ~1 GB of float32


@dataclass
class EngineConfig:
    """Fields every task shares (mixed into ProbeConfig / RetrievalConfig / CaptionConfig)."""

    steps: int = 0  # 0: epochs x (training examples // batch_size)
    warmup_steps: Optional[int] = None  # None: warmup_epochs
    adam_beta2: float = 0.999
    num_workers: int = 2
    save_every_steps: int = 0  # 0: only at the end (when a checkpoint path is given)
    precision: str = "bf16"  # autocast dtype on GPU (bf16 | fp32); CPU always runs fp32


ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig))


def autocast(precision: str):
    if compute_device().type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------ model

class TransferModel(torch.nn.Module):
    """A vision encoder (frozen: eval mode, no grad; full: trained) under a new task head.

    forward(inputs, *args) = head(latents (float32), *args); inputs are pixels `[b, 3, S, S]` or the
    frozen encoder's cached latents `[b, M, h]`."""

    def __init__(self, encoder: VisionEncoder, head: torch.nn.Module, mode: str):
        super().__init__()
        assert mode in MODES, f"mode ({mode!r}) must be one of {MODES}"
        self.encoder, self.head, self.mode = encoder, head, mode
        if mode == "frozen":
            freeze(encoder)

    def latents(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dim() == 3:  # already latents [b, M, h] (the frozen cache)
            return inputs.float()
        if self.mode == "frozen":
            self.encoder.eval()
            with torch.no_grad():
                return self.encoder(inputs).float()
        return self.encoder(inputs).float()

    def forward(self, inputs: torch.Tensor, *args, **kwargs):
        return self.head(self.latents(inputs), *args, **kwargs)

    def trainable_state(self) -> dict:
        """What a checkpoint keeps: the head, plus the encoder in full mode."""
        module = self if self.mode == "full" else self.head
        prefix = "" if self.mode == "full" else "head."
        return {prefix + k: v for k, v in module.state_dict().items() if torch.is_tensor(v)}


def wrap_ddp(model: TransferModel, layout: ParallelLayout) -> torch.nn.Module:
    device = compute_device()
    model.to(device)
    if layout.dp_size == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    # buffers are equal on every rank (same checkpoint); the frozen encoder has no trainable params
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                                     process_group=layout.dp_group)


@torch.no_grad()
def cache_frozen_latents(model: TransferModel, dataset: SourceImages, cfg,
                         layout: ParallelLayout) -> Optional[FrozenLatents]:
    """The frozen encoder's latents `[M, h]` (float32, on the CPU) of every readable item of `dataset`,
    each rank encoding its share and all ranks gathering the rest (an unreadable item is not cached:
    it is read again, and left out again, where it is met). None in full mode or when the latents
    would not fit in CACHE_MAX_ELEMENTS."""
    if model.mode != "frozen":
        return None
    size = model.encoder.image_size
    per_item = model.latents(torch.zeros(1, 3, size, size, device=compute_device()))[0].numel()
    if len(dataset) * per_item > CACHE_MAX_ELEMENTS:
        return None
    mine: FrozenLatents = {}
    with torch.random.fork_rng(devices=[]):  # the DataLoader draws its workers' seed: training's draws stay put
        for batch in eval_batches(dataset, 256, layout, cfg.num_workers):
            if len(batch["index"]):
                with autocast(cfg.precision):
                    latents = model.latents(batch["inputs"].to(compute_device())).float().cpu()  # [b, M, h]
                mine.update(zip(batch["index"].tolist(), latents))
    return {i: x for part in all_gather_objects(mine, layout) for i, x in part.items()}


# ------------------------------------------------------------------------------------------ optimizer

def encoder_param_groups(encoder: VisionEncoder, mode: str, encoder_lr: float, weight_decay: float) -> list:
    """Optimizer groups for the encoder: none when frozen; all its weights at `encoder_lr` when full
    (the paper fine-tunes pre-trained weights at 1e-5 and new ones at 1e-3)."""
    if mode == "frozen":
        return []
    # an encoder may train only the parameters its output depends on (e.g. features of an inner layer)
    params = list(getattr(encoder, "trainable_parameters", encoder.parameters)())
    for p in params:
        p.requires_grad_(True)
    return [{"params": params, "lr": encoder_lr, "base_lr": encoder_lr, "weight_decay": weight_decay}]


def make_optimizer(model: TransferModel, cfg) -> torch.optim.Optimizer:
    """AdamW: the head at cfg.lr, the encoder (full mode) at cfg.encoder_lr; betas (0.9, cfg.adam_beta2)."""
    head_params = [p for p in model.head.parameters() if p.requires_grad]
    groups = [{"params": head_params, "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    groups += encoder_param_groups(model.encoder, cfg.mode, cfg.encoder_lr, cfg.weight_decay)
    return torch.optim.AdamW(groups, betas=(0.9, cfg.adam_beta2))


def set_cosine_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, warmup_steps: int) -> None:
    """Linear warm-up then cosine decay to 0 of every group's `base_lr`."""
    if step < warmup_steps:
        factor = (step + 1) / warmup_steps
    else:
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        factor = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


# ------------------------------------------------------------------------------------------ checkpoints

class EvalCheckpoint:
    """`{step, model (trainable_state), optimizer, bad}` at `path` (None: no checkpointing)."""

    def __init__(self, path: Optional[str], layout: ParallelLayout):
        self.path, self.is_main = path, layout.rank == 0

    def save(self, step: int, model: TransferModel, optimizer, bad: BadSampleLog) -> None:
        if not self.path or not self.is_main:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp"
        torch.save({"step": step, "model": model.trainable_state(), "optimizer": optimizer.state_dict(),
                    "bad": bad.as_dict()}, tmp)
        os.replace(tmp, self.path)  # atomic: a crash leaves the previous checkpoint

    def load(self, model: TransferModel, optimizer, bad: BadSampleLog) -> int:
        """Restore a saved state (if any); returns the step to continue from (0 when none)."""
        if not self.path or not os.path.exists(self.path):
            return 0
        try:
            state = torch.load(self.path, map_location=compute_device(), weights_only=False)
            missing, unexpected = model.load_state_dict(state["model"], strict=False)
        except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as e:
            detail = (str(e).strip().splitlines() or [""])[0]
            raise InputError(f"--checkpoint {self.path}: not a checkpoint of this task and model "
                             f"({type(e).__name__}: {detail})") from None
        wanted = set(model.trainable_state())
        if unexpected or wanted & set(missing):
            raise InputError(f"--checkpoint {self.path}: saved by another task or model (missing "
                             f"{sorted(wanted & set(missing))[:3]}, unexpected {unexpected[:3]}): give a new path")
        optimizer.load_state_dict(state["optimizer"])
        bad.load(state["bad"])
        return int(state["step"])


# ------------------------------------------------------------------------------------------ the loop

@dataclass
class Schedule:
    """Steps of a run: `total`, `warmup`, and global batches per epoch."""

    total: int
    warmup: int
    per_epoch: int


def schedule(num_examples: int, cfg) -> Schedule:
    """cfg.steps (else cfg.epochs epochs) of cfg.batch_size; warm-up cfg.warmup_steps (else
    cfg.warmup_epochs epochs)."""
    per_epoch = num_examples // cfg.batch_size
    if per_epoch == 0:
        raise InputError(f"--batch-size ({cfg.batch_size}) is larger than the training set ({num_examples} examples)")
    total = cfg.steps or cfg.epochs * per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * per_epoch)
    return Schedule(total, warmup, per_epoch)


def fit_warmup_to_run(cfg, num_examples: int, preset: Optional[dict], explicit: set) -> Optional[str]:
    """A warm-up no shorter than the run leaves the learning rate below its peak throughout (e.g.
    `--preset paper --steps 5`: warm-up 500). A warm-up the command line set is refused (InputError
    naming both); one from `preset` or the defaults is scaled to the run, keeping its fraction of
    that preset's (or the defaults') own run, and a note says so (`cfg.warmup_steps` is set).
    `explicit`: the config fields given on the command line."""
    plan = schedule(num_examples, cfg)
    if plan.warmup < plan.total:
        return None
    field = "warmup_steps" if cfg.warmup_steps is not None else "warmup_epochs"
    flag, value = "--" + field.replace("_", "-"), getattr(cfg, field)
    run = f"--steps {cfg.steps}" if cfg.steps else f"--epochs {cfg.epochs} x {plan.per_epoch} steps"
    if field in explicit:
        unit = "" if field == "warmup_steps" else f" ({plan.warmup} steps)"
        raise InputError(f"{flag} {value}{unit} is not shorter than the run ({run}: {plan.total} steps): the learning "
                         f"rate would never reach its peak; lower {flag}")
    if preset and field in preset:
        own_total = preset.get("steps") or preset.get("_run_steps") or preset.get("epochs", cfg.epochs) * plan.per_epoch
        fraction, origin = plan.warmup / own_total, f"the preset's {plan.warmup} of {own_total} steps"
        where = "--preset"
    else:
        defaults = type(cfg)()
        fraction, origin = defaults.warmup_epochs / defaults.epochs, \
            f"the defaults' {defaults.warmup_epochs:g} of {defaults.epochs} epochs"
        where = "default"
    cfg.warmup_steps = round(plan.total * fraction)
    return (f"warm-up {plan.warmup} steps ({where}) is not shorter than the run ({run}: {plan.total} steps): "
            f"scaled to {cfg.warmup_steps} ({origin})")


def describe_plan(plan: Schedule, num_examples: int, cfg, start: int) -> str:
    """One line: steps x batch = epochs of the training set, warm-up, learning rates."""
    epochs = plan.total * cfg.batch_size / num_examples
    lrs = f"lr {cfg.lr:g}" + (f", encoder lr {cfg.encoder_lr:g}" if cfg.mode == "full" else "")
    resumed = f", resuming at step {start}" if start else ""
    return (f"training: {plan.total} steps x batch {cfg.batch_size} = {epochs:.3g} epochs of {num_examples} "
            f"examples; warm-up {plan.warmup} steps; {lrs}; weight decay {cfg.weight_decay:g}; "
            f"betas (0.9, {cfg.adam_beta2:g}){resumed}")


def train_batches(dataset, cfg, layout: ParallelLayout, plan: Schedule, start_step: int) -> Iterator[dict]:
    """Global batches from `start_step` to `plan.total`, epoch after epoch (resume lands mid-epoch)."""
    step = start_step
    while step < plan.total:
        epoch, first = divmod(step, plan.per_epoch)
        sampler = GlobalBatches(len(dataset), cfg.batch_size, cfg.seed, epoch, start=first, rank=layout.dp_rank,
                                world=layout.dp_size)
        for batch in loader(dataset, sampler, cfg.num_workers):
            yield batch
            step += 1
            if step == plan.total:
                return


def progress_bar(plan: Schedule, start: int, layout: ParallelLayout, desc: str):
    return tqdm(total=plan.total, initial=start, desc=desc, disable=layout.rank != 0, dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


def fit(model: TransferModel, dataset: SourceImages, step_loss: Callable, cfg, layout: ParallelLayout,
        bad: BadSampleLog, checkpoint_path: Optional[str] = None, desc: str = "train") -> TransferModel:
    """Train `model`'s head (and the encoder in full mode) on `dataset`; returns `model` in eval mode.

    step_loss(ddp_model, batch) -> the loss to backpropagate (local sum x world / global count).
    `cfg`: mode, steps/epochs, batch_size (global), lr, encoder_lr, weight_decay, adam_beta2,
    warmup_steps/warmup_epochs, seed, num_workers, save_every_steps, precision.
    """
    ddp = wrap_ddp(model, layout)
    optimizer = make_optimizer(model, cfg)
    plan = schedule(len(dataset), cfg)
    ckpt = EvalCheckpoint(checkpoint_path, layout)
    start = ckpt.load(model, optimizer, bad)
    if layout.rank == 0:
        print(describe_plan(plan, len(dataset), cfg, start), flush=True)
    latents = cache_frozen_latents(model, dataset, cfg, layout) if start < plan.total else None
    dataset = dataset.with_latents(latents) if latents is not None else dataset
    model.train()
    with progress_bar(plan, start, layout, desc) as bar:  # closed (its line ended) also when a step raises
        for step, batch in enumerate(train_batches(dataset, cfg, layout, plan, start), start):
            bad.extend(batch["bad"])
            if not len(batch["index"]):  # every rank must join DDP's all-reduce: stop with the names
                raise InputError(f"every sample of this rank's part of global batch {step} is unreadable: "
                                 f"{'; '.join(f'{b.origin}: {b.reason}' for b in batch['bad'][:4])}", every_rank=False)
            set_cosine_lr(optimizer, step, plan.total, plan.warmup)
            with autocast(cfg.precision):
                loss = step_loss(ddp, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", bad=bad.count, refresh=False)  # rank 0's estimate
            if cfg.save_every_steps and (step + 1) % cfg.save_every_steps == 0 and step + 1 < plan.total:
                ckpt.save(step + 1, model, optimizer, bad)
    ckpt.save(plan.total, model, optimizer, bad)
    return model.eval()

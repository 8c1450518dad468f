"""The data-parallel transfer-training engine shared by classification, retrieval and captioning.

One loop (`fit`) for every task, at any scale:
- data: a map-style Dataset (streaming.py) read through `GlobalBatches`: epoch e's order is a
  permutation seeded with (seed, e); global batch b is its b-th slice of `batch_size` items and rank
  r takes the r-th contiguous part, so W ranks see exactly the samples of the 1-rank run; decoded in
  DataLoader workers;
- model: `TransferModel` (encoder frozen or trained + a new head) wrapped in torch DDP when
  world > 1 (gloo on CPU, nccl on GPU; the process group comes from `megatron_lcl.runtime`);
- loss: each task's `step_loss` returns its local sum x world / global count, so DDP's gradient
  average is the gradient of the global-batch mean (W ranks == 1 rank on the same global batch);
- AdamW (beta2 configurable) with warm-up + cosine (`common.set_cosine_lr`), bf16 autocast on GPU;
- resumable: `EvalCheckpoint` saves {step, trainable weights, optimizer, bad-sample log} every
  `save_every_steps` and at the end (torch.save to a tmp file + os.replace), and a restarted run
  continues at that step with the same batches (resume == no resume);
- a progress bar with ETA on rank 0 (tqdm).
"""

import contextlib
import dataclasses
import os
import pickle
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron_lcl.eval.common import encoder_param_groups, set_cosine_lr
from megatron_lcl.eval.encoders import VisionEncoder, freeze
from megatron_lcl.eval.errors import InputError
from megatron_lcl.eval.streaming import BadSampleLog, collate, reason_kind


# ------------------------------------------------------------------------------------------ runtime

@dataclass
class Runtime:
    """This process's place in the data-parallel run. `group` is None in a single process;
    `gather_group` is a second group for the contrastive gather (kept apart from DDP's all-reduces)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    group: Optional[object] = None
    gather_group: Optional[object] = None
    precision: str = "bf16"  # autocast dtype on GPU; CPU always runs fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.device.type == "cuda" and self.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_sum(self, values: List[float]) -> List[float]:
        """Sum of each value over the ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.group is not None:
            dist.all_reduce(t, group=self.group)
        return t.tolist()

    def all_gather_objects(self, obj) -> list:
        if self.group is None:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out


def init_runtime(precision: str = "bf16") -> Runtime:
    """torch.distributed from torchrun's environment (nccl + this rank's GPU, or gloo on CPU) via
    `megatron_lcl.runtime.initialize_distributed`; a single process needs no launcher."""
    from megatron_lcl.config import ParallelConfig
    from megatron_lcl.runtime import device as compute_device, initialize_distributed

    initialize_distributed(ParallelConfig())
    world, rank = dist.get_world_size(), dist.get_rank()
    device = compute_device()
    if world == 1:
        return Runtime(0, 1, device, None, None, precision)
    return Runtime(rank, world, device, dist.group.WORLD, dist.new_group(), precision)


def merge_bad_logs(log: BadSampleLog, runtime: Runtime) -> dict:
    """One BadSampleLog dict over all ranks (each rank read different samples)."""
    merged = BadSampleLog()
    for saved in runtime.all_gather_objects(log.as_dict()):
        named_kinds: dict = {}
        for entry in saved["named"]:
            origin, _, reason = entry.partition(": ")
            merged.add(origin, reason)
            named_kinds[reason_kind(reason)] = named_kinds.get(reason_kind(reason), 0) + 1
        merged.count += saved["count"] - len(saved["named"])  # counted but not named
        merged.reads += saved["reads"] - len(saved["named"])
        for kind, n in saved["by_reason"].items():
            merged.by_reason[kind] = merged.by_reason.get(kind, 0) + n - named_kinds.get(kind, 0)
    return merged.as_dict()


# ------------------------------------------------------------------------------------------ data

class GlobalBatches(torch.utils.data.Sampler):
    """This rank's part of each global batch of an epoch, from batch `start` on (see module doc).

    shuffle=False, drop_last=False: the evaluation order (every item once; the last batch short)."""

    def __init__(self, n: int, batch_size: int, runtime: Runtime, seed: int, epoch: int, start: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if batch_size % runtime.world:
            raise InputError(f"--batch-size ({batch_size}) must be divisible by the number of ranks ({runtime.world})")
        self.n, self.batch_size, self.runtime, self.start = n, batch_size, runtime, start
        self.seed, self.epoch, self.shuffle, self.drop_last = seed, epoch, shuffle, drop_last

    def num_batches(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.start)

    def __iter__(self) -> Iterator[List[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        per_rank = self.batch_size // self.runtime.world
        for b in range(self.start, self.num_batches()):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self.drop_last:
                mine = batch[self.runtime.rank * per_rank:(self.runtime.rank + 1) * per_rank]
            else:  # short last batch: split as evenly as possible
                mine = batch.tensor_split(self.runtime.world)[self.runtime.rank]
            yield mine.tolist()


def loader(dataset, sampler: GlobalBatches, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate, persistent_workers=False,
                                       prefetch_factor=4 if num_workers else None)


def eval_batches(dataset, batch_size: int, runtime: Runtime, num_workers: int) -> Iterator[dict]:
    """Every item of `dataset` once over all ranks, in order, batches of `batch_size` (global)."""
    batch_size = max(runtime.world, batch_size - batch_size % runtime.world)
    sampler = GlobalBatches(len(dataset), batch_size, runtime, 0, 0, shuffle=False, drop_last=False)
    yield from loader(dataset, sampler, num_workers)


# ------------------------------------------------------------------------------------------ model

class TransferModel(torch.nn.Module):
    """A vision encoder (frozen: eval mode, no grad; full: trained) under a new task head.

    forward(pixels `[b, 3, S, S]`, *args) = head(latents `[b, M, h]` (float32), *args)."""

    def __init__(self, encoder: VisionEncoder, head: torch.nn.Module, mode: str):
        super().__init__()
        self.encoder, self.head, self.mode = encoder, head, mode
        if mode == "frozen":
            freeze(encoder)

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.mode == "frozen":
            self.encoder.eval()
            with torch.no_grad():
                return self.encoder(pixels).float()
        return self.encoder(pixels).float()

    def forward(self, pixels: torch.Tensor, *args, **kwargs):
        return self.head(self.latents(pixels), *args, **kwargs)

    def trainable_state(self) -> dict:
        """What a checkpoint keeps: the head, plus the encoder in full mode."""
        module = self if self.mode == "full" else self.head
        prefix = "" if self.mode == "full" else "head."
        return {prefix + k: v for k, v in module.state_dict().items() if torch.is_tensor(v)}


def wrap_ddp(model: TransferModel, runtime: Runtime) -> torch.nn.Module:
    model.to(runtime.device)
    if runtime.world == 1:
        return model
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # buffers are equal on every rank (same checkpoint); the frozen encoder has no trainable params
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                                     process_group=runtime.group)


def make_optimizer(model: TransferModel, cfg) -> torch.optim.Optimizer:
    """AdamW: the head at cfg.lr, the encoder (full mode) at cfg.encoder_lr; betas (0.9, cfg.adam_beta2)."""
    head_params = [p for p in model.head.parameters() if p.requires_grad]
    groups = [{"params": head_params, "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    groups += encoder_param_groups(model.encoder, cfg.mode, cfg.encoder_lr, cfg.weight_decay)
    return torch.optim.AdamW(groups, betas=(0.9, cfg.adam_beta2))


# ------------------------------------------------------------------------------------------ checkpoints

class EvalCheckpoint:
    """`{step, model (trainable_state), optimizer, bad}` at `path` (None: no checkpointing)."""

    def __init__(self, path: Optional[str], runtime: Runtime):
        self.path, self.runtime = path, runtime

    def save(self, step: int, model: TransferModel, optimizer, bad: BadSampleLog) -> None:
        if not self.path or not self.runtime.is_main:
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
            state = torch.load(self.path, map_location=self.runtime.device, weights_only=False)
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


def train_batches(dataset, cfg, runtime: Runtime, plan: Schedule, start_step: int) -> Iterator[dict]:
    """Global batches from `start_step` to `plan.total`, epoch after epoch (resume lands mid-epoch)."""
    step = start_step
    while step < plan.total:
        epoch, first = divmod(step, plan.per_epoch)
        sampler = GlobalBatches(len(dataset), cfg.batch_size, runtime, cfg.seed, epoch, start=first)
        for batch in loader(dataset, sampler, cfg.num_workers):
            yield batch
            step += 1
            if step == plan.total:
                return


def progress_bar(plan: Schedule, start: int, runtime: Runtime, desc: str):
    from tqdm import tqdm

    return tqdm(total=plan.total, initial=start, desc=desc, disable=not runtime.is_main, dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


def fit(model: TransferModel, dataset, step_loss: Callable, cfg, runtime: Runtime, bad: BadSampleLog,
        checkpoint_path: Optional[str] = None, desc: str = "train") -> TransferModel:
    """Train `model`'s head (and the encoder in full mode) on `dataset`; returns `model` in eval mode.

    step_loss(ddp_model, batch) -> the loss to backpropagate (local sum x world / global count).
    `cfg`: mode, steps/epochs, batch_size (global), lr, encoder_lr, weight_decay, adam_beta2,
    warmup_steps/warmup_epochs, seed, num_workers, save_every_steps.
    """
    ddp = wrap_ddp(model, runtime)
    optimizer = make_optimizer(model, cfg)
    plan = schedule(len(dataset), cfg)
    ckpt = EvalCheckpoint(checkpoint_path, runtime)
    start = ckpt.load(model, optimizer, bad)
    if runtime.is_main:
        print(describe_plan(plan, len(dataset), cfg, start), flush=True)
    model.train()
    with progress_bar(plan, start, runtime, desc) as bar:  # closed (its line ended) also when a step raises
        for step, batch in enumerate(train_batches(dataset, cfg, runtime, plan, start), start):
            bad.extend(batch["bad"])
            if not len(batch["index"]):  # every rank must join DDP's all-reduce: stop with the names
                raise InputError(f"every sample of this rank's part of global batch {step} is unreadable: "
                                 f"{'; '.join(f'{b.origin}: {b.reason}' for b in batch['bad'][:4])}", every_rank=False)
            set_cosine_lr(optimizer, step, plan.total, plan.warmup)
            with runtime.autocast():
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


@dataclass
class EngineConfig:
    """Fields every streaming task shares (mixed into ProbeConfig / RetrievalConfig / CaptionConfig)."""

    steps: int = 0  # 0: epochs x (training examples // batch_size)
    warmup_steps: Optional[int] = None  # None: warmup_epochs
    adam_beta2: float = 0.999
    num_workers: int = 2
    save_every_steps: int = 0  # 0: only at the end (when a checkpoint path is given)


ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig))

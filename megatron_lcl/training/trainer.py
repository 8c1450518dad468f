"""The training driver: `Trainer.setup()` builds everything, `Trainer.train()` loops `train_step`.

Per step, on every rank:

    batches   <- next micro-batches from the loader (first and last pipeline stages only)
    step_forward_backward (megatron-core schedule, 1F1B when PP > 1; with loss.contrastive_batch=step
                 a forward-only feature pass first, so L_con's negatives are the whole step)
    stats     <- one all-reduce over the world: losses (last stage), image/token counts (first stage),
                 collapse monitor (first stage), stop flags and background checkpoint writes (every
                 rank) - so all ranks agree on skipping a non-finite step, on stopping after a signal
                 and on when a background save is complete
    optimizer step (skipped when the loss is not finite), LR schedule, logit-scale clamp

Rank 0 writes metrics.jsonl / TensorBoard / the console line; checkpoints are collective.
"""

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import List, Optional

import torch
import torch.distributed as dist

import megatron_lcl
from megatron_lcl import checkpoint as ckpt
from megatron_lcl.checkpoint.resume import check_resume
from megatron_lcl.checkpoint.run_dir import absolute_paths, keep_tokenizer
from megatron_lcl.config import ConfigError, LCLConfig, num_microbatches, save_config, section_to_dict, validate_config
from megatron_lcl.config.validate import data_file_errors, raise_errors, tokenizer_errors
from megatron_lcl.data.loader import build_loader
from megatron_lcl.losses import LCLLoss
from megatron_lcl.losses.contrastive import gather_rows
from megatron_lcl.models.factory import build_model
from megatron_lcl.models.flops import count_parameters_by_group, run_flops_options, throughput_metrics
from megatron_lcl.runtime import device, initialize_distributed, to_device
from megatron_lcl.training.metrics import MetricsWriter, ProgressLine, singular_value_stats
from megatron_lcl.training.optim import (build_optimizer, build_scheduler, clamp_logit_scale, current_lr,
                                         drop_path_rate_at, sync_params)
from megatron_lcl.training.pipeline import PipelineShape, step_forward_backward, wrap_ddp
from megatron_lcl.stop_signals import StopRequest

# Values summed over the world each step. Each is contributed by the ranks named in `_step_stats`.
STAT_KEYS = ("loss", "lm_loss", "con_loss", "con_top1", "text_tokens", "con_images", "con_excluded",
             "con_batch", "logit_scale", "logit_bias",
             "images", "effective_rank", "effective_rank_frac", "sv_entropy", "stop", "ckpt_writing",
             "data_behind")


@dataclass
class TrainState:
    """Progress that a checkpoint carries (meta.json) besides the model/optimizer/data states."""

    step: int = 0
    consumed_samples: int = 0
    consumed_images: int = 0
    consumed_tokens: int = 0  # sequence positions (text, image and padding)
    consumed_text_tokens: int = 0  # text targets of L_gen
    skipped_steps: int = 0  # non-finite loss, not applied
    consecutive_nonfinite: int = 0


def record_launch(run_dir: str, start_step: int, world_size: int) -> None:
    """Append this launch to run_dir/launches.jsonl: when, from which step, world size, code version."""
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "start_step": start_step, "world_size": world_size,
           "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "argv": sys.argv, **code_version()}
    with open(ckpt.run_path(run_dir, ckpt.LAUNCHES), "a") as f:
        f.write(json.dumps(row) + "\n")


def code_version() -> dict:
    """The package's version, and the git commit (and whether the work tree differs from it) of the
    repository the package was imported from: an editable install or a checkout on PYTHONPATH. An
    installed package (site-packages) is in no repository's index: commit None."""
    package_dir = os.path.dirname(os.path.abspath(megatron_lcl.__file__))

    def git(*args) -> str:
        try:
            return subprocess.run(["git", "-C", package_dir, *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    tracked = bool(git("ls-files", "--", "__init__.py"))  # this very file is in the repository's index
    commit = git("rev-parse", "HEAD") if tracked else ""
    return {"version": megatron_lcl.__version__, "git_commit": commit or None,
            "git_dirty": bool(commit) and bool(git("status", "--porcelain", "-uno"))}


def log0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


class Trainer:
    def __init__(self, cfg: LCLConfig):
        self.cfg = cfg
        self.state = TrainState()
        self.stop = StopRequest()
        self.writer: Optional[MetricsWriter] = None
        self.loader = self.data_iter = None
        self._captured: Optional[List[torch.Tensor]] = None
        self._last_saved_step = -1
        self._run_lock: Optional[int] = None
        self.saver: Optional[ckpt.CheckpointSaver] = None

    # ---------------------------------------------------------------------------------- set-up
    def setup(self) -> "Trainer":
        cfg = self.cfg
        self.stop.install()  # first: a stop signal during a long set-up (resume) must not kill the rank
        self.layout = layout = initialize_distributed(cfg.parallel, cfg.train.seed)
        self.lock_run_dir()
        self.keep_tokenizer()
        if self.stop_agreed():  # a stop signal during the imports or the start of the process group
            return self
        validate_config(cfg, layout.world_size)
        c = cfg.checkpoint  # first: a background writer starts while the model is built
        self.saver = ckpt.CheckpointSaver(self.checkpoint_root, c.keep_last, layout, c.optimizer_format,
                                          asynchronous=c.background_saves(), log=log0)
        self.num_microbatches = num_microbatches(cfg.train, cfg.data, layout.dp_size)
        self.model = build_model(cfg.model, cfg.parallel, cfg.precision, first_stage=layout.is_first_stage,
                                 last_stage=layout.is_last_stage, fuse_wgrad_accumulation=True)  # wrapped next:
        self.ddp = wrap_ddp(self.model, cfg.parallel)  # megatron-core DDP allocates the main_grad TE adds into
        self.optimizer = build_optimizer(self.ddp, cfg.optimizer, cfg.parallel, cfg.precision)
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer, cfg.train)
        self.loss_fn = LCLLoss(cfg.loss, layout.dp_group)
        self.shape = PipelineShape.for_model(cfg.model, cfg.data.seq_length, cfg.data.micro_batch_size)
        if layout.needs_data:
            self.loader = self.build_loader()
        if layout.is_first_stage:
            self.model.image_head.register_forward_hook(self._capture_image_features)
        self.maybe_resume()
        self.data_iter = iter(self.loader) if self.loader is not None else None
        self.write_run_dir()
        if self.saver.writer is not None:  # its start-up done now, not during the first steps or a stop
            self.saver.writer.wait_ready()
        return self

    def lock_run_dir(self) -> None:
        """Rank 0 takes the run directory's lock for the life of the run; every rank raises the same
        RunDirInUse when another launch holds it (before this launch reads or writes anything there)."""
        error = None
        if self.layout.rank == 0:
            try:
                self._run_lock = ckpt.lock_run_dir(self.cfg.run_dir)
            except ckpt.RunDirInUse as e:
                error = str(e)
        error = _from_rank0(error)
        if error is not None:
            raise ckpt.RunDirInUse(error)

    def keep_tokenizer(self) -> None:
        """Rank 0 keeps data.tokenizer in the run directory (`run_dir.keep_tokenizer`); every rank then
        reads that copy, and config.yaml and meta.json record it and data.path as absolute paths: export,
        eval and resume work from any folder, also after the data folder moved."""
        d, kept, error = self.cfg.data, None, None
        if self.layout.rank == 0 and d.tokenizer and os.path.isfile(d.tokenizer):  # missing: build_loader says so
            try:
                kept = keep_tokenizer(self.cfg.run_dir, d.tokenizer)
            except (OSError, ValueError) as e:
                error = f"run_dir {self.cfg.run_dir}: {e}"
        kept, error = _from_rank0((kept, error))
        if error is not None:
            raise ConfigError(error)
        self.cfg = replace(self.cfg, data=replace(d, tokenizer=kept or d.tokenizer, path=absolute_paths(d.path)))

    def stop_agreed(self) -> bool:
        """Whether any rank got a stop signal (or the stop file) so far; the same answer on every rank."""
        flag = torch.tensor([1.0 if self.stop else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def build_loader(self):
        d, v = self.cfg.data, self.cfg.model.vision
        # The driver checked the files; a Trainer built directly gets the same messages. Only here is
        # the tokenizer read for its vocabulary (`validate.tokenizer_errors`).
        raise_errors(data_file_errors(d) + tokenizer_errors(d, self.cfg.model.lm))
        # The last stage of a pipeline reads the targets only: the same samples, no image decoded.
        return build_loader(d, image_size=v.image_size, num_image_tokens=v.num_image_tokens,
                            dp_rank=self.layout.dp_rank, dp_size=self.layout.dp_size,
                            labels_only=not self.layout.is_first_stage)

    @property
    def checkpoint_root(self) -> str:
        return ckpt.checkpoints_dir(self.cfg.run_dir)

    def maybe_resume(self) -> None:
        c = self.cfg.checkpoint
        path = c.load or (self.checkpoint_root if c.auto_resume else None)
        found = ckpt.resolve_checkpoint(path, log=log0) if path else None
        if found is None:
            if c.load:
                raise FileNotFoundError(f"checkpoint.load ({c.load}) holds no checkpoint yet")
            return
        # From a checkpoints folder (not one named step_* folder): fall back past unreadable checkpoints.
        fall_back = os.path.realpath(found) != os.path.realpath(path)
        own_root = os.path.realpath(os.path.dirname(found)) == os.path.realpath(self.checkpoint_root)
        found, meta = ckpt.load_newest_loadable(
            found, self.model, self.optimizer, self.scheduler, self.loader, self.layout, fall_back=fall_back,
            own_root=own_root, load_optimizer=c.load_optimizer, load_data_state=c.load_data_state, log=log0,
            check_meta=lambda path, meta: check_resume(path, meta, self.cfg, schedule_loaded=c.load_optimizer,
                                                       log=log0))
        self.state = TrainState(**meta.get("train_state", {}))  # weights-only: start at step 0
        self._last_saved_step = self.state.step
        log0(f"resumed from {found} at step {self.state.step}")

    def write_run_dir(self) -> None:
        if self.layout.rank != 0:
            return
        os.makedirs(self.cfg.run_dir, exist_ok=True)
        save_config(self.cfg, ckpt.run_path(self.cfg.run_dir, ckpt.CONFIG))
        record_launch(self.cfg.run_dir, self.state.step, self.layout.world_size)
        self.writer = MetricsWriter(self.cfg.run_dir, self.state.step, self.cfg.logging.tensorboard)
        self.progress = ProgressLine(self.cfg.train.train_steps, self.state.step)
        counts = count_parameters_by_group(self.model)
        log0(f"run dir {self.cfg.run_dir} | world {self.layout.world_size} = TP {self.layout.tp_size} x PP "
             f"{self.layout.pp_size} x DP {self.layout.dp_size} | {self.num_microbatches} micro-batch(es) of "
             f"{self.cfg.data.micro_batch_size} per step | parameters on rank 0: "
             + ", ".join(f"{k} {v:,}" for k, v in counts.items()))

    # ---------------------------------------------------------------------------------- one step
    def next_batches(self) -> Optional[list]:
        """This step's micro-batches on the first/last pipeline stage; None on middle stages."""
        if self.data_iter is None:
            return None
        # The loader must not move the training RNG (torch's DataLoader draws worker seeds from it
        # when it starts): otherwise a resumed run would drop different paths than an uninterrupted one.
        with torch.random.fork_rng(devices=[]):
            batches = [next(self.data_iter) for _ in range(self.num_microbatches)]
        return [to_device(b) for b in batches]

    def train_step(self, batches: Optional[list], collect_features: bool = False) -> dict:
        """Forward + backward over the step's micro-batches, then the optimizer step unless non-finite."""
        cfg = self.cfg
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.layout.is_first_stage:
            self.model.vision.set_drop_path_rate(drop_path_rate_at(
                self.state.step, cfg.model.vision.drop_path_rate, cfg.train.drop_path_ramp_steps))
        self._captured = [] if collect_features and cfg.logging.collapse_monitor else None
        per_micro = step_forward_backward(self.ddp, batches, self.num_microbatches, self.loss_fn, self.shape,
                                          self.layout)
        stats = self._step_stats(per_micro, batches)
        self._captured = None
        _check_pipeline_data(stats["data_behind"])
        stats["skipped"] = not math.isfinite(stats["loss"])
        stats["grad_norm"] = float("nan")
        if not stats["skipped"]:
            ok, grad_norm, _ = self.optimizer.step()
            stats["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
            if ok:
                self.scheduler.step(increment=1)
            clamp_logit_scale(self.model, cfg.model.heads.logit_scale_max)
        return stats

    def _capture_image_features(self, _module, _inputs, output) -> None:
        # The training pass only: with contrastive_batch=step a no-grad feature pass runs first.
        if self._captured is not None and torch.is_grad_enabled():
            self._captured.append(output.detach().float())  # v: [n, e] per micro-batch

    def _step_stats(self, per_micro: List[dict], batches: Optional[list]) -> dict:
        """Sum one vector over the world: each value comes from the ranks that own it (zeros elsewhere)."""
        layout, dp0 = self.layout, self.layout.dp_rank == 0
        local = dict.fromkeys(STAT_KEYS, 0.0)
        if layout.is_last_stage and layout.is_logging_rank:  # loss terms are already global over DP
            step = self.loss_fn.step_metrics(per_micro)  # the step's values (L_gen over its targets)
            for key in ("loss", "lm_loss", "con_loss", "con_top1", "con_excluded", "con_batch"):
                local[key] = step[key]
            local["text_tokens"], local["con_images"] = step["num_text_tokens"], step["num_images"]
            local["logit_scale"] = float(self.model.text_head.scale().detach())
            if self.model.text_head.logit_bias is not None:  # the sigmoid loss's b
                local["logit_bias"] = float(self.model.text_head.logit_bias.detach())
        if layout.is_first_stage and layout.tp_rank == 0:  # this DP rank's share of the counts
            local["images"] = float(sum(b.num_images for b in batches))
            if self._captured is not None:
                local.update(self._collapse_stats(dp0))
        if self.loader is not None and layout.tp_rank == 0 and layout.pp_size > 1:
            # The slots the first stage's readers went past minus the last stage's: 0 unless the
            # first stage dropped a sample (an image that did not decode) the labels-only loader kept.
            sign = 1.0 if layout.is_first_stage else -1.0
            local["data_behind"] = sign * self.loader.slots_consumed
        local["stop"] = 1.0 if self.stop else 0.0
        local["ckpt_writing"] = 1.0 if self.saver.writing() else 0.0
        vec = torch.tensor([local[k] for k in STAT_KEYS], dtype=torch.float64, device=device())
        dist.all_reduce(vec)
        return dict(zip(STAT_KEYS, vec.tolist()))

    def _collapse_stats(self, dp0: bool) -> dict:
        """Effective rank of the normalised v_i of the whole step, gathered over the DP group."""
        local = torch.cat(self._captured) if self._captured else torch.zeros(0, self.cfg.model.heads.embed_dim, device=device())
        features, _, _ = gather_rows(local, self.layout.dp_group)
        return singular_value_stats(features) if dp0 else {}

    # ---------------------------------------------------------------------------------- the loop
    def train(self) -> str:
        """Run to `train.train_steps`. Returns completed | preempted | exit_after_steps | diverged."""
        cfg, start = self.cfg, self.state.step
        if self.stop_agreed():  # during start-up: nothing trained by this launch, nothing to save
            self._report("stopped_at_start")
            return "preempted"
        window, stop = _Window(), None
        while self.state.step < cfg.train.train_steps and stop is None:
            t0 = time.time()
            log_now = (self.state.step + 1) % cfg.logging.log_interval == 0 or \
                self.state.step + 1 == cfg.train.train_steps
            stats = self.train_step(self.next_batches(), collect_features=log_now)
            if self.saver.in_flight and stats["ckpt_writing"] == 0:  # every rank's writer is done
                self.finish_save()
            self._advance(stats)
            window.add(stats, time.time() - t0, cfg.train.global_batch_size * cfg.data.seq_length)
            stop = self._stop_reason(stats, start)
            if log_now or stop is not None:
                self.log(stats, window, self.gather_data_skips(), self.gather_source_counts())
                window = _Window()
            if stop is None and cfg.checkpoint.save_interval and \
                    self.state.step % cfg.checkpoint.save_interval == 0:
                self.save(blocking=False)
        if cfg.checkpoint.save_at_exit or stop is not None:
            self.save()  # at once: faster than staging it for the background, and nothing waits for it
        self.finish_save()
        status = stop or "completed"
        self._report(status)
        return status

    def _advance(self, stats: dict) -> None:
        s = self.state
        s.step += 1
        s.consumed_samples += self.cfg.train.global_batch_size
        s.consumed_images += int(stats["images"])
        s.consumed_tokens += self.cfg.train.global_batch_size * self.cfg.data.seq_length
        s.consumed_text_tokens += int(stats["text_tokens"])
        if stats["skipped"]:
            s.skipped_steps += 1
            s.consecutive_nonfinite += 1
        else:
            s.consecutive_nonfinite = 0

    def _stop_reason(self, stats: dict, start: int) -> Optional[str]:
        """Why the run stops after this step (None: it goes on). The same on every rank."""
        t = self.cfg.train
        if self.state.consecutive_nonfinite >= t.max_consecutive_nonfinite:
            return "diverged"
        if stats["stop"] > 0:
            return "preempted"
        if t.exit_after_steps is not None and self.state.step - start >= t.exit_after_steps \
                and self.state.step < t.train_steps:
            return "exit_after_steps"
        return None

    def _report(self, status: str) -> None:
        s, t = self.state, self.cfg.train
        messages = {
            "completed": f"training finished at step {s.step}",
            "exit_after_steps": f"stopped after train.exit_after_steps ({t.exit_after_steps}) at step {s.step}",
            "preempted": f"stop signal ({self.stop.signal_name or 'on another rank'}) received: "
                         f"saved step {s.step}, exiting for requeue",
            "stopped_at_start": f"stop signal ({self.stop.signal_name or 'on another rank'}) received during "
                                "start-up: nothing trained by this launch, nothing to save; exiting for requeue",
            "diverged": f"loss was not finite for {s.consecutive_nonfinite} steps in a row "
                        f"(train.max_consecutive_nonfinite = {t.max_consecutive_nonfinite}); stopping at step "
                        f"{s.step}. The checkpoint saved now holds the weights from before these steps "
                        f"(non-finite steps are never applied): lower optimizer.lr or check the data",
        }
        log0(messages[status] + f" | checkpoints in {self.checkpoint_root}")

    # ---------------------------------------------------------------------------------- outputs
    def log(self, stats: dict, window: "_Window", data_skips: dict, source_counts: dict) -> None:
        if self.layout.rank != 0:
            return
        row = {"step": self.state.step, **{k: v for k, v in asdict(self.state).items() if k != "step"}}
        row.pop("consecutive_nonfinite")
        row.update(window.means())  # losses: mean over the window's finite steps
        for key in ("logit_scale", "grad_norm", "con_batch", "con_excluded"):  # the last step's
            row[key] = stats[key]
        if self.cfg.loss.contrastive_loss == "sigmoid":
            row["logit_bias"] = stats["logit_bias"]
        row["lr"] = current_lr(self.optimizer)
        if self._collapse_measured(stats):
            for key in ("effective_rank", "effective_rank_frac", "sv_entropy"):
                row[key] = stats[key]
        row.update(window.rates())
        images_per_step = window.images / max(window.steps, 1)
        row.update(throughput_metrics(self.cfg.model, self.cfg.data.seq_length, self.cfg.train.global_batch_size,
                                      images_per_step, row["step_time_s"], self.cfg.logging.peak_flops_per_s,
                                      self.layout.world_size, contrastive_negatives=int(stats["con_batch"]),
                                      **run_flops_options(self.cfg, self.num_microbatches)))
        row.update({f"skipped/{k}": v for k, v in sorted(data_skips.items())})
        row.update({f"source_samples/{k}": v for k, v in sorted(source_counts.items())})  # blends only
        self.writer.write(row)
        if self.cfg.logging.console:
            self.progress.show(row)

    def _collapse_measured(self, stats: dict) -> bool:
        return self.cfg.logging.collapse_monitor and stats["effective_rank"] > 0

    def gather_data_skips(self) -> dict:
        """{reason: count} of data the loaders dropped so far, summed over DP ranks (valid on rank 0)."""
        return self._sum_over_dp(lambda: self.loader.skip_counts())

    def gather_source_counts(self) -> dict:
        """{blend source: samples} the loaders handed out so far, summed over DP ranks (valid on rank 0)."""
        return self._sum_over_dp(lambda: self.loader.source_counts())

    def _sum_over_dp(self, local_counts) -> dict:
        if not (self.layout.is_first_stage and self.layout.tp_rank == 0):
            return {}
        counts = [None] * self.layout.dp_size
        dist.all_gather_object(counts, local_counts(), group=self.layout.dp_group)
        total = {}
        for c in counts:
            for key, n in c.items():
                total[key] = total.get(key, 0) + n
        return total

    def save(self, blocking: bool = True) -> None:
        """Save this step (all ranks): complete on return when `blocking` (or without background
        saves); else written in the background, completed by `finish_save`."""
        self.finish_save()  # the one in flight first
        if self.state.step == self._last_saved_step:
            return
        started = time.perf_counter()
        sync_params(self.ddp)  # overlap_param_gather: the shards other ranks updated, before they are saved
        meta = {"train_state": asdict(self.state), "config": section_to_dict(self.cfg)}
        path = self.saver.save(self.state.step, self.model, self.optimizer, self.scheduler, self.loader, meta,
                               blocking=blocking)
        self._last_saved_step = self.state.step
        took = time.perf_counter() - started
        log0(f"saved checkpoint {path} ({took:.2f} s)" if path else
             f"saving step {self.state.step} in the background (training paused {took:.2f} s)")

    def finish_save(self) -> None:
        """Complete the background save in flight, if any (all ranks)."""
        started = time.perf_counter()
        path = self.saver.finish()
        if path:
            log0(f"saved checkpoint {path} (written in the background; completing it took "
                 f"{time.perf_counter() - started:.2f} s)")

    def close(self) -> None:
        self.stop.uninstall()
        if self.data_iter is not None and hasattr(self.data_iter, "close"):
            self.data_iter.close()  # stops the DataLoader workers now rather than at garbage collection
        if self.writer is not None:
            self.writer.close()
        if self._run_lock is not None:  # last: nothing of this launch writes into the run directory after
            ckpt.unlock_run_dir(self._run_lock)
            self._run_lock = None


def _check_pipeline_data(slots_behind: float) -> None:
    """Every rank raises the same error when the last pipeline stage's targets left the first stage's
    samples (see `megatron_lcl.data.loader`, labels-only loaders)."""
    if slots_behind != 0:
        raise RuntimeError(
            "the last pipeline stage's labels no longer match the first stage's samples: an image failed "
            "to decode on the first stage (its sample was dropped there, see the corrupt_image warning naming "
            "shard and key); fix or remove that shard, then resume from the last checkpoint with "
            "checkpoint.load_data_state=false")


def _from_rank0(obj):
    objs = [obj]
    dist.broadcast_object_list(objs, src=0)
    return objs[0]


class _Window:
    """The steps since the last log line: loss means over its finite steps, and throughput."""

    MEAN_KEYS = ("loss", "lm_loss", "con_loss", "con_top1")

    def __init__(self):
        self.steps, self.finite_steps, self.time_s, self.tokens, self.images = 0, 0, 0.0, 0, 0
        self.sums = dict.fromkeys(self.MEAN_KEYS, 0.0)

    def add(self, stats: dict, step_time_s: float, tokens: int) -> None:
        self.steps += 1
        self.time_s += step_time_s
        self.tokens += tokens
        self.images += int(stats["images"])
        if not stats["skipped"]:
            self.finite_steps += 1
            for key in self.MEAN_KEYS:
                self.sums[key] += stats[key]

    def means(self) -> dict:
        n = self.finite_steps
        return {k: (v / n if n else float("nan")) for k, v in self.sums.items()}

    def rates(self) -> dict:
        t = max(self.time_s, 1e-9)
        return {"step_time_s": self.time_s / max(self.steps, 1), "tokens_per_s": self.tokens / t,
                "images_per_s": self.images / t}

"""Metrics: the collapse monitor, and the writers (metrics.jsonl, TensorBoard, console line with ETA).

Only one process (global rank 0) writes; `Trainer` gathers the values there first.
"""

import json
import os
import sys
import time
from typing import Optional

import torch
from torch.utils.tensorboard import SummaryWriter

from megatron_lcl.checkpoint.run_dir import METRICS, TENSORBOARD, run_path
from megatron_lcl.losses.contrastive import singular_value_stats  # noqa: F401  (the collapse monitor)


class MetricsWriter:
    """Appends one JSON object per logged step to `metrics.jsonl` and mirrors scalars to TensorBoard.

    On resume from step S, rows after S (written by the interrupted run after its last checkpoint)
    are dropped first, so the file always reads as one consistent history.
    """

    def __init__(self, run_dir: str, start_step: int, tensorboard: bool = True):
        self.path = run_path(run_dir, METRICS)
        _truncate_after(self.path, start_step)
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            self.tb = SummaryWriter(run_path(run_dir, TENSORBOARD), purge_step=start_step + 1)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(_tb_tag(key), value, row["step"])
            self.tb.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _tb_tag(key: str) -> str:
    if key.startswith("skipped/"):
        return "data/" + key
    if key in ("loss", "lm_loss", "con_loss", "con_top1", "effective_rank", "effective_rank_frac", "sv_entropy"):
        return "train/" + key
    return "perf/" + key if key.endswith("_per_s") or key.endswith("_s") else "progress/" + key


def _truncate_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


class ProgressLine:
    """`step 120/1000 | loss 5.21 (lm 5.10 con 1.12) | top1 0.41 | lr 3.0e-04 | ... | ETA 0:12:03`."""

    def __init__(self, total_steps: int, start_step: int, stream=None):
        self.total, self.start = total_steps, start_step
        self.t0 = time.time()
        self.stream = stream or sys.stdout

    def eta_s(self, step: int) -> Optional[float]:
        done = step - self.start
        return None if done <= 0 else (time.time() - self.t0) / done * (self.total - step)

    def show(self, row: dict) -> None:
        eta = self.eta_s(row["step"])
        parts = [f"step {row['step']}/{self.total}",
                 f"loss {row['loss']:.4f} (lm {row['lm_loss']:.4f} con {row['con_loss']:.4f})",
                 f"top1 {row['con_top1']:.2f}"]
        if "effective_rank" in row:
            parts.append(f"erank {row['effective_rank']:.1f}")
        parts += [f"lr {row['lr']:.2e}", f"gnorm {row['grad_norm']:.3f}",
                  f"{row['step_time_s']:.2f} s/step", f"{row['tokens_per_s']:.0f} tok/s"]
        if row.get("skipped_steps"):
            parts.append(f"skipped {row['skipped_steps']}")
        parts.append(f"ETA {_hms(eta)}")
        print(" | ".join(parts), file=self.stream, flush=True)


def _hms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

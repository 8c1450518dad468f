"""The checkpoint format, in one place: run-directory paths, atomic training checkpoints (save/load,
keep-last-K, resharding), weights-only checkpoints, `load_pretrained`, and the metrics.jsonl reader.

- `run_dir.py`     file names of a run directory, `latest`, `resolve_checkpoint`, atomic writes, `read_metrics`
- `state.py`       the training checkpoint (model, optimizer, scheduler, RNG, data-loader states),
                  saved at once or in the background (`CheckpointSaver`)
- `writer.py`      who writes the data files: the rank, or its background writer process
- `pretrained.py`  weights-only save (`save_weights`) and single-process loading (`load_pretrained`)

Imports of megatron-core happen in the functions that need it, so `read_metrics` and the paths are
cheap to import for reports.
"""

from megatron_lcl.lazy import lazy_getattr

_EXPORTS = {
    "CHECKPOINTS": "run_dir", "CONFIG": "run_dir", "LATEST": "run_dir", "LAUNCHES": "run_dir", "META": "run_dir",
    "METRICS": "run_dir", "TENSORBOARD": "run_dir", "checkpoint_name": "run_dir", "checkpoints_dir": "run_dir",
    "read_meta": "run_dir", "read_metrics": "run_dir", "resolve_checkpoint": "run_dir", "run_path": "run_dir",
    "checkpoint_for_flag": "run_dir",
    "save_checkpoint": "state", "CheckpointSaver": "state", "load_checkpoint": "state", "load_newest_loadable": "state",
    "CheckpointError": "run_dir", "LOCK": "run_dir", "RunDirInUse": "run_dir", "lock_run_dir": "run_dir",
    "unlock_run_dir": "run_dir", "run_dir_write_error": "run_dir",
    "LCLPretrained": "pretrained", "load_pretrained": "pretrained", "save_weights": "pretrained",
    "full_state_dict": "pretrained", "ensure_single_process": "pretrained",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)

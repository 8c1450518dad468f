"""What a checkpoint fixes about the run that resumes from it, checked before it is loaded (the saved
config is in its meta.json); a difference is refused with one line naming each field and both values.

- The model: every field of the checkpoint's `model` section must equal the run's, except those that
  leave the weights' meaning alone (`CHANGEABLE_MODEL_FIELDS`: regularisation, the layer
  implementation, initialisation). Shapes do not catch it: `model.lm.num_attention_heads` 4 -> 8 loads
  the same tensors and trains another model.
- The LR schedule, when the optimizer state is loaded (it carries megatron-core's scheduler state,
  which would silently win over the run's settings): `optimizer.lr`, `min_lr`, `warmup_steps`,
  `decay_style`, `weight_decay` and the decay length (`optimizer.decay_steps`, else
  `train.train_steps`). `optimizer.override_scheduler=true` applies the run's values instead, from the
  checkpoint's step on (logged): the way to extend a run (`train.train_steps` 80 -> 160 re-spans the
  decay over 160 steps, so step 81 continues the longer schedule; keeping `optimizer.decay_steps=80`
  instead trains steps 81-160 at `min_lr`).
- The data stream, when the data-loader position is loaded (`checkpoint.load_data_state`): the saved
  position is per logical reader over windows of `data.seq_length`, so `data.num_readers`,
  `data.seq_length`, `data.seed`, `data.shuffle_buffer` and `data.packing` must be the saved ones;
  `checkpoint.load_data_state=false` continues with a fresh data stream instead. (Shards missing from
  `data.path` are the data's fault, not the config's: the load names them, `state._data_state_mismatch`.)

Every refusal is a ConfigError: the driver prints its one line and exits 2.
"""

from typing import Callable, List

from megatron_lcl.config import ConfigError, LCLConfig, section_to_dict

CHANGEABLE_MODEL_FIELDS = {"preset", "drop_path_rate", "attention_dropout", "hidden_dropout",
                           "transformer_impl", "attention", "init_method_std", "logit_scale_init",
                           "logit_scale_max"}
SCHEDULE_FIELDS = ("lr", "min_lr", "warmup_steps", "decay_style", "weight_decay")
DATA_STREAM_FIELDS = ("num_readers", "seq_length", "seed", "shuffle_buffer", "packing")


def model_differences(saved: dict, now: dict, where: str = "model") -> List[str]:
    """["model.lm.num_attention_heads 4 -> 8", ...]: architecture fields that differ (fields the
    checkpoint's config does not have, written by an older version, are not compared)."""
    out = []
    for key, value in now.items():
        if key not in saved or key in CHANGEABLE_MODEL_FIELDS:
            continue
        if isinstance(value, dict) and isinstance(saved[key], dict):
            out += model_differences(saved[key], value, f"{where}.{key}")
        elif saved[key] != value:
            out.append(f"{where}.{key} {saved[key]!r} -> {value!r}")
    return out


def schedule_differences(saved: dict, now: dict) -> List[str]:
    """["optimizer.lr 0.001 -> 0.0005", "train.train_steps 80 -> 160", ...] between two configs (dicts)."""
    s_opt, n_opt = saved.get("optimizer", {}), now["optimizer"]
    out = [f"optimizer.{k} {s_opt[k]!r} -> {n_opt[k]!r}" for k in SCHEDULE_FIELDS if k in s_opt and s_opt[k] != n_opt[k]]
    s_steps, n_steps = saved.get("train", {}).get("train_steps"), now["train"]["train_steps"]
    if "decay_steps" in s_opt and s_steps is not None and \
            (s_opt["decay_steps"] or s_steps) != (n_opt["decay_steps"] or n_steps):
        if s_opt["decay_steps"] != n_opt["decay_steps"]:
            out.append(f"optimizer.decay_steps {s_opt['decay_steps']!r} -> {n_opt['decay_steps']!r}")
        if s_steps != n_steps:
            out.append(f"train.train_steps {s_steps} -> {n_steps}")
    return out


def data_stream_differences(saved: dict, now: dict) -> List[str]:
    """["data.num_readers 8 -> 4", ...]: the fields the saved data-loader position depends on."""
    s_data, n_data = saved.get("data", {}), now["data"]
    return [f"data.{k} {s_data[k]!r} -> {n_data[k]!r}" for k in DATA_STREAM_FIELDS
            if k in s_data and s_data[k] != n_data[k]]


def check_resume(ckpt: str, meta: dict, cfg: LCLConfig, *, schedule_loaded: bool, log: Callable = print) -> None:
    """Raise ConfigError when `cfg` differs from checkpoint `ckpt` (its `meta`) where it must not (the
    model; the LR schedule when `schedule_loaded`; the data stream when its position is loaded);
    log the schedule fields `optimizer.override_scheduler` overrides."""
    saved = meta.get("config")
    if not saved:
        return
    now = section_to_dict(cfg)
    model = model_differences(saved.get("model", {}), now["model"])
    if model:
        raise ConfigError(f"checkpoint {ckpt} holds another model: {', '.join(model)}; a checkpoint resumes "
                          "only with the model it was saved with (train this one in another run_dir)")
    schedule = schedule_differences(saved, now) if schedule_loaded and not meta.get("weights_only") else []
    if schedule and not cfg.optimizer.override_scheduler:
        raise ConfigError(f"checkpoint {ckpt} was saved with another LR schedule: {', '.join(schedule)}; set "
                          f"optimizer.override_scheduler=true to apply the new values from step "
                          f"{meta.get('step', '?')} on, or restore the saved ones")
    data_loaded = cfg.checkpoint.load_data_state and not meta.get("weights_only")
    data = data_stream_differences(saved, now) if data_loaded else []
    if data:
        raise ConfigError(f"checkpoint {ckpt} holds a data-loader position for another data stream: {', '.join(data)}; "
                          "set checkpoint.load_data_state=false to continue with a fresh data stream, or restore "
                          "the saved value(s)")
    if schedule:
        log(f"optimizer.override_scheduler=true: the LR schedule continues from step {meta.get('step', '?')} "
            f"with {', '.join(schedule)}")

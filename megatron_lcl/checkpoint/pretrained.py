"""Weights-only checkpoints, and single-process access to any megatron_lcl checkpoint.

    from megatron_lcl.checkpoint import load_pretrained
    lcl = load_pretrained("runs/demo/checkpoints")            # its `latest`, or one step_* folder
    latents, v = lcl.encode_images(pixel_values)              # [n, M, h_vit], [n, e]
    logits = lcl.lm_logits(tokens)                            # text only: [b, s, vocab]
    logits = lcl.lm_logits(tokens, images, image_sample_index, boi_positions)   # interleaved

The checkpoint is resharded to TP=PP=1 by megatron-core's dist-checkpointing on load.
"""

from dataclasses import replace
from typing import Optional

import torch

from megatron_lcl.checkpoint.run_dir import checkpoint_tokenizer, read_meta, resolve_checkpoint, save_atomically
from megatron_lcl.config import LCLConfig, ParallelConfig, config_from_dict, section_to_dict
from megatron_lcl.runtime.layout import ParallelLayout


class LCLPretrained:
    def __init__(self, model, cfg, checkpoint: Optional[str] = None):
        self.model, self.cfg, self.checkpoint = model.eval(), cfg, checkpoint

    @property
    def tokenizer(self):
        from megatron_lcl.data.tokenizer import LCLTokenizer

        return LCLTokenizer(self.cfg.data.tokenizer) if self.cfg.data.tokenizer else None

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor):
        """`[n, 3, H, W]` normalised images -> (latents `[n, M, h]`, L2-normalised v `[n, e]`)."""
        return self.model.encode_images(pixel_values)

    @torch.no_grad()
    def lm_logits(self, tokens, images=None, image_sample_index=None, boi_positions=None) -> torch.Tensor:
        """Logits `[b, s, vocab_padded]`; with images, their latents fill the positions after each `<BoI>`."""
        b, s = tokens.shape
        position_ids = torch.arange(s).expand(b, s)
        if images is None:
            images = torch.zeros(0, 3, self.cfg.model.vision.image_size, self.cfg.model.vision.image_size)
            image_sample_index = boi_positions = torch.zeros(0, dtype=torch.long)
        out = self.model(tokens, position_ids, images, image_sample_index, boi_positions)
        return out.logits.transpose(0, 1)  # [s, b, v] -> [b, s, v]


def ensure_single_process() -> ParallelLayout:
    """Initialise a one-process TP=PP=1 layout unless megatron-core's groups already exist."""
    from megatron.core import parallel_state as ps

    from megatron_lcl.runtime import initialize_distributed

    if not ps.model_parallel_is_initialized():
        initialize_distributed(ParallelConfig())
    layout = ParallelLayout.current()
    assert layout.tp_size == 1 and layout.pp_size == 1, "load_pretrained runs in a single process (TP=PP=1)"
    return layout


def single_rank_model_config(cfg: LCLConfig, saved_tp: int):
    """The model section to rebuild at TP=1: same padded vocabulary as the checkpoint's."""
    lm = replace(cfg.model.lm, make_vocab_size_divisible_by=cfg.model.lm.make_vocab_size_divisible_by * saved_tp)
    return replace(cfg.model, lm=lm, transformer_impl="local")


def load_pretrained(path: str) -> LCLPretrained:
    """The whole model of a checkpoint (a run dir, a `checkpoints/` root or a `step_*` folder) at TP=PP=1."""
    from megatron.core import dist_checkpointing

    from megatron_lcl.models.factory import build_model

    ensure_single_process()
    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint under {path}")
    meta = read_meta(ckpt)
    cfg = config_from_dict(meta["config"])
    model_cfg = single_rank_model_config(cfg, meta["parallel"]["tensor_model_parallel_size"])
    tokenizer = checkpoint_tokenizer(ckpt, cfg.data.tokenizer) or cfg.data.tokenizer  # the run directory's copy
    cfg = replace(cfg, model=model_cfg, data=replace(cfg.data, tokenizer=tokenizer))
    model = build_model(model_cfg, ParallelConfig(), device=torch.device("cpu"))  # callers place it
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)
    model.load_state_dict(loaded["model"])
    return LCLPretrained(model, cfg, ckpt)


def full_state_dict(model) -> dict:
    """Plain tensors of a TP=PP=1 model (megatron-core's `_extra_state` entries dropped)."""
    return {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def save_weights(model, cfg: LCLConfig, path: str, layout: Optional[ParallelLayout] = None) -> str:
    """Write a weights-only checkpoint at `path` (all ranks call it), atomically: dist-checkpointing
    files + `meta.json` with the config and parallel layout. Loadable by `load_pretrained`, by the
    converters and by training (`checkpoint.load=... checkpoint.load_optimizer=false`)."""
    layout = layout or ParallelLayout.current()
    return save_atomically(path.rstrip("/"), {"model": model.sharded_state_dict()}, {
        "step": 0, "weights_only": True, "parallel": layout.sizes(), "config": section_to_dict(cfg)})

"""Single-process access to a megatron_lcl checkpoint saved at any TP/PP.

    from megatron_lcl.hf.pretrained import load_pretrained
    lcl = load_pretrained("runs/demo/checkpoints")            # its `latest`, or one step_* folder
    latents, v = lcl.encode_images(pixel_values)              # [n, M, h_vit], [n, e]
    logits = lcl.lm_logits(tokens)                            # text only: [b, s, vocab]
    logits = lcl.lm_logits(tokens, images, image_sample_index, boi_positions)   # interleaved

The checkpoint is resharded to TP=PP=1 by megatron-core's dist-checkpointing on load.
"""

from dataclasses import replace
from typing import Optional

import torch


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


def ensure_single_process():
    from megatron.core import parallel_state as ps

    from megatron_lcl.config import ParallelConfig
    from megatron_lcl.runtime import initialize_distributed

    if not ps.model_parallel_is_initialized():
        initialize_distributed(ParallelConfig())
    assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_pipeline_model_parallel_world_size() == 1, \
        "load_pretrained runs in a single process (TP=PP=1)"


def config_from_meta(meta: dict):
    from megatron_lcl.training.config_io import from_dict
    from megatron_lcl.training.config import LCLConfig

    return from_dict(LCLConfig, meta["config"], "")


def single_rank_model_config(cfg, saved_tp: int):
    """The model section to rebuild at TP=1: same padded vocabulary as the checkpoint's."""
    lm = replace(cfg.model.lm, make_vocab_size_divisible_by=cfg.model.lm.make_vocab_size_divisible_by * saved_tp)
    return replace(cfg.model, lm=lm, transformer_impl="local")


def load_pretrained(path: str) -> LCLPretrained:
    from megatron.core import dist_checkpointing

    from megatron_lcl.config import ParallelConfig
    from megatron_lcl.models.lcl_model import LCLModel
    from megatron_lcl.training.checkpointing import read_meta, resolve_checkpoint

    ensure_single_process()
    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint under {path}")
    meta = read_meta(ckpt)
    cfg = config_from_meta(meta)
    model_cfg = single_rank_model_config(cfg, meta["parallel"]["tensor_model_parallel_size"])
    cfg = replace(cfg, model=model_cfg)
    model = LCLModel(model_cfg, ParallelConfig())
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)
    model.load_state_dict(loaded["model"])
    return LCLPretrained(model, cfg, ckpt)


def full_state_dict(model) -> dict:
    """Plain tensors of a TP=PP=1 model (megatron-core's `_extra_state` entries dropped)."""
    return {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def save_model_checkpoint(model, cfg, path: str) -> str:
    """Write a weights-only megatron_lcl checkpoint (all ranks call it): dist-checkpointing files +
    `meta.json` with the config and parallel layout, loadable by `load_pretrained`, by the converters
    and by training (`checkpoint.load=... checkpoint.load_optimizer=false`)."""
    import json
    import os

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_lcl.config import section_to_dict
    from megatron_lcl.training.checkpointing import META, parallel_layout

    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, path)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(path, META), "w") as f:
            json.dump({"step": 0, "weights_only": True, "parallel": parallel_layout(),
                       "config": section_to_dict(cfg)}, f, indent=1)
    dist.barrier()
    return path

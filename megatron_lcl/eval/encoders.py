"""Vision encoders under evaluation, seen one way: normalised images `[n, 3, S, S]` -> latents `[n, M, h]`.

    encoder = load_encoder("runs/tiny/checkpoints")      # a megatron_lcl checkpoint (any TP/PP)
    encoder = load_encoder("hf_out/vision")               # a HuggingFace CLIPVisionModel folder
    encoder = load_encoder("hf_out")                      # ... or our HF export (its vision/ folder)
    latents = encoder(pixel_values)                       # [n, M, h]; M = 1 + patches (class token first)

Both kinds give the latents the LCL language model's image tokens were made from: every token after the
ViT's post-LayerNorm (for CLIP: `post_layernorm(last_hidden_state)`, see `megatron_lcl.hf.convert`). A
model trained with `model.vision.image_tokens=pooled_values` (the released LCL code's tokens) used the
patch tokens only, so its encoder drops the class token (M = patches; `encoder.image_tokens` says which):
read from the checkpoint's config, or from `lcl_heads.safetensors` beside an export's `vision/`.
Pixel values are normalised with CLIP's mean/std (`megatron_lcl.data.preprocess_image`).
"""

import contextlib
import hashlib
import json
import os
from typing import Callable, Iterator, Optional, Tuple

import torch


class VisionEncoder(torch.nn.Module):
    """A pre-trained ViT `module` plus the function that turns images into its latents."""

    def __init__(self, module: torch.nn.Module, latents_fn: Callable, hidden_size: int, image_size: int,
                 source: str, kind: str, image_tokens: str = "latents"):
        super().__init__()
        self.module = module
        self._latents_fn = latents_fn
        self.hidden_size, self.image_size, self.source, self.kind = hidden_size, image_size, source, kind
        self.image_tokens = image_tokens  # the model's model.vision.image_tokens (pooled_values: no class token)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[n, 3, S, S]` -> latents `[n, M, h]`."""
        return self._latents_fn(self.module, pixel_values)

    def __repr__(self) -> str:
        return f"VisionEncoder({self.kind}: {self.source}, width {self.hidden_size}, {self.image_size} px)"


def _lcl_latents(vit, pixel_values):
    return vit(pixel_values)  # VisionTransformer: [n, M, h], post-LN on every token


def _clip_latents(clip, pixel_values):
    from megatron_lcl.hf.convert import clip_latents

    return clip_latents(clip, pixel_values)


def _lcl_patch_latents(vit, pixel_values):
    return vit(pixel_values)[:, 1:]  # image_tokens=pooled_values: the patch tokens `[n, P, h]`


def _clip_patch_latents(clip, pixel_values):
    return _clip_latents(clip, pixel_values)[:, 1:]


def export_image_tokens(vision_dir: str) -> str:
    """`image_tokens` of the export a `vision/` folder belongs to (latents when it is no export of ours)."""
    from megatron_lcl.hf.convert import read_heads_config

    heads = os.path.join(os.path.dirname(os.path.abspath(vision_dir)), "lcl_heads.safetensors")
    return read_heads_config(heads)["image_tokens"] if os.path.isfile(heads) else "latents"


def is_hf_vision_dir(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return json.load(f).get("model_type") in ("clip_vision_model", "clip")


def locate_encoder(path: str) -> Tuple[str, str]:
    """-> (kind, path) of an `--encoder` argument: ("hf_clip", the HF CLIPVisionModel folder, an export's
    `vision/` included) or ("megatron_lcl", the checkpoint path); an InputError names what is wrong."""
    from megatron_lcl.checkpoint import checkpoint_for_flag
    from megatron_lcl.eval.errors import InputError

    if not os.path.exists(path):
        raise InputError(f"--encoder {path}: no such file or directory")
    if os.path.isdir(os.path.join(path, "vision")) and is_hf_vision_dir(os.path.join(path, "vision")):
        path = os.path.join(path, "vision")
    if is_hf_vision_dir(path):
        return "hf_clip", path
    try:
        checkpoint_for_flag("--encoder", path, none="neither a megatron_lcl checkpoint (a run's checkpoints/ or a "
                            "step_* folder) nor a HF CLIPVisionModel folder (config.json with model_type "
                            "clip_vision_model)")
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    return "megatron_lcl", path


def load_encoder(path: str) -> VisionEncoder:
    """A megatron_lcl checkpoint (`checkpoints/` root or a `step_*` folder), a HF `CLIPVisionModel`
    folder, or a folder written by `tools/checkpoint/convert_to_hf.py` (its `vision/` is used)."""
    kind, path = locate_encoder(path)
    return load_hf_clip(path) if kind == "hf_clip" else load_lcl_checkpoint(path)


def load_hf_clip(path: str) -> VisionEncoder:
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel.from_pretrained(path).eval()
    c = clip.config
    image_tokens = export_image_tokens(path)
    latents_fn = _clip_patch_latents if image_tokens == "pooled_values" else _clip_latents
    return VisionEncoder(clip, latents_fn, c.hidden_size, c.image_size, path, "hf_clip", image_tokens)


def load_lcl_checkpoint(path: str) -> VisionEncoder:
    from megatron_lcl.checkpoint import load_pretrained

    lcl = load_pretrained(path)
    vision = lcl.cfg.model.vision
    latents_fn = _lcl_patch_latents if vision.image_tokens == "pooled_values" else _lcl_latents
    return VisionEncoder(lcl.model.vision, latents_fn, vision.hidden_size, vision.image_size,
                         lcl.checkpoint, "megatron_lcl", vision.image_tokens)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer's name, dtype, shape and raw bytes: equal digests mean
    bitwise-equal weights (used to prove that `frozen` transfer never touches the encoder)."""
    digest = hashlib.sha256()
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def freeze(encoder: VisionEncoder) -> VisionEncoder:
    """Eval mode (no drop-path/dropout) and no gradients: the `frozen` transfer setting."""
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


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


def random_init_checkpoint(config_path: str, out: str, overrides=(), seed: int = None) -> str:
    """Write a weights-only checkpoint of the model a config describes, at its random initialisation
    (the `random init` row of the loss ablation). Runs in this process (TP=PP=1)."""
    from megatron_lcl.checkpoint import save_weights
    from megatron_lcl.config import ParallelConfig, load_config
    from megatron_lcl.models.factory import build_model
    from megatron_lcl.runtime import initialize_distributed, set_seed

    cfg = load_config(config_path, list(overrides))
    initialize_distributed(ParallelConfig(), cfg.train.seed if seed is None else seed)
    set_seed(cfg.train.seed if seed is None else seed)
    model = build_model(cfg.model, ParallelConfig(), cfg.precision)
    return save_weights(model, cfg, out)

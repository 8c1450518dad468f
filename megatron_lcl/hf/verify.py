"""Load a megatron_lcl checkpoint and its HuggingFace export side by side and print how close they are.

    lcl-verify-hf --load runs/demo/checkpoints --hf runs/demo/hf
    (or python tools/checkpoint/verify_hf.py ..., python -m megatron_lcl.hf.verify ...)

Bounds: vision latents max abs diff <= 1e-4 (fp32), text-only and interleaved logits KL <= 1e-6,
tokenizer ids equal. Exits 1 when a figure is out of bounds. The interleaved input is built on the HF
side from `lcl_heads.safetensors` as its model card says (`convert.image_token_module`: the projector, or
the pooling block's value path for `model.vision.image_tokens=pooled_values`).
"""

import argparse
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPVisionModel, OPTForCausalLM

from megatron_lcl.checkpoint import load_pretrained
from megatron_lcl.checkpoint.run_dir import checkpoint_for_flag
from megatron_lcl.data.tokenizer import LCLTokenizer
from megatron_lcl.hf.convert import clip_latents, image_token_module, read_heads_config
from megatron_lcl.testing import random_batch

BOUNDS = {"vision_max_abs_diff": 1e-4, "text_logits_kl": 1e-6, "interleaved_logits_kl": 1e-6}


def max_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """max over positions of KL(softmax(p) || softmax(q)), in float64."""
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).max().item()


@torch.no_grad()
def compare(lcl, clip, opt, tokens, images, image_sample_index, boi_positions, projector) -> dict:
    """Vision latents, text-only logits and interleaved logits (HF CLIP -> `projector` -> OPT embeds).
    `projector`: latents `[n, 1 + P, h_v]` -> image tokens `[n, M, h]` (`load_hf`'s third value)."""
    m = lcl.cfg.model.vision.num_image_tokens
    ours_latents, _ = lcl.encode_images(images)
    hf_latents = clip_latents(clip, images)
    text = {"ours": lcl.lm_logits(tokens), "hf": opt(input_ids=tokens).logits}
    embeds = opt.get_input_embeddings()(tokens).clone()
    image_embeds = projector(hf_latents)
    for j, (b, boi) in enumerate(zip(image_sample_index.tolist(), boi_positions.tolist())):
        embeds[b, boi + 1: boi + 1 + m] = image_embeds[j]
    interleaved = {"ours": lcl.lm_logits(tokens, images, image_sample_index, boi_positions),
                   "hf": opt(inputs_embeds=embeds).logits}
    return {"vision_max_abs_diff": (ours_latents - hf_latents).abs().max().item(),
            "text_logits_kl": max_kl(text["ours"], text["hf"]),
            "interleaved_logits_kl": max_kl(interleaved["ours"], interleaved["hf"])}


def compare_tokenizers(sp_model_path: str, hf_dir: str, texts) -> dict:
    ours, hf = LCLTokenizer(sp_model_path), AutoTokenizer.from_pretrained(hf_dir)
    same = all(hf(t, add_special_tokens=False)["input_ids"] == ours.encode(t) for t in texts)
    specials = hf.convert_tokens_to_ids(["<BoI>", "<EoI>", "<img>"]) == [ours.boi_id, ours.eoi_id, ours.image_id]
    return {"tokenizer_ids_equal": bool(same and specials)}


def within_bounds(figures: dict) -> bool:
    ok = all(figures[k] <= bound for k, bound in BOUNDS.items() if k in figures)
    return ok and figures.get("tokenizer_ids_equal", True)


def load_hf(out_dir: str):
    """-> (CLIPVisionModel, OPTForCausalLM, the image-token module of `lcl_heads.safetensors`)."""
    clip = CLIPVisionModel.from_pretrained(os.path.join(out_dir, "vision")).eval()
    opt = OPTForCausalLM.from_pretrained(os.path.join(out_dir, "lm")).eval()
    path = os.path.join(out_dir, "lcl_heads.safetensors")
    config = read_heads_config(path)
    eps = config.get("vision_layernorm_epsilon", clip.config.layer_norm_eps)
    return clip, opt, image_token_module(load_file(path), config["image_tokens"], eps)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:  # bad paths: one line and status 2, before anything loads
        checkpoint_for_flag("--load", args.load)
    except FileNotFoundError as e:
        parser.exit(2, f"error: {e}\n")
    absent = [name for name in ("vision", "lm", "lcl_heads.safetensors")
              if not os.path.exists(os.path.join(args.hf, name))]
    if absent:
        parser.exit(2, f"error: --hf {args.hf}: not a megatron_lcl HuggingFace export (no {', '.join(absent)})\n")
    lcl = load_pretrained(args.load)
    clip, opt, projector = load_hf(args.hf)
    v, lm = lcl.cfg.model.vision, lcl.cfg.model.lm
    seq = min(lm.max_position_embeddings, 3 * (v.num_image_tokens + 2) + 16)
    vocab = min(lm.vocab_size, opt.config.vocab_size)
    batch = random_batch([[2], [5, 5 + v.num_image_tokens + 4]], seq, v.num_image_tokens, v.image_size,
                         vocab, seed=args.seed)
    figures = compare(lcl, clip, opt, batch.tokens, batch.images, batch.image_sample_index,
                      batch.boi_positions, projector)
    tok_dir, sp_model = os.path.join(args.hf, "tokenizer"), lcl.cfg.data.tokenizer  # the run directory's copy
    if sp_model and os.path.isdir(tok_dir):
        if not os.path.isfile(sp_model):
            print(f"error: the tokenizer of {lcl.checkpoint}, {sp_model}, is not there and its run directory "
                  "keeps none: tokenizer/ cannot be compared", file=sys.stderr)
            sys.exit(2)
        figures.update(compare_tokenizers(sp_model, tok_dir,
                                          ["a red circle on a striped background", " Hello, World 123!"]))
    for k, value in figures.items():
        bound = BOUNDS.get(k)
        print(f"{k:<24} {value!s:<24} {'<= ' + str(bound) if bound else ''}")
    ok = within_bounds(figures)
    print("OK" if ok else "OUT OF BOUNDS")
    if not ok:
        sys.exit(1)
    return figures


if __name__ == "__main__":
    main()

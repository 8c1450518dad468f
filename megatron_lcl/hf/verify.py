"""Compare a megatron_lcl checkpoint with its HuggingFace export: the numbers `verify_hf.py` prints."""

import os

import torch

from megatron_lcl.hf.convert import clip_latents

BOUNDS = {"vision_max_abs_diff": 1e-4, "text_logits_kl": 1e-6, "interleaved_logits_kl": 1e-6}


def max_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """max over positions of KL(softmax(p) || softmax(q)), in float64."""
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).max().item()


@torch.no_grad()
def compare(lcl, clip, opt, tokens, images, image_sample_index, boi_positions, projector) -> dict:
    """Vision latents, text-only logits and interleaved logits (HF CLIP -> projector -> OPT embeds)."""
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
    from transformers import AutoTokenizer

    from megatron_lcl.data.tokenizer import LCLTokenizer

    ours, hf = LCLTokenizer(sp_model_path), AutoTokenizer.from_pretrained(hf_dir)
    same = all(hf(t, add_special_tokens=False)["input_ids"] == ours.encode(t) for t in texts)
    specials = hf.convert_tokens_to_ids(["<BoI>", "<EoI>", "<img>"]) == [ours.boi_id, ours.eoi_id, ours.image_id]
    return {"tokenizer_ids_equal": bool(same and specials)}


def within_bounds(figures: dict) -> bool:
    ok = all(figures[k] <= bound for k, bound in BOUNDS.items() if k in figures)
    return ok and figures.get("tokenizer_ids_equal", True)


def load_hf(out_dir: str):
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel, OPTForCausalLM

    clip = CLIPVisionModel.from_pretrained(os.path.join(out_dir, "vision")).eval()
    opt = OPTForCausalLM.from_pretrained(os.path.join(out_dir, "lm")).eval()
    heads = load_file(os.path.join(out_dir, "lcl_heads.safetensors"))
    projector = torch.nn.Linear(*heads["projector.weight"].shape[::-1])
    projector.load_state_dict({"weight": heads["projector.weight"], "bias": heads["projector.bias"]})
    return clip, opt, projector

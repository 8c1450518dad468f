"""megatron_lcl checkpoint (any TP/PP) -> HuggingFace folder (vision tower, LM, tokenizer, LCL heads + card).

    lcl-convert-to-hf --load runs/demo/checkpoints --save runs/demo/hf
    (or python tools/checkpoint/convert_to_hf.py ..., python -m megatron_lcl.hf.export ...)

Writes OUT/vision (CLIPVisionModel), OUT/lm (OPTForCausalLM with its tokenizer: a complete
AutoModelForCausalLM + AutoTokenizer folder), OUT/tokenizer (the tokenizer alone),
OUT/lcl_heads.safetensors and OUT/README.md (what each file is and how to use it).
"""

import argparse
import json
import os
import sys

from safetensors.torch import save_file

from megatron_lcl.checkpoint import resolve_checkpoint
from megatron_lcl.hf.convert import build_hf_models, lcl_heads_state
from megatron_lcl.checkpoint.pretrained import full_state_dict, load_pretrained
from megatron_lcl.hf.tokenizer import to_hf_tokenizer

MODEL_CARD = """# LCL pre-trained vision encoder (megatron_lcl export)

Trained with Latent Compression Learning (Yang et al., NeurIPS 2024) by megatron_lcl.
Source checkpoint: `{checkpoint}`

| folder / file | what | load with |
| --- | --- | --- |
| `vision/` | the ViT | `transformers.CLIPVisionModel.from_pretrained(".../vision")` |
| `lm/` | the causal LM (OPT architecture) with its tokenizer | `transformers.AutoModelForCausalLM.from_pretrained(".../lm")`, `AutoTokenizer.from_pretrained(".../lm")` |
| `tokenizer/` | the same sentencepiece tokenizer with `<BoI>`, `<EoI>`, `<img>` | `transformers.AutoTokenizer.from_pretrained(".../tokenizer")` |
| `lcl_heads.safetensors` | LCL heads (below) | `safetensors.torch.load_file` |

The image latents the LM was trained on are `post_layernorm(last_hidden_state)` of the vision model
(every token, class token first): `megatron_lcl.hf.convert.clip_latents(model, pixel_values)`.
Layer-scale has been folded into `out_proj` and `fc2`. Images are normalised with CLIP's mean/std
at {image_size} px.

`lcl_heads.safetensors` holds:
- `projector.weight/bias`: latents (width {vit_width}) -> LM width ({lm_width}); an interleaved input
  puts `<BoI>`, then the {num_image_tokens} projected latents, then `<EoI>` into `inputs_embeds`.
- `image_head.pool.*`: attention pooling (one learnable query, {pool_heads} heads) over the latents;
  `image_head.proj.weight` (W1) -> v, L2-normalised, dimension {embed_dim}.
- `text_head.norm.*` (LayerNorm) and `text_head.proj.weight` (W2) applied to the LM's last hidden state
  at a `<BoI>` -> t, L2-normalised; `text_head.logit_scale`: log of the contrastive temperature.
"""


def export_to_hf(checkpoint: str, out_dir: str, log=print) -> dict:
    """Write `out_dir/{vision,lm,tokenizer}`, `lcl_heads.safetensors` and `README.md`. `lm/` is a
    complete HF model folder: the tokenizer is saved there too (as `from_pretrained` users expect) and
    the OPT config carries its pad / bos / eos ids."""
    lcl = load_pretrained(checkpoint)
    cfg = lcl.cfg.model
    state = full_state_dict(lcl.model)
    vocab = state["lm.embedding.word_embeddings.weight"].shape[0]
    tokenizer = to_hf_tokenizer(lcl.cfg.data.tokenizer) if lcl.cfg.data.tokenizer else None
    special_ids = None if tokenizer is None else {
        "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id}
    log(f"loaded {lcl.checkpoint}; building transformers models (vocab {vocab})")
    clip, opt = build_hf_models(state, cfg.vision, cfg.lm, vocab, special_ids)
    paths = {"vision": os.path.join(out_dir, "vision"), "lm": os.path.join(out_dir, "lm"),
             "heads": os.path.join(out_dir, "lcl_heads.safetensors")}
    clip.save_pretrained(paths["vision"])
    opt.save_pretrained(paths["lm"])
    save_file({k: v.contiguous() for k, v in lcl_heads_state(state).items()}, paths["heads"],
              metadata={"config": json.dumps({"heads": vars(cfg.heads), "num_image_tokens": cfg.vision.num_image_tokens})})
    if tokenizer is not None:
        paths["tokenizer"] = os.path.join(out_dir, "tokenizer")
        tokenizer.save_pretrained(paths["tokenizer"])
        tokenizer.save_pretrained(paths["lm"])
    else:
        log("no data.tokenizer in the checkpoint's config: tokenizer/ not written (lm/ has no tokenizer)")
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(MODEL_CARD.format(checkpoint=lcl.checkpoint, image_size=cfg.vision.image_size,
                                  vit_width=cfg.vision.hidden_size, lm_width=cfg.lm.hidden_size,
                                  num_image_tokens=cfg.vision.num_image_tokens,
                                  pool_heads=cfg.heads.pool_num_heads, embed_dim=cfg.heads.embed_dim))
    for name, path in paths.items():
        log(f"  {name:<10} {path}")
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoints/ folder (uses `latest`) or one step_* folder")
    parser.add_argument("--save", required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        found = resolve_checkpoint(args.load)
    except FileNotFoundError as e:  # `latest` names an incomplete checkpoint and there is no other
        found, why = None, str(e)
    else:
        why = "no complete checkpoint there (a run directory, its checkpoints/ or one step_* folder)"
    if found is None:
        print(f"error: --load {args.load}: {why}", file=sys.stderr)
        return 2
    export_to_hf(found, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())

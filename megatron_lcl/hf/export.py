"""megatron_lcl checkpoint (any TP/PP) -> HuggingFace folder (vision tower, LM, tokenizer, LCL heads + card).

    lcl-convert-to-hf --load runs/demo/checkpoints --save runs/demo/hf
    (or python tools/checkpoint/convert_to_hf.py ..., python -m megatron_lcl.hf.export ...)

Writes OUT/vision (CLIPVisionModel), OUT/lm (OPTForCausalLM with its tokenizer: a complete
AutoModelForCausalLM + AutoTokenizer folder), OUT/tokenizer (the tokenizer alone),
OUT/lcl_heads.safetensors and OUT/README.md (what each file is and how to use it).

OUT is written whole into a hidden sibling and renamed into place when complete (`hf.publish`): a
failed or killed export leaves no OUT, and an existing export untouched. An existing OUT is refused
unless `--overwrite` (which replaces it atomically where the file system allows). The tokenizer is the
one the run was trained with, kept in its run directory (`RUN_DIR/tokenizer.model`), so the export
runs from any folder, also after the data folder moved. Exit status: 0, or 2 after one line (no
checkpoint, an existing OUT, a missing tokenizer).
"""

import argparse
import json
import os
import sys
from typing import Optional

from safetensors.torch import save_file

from megatron_lcl.checkpoint.pretrained import full_state_dict, load_pretrained
from megatron_lcl.checkpoint.run_dir import (TOKENIZER, checkpoint_for_flag, checkpoint_tokenizer, read_meta,
                                             resolve_checkpoint)
from megatron_lcl.hf.convert import build_hf_models, lcl_heads_state
from megatron_lcl.hf.publish import MARKER, ExportError, check_target, staged_folder
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

`lcl_heads.safetensors` holds (image tokens: `{image_tokens}`; its metadata `config` says so):
{image_head_lines}
- `text_head.norm.*` (LayerNorm) and `text_head.proj.weight` (W2) applied to the LM's last hidden state
  at a `<BoI>` -> t, L2-normalised; `text_head.logit_scale`: log of the contrastive temperature;
  `text_head.logit_bias` (only with `loss.contrastive_loss=sigmoid`): the sigmoid loss's logit bias b.
"""

IMAGE_HEAD_LINES = {
    "latents": """- `projector.weight/bias`: latents (width {vit_width}) -> LM width ({lm_width}); an interleaved input
  puts `<BoI>`, then the {num_image_tokens} projected latents, then `<EoI>` into `inputs_embeds`.
- `image_head.pool.*`: attention pooling (one learnable query, {pool_heads} heads) over the latents;
  `image_head.proj.weight` (W1) -> v, L2-normalised, dimension {embed_dim}.""",
    "pooled_values": """- `image_head.*`: the released LCL code's pooling block over the patch latents (class token dropped):
  `query`, LayerNorms `norm_q/k/v`, `q/k/v` (width {vit_width} -> {lm_width}, {pool_heads} heads), `proj`
  (no bias). The image tokens are `proj(v(norm_v(patches)))`: an interleaved input puts `<BoI>`, those
  {num_image_tokens} tokens, then `<EoI>` into `inputs_embeds`; v is the pooled output, L2-normalised.""",
}


def export_to_hf(checkpoint: str, out_dir: str, log=print, *, overwrite: bool = False,
                 tokenizer: Optional[str] = None) -> dict:
    """Write `out_dir/{vision,lm,tokenizer}`, `lcl_heads.safetensors` and `README.md`. `lm/` is a
    complete HF model folder: the tokenizer is saved there too (as `from_pretrained` users expect) and
    the OPT config carries its pad / bos / eos ids.

    The folder is written whole into a temporary sibling and renamed into place (`hf.publish`): an
    export that fails or is killed leaves no `out_dir` (or the older one untouched). An existing export
    is replaced only with `overwrite`. The tokenizer is `tokenizer` or the one the checkpoint was
    trained with, read from its run directory (`checkpoint_tokenizer`). Raises ExportError (one line)
    for a target that may not be written or a missing checkpoint or tokenizer."""
    check_target(out_dir, overwrite)  # before the seconds-long load
    ckpt = resolve_checkpoint(checkpoint)
    if ckpt is None:
        raise ExportError(f"--load {checkpoint}: no complete checkpoint there")
    sp_model = tokenizer_for(ckpt, tokenizer)
    lcl = load_pretrained(ckpt)
    state = full_state_dict(lcl.model)
    vocab = state["lm.embedding.word_embeddings.weight"].shape[0]
    log(f"loaded {lcl.checkpoint}; building transformers models (vocab {vocab})")
    hf_tokenizer = to_hf_tokenizer(sp_model) if sp_model else None
    if hf_tokenizer is None:
        log("no data.tokenizer in the checkpoint's config: tokenizer/ not written (lm/ has no tokenizer)")
    elif len(hf_tokenizer) > lcl.cfg.model.lm.vocab_size:
        raise ExportError(f"tokenizer {sp_model} has {len(hf_tokenizer)} tokens, more than the model's vocabulary "
                          f"(model.lm.vocab_size {lcl.cfg.model.lm.vocab_size}): not the run's tokenizer")
    with staged_folder(out_dir, overwrite) as tmp:
        names = write_export(tmp, lcl, state, vocab, hf_tokenizer)
    paths = {name: os.path.join(out_dir, rel) for name, rel in names.items()}
    for name, path in paths.items():
        log(f"  {name:<10} {path}")
    return paths


def tokenizer_for(ckpt: str, given: Optional[str]) -> Optional[str]:
    """The sentencepiece model to export: `given` (--tokenizer), else the one checkpoint `ckpt` was
    trained with (its run directory's copy, or the recorded path); None when its config names none."""
    if given:
        if not os.path.isfile(given):
            raise ExportError(f"--tokenizer {given}: no such file")
        return given
    recorded = read_meta(ckpt).get("config", {}).get("data", {}).get("tokenizer")
    found = checkpoint_tokenizer(ckpt, recorded)
    if recorded and found is None:
        raise ExportError(f"checkpoint {ckpt} was trained with data.tokenizer {recorded}, which is not there (from "
                          f"{os.getcwd()}), and its run directory keeps no {TOKENIZER}; give --tokenizer PATH "
                          "(the sentencepiece .model the run was trained with)")
    return found


def write_export(folder: str, lcl, state: dict, vocab: int, tokenizer) -> dict:
    """Every file of the export into `folder`; returns {what: path relative to it}."""
    cfg = lcl.cfg.model
    special_ids = None if tokenizer is None else {
        "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id}
    clip, opt = build_hf_models(state, cfg.vision, cfg.lm, vocab, special_ids)
    names = {"vision": "vision", "lm": "lm", "heads": MARKER}
    clip.save_pretrained(os.path.join(folder, "vision"))
    opt.save_pretrained(os.path.join(folder, "lm"))
    heads_config = {"heads": vars(cfg.heads), "num_image_tokens": cfg.vision.num_image_tokens,
                    "image_tokens": cfg.vision.image_tokens,
                    "vision_layernorm_epsilon": cfg.vision.layernorm_epsilon}
    save_file({k: v.contiguous() for k, v in lcl_heads_state(state).items()}, os.path.join(folder, MARKER),
              metadata={"config": json.dumps(heads_config)})
    if tokenizer is not None:
        names["tokenizer"] = "tokenizer"
        tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
        tokenizer.save_pretrained(os.path.join(folder, "lm"))
    with open(os.path.join(folder, "README.md"), "w") as f:
        sizes = dict(vit_width=cfg.vision.hidden_size, lm_width=cfg.lm.hidden_size, embed_dim=cfg.heads.embed_dim,
                     num_image_tokens=cfg.vision.num_image_tokens, pool_heads=cfg.heads.pool_num_heads)
        f.write(MODEL_CARD.format(checkpoint=lcl.checkpoint, image_size=cfg.vision.image_size,
                                  image_tokens=cfg.vision.image_tokens,
                                  image_head_lines=IMAGE_HEAD_LINES[cfg.vision.image_tokens].format(**sizes)))
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoints/ folder (uses `latest`) or one step_* folder")
    parser.add_argument("--save", required=True, help="output folder (written whole, then renamed into place)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export at --save")
    parser.add_argument("--tokenizer", help="sentencepiece .model to export (default: the one the run was "
                                            "trained with, kept in its run directory)")
    args = parser.parse_args(argv)
    try:
        found = checkpoint_for_flag("--load", args.load)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        export_to_hf(found, args.save, overwrite=args.overwrite, tokenizer=args.tokenizer)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

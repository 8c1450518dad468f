"""Initialise a megatron_lcl checkpoint from HuggingFace weights on disk (continue from existing models).

    lcl-convert-from-hf --config examples/configs/vit_b16_opt125m_mmc4.yaml \\
        --vision path/to/clip-vit-b16 --lm path/to/opt-125m --save runs/init/checkpoint
    (or python tools/checkpoint/convert_from_hf.py ..., python -m megatron_lcl.hf.from_hf ...)

`--vision`: a `CLIPVisionModel` folder (the vision tower of a CLIP checkpoint works too); `--lm`: an
`OPTForCausalLM` folder. The model sizes in the config must match them (the tool says which field does
not), and every config field that changes the function must agree or be supported: a CLIP with
`hidden_act: quick_gelu` (all openai/clip-vit-* releases) needs `model.vision.activation=quick_gelu`;
post-LN OPT layers, `word_embed_proj_dim != hidden_size`, other activations are refused, naming the
field. The LCL heads and projector (or, with `model.vision.image_tokens=pooled_values`, the pooling block
that makes the image tokens) keep their fresh initialisation, layer-scale starts at 1. Either
side may be omitted (that part stays randomly initialised). The result is a megatron-core
dist-checkpoint: training loads it at any TP/PP (`checkpoint.load=<folder> checkpoint.load_optimizer=false`).
It is written whole, then renamed into place; an existing checkpoint at `--save` is replaced only with
`--overwrite`. Exit status: 0, or 2 after one line (a config or HF model that does not match, an existing
`--save`).
"""

import argparse
import os
import sys
from dataclasses import replace

import torch
from transformers import CLIPVisionModel, OPTForCausalLM

from megatron_lcl.checkpoint import ensure_single_process, save_weights
from megatron_lcl.checkpoint.run_dir import META, absolute_paths
from megatron_lcl.config import ConfigError, ParallelConfig, load_config
from megatron_lcl.hf.convert import lm_from_hf, lm_import_errors, vision_from_hf, vision_import_errors
from megatron_lcl.hf.publish import ExportError
from megatron_lcl.models.lcl_model import LCLModel
from megatron_lcl.runtime import set_seed


def check_hf_configs(cfg, vision_hf=None, lm_hf=None) -> None:
    """Refuse HF models whose sizes or function (activation, LayerNorm eps and placement, embedding
    projection, ...) differ from the config, naming each field (`megatron_lcl.hf.convert`)."""
    wrong = []
    if vision_hf is not None:
        wrong += vision_import_errors(cfg.model.vision, vision_hf.config)
    if lm_hf is not None:
        wrong += lm_import_errors(cfg.model.lm, lm_hf.config)
    if wrong:
        raise ConfigError("config does not match the HF weights: " + "; ".join(wrong))


def convert(cfg, vision_dir, lm_dir, save_dir, log=print, overwrite: bool = False) -> str:
    """The checkpoint at `save_dir`, written atomically (`save_weights`: into `NAME.tmp/`, renamed when
    complete); an existing checkpoint there is replaced only with `overwrite` (ExportError otherwise).
    Its config records `data.tokenizer` and `data.path` as absolute paths."""
    check_save_dir(save_dir, overwrite)
    ensure_single_process()
    vision_hf = CLIPVisionModel.from_pretrained(vision_dir) if vision_dir else None
    lm_hf = OPTForCausalLM.from_pretrained(lm_dir) if lm_dir else None
    check_hf_configs(cfg, vision_hf, lm_hf)
    set_seed(cfg.train.seed)
    model = LCLModel(cfg.model, ParallelConfig())
    state = {}
    if vision_hf is not None:
        state.update(vision_from_hf(vision_hf.state_dict(), cfg.model.vision))
    if lm_hf is not None:
        lm_state = lm_from_hf(lm_hf.state_dict(), cfg.model.lm)
        embed = lm_state["lm.embedding.word_embeddings.weight"]
        ours = model.lm.embedding.word_embeddings.weight
        assert embed.shape[0] <= ours.shape[0], (
            f"the HF vocabulary ({embed.shape[0]}) is larger than model.lm.vocab_size padded ({ours.shape[0]})")
        padded = ours.detach().clone()
        padded[: embed.shape[0]] = embed  # rows past the HF vocabulary keep their init (never used)
        lm_state["lm.embedding.word_embeddings.weight"] = padded
        state.update(lm_state)
    missing = [k for k in state if k not in dict(model.named_parameters())]
    assert not missing, f"unknown parameters: {missing[:5]}"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in state:
                p.copy_(state[name])
    log(f"initialised {len(state)} tensors from HF ({'vision ' if vision_hf else ''}{'lm' if lm_hf else ''})")
    tokenizer = os.path.abspath(cfg.data.tokenizer) if cfg.data.tokenizer else None
    cfg = replace(cfg, data=replace(cfg.data, tokenizer=tokenizer, path=absolute_paths(cfg.data.path)))
    return save_weights(model, cfg, save_dir)


def check_save_dir(save_dir: str, overwrite: bool) -> None:
    """Refuse (ExportError) a `--save` folder that holds anything, unless `overwrite` and it is a
    checkpoint (save_weights itself never replaces another kind of folder)."""
    if not os.path.isdir(save_dir) or not os.listdir(save_dir):
        return
    if not os.path.exists(os.path.join(save_dir, META)):
        raise ExportError(f"--save {save_dir} exists and is not a megatron_lcl checkpoint; refusing to replace it")
    if not overwrite:
        raise ExportError(f"--save {save_dir} already holds a checkpoint; --overwrite replaces it, or choose "
                          "another folder")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML (model sizes must match the HF models)")
    parser.add_argument("--vision", help="CLIPVisionModel folder")
    parser.add_argument("--lm", help="OPTForCausalLM folder")
    parser.add_argument("--save", required=True, help="output checkpoint folder (written whole, then renamed)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --save")
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=c")
    args = parser.parse_intermixed_args(argv)  # overrides before, between or after the options
    if not (args.vision or args.lm):
        parser.error("give --vision and/or --lm")
    for flag, path in (("--vision", args.vision), ("--lm", args.lm)):
        if path and not os.path.isfile(os.path.join(path, "config.json")):  # else transformers takes it for a hub id
            parser.exit(2, f"error: {flag} {path}: not a HuggingFace model folder (no config.json)\n")
    try:
        cfg = load_config(args.config, args.overrides)
        path = convert(cfg, args.vision, args.lm, args.save, overwrite=args.overwrite)
    except (ConfigError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

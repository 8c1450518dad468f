"""The dialogue transfer's model -> a HuggingFace `LlavaForConditionalGeneration` folder with its
processor (CLIP image processor, the LM's tokenizer with `<image>`, the chat template the model was
tuned with), which stock `transformers` loads (`LlavaForConditionalGeneration.from_pretrained`,
`AutoProcessor.from_pretrained`) and so do the community's evaluators (lmms-eval's `llava_hf` model,
VLMEvalKit's LLaVA-HF wrapper).

The weights move as they are, each module into its HF place, beside the existing exports
(`hf/export.py` writes the LCL model's vision tower and LM; `hf/convert.py` is the one weight map of
our ViT to `CLIPVisionModel`, which the dialogue transfer already trains in):

    vision tower (CLIPVisionModel)       -> model.vision_tower.*
    projector linear_1 / linear_2        -> model.multi_modal_projector.linear_1 / linear_2
    LM body (e.g. OPTModel, LlamaModel)  -> model.language_model.*
    LM output layer                      -> lm_head.weight

The text config is written with `tie_word_embeddings=False` and `lm_head` stored on its own:
transformers 5.x's Llava ties `lm_head` to `model.language_model.embed_tokens`, a name OPT does not
have (its embeddings are under `decoder.`), so a tied OPT text config crashes at construction;
untied, every LM works and the weights are the same values.

The folder is written whole and renamed into place as the main export is (`hf/publish.staged_folder`):
an export killed or failing part-way leaves no folder under the target's name and an older export
there untouched; an existing export is replaced only with `overwrite`, and a folder that is not a
LLaVA export of ours (no `MARKER` file) never.
"""

import copy
import json
import os

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from megatron_lcl.data.transforms import CLIP_MEAN, CLIP_STD
from megatron_lcl.hf.publish import check_target, staged_folder

MARKER = "lcl_llava.json"  # every LLaVA export has it (what was exported from what); `staged_folder`'s marker

try:  # transformers 5.x: the PIL image processor (the default one needs torchvision)
    from transformers import CLIPImageProcessorPil as ImageProcessor
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import CLIPImageProcessor as ImageProcessor


def llava_config(clip_config, lm_config, image_token_id: int, layer: int, strategy: str,
                 num_image_tokens: int) -> LlavaConfig:
    text = copy.deepcopy(lm_config)
    text.tie_word_embeddings = False
    return LlavaConfig(vision_config=clip_config.to_dict(), text_config=text.to_dict(),
                       image_token_index=image_token_id, vision_feature_layer=layer,
                       vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
                       multimodal_projector_bias=True, image_seq_length=num_image_tokens, tie_word_embeddings=False)


def build_llava(model, tokens) -> LlavaForConditionalGeneration:
    """`model`: the dialogue TransferModel (encoder: CLIPVisionModel features; head: DialogueHead);
    `tokens`: its `task.Tokens` -> the HF model in eval mode with the same weights (float32)."""
    clip, head = model.encoder.module, model.head
    config = llava_config(clip.config, head.lm.config, tokens.image_token_id, model.encoder.feature_layer,
                          model.encoder.feature_strategy, tokens.num_image_tokens)
    llava = LlavaForConditionalGeneration(config).eval()
    lm_body = getattr(head.lm, head.lm.base_model_prefix)
    parts = [(llava.model.vision_tower, clip), (llava.model.multi_modal_projector, head.projector),
             (llava.model.language_model, lm_body), (llava.lm_head, head.lm.get_output_embeddings())]
    with torch.no_grad():
        for target, source in parts:
            state = {k: v.detach().float().clone() for k, v in source.state_dict().items()}
            missing, unexpected = target.load_state_dict(state, strict=False)
            assert not unexpected and all(k.endswith("position_ids") for k in missing), \
                f"{type(target).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}"
    return llava


def build_processor(model, tokens) -> LlavaProcessor:
    """CLIP's preprocessing at the encoder's size (resize the shorter side, centre-crop, CLIP mean/std:
    the evaluation wing's eval transform) + the tokenizer + the chat template."""
    config = model.encoder.module.config
    size = config.image_size
    images = ImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                            do_center_crop=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                            do_convert_rgb=True)
    return LlavaProcessor(image_processor=images, tokenizer=tokens.tokenizer, patch_size=config.patch_size,
                          vision_feature_select_strategy=model.encoder.feature_strategy,
                          chat_template=tokens.template, image_token="<image>", num_additional_image_tokens=1)


def check_export_target(out_dir: str, overwrite: bool) -> None:
    """Refuse (`publish.ExportError`, one line) a target that `export_llava` would refuse, before any
    training: it holds an export and `overwrite` is off, or it is not a LLaVA export of ours."""
    check_target(os.path.abspath(out_dir), overwrite, flag="--export", marker=MARKER)


def export_llava(model, tokens, out_dir: str, overwrite: bool = False) -> str:
    """Write `out_dir` (config, safetensors, processor, tokenizer, chat template, `MARKER`) whole, then
    rename it into place -> out_dir."""
    llava = build_llava(model, tokens)
    llava.generation_config.eos_token_id = tokens.tokenizer.eos_token_id
    llava.generation_config.pad_token_id = tokens.tokenizer.pad_token_id
    with staged_folder(out_dir, overwrite, marker=MARKER) as tmp:
        llava.save_pretrained(tmp)
        build_processor(model, tokens).save_pretrained(tmp)
        provenance = {"encoder": model.encoder.source, "encoder_kind": model.encoder.kind,
                      "transfer": model.mode, "template": tokens.template_name,
                      "vision_feature_layer": model.encoder.feature_layer,
                      "vision_feature_select_strategy": model.encoder.feature_strategy}
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(provenance, f, indent=1)
    return out_dir

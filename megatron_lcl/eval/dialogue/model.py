"""The LLaVA-1.5 model of the dialogue transfer, in process: a vision tower whose selected features
a 2-layer MLP projector (GELU) maps to the width of a pre-trained causal LM, placed at the image
tokens of the text (HF `LlavaForConditionalGeneration`'s arithmetic, so `megatron_lcl.hf.llava`
exports it weight for weight).

Features (`select_features`, HF's `vision_feature_layer` / `vision_feature_select_strategy`): the
hidden states after encoder layer `layer` (hidden_states[0] is the embedding output, so -1 is the
last layer and -2, LLaVA-1.5's choice, the penultimate; no final LayerNorm), with the class token
dropped (`default`, LLaVA-1.5) or kept (`full`). The paper follows LLaVA-1.5's protocol for Table 4,
which implies the penultimate layer without the class token: that is our default. (The other
transfer tasks read the last layer after the post-LayerNorm, every token: the latents the LCL
language model was trained on; `--vision-feature-layer -1 --vision-feature-select-strategy full` is
the nearest LLaVA setting, without that LayerNorm.)

The vision tower is a HF `CLIPVisionModel` for every encoder: a megatron_lcl checkpoint's ViT is
converted by `megatron_lcl.hf.convert` (the same map as the HF export, tested to 1e-4), so training
in `full` mode and the export work on one representation.
"""

import os
from typing import List, Tuple

import torch
import torch.nn.functional as F
from transformers import AddedToken, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

from megatron_lcl.eval.caption import load_tokenizer
from megatron_lcl.eval.dialogue.conversations import IGNORE, IMAGE_TAG
from megatron_lcl.eval.encoders import VisionEncoder, locate_encoder
from megatron_lcl.eval.errors import InputError

STRATEGIES = ("default", "full")  # HF's names: default drops the class token, full keeps it


# ------------------------------------------------------------------------------------------ vision

def select_features(clip: CLIPVisionModel, pixel_values: torch.Tensor, layer: int, strategy: str) -> torch.Tensor:
    """`[n, 3, S, S]` -> features `[n, N, h]` (HF LlavaModel.get_image_features before the projector)."""
    hidden = clip(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]  # [n, 1 + P, h]
    return hidden[:, 1:] if strategy == "default" else hidden


def num_image_tokens(config: CLIPVisionConfig, strategy: str) -> int:
    patches = (config.image_size // config.patch_size) ** 2
    return patches if strategy == "default" else patches + 1


def clip_from_checkpoint(path: str) -> Tuple[CLIPVisionModel, str]:
    """A megatron_lcl checkpoint's ViT as a CLIPVisionModel (hf.convert's map) -> (model, checkpoint)."""
    from megatron_lcl.checkpoint.pretrained import full_state_dict, load_pretrained
    from megatron_lcl.hf.convert import clip_vision_config, vision_import_errors, vision_to_hf

    lcl = load_pretrained(path)
    vision = lcl.cfg.model.vision
    config = clip_vision_config(vision)
    errors = vision_import_errors(vision, config)
    if errors:
        raise InputError(f"--encoder {path}: its ViT has no CLIPVisionModel form ({'; '.join(errors)})")
    clip = CLIPVisionModel(config)
    missing, unexpected = clip.load_state_dict(vision_to_hf(full_state_dict(lcl.model), vision), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return clip, lcl.checkpoint


def load_vision_tower(path: str) -> Tuple[CLIPVisionModel, str, str]:
    """-> (CLIPVisionModel, source, kind) from a HF CLIP folder, our HF export (its vision/) or a
    megatron_lcl checkpoint."""
    kind, path = locate_encoder(path)
    if kind == "hf_clip":
        return CLIPVisionModel.from_pretrained(path).float(), path, "hf_clip"
    clip, checkpoint = clip_from_checkpoint(path)
    return clip, checkpoint, "megatron_lcl"


def dialogue_encoder(clip: CLIPVisionModel, layer: int, strategy: str, source: str, kind: str) -> VisionEncoder:
    """The evaluation wing's VisionEncoder whose 'latents' are the selected features `[n, N, h]`."""
    config = clip.config
    if not -config.num_hidden_layers - 1 <= layer <= config.num_hidden_layers:
        raise InputError(f"--vision-feature-layer {layer}: the encoder has {config.num_hidden_layers} layers "
                         f"(hidden states {-config.num_hidden_layers - 1}..{config.num_hidden_layers})")
    used = {id(p) for p in feature_parameters(clip, layer)}
    for p in clip.parameters():  # full mode trains these only (DDP takes what requires grad when it wraps)
        p.requires_grad_(id(p) in used)
    encoder = VisionEncoder(clip, lambda m, x: select_features(m, x, layer, strategy), config.hidden_size,
                            config.image_size, source, kind)
    encoder.feature_layer, encoder.feature_strategy = layer, strategy
    encoder.trainable_parameters = lambda: feature_parameters(clip, layer)  # full mode (engine.encoder_param_groups)
    return encoder


def feature_parameters(clip: CLIPVisionModel, layer: int) -> List[torch.nn.Parameter]:
    """The parameters hidden_states[layer] depends on: the embeddings, the pre-LayerNorm and the layers
    before it (the later layers and the post-LayerNorm get no gradient: DDP needs them left out)."""
    inner = getattr(clip, "vision_model", clip)
    used = layer % (clip.config.num_hidden_layers + 1)  # hidden_states[j] = the output of layers[:j]
    modules = [inner.embeddings, inner.pre_layrnorm] + list(inner.encoder.layers[:used])
    return [p for m in modules for p in m.parameters()]


# ------------------------------------------------------------------------------------------ language model

def check_tokenizer(tokenizer, path: str):
    """Refuse a tokenizer without EOS (one line naming the folder); no pad token: the EOS pads."""
    if tokenizer.eos_token_id is None:
        raise InputError(f"--lm {path}: the tokenizer has no EOS token (eos_token {tokenizer.eos_token!r}, pad_token "
                         f"{tokenizer.pad_token!r}): it ends every assistant turn and stops generation")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_dialogue_lm(path: str) -> Tuple[torch.nn.Module, object, int]:
    """Any HF causal LM folder -> (LM in float32, tokenizer with an `<image>` token, its id). The
    tokenizer must have an EOS token (it ends every assistant turn and stops generation); a missing
    pad token is the EOS. The image token is added (and the LM's embeddings grown) when missing."""
    tokenizer = check_tokenizer(load_tokenizer(path), path)
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"--lm {path}: not loadable as a HF causal LM ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0]})") from None
    # a special added token (split out before pre-tokenisation, so the processor's "<image><image>..."
    # becomes that many ids), also when the vocabulary already has the word
    tokenizer.add_tokens([AddedToken(IMAGE_TAG, special=True, normalized=False)], special_tokens=True)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return lm, tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TAG)


# ------------------------------------------------------------------------------------------ the head

class Projector(torch.nn.Module):
    """LLaVA-1.5's mlp2x_gelu; the names are HF's `LlavaMultiModalProjector`'s."""

    def __init__(self, vision_width: int, lm_width: int):
        super().__init__()
        self.linear_1 = torch.nn.Linear(vision_width, lm_width)
        self.act = torch.nn.GELU()
        self.linear_2 = torch.nn.Linear(lm_width, lm_width)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class DialogueHead(torch.nn.Module):
    """features `[b, N, h]` -> projector -> the LM's embeddings at the image tokens; the LM reads the rest."""

    def __init__(self, vision_width: int, lm: torch.nn.Module, image_token_id: int, train_lm: bool):
        super().__init__()
        self.projector = Projector(vision_width, lm.get_input_embeddings().embedding_dim)
        self.lm, self.image_token_id = lm, image_token_id
        self.lm.requires_grad_(train_lm)

    def embed(self, features: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings `[b, T, d]` with row r's image tokens replaced by its N projected features
        (rows without image tokens ignore their features), as HF's masked_scatter does."""
        embeds = self.lm.get_input_embeddings()(input_ids)  # [b, T, d]
        image_positions = input_ids == self.image_token_id  # [b, T]
        with_image = image_positions.any(dim=1)  # [b]
        projected = self.projector(features)  # [b, N, d]
        if not with_image.any():
            return embeds + 0.0 * projected.sum()  # exact; keeps the projector in the graph for DDP
        n = projected.shape[1]
        counts = image_positions.sum(dim=1)[with_image]
        assert bool((counts == n).all()), f"rows with an image must hold {n} image tokens, got {counts.tolist()}"
        rows = projected[with_image].reshape(-1, projected.shape[-1]).to(embeds.dtype)  # [images x N, d]
        return embeds.masked_scatter(image_positions.unsqueeze(-1), rows)

    def logits(self, features, input_ids, attention_mask) -> torch.Tensor:
        embeds = self.embed(features, input_ids)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask).logits  # [b, T, V]

    def forward(self, features, input_ids, attention_mask, labels):
        """Next-token CE over the assistant tokens -> (loss sum, number of target tokens)."""
        logits = self.logits(features, input_ids, attention_mask)
        predictions, targets = logits[:, :-1].float(), labels[:, 1:]  # position t predicts token t + 1
        loss_sum = F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1),
                                   ignore_index=IGNORE, reduction="sum")
        return loss_sum, (targets != IGNORE).sum()


def load_projector(head: DialogueHead, path: str) -> None:
    """Stage 2 starts from stage 1's projector: a stage-1 `--checkpoint` file (LLaVA's
    --pretrain_mm_mlp_adapter)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    except (OSError, RuntimeError, KeyError, EOFError, TypeError) as e:
        raise InputError(f"--projector {path}: not a stage-1 checkpoint ({type(e).__name__}: {e})") from None
    mine = {k.split("projector.", 1)[1]: v for k, v in state.items() if ".projector." in f".{k}"}
    expected = head.projector.state_dict()
    if set(mine) != set(expected) or any(mine[k].shape != expected[k].shape for k in expected):
        shapes = {k: tuple(v.shape) for k, v in mine.items()}
        raise InputError(f"--projector {path}: its projector {shapes or 'is missing'} does not fit this encoder and LM "
                         f"({ {k: tuple(v.shape) for k, v in expected.items()} })")
    head.projector.load_state_dict(mine)


# ------------------------------------------------------------------------------------------ decoding

def left_pad(rows: List[List[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-aligned (generation continues every row at the end): ids, mask `[b, T]`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


@torch.no_grad()
def generate(head: DialogueHead, features: torch.Tensor, prompts: List[List[int]], tokenizer,
             max_new_tokens: int) -> List[str]:
    """Greedy answers to `prompts` (token ids with image tokens) over `features [b, N, h]`."""
    device = features.device
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    embeds = head.embed(features, ids.to(device))
    out = head.lm.generate(inputs_embeds=embeds, attention_mask=mask.to(device), do_sample=False,
                           max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]

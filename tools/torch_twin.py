"""The plain-PyTorch twin of the LCL model: the same model as an open_clip-style user would write it.

HuggingFace `CLIPVisionModel` + `OPTForCausalLM` (attention through `scaled_dot_product_attention`),
sized from the same `ModelConfig` (`megatron_lcl.hf.convert.clip_vision_config` / `opt_config`), with
the same LCL wiring: each image's latents (post-LN on every token, as ours) are projected to the LM
width and spliced in after its `<BoI>`; v_i = attention pooling -> W1 and t_i = LN -> W2 on the `<BoI>`
output (megatron_lcl's own `ImageHead` / `TextHead`, plain torch); with `model.vision.image_tokens=
pooled_values` the released code's pooling block (`ValuePoolingHead`) makes both the tokens and v_i; L = L_gen + lambda * L_con with
plain `F.cross_entropy` and megatron_lcl's `contrastive_loss_sum` (plain torch, no group).

It is the yardstick of `tools/bench_vs_torch.py`: the same matmuls (FLOPs), none of megatron-core.
Differences that cost no FLOPs: no layer-scale (folded into the weights by `from_lcl_state`), OPT's
position table has 2 unused rows, bf16 runs under autocast with fp32 weights (open_clip's `amp_bf16`).

    twin = TorchTwin(cfg)                        # random init
    twin = TorchTwin.from_lcl_state(cfg, model.state_dict())   # our weights: the same function
    terms = twin.loss(batch, LossConfig())       # {"total", "lm_loss", "con_loss"}
"""

from typing import Dict

import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel, OPTForCausalLM

from megatron_lcl.config import LossConfig, ModelConfig, padded_vocab_size
from megatron_lcl.data.batch import LCLBatch
from megatron_lcl.hf.convert import build_hf_models, clip_latents, clip_vision_config, opt_config
from megatron_lcl.losses.contrastive import contrastive_loss_sum
from megatron_lcl.models.heads import ImageHead, TextHead, ValuePoolingHead

HEADS = ("projector.", "image_head.", "text_head.")  # the LCL modules beside the two HF models


class TorchTwin(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, clip=None, opt=None, attn_implementation: str = "sdpa"):
        super().__init__()
        v, lm = cfg.vision, cfg.lm
        self.vision = clip if clip is not None else CLIPVisionModel._from_config(
            clip_vision_config(v), attn_implementation=attn_implementation)
        self.lm = opt if opt is not None else OPTForCausalLM._from_config(
            opt_config(lm, padded_vocab_size(lm, 1)), attn_implementation=attn_implementation)
        for model in (self.vision, self.lm):
            model.set_attn_implementation(attn_implementation)
        self.image_tokens = v.image_tokens
        if v.image_tokens == "latents":
            self.projector = torch.nn.Linear(v.hidden_size, lm.hidden_size)
            self.image_head = ImageHead(v.hidden_size, cfg.heads)
        else:  # pooled_values: the released code's pooling block makes the tokens and v
            self.image_head = ValuePoolingHead(v.hidden_size, lm.hidden_size, cfg.heads.pool_num_heads,
                                               eps=v.layernorm_epsilon)
        self.text_head = TextHead(lm.hidden_size, cfg.heads)
        self.num_image_tokens = v.num_image_tokens

    @classmethod
    def from_lcl_state(cls, cfg: ModelConfig, state: Dict[str, torch.Tensor],
                       attn_implementation: str = "sdpa") -> "TorchTwin":
        """The twin holding an `LCLModel`'s weights (TP=PP=1 state dict): it computes the same function."""
        state = {k: v.float() for k, v in state.items() if v is not None and torch.is_tensor(v)}
        clip, opt = build_hf_models(state, cfg.vision, cfg.lm, padded_vocab_size(cfg.lm, 1))
        twin = cls(cfg, clip.train(), opt.train(), attn_implementation)
        heads = {k: v for k, v in state.items() if k.startswith(HEADS)}
        missing, unexpected = twin.load_state_dict(heads, strict=False)
        missing = [k for k in missing if k.startswith(HEADS)]
        assert not missing and not unexpected, f"heads weight mismatch: missing {missing}, unexpected {unexpected}"
        return twin

    def forward(self, batch: LCLBatch):
        """-> (logits `[b, s, V]`, v `[n, e]`, t `[n, e]`, scale). Inputs as in `LCLBatch`."""
        n = batch.num_images
        words = self.lm.get_input_embeddings()(batch.tokens)  # [b, s, h]
        if n:
            latents = clip_latents(self.vision, batch.images)  # [n, 1 + P, h_v], post-LN on every token
            if self.image_tokens == "latents":
                image_embeds, image_features = self.projector(latents), self.image_head(latents)  # [n, M, h], [n, e]
            else:
                patches = latents[:, 1:]  # [n, P, h_v]: the class token is dropped
                values = self.image_head.values(patches)  # [n, P, h]
                image_embeds, image_features = self.image_head.tokens(values), self.image_head(patches, values)
            image_embeds = image_embeds.flatten(0, 1)  # [n*M, h]
            offsets = torch.arange(1, self.num_image_tokens + 1, device=words.device)  # [M]
            positions = (batch.boi_positions[:, None] + offsets).reshape(-1)  # [n*M]
            samples = batch.image_sample_index.repeat_interleave(self.num_image_tokens)
            words = words.index_put((samples, positions), image_embeds.to(words.dtype))
        else:
            image_features = words.new_zeros((0, self.text_head.proj.out_features))  # e: v and t share it
        hidden = self.lm.model.decoder(inputs_embeds=words, position_ids=batch.position_ids,
                                       use_cache=False).last_hidden_state  # [b, s, h], after the final LN
        logits = self.lm.lm_head(hidden)  # [b, s, V]
        text_features = self.text_head(hidden[batch.image_sample_index, batch.boi_positions])  # [n, e]
        return logits, image_features, text_features, self.text_head.scale()

    def loss(self, batch: LCLBatch, cfg: LossConfig) -> Dict[str, torch.Tensor]:
        """{total, lm_loss, con_loss}: L_gen (mean over text targets) + lambda * L_con (images with context)."""
        assert cfg.mode == "lcl", f"the twin computes loss.mode=lcl only, not {cfg.mode!r}"
        logits, v, t, scale = self(batch)
        per_token = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), reduction="none")
        mask = batch.loss_mask.flatten()
        lm_loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        keep = batch.image_has_context
        con_sum, num_images, _ = contrastive_loss_sum(v[keep].float(), t[keep].float(), scale.float())
        con_loss = con_sum / max(num_images, 1)
        return {"total": lm_loss + cfg.con_weight * con_loss, "lm_loss": lm_loss, "con_loss": con_loss}

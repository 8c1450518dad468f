"""ViT encoder in the CLIP layout, on a megatron-core TransformerBlock (bidirectional)."""

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lcl.config import VisionConfig


class VisionTransformer(MegatronModule):
    """conv patchify -> [class token; patches] + learned positions -> pre-LN -> blocks -> post-LN.

    Weights map one-to-one onto HuggingFace `CLIPVisionModel` (conv without bias, `pre_layrnorm`),
    except that our post-LN is applied to every token: the latents handed to the LM are normalised.
    The ViT is never split over pipeline stages: build it with a config whose pipeline size is 1.
    """

    def __init__(self, config: TransformerConfig, vision: VisionConfig, spec: TransformerBlockSubmodules):
        super().__init__(config=config)
        assert config.pipeline_model_parallel_size == 1, "the ViT lives whole on the first pipeline stage"
        hidden = vision.hidden_size
        self.num_tokens = vision.num_vit_tokens  # 1 + patches
        self.conv1 = torch.nn.Conv2d(3, hidden, kernel_size=vision.patch_size,
                                     stride=vision.patch_size, bias=False)
        self.class_token = torch.nn.Parameter(torch.zeros(hidden))
        self.position_embeddings = torch.nn.Parameter(torch.zeros(self.num_tokens, hidden))
        self.ln_pre = torch.nn.LayerNorm(hidden, eps=vision.layernorm_epsilon)
        # post_process=True: the block's final LayerNorm is the ViT's post-LN.
        self.decoder = TransformerBlock(config=config, spec=spec, pre_process=True,
                                        post_process=True)
        for p in (self.class_token, self.position_embeddings):
            torch.nn.init.normal_(p, std=hidden ** -0.5)
        self._set_drop_path_rates(vision.drop_path_rate)

    def _set_drop_path_rates(self, max_rate: float) -> None:
        """Stochastic depth increasing linearly from 0 (first layer) to `max_rate` (last layer)."""
        layers = self.decoder.layers
        for i, layer in enumerate(layers):
            rate = max_rate * i / max(len(layers) - 1, 1)
            layer.self_attention.linear_proj.drop_path_rate = rate
            layer.mlp.linear_fc2.drop_path_rate = rate

    def set_drop_path_rate(self, max_rate: float) -> None:
        """Change the drop-path schedule (e.g. ramped up during training)."""
        self._set_drop_path_rates(max_rate)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images `[n, 3, H, W]` -> latents `[n, 1 + P, h]`, class token first, P = (H/p)*(W/p)."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [n, h, H/p, W/p]
        x = x.flatten(2).transpose(1, 2)  # [n, (H/p)*(W/p), h]
        cls = self.class_token.expand(x.shape[0], 1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.position_embeddings  # [n, 1 + P, h]
        x = self.ln_pre(x)
        x = x.transpose(0, 1).contiguous()  # [n, 1 + P, h] -> [1 + P, n, h] (megatron-core layout)
        x = self.decoder(x, attention_mask=None)  # no_mask attention: bidirectional
        return x.transpose(0, 1).contiguous()  # [n, 1 + P, h]

"""The LCL model: ViT + projector + image head on the first stage, OPT LM across stages, text head last.

Architecture only: how stages exchange tensors (v_i carried to the last stage) is the pipeline's
business (`megatron_lcl.training.pipeline`); a stage exposes `embed`, `decode` and `finish`.

Sequence layout and the batch contract are in `megatron_lcl.data.batch`. For each image j the image
tokens `[M, h]` fill positions boi_j+1 .. boi_j+M of sample `image_sample_index[j]`, and t_j is the LM
output at boi_j. `model.vision.image_tokens` says what the tokens and v_j are:
- latents (the paper's text): the ViT latents `[1 + P, h_v]` through the linear projector; v_j from
  attention pooling of the same latents and W1 (`ImageHead`).
- pooled_values (the released code): the P patch latents through the pooling block's value and output
  projections; v_j that block's pooled output (`ValuePoolingHead`).
"""

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megatron_lcl.config import ModelConfig, ParallelConfig, PrecisionConfig, padded_vocab_size
from megatron_lcl.config.validate import backend_errors, raise_errors
from megatron_lcl.models.heads import ImageHead, TextHead, ValuePoolingHead
from megatron_lcl.models.language import OPTLanguageModel
from megatron_lcl.models.specs import block_spec, lm_layer_spec, select_transformer_impl, vit_layer_spec
from megatron_lcl.models.transformer_config import build_transformer_config
from megatron_lcl.models.vision import VisionTransformer


@dataclass
class LCLOutput:
    logits: Optional[torch.Tensor]  # [s, b, v/tp] vocab-parallel (None when not needed)
    image_features: torch.Tensor  # v: [n, e], L2-normalised, every image of the micro-batch
    text_features: torch.Tensor  # t: [n, e], L2-normalised (from the <BoI> before each image)
    logit_scale: torch.Tensor  # s = exp(logit_scale) clamped, scalar
    hidden: torch.Tensor  # LM output after the final LN, [s, b, h]
    logit_bias: Optional[torch.Tensor] = None  # b of the sigmoid loss, scalar (None: no bias, InfoNCE)


def image_token_index(image_sample_index, boi_positions, num_image_tokens: int):
    """(sample_idx, position_idx), each `[n * M]`: the LM positions the latents of each image fill."""
    offsets = torch.arange(1, num_image_tokens + 1, device=boi_positions.device)  # [M]
    positions = (boi_positions[:, None] + offsets[None, :]).reshape(-1)  # [n*M]
    samples = image_sample_index.repeat_interleave(num_image_tokens)  # [n*M]
    return samples, positions


def transformer_configs(cfg: ModelConfig, parallel: ParallelConfig, precision: Optional[PrecisionConfig],
                        impl: str, fuse_wgrad_accumulation: bool = False):
    """(LM config, ViT config) for the backend `impl`: fused weight-gradient accumulation with Transformer
    Engine layers when asked (a model megatron-core's DDP wraps), fp8 on the LM only
    (`build_transformer_config`)."""
    common = dict(init_method_std=cfg.init_method_std, precision=precision, impl=impl,
                  fuse_wgrad_accumulation=fuse_wgrad_accumulation)
    lm = build_transformer_config(cfg.lm, parallel, activation="relu", **common)
    vit = build_transformer_config(cfg.vision, parallel, activation=cfg.vision.activation, pipeline_split=False,
                                   **common)
    return lm, vit


class LCLModel(MegatronModule):
    """One pipeline stage of the LCL model (the whole model when pipeline size is 1)."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig,
                 precision: Optional[PrecisionConfig] = None,
                 pre_process: bool = True, post_process: bool = True, fuse_wgrad_accumulation: bool = False):
        impl = select_transformer_impl(cfg.transformer_impl)
        raise_errors(backend_errors(precision, impl))
        lm_config, vit_config = transformer_configs(cfg, parallel, precision, impl, fuse_wgrad_accumulation)
        super().__init__(config=lm_config)
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = pre_process, post_process
        self.transformer_impl = impl
        self.num_image_tokens = cfg.vision.num_image_tokens
        self.image_tokens = cfg.vision.image_tokens
        if pre_process:
            vit_layers = vit_layer_spec(impl, cfg.vision.layer_scale_init, cfg.attention)
            self.vision = VisionTransformer(vit_config, cfg.vision, block_spec(vit_layers, impl, vit_config))
            self._build_image_path(cfg)
        self.lm = OPTLanguageModel(lm_config, block_spec(lm_layer_spec(impl, cfg.attention), impl, lm_config),
                                   vocab_size=padded_vocab_size(cfg.lm, parallel.tensor_model_parallel_size),
                                   max_sequence_length=cfg.lm.max_position_embeddings,
                                   pre_process=pre_process, post_process=post_process)
        if post_process:
            self.text_head = TextHead(cfg.lm.hidden_size, cfg.heads)
        # megatron-core layers are built in params_dtype; bring the plain torch modules (ViT stem,
        # projector, heads) along, so bf16 runs need no wrapper. The optimizer keeps fp32 masters.
        self.to(lm_config.params_dtype)

    def _build_image_path(self, cfg: ModelConfig) -> None:
        if self.image_tokens == "latents":
            self.projector = torch.nn.Linear(cfg.vision.hidden_size, cfg.lm.hidden_size)
            self.image_head = ImageHead(cfg.vision.hidden_size, cfg.heads)
        else:  # pooled_values: one block makes the tokens and v (validated: embed_dim == LM width)
            self.image_head = ValuePoolingHead(cfg.vision.hidden_size, cfg.lm.hidden_size, cfg.heads.pool_num_heads,
                                               eps=cfg.vision.layernorm_epsilon)

    # megatron-core hooks -------------------------------------------------------------------------
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.lm.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.lm.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron-core's schedule on every stage but the first, with what the previous
        stage sent (the pipeline code in `megatron_lcl.training.pipeline` decides its layout)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.stage_input = input_tensor

    # stages ---------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor):
        """images `[n, 3, H, W]` -> (ViT latents `[n, 1 + P, h_v]`, v `[n, e]`)."""
        latents = self.vision(images)
        return latents, self.image_tokens_and_features(latents)[1]

    def image_tokens_and_features(self, latents: torch.Tensor, hooks: bool = True):
        """ViT latents `[n, 1 + P, h_v]` -> (the LM's image tokens `[n, M, h]`, v `[n, e]`).
        `hooks=False` runs the image head without its forward hooks (the collapse monitor's)."""
        head = self.image_head if hooks else self.image_head.forward
        if self.image_tokens == "latents":
            return self.projector(latents), head(latents)
        patches = latents[:, 1:]  # the class token is dropped: [n, P, h_v]
        values = self.image_head.values(patches)  # [n, P, h], computed once for tokens and pooling
        return self.image_head.tokens(values), head(patches, values)

    def embed(self, tokens, position_ids, images, image_sample_index, boi_positions):
        """First stage: -> (decoder input `[s, b, h]`, v `[n, e]` for all n images)."""
        if images.shape[0] == 0:
            return self._embed_without_images(tokens, position_ids, images)
        image_embeds, image_features = self.image_tokens_and_features(self.vision(images))
        image_embeds = image_embeds.flatten(0, 1)  # [n, M, h] -> [n*M, h]
        index = image_token_index(image_sample_index, boi_positions, self.num_image_tokens)
        return self.lm.embed(tokens, position_ids, image_embeds, index), image_features

    def _embed_without_images(self, tokens, position_ids, images):
        """A micro-batch without images still runs the image path, on one blank image whose outputs
        enter the LM input and v with weight 0 (as Megatron-LM's multimodal models do).

        So every rank runs the same backward whatever its data: the image path's parameters get their
        (zero) gradients at the same point of the backward as with images (DDP's overlapped gradient
        buckets are reduced in the same order on every rank), the data-parallel gather of L_con sees v
        in the graph on every rank, and dropout/drop-path draw the same numbers in the feature pass and
        the training pass of `loss.contrastive_batch=step`.
        """
        latents = self.vision(images.new_zeros((1,) + tuple(images.shape[1:])))  # [1, 1 + P, h_v]
        # No hooks: monitors of v (the collapse monitor) never see the blank.
        image_embeds, image_features = self.image_tokens_and_features(latents, hooks=False)
        hidden = self.lm.embed(tokens, position_ids)
        return hidden + 0.0 * image_embeds.sum().to(hidden.dtype), image_features[:0]  # v: [0, e]

    def head(self, hidden, image_sample_index, boi_positions, with_logits: bool = True):
        """Last stage: hidden `[s, b, h]` -> (logits `[s, b, v/tp]` or None, t `[n, e]`, hidden `[s, b, h]`).

        Under sequence parallelism `hidden` arrives as this rank's `[s/tp, b, h]` chunk: the output layer
        gathers it itself (megatron-core's ColumnParallelLinear); the `<BoI>` rows are read from the
        gathered sequence, whose backward hands each rank its own chunk's gradient (the text head runs
        replicated over TP ranks)."""
        logits = self.lm.logits(hidden) if with_logits else None
        if self.config.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        boi_hidden = hidden[boi_positions, image_sample_index]  # [n, h]
        return logits, self.text_head(boi_hidden), hidden

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """This stage's LM layers (+ final LN on the last stage): `[s, b, h]` -> `[s, b, h]`."""
        if self.pre_process:
            self.lm.set_input_tensor(None)
            return self.lm.decode(hidden)
        self.lm.set_input_tensor(hidden)  # megatron-core's TransformerBlock reads it from here
        return self.lm.decode(None)

    def finish(self, hidden, image_features, image_sample_index, boi_positions,
               with_logits: bool = True) -> LCLOutput:
        """Last stage: hidden `[s, b, h]` + v `[n, e]` of all n images -> LCLOutput. Which images enter
        L_con (the context rule) is the loss's business: `LCLBatch.image_has_context`."""
        logits, text_features, hidden = self.head(hidden, image_sample_index, boi_positions, with_logits)
        return LCLOutput(logits=logits, image_features=image_features, text_features=text_features,
                         logit_scale=self.text_head.scale(), hidden=hidden, logit_bias=self.text_head.logit_bias)

    def forward(self, tokens, position_ids, images, image_sample_index, boi_positions,
                with_logits: bool = True) -> LCLOutput:
        """Whole model on one stage (pipeline size 1). Inputs as in `LCLBatch`."""
        assert self.pre_process and self.post_process, \
            "with PP > 1 the stages run through megatron_lcl.training.pipeline.forward_stage"
        hidden, image_features = self.embed(tokens, position_ids, images, image_sample_index, boi_positions)
        hidden = self.decode(hidden)
        return self.finish(hidden, image_features, image_sample_index, boi_positions, with_logits)

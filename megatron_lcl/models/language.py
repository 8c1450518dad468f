"""Causal LM with the OPT architecture on megatron-core (a `LanguageModule`, pipeline-aware)."""

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lcl.models.layers import ColumnParallelLinear
from megatron_lcl.models.transformer_config import output_layer_config


class OPTLanguageModel(LanguageModule):
    """Learned absolute positions, pre-LN decoder, ReLU MLP, final LN, output tied to the embedding.

    Unlike megatron-core's GPTModel this exposes its three parts separately (`embed`, `decode`,
    `logits`), because LCL splices image latents into the embeddings and reads the hidden state at
    `<BoI>` positions before the output layer. Only the first pipeline stage (`pre_process`) owns
    the embedding, only the last (`post_process`) the final LN and output layer.
    """

    def __init__(self, config: TransformerConfig, spec: TransformerBlockSubmodules, vocab_size: int,
                 max_sequence_length: int, pre_process: bool = True, post_process: bool = True):
        super().__init__(config=config)
        self.pre_process, self.post_process = pre_process, post_process
        self.vocab_size = vocab_size
        self.share_embeddings_and_output_weights = True
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config, vocab_size=vocab_size, max_sequence_length=max_sequence_length,
                position_embedding_type="learned_absolute")
        self.decoder = TransformerBlock(config=config, spec=spec, pre_process=pre_process,
                                        post_process=post_process)
        if post_process:
            self.output_layer = ColumnParallelLinear(  # local on every backend: without wgrad fusion
                config.hidden_size, vocab_size, config=output_layer_config(config), init_method=config.init_method,
                bias=False, skip_bias_add=False, gather_output=False,
                skip_weight_param_allocation=pre_process)
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        self.decoder.set_input_tensor(input_tensor)

    def embed(self, tokens: torch.Tensor, position_ids: torch.Tensor,
              image_embeds: Optional[torch.Tensor] = None,
              image_index: Optional[tuple] = None) -> torch.Tensor:
        """tokens/position_ids `[b, s]` -> decoder input `[s, b, h]`.

        `image_embeds [k, h]` replace the word embeddings at `image_index = (sample_idx [k],
        position_idx [k])`; position embeddings are added to them like to text.
        """
        words = self.embedding.word_embeddings(tokens)  # [b, s, h]
        if image_embeds is not None and image_embeds.shape[0] > 0:
            # out of place: the replaced word embeddings get no gradient, the latents get theirs
            words = words.index_put(image_index, image_embeds.to(words.dtype))
        x = words + self.embedding.position_embeddings(position_ids)  # [b, s, h]
        x = x.transpose(0, 1).contiguous()  # [b, s, h] -> [s, b, h]
        if self.config.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.embedding.embedding_dropout(x)
        return self.embedding.embedding_dropout(x)

    def decode(self, hidden: Optional[torch.Tensor]) -> torch.Tensor:
        """Run this stage's layers (and the final LN on the last stage). `[s, b, h]` in and out.

        On stages other than the first, the input comes from `set_input_tensor`.
        """
        return self.decoder(hidden_states=hidden, attention_mask=None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[s, b, h]` -> vocab-parallel logits `[s, b, v/tp]`."""
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight)
        return logits

"""The LCL heads (replicated over tensor-parallel ranks: they are small).

- image side (first pipeline stage): attention pooling of the image latents -> W1 -> v_i
- text side (last pipeline stage): LayerNorm -> W2 on the LM output at each `<BoI>` -> t_i
"""

import math

import torch
import torch.nn.functional as F

from megatron_lcl.config import HeadsConfig


class AttentionPooling(torch.nn.Module):
    """One multi-head attention layer whose single learnable query attends over the latents."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float = 1e-5):
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(1, 1, hidden_size) * hidden_size ** -0.5)
        self.ln_kv = torch.nn.LayerNorm(hidden_size, eps=eps)
        self.attention = torch.nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents `[n, M, h]` -> pooled `[n, h]`."""
        kv = self.ln_kv(latents)
        query = self.query.expand(latents.shape[0], -1, -1).to(kv.dtype)  # [n, 1, h]
        pooled, _ = self.attention(query, kv, kv, need_weights=False)
        return pooled.squeeze(1)


class ImageHead(torch.nn.Module):
    """v_i = normalize(W1 · attention_pool(latents_i))."""

    def __init__(self, vision_hidden: int, heads: HeadsConfig):
        super().__init__()
        self.pool = AttentionPooling(vision_hidden, heads.pool_num_heads)
        self.proj = torch.nn.Linear(vision_hidden, heads.embed_dim, bias=False)  # W1

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.pool(latents)), dim=-1)  # [n, e]


class TextHead(torch.nn.Module):
    """t_i = normalize(W2 · LayerNorm(h_<BoI>_i)), plus the learnable temperature s = exp(logit_scale)
    (clamped after each step by `training.optim.clamp_logit_scale`, on the optimizer's copy too)."""

    def __init__(self, lm_hidden: int, heads: HeadsConfig):
        super().__init__()
        self.norm = torch.nn.LayerNorm(lm_hidden)
        self.proj = torch.nn.Linear(lm_hidden, heads.embed_dim, bias=False)  # W2
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(heads.logit_scale_init)))
        self.logit_scale_max = heads.logit_scale_max

    def forward(self, boi_hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.norm(boi_hidden)), dim=-1)  # [n, e]

    def scale(self) -> torch.Tensor:
        """s = exp(logit_scale), at most `logit_scale_max` (100): logit_scale is clamped at log(max), so
        at the bound (where the clamp after each step leaves it) its gradient still flows (clamp passes
        it at equality; exp(fp32 log 100) is 100.0000076, so clamping s instead would zero it there)."""
        return self.logit_scale.clamp(max=math.log(self.logit_scale_max)).exp()

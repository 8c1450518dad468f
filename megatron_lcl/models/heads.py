"""The LCL heads (replicated over tensor-parallel ranks: they are small).

- image side (first pipeline stage): attention pooling of the image latents -> W1 -> v_i
  (`ImageHead`, `model.vision.image_tokens=latents`), or the released code's pooling block
  (`ValuePoolingHead`, `image_tokens=pooled_values`), which also makes the LM's image tokens
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


class ValuePoolingHead(torch.nn.Module):
    """The released LCL code's image pooling block (OpenGVLab/LCL, `AttentivePoolingProjection` with one
    query): it gives both v_i and the LM's image tokens, from the patch tokens `[n, P, h_v]` (no class token).

        keys   = K(LN_k(patches)),  values = V(LN_v(patches))       [n, P, d]   (d = LM width)
        pooled = O(attention(Q(LN_q(query)), keys, values))        [n, d]      -> v_i = normalize(pooled)
        tokens = O(values)                                         [n, P, d]   -> the LM's image positions

    Q, K, V: `h_v -> d` with biases; O: `d -> d` without bias; `num_heads` heads of d / num_heads; three
    separate LayerNorms; the query is drawn from N(0, 1). The tokens use V and O whole (all heads, no
    attention weights), so the LM sees each patch through the same value path the pooling mixes.
    """

    def __init__(self, vision_hidden: int, lm_hidden: int, num_heads: int, eps: float = 1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.query = torch.nn.Parameter(torch.randn(1, 1, vision_hidden))
        self.norm_q, self.norm_k, self.norm_v = (torch.nn.LayerNorm(vision_hidden, eps=eps) for _ in range(3))
        self.q, self.k, self.v = (torch.nn.Linear(vision_hidden, lm_hidden) for _ in range(3))
        self.proj = torch.nn.Linear(lm_hidden, lm_hidden, bias=False)  # O

    def values(self, patches: torch.Tensor) -> torch.Tensor:
        """patches `[n, P, h_v]` -> V(LN_v(patches)) `[n, P, d]` (shared by the pooling and the tokens)."""
        return self.v(self.norm_v(patches))

    def tokens(self, values: torch.Tensor) -> torch.Tensor:
        """values `[n, P, d]` -> the LM's image tokens O(values) `[n, P, d]`."""
        return self.proj(values)

    def forward(self, patches: torch.Tensor, values: torch.Tensor = None) -> torch.Tensor:
        """patches `[n, P, h_v]` (and their `values`, when already computed) -> v `[n, d]`, L2-normalised."""
        values = self.values(patches) if values is None else values
        n, _, d = values.shape
        query = self.q(self.norm_q(self.query.to(patches.dtype)))  # [1, 1, d]
        keys = self.k(self.norm_k(patches))  # [n, P, d]
        heads = (self._split_heads(t) for t in (query.expand(n, -1, -1), keys, values))
        pooled = F.scaled_dot_product_attention(*heads)  # scale (d / heads)^-0.5, as released
        pooled = pooled.transpose(1, 2).reshape(n, d)  # [n, heads, 1, d / heads] -> [n, d]
        return F.normalize(self.proj(pooled), dim=-1)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """`[n, s, d]` -> `[n, heads, s, d / heads]` (head h holds channels h*d/heads .. (h+1)*d/heads)."""
        n, s, d = t.shape
        return t.view(n, s, self.num_heads, d // self.num_heads).transpose(1, 2)


class TextHead(torch.nn.Module):
    """t_i = normalize(W2 · LayerNorm(h_<BoI>_i)), plus the learnable temperature s = exp(logit_scale)
    (clamped after each step by `training.optim.clamp_logit_scale`, on the optimizer's copy too) and,
    with `heads.logit_bias_init` set (the sigmoid loss), the learnable logit bias b (0-D: no weight decay)."""

    def __init__(self, lm_hidden: int, heads: HeadsConfig):
        super().__init__()
        self.norm = torch.nn.LayerNorm(lm_hidden)
        self.proj = torch.nn.Linear(lm_hidden, heads.embed_dim, bias=False)  # W2
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(heads.logit_scale_init)))
        self.logit_scale_max = heads.logit_scale_max
        self.logit_bias = (None if heads.logit_bias_init is None else
                           torch.nn.Parameter(torch.tensor(float(heads.logit_bias_init))))

    def forward(self, boi_hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.norm(boi_hidden)), dim=-1)  # [n, e]

    def scale(self) -> torch.Tensor:
        """s = exp(logit_scale), at most `logit_scale_max` (100): logit_scale is capped at log(max), so
        at the bound (where the clamp after each step leaves it) its gradient still flows. Capped with
        `where(x > bound)`, not `clamp`: torch 2.14's clamp zeroes the gradient at equality (2.13's
        passes it); and exp(fp32 log 100) is 100.0000076, so capping s instead would zero it there."""
        bound = math.log(self.logit_scale_max)
        return torch.where(self.logit_scale > bound, self.logit_scale.new_tensor(bound), self.logit_scale).exp()

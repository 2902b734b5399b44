"""Self-attention sublayers: grouped-query attention (GQA/MHA) and DeepSeek multi-head latent attention (MLA).

Both take `x: [B, T, D]` (already normalised by the block's RMSNorm) and return `[B, T, D]`, with a causal
mask and RoPE. `forward(x, start_pos=0, cache=None)`: `start_pos` is the absolute position of `x[:, 0]`
(RoPE offset for incremental decoding); `cache`, if given, is a per-layer `KVCache` that receives the new
keys/values (after RoPE) and returns all keys/values so far. The caller keeps `start_pos` equal to the
number of tokens already in the cache. `key_mask` ([B, cached + T] bool, False at padding) hides padding
keys (left-padded batches); RoPE is relative, so a left-padded row equals the unpadded one.

RoPE layout ("rotate half", as in GPT-NeoX / HF Llama): frequency i (0 <= i < d/2) rotates the pair
(x[i], x[i + d/2]) by the angle pos * theta^(-2i/d). DeepSeek's released code rotates adjacent pairs
(x[2i], x[2i+1]) instead; the two are the same up to a fixed permutation of the rotated dims, which is
immaterial when training from scratch but must be respected when importing foreign checkpoints.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import AttentionConfig, ModelConfig
from .recompute import cheap


class KVCache(Protocol):
    """Per-layer key/value store for incremental decoding."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k: [B, Hk, T, dk], v: [B, Hk, T, dv]; return all cached (k, v) along T, new ones last."""
        ...


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with a precomputed cos/sin cache (rotate-half layout, see module doc).

    The cache is built in float64 so that fp64 runs are exact; a module-wide dtype cast (e.g.
    `.bfloat16()`) is undone on the next use. The rotation is computed in at least fp32 and the result is
    cast back to the input dtype.
    """

    def __init__(self, dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"RoPE dim must be positive and even, got {dim}")
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.dim, self.max_seq_len, self.theta = dim, max_seq_len, theta
        cos, sin = self._table(torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)  # [max_seq_len, dim/2]
        self.register_buffer("sin", sin, persistent=False)

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float64, device=device) / self.dim
        inv_freq = self.theta ** -exponents
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64, device=device), inv_freq)
        return angles.cos(), angles.sin()

    def rotate(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Rotate x: [..., T, dim] for absolute positions [start_pos, start_pos + T).

        Named `rotate`, not `apply`, so as not to shadow `nn.Module.apply(fn)` (used by recursive init).
        """
        t = x.shape[-2]
        if x.shape[-1] != self.dim:
            raise ValueError(f"RoPE expects last dim {self.dim}, got {x.shape[-1]}")
        if start_pos < 0 or start_pos + t > self.max_seq_len:
            raise ValueError(
                f"positions [{start_pos}, {start_pos + t}) exceed max_seq_len={self.max_seq_len}"
            )
        if self.cos.dtype != torch.float64:
            self.cos, self.sin = self._table(self.cos.device)
        dtype = torch.promote_types(x.dtype, torch.float32)
        cos = self.cos[start_pos:start_pos + t].to(dtype)  # [T, dim/2]
        sin = self.sin[start_pos:start_pos + t].to(dtype)
        x1, x2 = x.to(dtype).chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, start_pos: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q: [B, H, T, dim] and k: [B, Hk, T, dim] at positions [start_pos, start_pos + T)."""
        return self.rotate(q, start_pos), self.rotate(k, start_pos)


def _linear(d_in: int, d_out: int, init_std: float) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=False)
    nn.init.normal_(layer.weight, mean=0.0, std=init_std)
    return layer


def _causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, enable_gqa: bool = False,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA with a causal mask aligned to the end of k (the last query sees every key).

    q: [B, H, Tq, dk], k: [B, Hk, Tk, dk], v: [B, Hk, Tk, dv] with Tk >= Tq -> [B, H, Tq, dv].
    key_mask: optional [B, Tk] bool, False at padding keys; a query always sees its own key, so padding
    queries stay finite (their outputs are meaningless but reach no real token).
    """
    tq, tk = q.shape[-2], k.shape[-2]
    assert tk >= tq, "keys must include the queries' own positions"
    if tq == tk and key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    qpos = torch.arange(tq, device=q.device) + (tk - tq)
    kpos = torch.arange(tk, device=q.device)[None, :]
    mask = kpos <= qpos[:, None]  # [Tq, Tk], True = attend
    if key_mask is not None:
        mask = mask & (key_mask[:, None, None, :] | (kpos == qpos[:, None]))  # [B, 1, Tq, Tk]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


class GroupedQueryAttention(nn.Module):
    """Causal GQA (MHA when num_kv_heads == num_heads) with RoPE on the full head dim, no biases."""

    def __init__(self, hidden_size: int, cfg: AttentionConfig, max_seq_len: int, init_std: float) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads or cfg.num_heads
        if self.num_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        if cfg.head_dim is None and hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={self.num_heads}")
        self.head_dim = cfg.head_dim or hidden_size // self.num_heads
        self.wq = _linear(hidden_size, self.num_heads * self.head_dim, init_std)
        self.wk = _linear(hidden_size, self.num_kv_heads * self.head_dim, init_std)
        self.wv = _linear(hidden_size, self.num_kv_heads * self.head_dim, init_std)
        self.wo = _linear(self.num_heads * self.head_dim, hidden_size, init_std)
        self.rope = RotaryEmbedding(self.head_dim, max_seq_len, cfg.rope_theta)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]; key_mask: [B, cached + T] bool, False at padding."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.wk(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hk, T, hd]
        v = self.wv(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, k, start_pos)
        if cache is not None:
            k, v = cache.update(k, v)
        o = _causal_attention(q, k, v, 1.0 / math.sqrt(self.head_dim),
                              enable_gqa=self.num_kv_heads != self.num_heads, key_mask=key_mask)
        return self.wo(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek MLA, training ("naive") path: per-head K and V are materialised from the KV latent.

    Per-head layouts: wq / wq_b output [q_nope (head_dim) | q_rope (rope_head_dim)]; wkv_a output
    [c_kv (kv_lora_rank) | k_rope (rope_head_dim)]; wkv_b output [k_nope (head_dim) | v (v_head_dim)].
    k_rope is one head shared by all query heads. Softmax scale 1/sqrt(head_dim + rope_head_dim).
    """

    def __init__(
        self, hidden_size: int, cfg: AttentionConfig, max_seq_len: int, init_std: float, norm_eps: float
    ) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        if self.num_heads <= 0:
            raise ValueError(f"num_heads must be positive, got {self.num_heads}")
        if cfg.head_dim is None and hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={self.num_heads}")
        if cfg.kv_lora_rank <= 0:
            raise ValueError(f"kv_lora_rank must be positive, got {cfg.kv_lora_rank}")
        self.head_dim = cfg.head_dim or hidden_size // self.num_heads
        self.rope_head_dim = cfg.rope_head_dim
        self.v_head_dim = cfg.v_head_dim or self.head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        h, qk_dim = self.num_heads, self.head_dim + self.rope_head_dim
        if self.q_lora_rank is None:
            self.wq = _linear(hidden_size, h * qk_dim, init_std)
        else:
            if self.q_lora_rank <= 0:
                raise ValueError(f"q_lora_rank must be positive or None, got {self.q_lora_rank}")
            self.wq_a = _linear(hidden_size, self.q_lora_rank, init_std)
            self.q_norm = nn.RMSNorm(self.q_lora_rank, eps=norm_eps)
            self.wq_b = _linear(self.q_lora_rank, h * qk_dim, init_std)
        self.wkv_a = _linear(hidden_size, self.kv_lora_rank + self.rope_head_dim, init_std)
        self.kv_norm = nn.RMSNorm(self.kv_lora_rank, eps=norm_eps)
        self.wkv_b = _linear(self.kv_lora_rank, h * (self.head_dim + self.v_head_dim), init_std)
        self.wo = _linear(h * self.v_head_dim, hidden_size, init_std)
        self.rope = RotaryEmbedding(self.rope_head_dim, max_seq_len, cfg.rope_theta)
        self.scale = 1.0 / math.sqrt(qk_dim)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]; key_mask: [B, cached + T] bool, False at padding."""
        b, t, _ = x.shape
        h, dn, dr, dv = self.num_heads, self.head_dim, self.rope_head_dim, self.v_head_dim
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(cheap(self.q_norm, self.wq_a(x)))
        q = q.view(b, t, h, dn + dr).transpose(1, 2)  # [B, H, T, dn + dr]
        q_nope, q_rope = q.split((dn, dr), dim=-1)
        c_kv, k_rope = self.wkv_a(x).split((self.kv_lora_rank, dr), dim=-1)  # [B, T, d_c], [B, T, dr]
        kv = self.wkv_b(cheap(self.kv_norm, c_kv)).view(b, t, h, dn + dv).transpose(1, 2)
        k_nope, v = kv.split((dn, dv), dim=-1)  # [B, H, T, dn], [B, H, T, dv]
        q_rope, k_rope = self.rope(q_rope, k_rope.unsqueeze(1), start_pos)  # k_rope: [B, 1, T, dr]
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(b, h, t, dr)), dim=-1)  # [B, H, T, dn + dr]
        if cache is not None:
            k, v = cache.update(k, v)
        o = _causal_attention(q, k, v, self.scale, key_mask=key_mask)  # [B, H, T, dv]
        return self.wo(o.transpose(1, 2).reshape(b, t, h * dv))


def build_attention(cfg: ModelConfig) -> nn.Module:
    """The attention sublayer selected by `cfg.attention.kind`."""
    a = cfg.attention
    if a.kind == "gqa":
        return GroupedQueryAttention(cfg.hidden_size, a, cfg.max_seq_len, cfg.init_std)
    if a.kind == "mla":
        return MultiHeadLatentAttention(cfg.hidden_size, a, cfg.max_seq_len, cfg.init_std, cfg.norm_eps)
    raise ValueError(f"model.attention.kind: unknown '{a.kind}' (expected gqa or mla)")

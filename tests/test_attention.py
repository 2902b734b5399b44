"""Attention sublayers against explicit fp64 references (loops over heads, queries and keys)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engram_pretrain.model.attention import (
    GroupedQueryAttention,
    MultiHeadLatentAttention,
    RotaryEmbedding,
    build_attention,
)
from engram_pretrain.model.config import AttentionConfig, ModelConfig

D, T, B, MAX_T = 32, 7, 2, 16


def ref_rope(x: torch.Tensor, start_pos: int, theta: float) -> torch.Tensor:
    """Rotate pair (x[i], x[i + d/2]) at position p by p * theta^(-2i/d), one scalar at a time."""
    d = x.shape[-1]
    half = d // 2
    out = x.clone()
    for t in range(x.shape[-2]):
        for i in range(half):
            a = (start_pos + t) * theta ** (-2.0 * i / d)
            c, s = math.cos(a), math.sin(a)
            x1, x2 = x[..., t, i], x[..., t, i + half]
            out[..., t, i] = x1 * c - x2 * s
            out[..., t, i + half] = x1 * s + x2 * c
    return out


def ref_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k: [B, H, T, dk], v: [B, H, T, dv] -> [B, H, T, dv] via explicit softmax over keys j <= t."""
    b, h, t, _ = q.shape
    out = torch.zeros(b, h, t, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                scores = torch.stack([q[bi, hi, ti] @ k[bi, hi, j] * scale for j in range(ti + 1)])
                w = torch.exp(scores - scores.max())
                w = w / w.sum()
                out[bi, hi, ti] = sum(w[j] * v[bi, hi, j] for j in range(ti + 1))
    return out


def ref_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def heads(y: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T, n*d] -> [B, n, T, d]."""
    b, t, _ = y.shape
    return y.reshape(b, t, n, -1).permute(0, 2, 1, 3)


def make_gqa(num_kv_heads: int | None, theta: float = 10000.0) -> GroupedQueryAttention:
    torch.manual_seed(0)
    cfg = AttentionConfig(kind="gqa", num_heads=4, num_kv_heads=num_kv_heads, rope_theta=theta)
    return GroupedQueryAttention(D, cfg, MAX_T, init_std=0.3).double()


def make_mla(q_lora_rank: int | None) -> MultiHeadLatentAttention:
    torch.manual_seed(0)
    cfg = AttentionConfig(kind="mla", num_heads=3, head_dim=6, rope_head_dim=4, v_head_dim=5,
                          kv_lora_rank=10, q_lora_rank=q_lora_rank, rope_theta=500.0)
    m = MultiHeadLatentAttention(D, cfg, MAX_T, init_std=0.3, norm_eps=1e-6).double()
    for mod in m.modules():  # non-trivial norm weights so the reference checks where they are applied
        if isinstance(mod, nn.RMSNorm):
            nn.init.normal_(mod.weight, mean=1.0, std=0.3)
    return m


def ref_gqa(m: GroupedQueryAttention, x: torch.Tensor, start_pos: int, theta: float) -> torch.Tensor:
    h, hk = m.num_heads, m.num_kv_heads
    q = heads(x @ m.wq.weight.T, h)
    k = heads(x @ m.wk.weight.T, hk)
    v = heads(x @ m.wv.weight.T, hk)
    q, k = ref_rope(q, start_pos, theta), ref_rope(k, start_pos, theta)
    group = h // hk
    k_rep = torch.stack([k[:, i // group] for i in range(h)], dim=1)  # query head i reads kv head i // group
    v_rep = torch.stack([v[:, i // group] for i in range(h)], dim=1)
    o = ref_causal_attention(q, k_rep, v_rep, 1.0 / math.sqrt(q.shape[-1]))
    return o.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1) @ m.wo.weight.T


def ref_mla(m: MultiHeadLatentAttention, x: torch.Tensor, theta: float, eps: float) -> torch.Tensor:
    h, dn, dr, dv, dc = m.num_heads, m.head_dim, m.rope_head_dim, m.v_head_dim, m.kv_lora_rank
    if m.q_lora_rank is None:
        q = x @ m.wq.weight.T
    else:
        q = ref_rmsnorm(x @ m.wq_a.weight.T, m.q_norm.weight, eps) @ m.wq_b.weight.T
    q = heads(q, h)  # [B, H, T, dn + dr]
    q = torch.cat([q[..., :dn], ref_rope(q[..., dn:], 0, theta)], dim=-1)
    a = x @ m.wkv_a.weight.T
    c_kv, k_rope = a[..., :dc], a[..., dc:]
    k_rope = ref_rope(k_rope, 0, theta)  # [B, T, dr], one key shared by all heads
    kv = heads(ref_rmsnorm(c_kv, m.kv_norm.weight, eps) @ m.wkv_b.weight.T, h)  # [B, H, T, dn + dv]
    k = torch.cat([kv[..., :dn], k_rope.unsqueeze(1).expand(-1, h, -1, -1)], dim=-1)
    v = kv[..., dn:]
    o = ref_causal_attention(q, k, v, 1.0 / math.sqrt(dn + dr))
    return o.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], h * dv) @ m.wo.weight.T


class ListCache:
    """Minimal KVCache: concatenates along the time axis."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=-2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=-2)
        return self.k, self.v


MODULES = {
    "mha": lambda: make_gqa(None),
    "gqa": lambda: make_gqa(2),
    "mla_direct_q": lambda: make_mla(None),
    "mla_lora_q": lambda: make_mla(12),
}


@pytest.mark.parametrize("num_kv_heads", [None, 4, 2, 1])
@pytest.mark.parametrize("start_pos", [0, 5])
def test_gqa_matches_reference(num_kv_heads: int | None, start_pos: int) -> None:
    m = make_gqa(num_kv_heads, theta=300.0)
    x = torch.randn(B, T, D, dtype=torch.float64)
    out = m(x, start_pos=start_pos)
    assert out.shape == (B, T, D)
    torch.testing.assert_close(out, ref_gqa(m, x, start_pos, 300.0), rtol=0, atol=1e-10)


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_mla_matches_reference(q_lora_rank: int | None) -> None:
    m = make_mla(q_lora_rank)
    x = torch.randn(B, T, D, dtype=torch.float64)
    out = m(x)
    assert out.shape == (B, T, D)
    torch.testing.assert_close(out, ref_mla(m, x, 500.0, 1e-6), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(MODULES))
def test_causality(name: str) -> None:
    m = MODULES[name]()
    x = torch.randn(B, T, D, dtype=torch.float64)
    out = m(x)
    for t in range(T - 1):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(B, T - t - 1, D, dtype=torch.float64)
        out2 = m(x2)
        torch.testing.assert_close(out2[:, :t + 1], out[:, :t + 1], rtol=0, atol=1e-12)
        assert (out2[:, t + 1:] - out[:, t + 1:]).abs().min() > 1e-8


@pytest.mark.parametrize("name", list(MODULES))
def test_kv_cache_decoding_matches_full_forward(name: str) -> None:
    m = MODULES[name]()
    x = torch.randn(B, T, D, dtype=torch.float64)
    full = m(x)
    cache, pos, outs = ListCache(), 0, []
    for n in (3, 1, 2, 1):  # prefill, single-token steps and a multi-token chunk after a prefix
        outs.append(m(x[:, pos:pos + n], start_pos=pos, cache=cache))
        pos += n
    assert pos == T
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=1e-12)


def test_rope_matches_formula_and_relative_position() -> None:
    theta = 10000.0
    rope = RotaryEmbedding(8, 64, theta)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 10, 8, dtype=torch.float64)
    torch.testing.assert_close(rope.rotate(x, 4), ref_rope(x, 4, theta), rtol=0, atol=1e-12)
    torch.testing.assert_close(rope.rotate(x).norm(dim=-1), x.norm(dim=-1), rtol=0, atol=1e-12)

    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def score(m_pos: int, n_pos: int) -> float:
        qm = rope.rotate(q.view(1, 1, 1, 8), m_pos)
        kn = rope.rotate(k.view(1, 1, 1, 8), n_pos)
        return float((qm * kn).sum())

    for m_pos, n_pos in [(3, 1), (7, 7), (2, 9), (0, 5)]:
        for shift in (1, 13, 40):
            assert score(m_pos + shift, n_pos + shift) == pytest.approx(score(m_pos, n_pos), abs=1e-12)
    assert abs(score(3, 1) - score(3, 2)) > 1e-3  # the score does depend on the offset


def test_rope_start_pos_offset_and_bounds() -> None:
    rope = RotaryEmbedding(6, 20, 100.0)
    q = torch.randn(2, 3, 12, 6, dtype=torch.float64)
    k = torch.randn(2, 1, 12, 6, dtype=torch.float64)
    fq, fk = rope(q, k)
    for s, t in [(0, 4), (5, 7), (11, 1)]:
        sq, sk = rope(q[:, :, s:s + t], k[:, :, s:s + t], start_pos=s)
        torch.testing.assert_close(sq, fq[:, :, s:s + t], rtol=0, atol=0)
        torch.testing.assert_close(sk, fk[:, :, s:s + t], rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        rope.rotate(q, start_pos=9)
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(5, 20)


def test_rope_cache_survives_low_precision_cast() -> None:
    m = make_gqa(2).float()
    x = torch.randn(B, T, D)
    ref = m(x)
    m.bfloat16()
    out = m(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert m.rope.cos.dtype == torch.float64
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
    assert not any("cos" in k or "sin" in k for k in m.state_dict())  # non-persistent buffers


@pytest.mark.parametrize("name", list(MODULES))
def test_gradients_reach_every_parameter(name: str) -> None:
    m = MODULES[name]()
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    m(x).square().sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, pname
    assert x.grad is not None and x.grad.abs().max() > 0


def test_build_attention_init_and_errors() -> None:
    cfg = ModelConfig(hidden_size=128, max_seq_len=32, init_std=0.02,
                      attention=AttentionConfig(kind="gqa", num_heads=4, num_kv_heads=2))
    gqa = build_attention(cfg)
    assert isinstance(gqa, GroupedQueryAttention) and gqa.head_dim == 32
    assert gqa.wk.weight.shape == (2 * 32, 128)
    cfg.attention = AttentionConfig(kind="mla", num_heads=4, rope_head_dim=8, kv_lora_rank=64, q_lora_rank=48)
    mla = build_attention(cfg)
    assert isinstance(mla, MultiHeadLatentAttention)
    assert mla.head_dim == 32 and mla.v_head_dim == 32 and mla.scale == pytest.approx(1 / math.sqrt(40))
    assert mla.wkv_a.weight.shape == (64 + 8, 128) and mla.wkv_b.weight.shape == (4 * 64, 64)
    assert mla.wo.weight.shape == (128, 4 * 32)
    for module in (gqa, mla):
        for mod in module.modules():
            if isinstance(mod, nn.Linear):
                assert mod.bias is None
                assert mod.weight.std().item() == pytest.approx(0.02, rel=0.1)

    cfg.attention = AttentionConfig(kind="gqa", num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        build_attention(cfg)
    cfg.attention = AttentionConfig(kind="gqa", num_heads=5)
    with pytest.raises(ValueError, match="divisible"):
        build_attention(cfg)
    cfg.attention = AttentionConfig(kind="mla", num_heads=4, rope_head_dim=3)
    with pytest.raises(ValueError, match="even"):
        build_attention(cfg)
    cfg.attention.kind = "linear"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="unknown"):
        build_attention(cfg)

"""Engram conditional-memory module (arXiv 2601.07372 §2; reference demo `engram_demo_v1.py`).

Hashing is done outside this module: `model/engram_hash.py` maps token ids to per-head row ids
(tokenizer compression, suffix n-grams, multiplicative-XOR hash modulo a prime per head). The module
receives those row ids `[B, T, H]` (H = (max_ngram - 1) * num_heads, order-major, without offsets),
adds the per-head row offsets of its flat table, looks the rows up and fuses the memory into the
residual streams:

    e      = concat_{n,k} E[n,k][row]                                # [B, T, d_mem]
    s[m]   = <RMSNorm(h[m]), RMSNorm(W_K[m] e)> / sqrt(D)             # per branch m
    s[m]   = sign(s) * sqrt(max(|s|, 1e-6))                           # signed_sqrt_gate
    u[m]   = sigmoid(s[m]) * W_V e                                    # gating off: alpha = 1
    Y      = u + SiLU(CausalDilatedDepthwiseConv(RMSNorm_m(u)))       # short_conv off: Y = u

The caller adds Y to the streams (`h[m] += Y[m]`). In the `w/o multi branch` ablation the caller
feeds a single branch (the H_pre aggregate) and handles the output itself.

The table is pluggable (`EngramTable`): `LocalEngramTable` is a plain dense parameter; a sharded or
offloaded implementation only needs `lookup`, `num_rows` and `dim`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .cache import ShortConvState
from .config import EngramConfig
from .recompute import cheap, recomputing

GATE_ABS_MIN = 1e-6
"""Clamp of |s| inside the signed square root (demo value)."""


@runtime_checkable
class EngramTable(Protocol):
    """Storage of one layer's flat multi-head embedding table."""

    num_rows: int
    dim: int

    def lookup(self, flat_row_ids: torch.Tensor) -> torch.Tensor:
        """flat_row_ids: [...] int64 (offsets included) -> rows [..., dim]."""
        ...


class LocalEngramTable(nn.Module):
    """Dense in-module table: Parameter `weight` [num_rows, dim] ~ N(0, init_std^2)."""

    def __init__(self, num_rows: int, dim: int, init_std: float = 0.02, sparse: bool = False) -> None:
        super().__init__()
        if num_rows <= 0 or dim <= 0:
            raise ValueError(f"LocalEngramTable: num_rows={num_rows} and dim={dim} must be positive")
        self.num_rows = num_rows
        self.dim = dim
        self.sparse = sparse
        self.weight = nn.Parameter(torch.empty(num_rows, dim))
        nn.init.normal_(self.weight, mean=0.0, std=init_std)

    def lookup(self, flat_row_ids: torch.Tensor) -> torch.Tensor:
        """flat_row_ids: [...] -> [..., dim]; the gradient touches only the looked-up rows."""
        return F.embedding(flat_row_ids, self.weight, sparse=self.sparse)

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}, sparse={self.sparse}"


def _branch_rms_norm(x: torch.Tensor, norms: nn.ModuleList) -> torch.Tensor:
    """x: [..., G, D] -> norms[m](x[..., m, :]) for every branch m at once (one normalisation over D times
    the stacked [G, D] weights)."""
    weight = torch.stack([n.weight for n in norms])  # [G, D]
    return F.rms_norm(x, (x.shape[-1],), eps=norms[0].eps) * weight


TableFactory = Callable[[int, int, int], EngramTable]
"""(layer_id, num_rows, dim) -> table of that layer."""


def local_table_factory(init_std: float = 0.02, sparse: bool = False) -> TableFactory:
    """Factory building a `LocalEngramTable` per layer."""

    def make(layer_id: int, num_rows: int, dim: int) -> EngramTable:
        del layer_id
        return LocalEngramTable(num_rows, dim, init_std=init_std, sparse=sparse)

    return make


class EngramModule(nn.Module):
    """Gated fusion of hashed n-gram memory into `num_branches` residual branches of width D."""

    def __init__(
        self,
        hidden_size: int,
        cfg: EngramConfig,
        layer_id: int,
        head_sizes: list[int],
        num_branches: int,
        table: EngramTable,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        num_heads = (cfg.max_ngram - 1) * cfg.num_heads
        if cfg.max_ngram < 2 or cfg.num_heads < 1:
            raise ValueError(f"engram: max_ngram={cfg.max_ngram} must be >= 2 and "
                             f"num_heads={cfg.num_heads} >= 1")
        if cfg.d_mem % num_heads != 0:
            raise ValueError(f"engram.d_mem={cfg.d_mem} is not divisible by (max_ngram - 1) * num_heads "
                             f"= {num_heads}")
        if len(head_sizes) != num_heads:
            raise ValueError(f"engram layer {layer_id}: expected {num_heads} head sizes, "
                             f"got {len(head_sizes)}")
        if any(s <= 0 for s in head_sizes):
            raise ValueError(f"engram layer {layer_id}: head sizes must be positive, got {head_sizes}")
        if num_branches < 1:
            raise ValueError(f"engram layer {layer_id}: num_branches={num_branches} must be >= 1")
        if not cfg.multi_branch and num_branches != 1:
            raise ValueError(f"engram layer {layer_id}: multi_branch=False needs num_branches=1, "
                             f"got {num_branches}")
        d_head = cfg.d_mem // num_heads
        if table.dim != d_head:
            raise ValueError(f"engram layer {layer_id}: table dim {table.dim} != d_head {d_head}")
        if table.num_rows != sum(head_sizes):
            raise ValueError(f"engram layer {layer_id}: table has {table.num_rows} rows, "
                             f"head sizes sum to {sum(head_sizes)}")

        self.hidden_size = hidden_size
        self.layer_id = layer_id
        self.num_branches = num_branches
        self.num_lookup_heads = num_heads
        self.d_head = d_head
        self.d_mem = cfg.d_mem
        self.head_sizes = list(head_sizes)
        self.gating = cfg.gating
        self.signed_sqrt_gate = cfg.signed_sqrt_gate
        self.short_conv = cfg.short_conv
        self.conv_kernel = cfg.conv_kernel
        self.conv_dilation = cfg.max_ngram

        offsets = [0]
        for s in head_sizes[:-1]:
            offsets.append(offsets[-1] + s)
        self.register_buffer("head_offsets", torch.tensor(offsets, dtype=torch.int64), persistent=False)
        self.table = table

        self.value_proj = nn.Linear(cfg.d_mem, hidden_size, bias=True)
        linears = [self.value_proj]
        if cfg.gating:
            self.key_projs = nn.ModuleList(nn.Linear(cfg.d_mem, hidden_size, bias=True)
                                           for _ in range(num_branches))
            self.key_norms = nn.ModuleList(nn.RMSNorm(hidden_size, eps=cfg.norm_eps)
                                           for _ in range(num_branches))
            self.query_norms = nn.ModuleList(nn.RMSNorm(hidden_size, eps=cfg.norm_eps)
                                             for _ in range(num_branches))
            linears.extend(self.key_projs)
        if cfg.short_conv:
            self.conv_norms = nn.ModuleList(nn.RMSNorm(hidden_size, eps=cfg.norm_eps)
                                            for _ in range(num_branches))
            channels = num_branches * hidden_size
            self.conv = nn.Conv1d(channels, channels, kernel_size=cfg.conv_kernel, groups=channels,
                                  bias=False, dilation=self.conv_dilation)
            if cfg.conv_zero_init:
                nn.init.zeros_(self.conv.weight)
        for lin in linears:
            nn.init.normal_(lin.weight, mean=0.0, std=init_std)
            nn.init.zeros_(lin.bias)

        self.last_gate_mean: torch.Tensor | None = None
        """Detached mean of alpha per branch [G] from the latest forward (for metrics)."""

    def memory(self, row_ids: torch.Tensor) -> torch.Tensor:
        """row_ids: [B, T, H] per-head rows (no offsets) -> e: [B, T, d_mem]."""
        if row_ids.shape[-1] != self.num_lookup_heads:
            raise ValueError(f"engram layer {self.layer_id}: row_ids last dim {row_ids.shape[-1]} "
                             f"!= {self.num_lookup_heads} heads")
        rows = self.table.lookup(row_ids + self.head_offsets)  # [B, T, H, d_head]
        return rows.reshape(*row_ids.shape[:-1], self.d_mem)

    def gates(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """h: [B, T, G, D], e: [B, T, d_mem] -> alpha: [B, T, G] (ones when gating is off).

        The D-long dot product, signed sqrt and sigmoid run in at least fp32 (a bf16 model's gates are
        not a bf16 reduction); alpha comes back in h's dtype.

        All branches at once: the G key projections as one matmul over their concatenated weights, the
        per-branch RMSNorms as one normalisation times the stacked [G, D] weights (same maths as applying
        `key_projs[m]`, `key_norms[m]`, `query_norms[m]` branch by branch; fewer, larger ops).
        """
        if not self.gating:
            return h.new_ones(h.shape[:-1])
        g, d = self.num_branches, self.hidden_size
        weight = torch.cat([p.weight for p in self.key_projs])  # [G*D, d_mem]
        bias = torch.cat([p.bias for p in self.key_projs])  # [G*D]
        key = F.linear(e, weight, bias).unflatten(-1, (g, d))  # [B, T, G, D]
        return cheap(self._gate, key, h)  # recomputed from the key projection under selective recompute

    def _gate(self, key: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Key [B, T, G, D] and branch states h -> alpha [B, T, G] (the norms, dot product and sigmoid)."""
        d = self.hidden_size
        key = _branch_rms_norm(key, self.key_norms)
        query = _branch_rms_norm(h, self.query_norms)  # [B, T, G, D]
        acc = torch.promote_types(key.dtype, torch.float32)  # the dot product of a bf16 model in fp32
        s = (key.to(acc) * query.to(acc)).sum(dim=-1) * (1.0 / math.sqrt(d))  # [B, T, G]
        if self.signed_sqrt_gate:
            s = torch.sign(s) * torch.sqrt(s.abs().clamp_min(GATE_ABS_MIN))
        return torch.sigmoid(s).to(h.dtype)

    def _short_conv(self, u: torch.Tensor, conv_state: ShortConvState | None = None,
                    token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """u: [B, T, G, D] -> SiLU(causal dilated depthwise conv of per-branch RMSNorm(u)) [B, T, G, D].

        Without `conv_state` the conv reads zeros before the sequence start; with it, the inputs of the
        earlier decoding calls (and the state keeps the latest ones). `token_mask` [B, T] (False at
        padding) zeroes the padding positions' inputs, as if the sequence started after them.

        The depthwise conv (`self.conv.weight` [G*D, 1, K]) is computed as K shifted multiply-adds in the
        [B, T, channels] layout: y[t] = sum_k w[:, k] * x[t - (K - 1 - k) * dilation], the cross-correlation
        `nn.Conv1d` computes, without its transposes and its slow depthwise backward on CPU.
        """
        b, t, g, d = u.shape
        x = _branch_rms_norm(u, self.conv_norms).reshape(b, t, g * d)  # [B, T, G*D]
        if token_mask is not None:
            x = x * token_mask.unsqueeze(-1).to(x.dtype)
        width = (self.conv_kernel - 1) * self.conv_dilation
        if conv_state is None:
            x = F.pad(x, (0, 0, width, 0))  # [B, width+T, G*D], zeros before the sequence start
        else:
            x = conv_state.extend(x, width)
        w = self.conv.weight[:, 0, :].t().contiguous()  # [K, G*D]: contiguous rows broadcast fast
        y = x[:, :t] * w[0]
        for k in range(1, self.conv_kernel):
            shift = k * self.conv_dilation
            y = torch.addcmul(y, x[:, shift:shift + t], w[k])  # [B, T, G*D]
        return F.silu(y).reshape(b, t, g, d)

    def forward(self, h: torch.Tensor, row_ids: torch.Tensor, conv_state: ShortConvState | None = None,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h: [B, T, G, D] branch states, row_ids: [B, T, H] -> Y: [B, T, G, D] (caller adds to h).

        conv_state: short-conv history for incremental decoding; token_mask: [B, T] bool, False at padding.
        """
        if h.dim() != 4 or h.shape[2] != self.num_branches or h.shape[3] != self.hidden_size:
            raise ValueError(f"engram layer {self.layer_id}: h must be [B, T, {self.num_branches}, "
                             f"{self.hidden_size}], got {tuple(h.shape)}")
        if row_ids.shape[:2] != h.shape[:2]:
            raise ValueError(f"engram layer {self.layer_id}: row_ids {tuple(row_ids.shape)} and h "
                             f"{tuple(h.shape)} disagree on [B, T]")
        e = self.memory(row_ids)  # [B, T, d_mem]
        value = self.value_proj(e).unsqueeze(2)  # [B, T, 1, D]
        alpha = self.gates(h, e)  # [B, T, G]
        if not recomputing():  # the statistics of the real forward, not of an activation recompute
            self.last_gate_mean = alpha.detach().mean(dim=(0, 1))
        u = cheap(torch.mul, alpha.unsqueeze(-1), value)  # [B, T, G, D]
        if not self.short_conv:
            return u
        return cheap(lambda x: x + self._short_conv(x, conv_state, token_mask), u, module=self)

    def extra_repr(self) -> str:
        return (f"layer_id={self.layer_id}, hidden={self.hidden_size}, branches={self.num_branches}, "
                f"d_mem={self.d_mem}, heads={self.num_lookup_heads}, gating={self.gating}, "
                f"short_conv={self.short_conv}, signed_sqrt={self.signed_sqrt_gate}")

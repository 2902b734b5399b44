"""Model configuration dataclasses (torch-free, shared by training, export and the HF remote code).

Each field carries a docstring right below it; `engram_pretrain.config_docs` renders them into
`docs/config_reference.md`. Layer indices are 0-based block indices throughout (the reference demo's
convention: the paper's "layer 2" of a 12-layer model is index 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class AttentionConfig:
    """Self-attention sublayer."""

    kind: Literal["gqa", "mla"] = "gqa"
    """`gqa`: grouped-query / multi-head attention with RoPE on the full head dim; `mla`: DeepSeek
    multi-head latent attention (low-rank KV latent plus a decoupled shared RoPE key)."""
    num_heads: int = 4
    """Number of query heads."""
    num_kv_heads: int | None = None
    """GQA: number of key/value heads (must divide `num_heads`); None means `num_heads` (MHA)."""
    head_dim: int | None = None
    """GQA: per-head width; None means `hidden_size // num_heads`. MLA: the no-RoPE q/k part."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    kv_lora_rank: int = 512
    """MLA: width of the compressed KV latent (d_c)."""
    q_lora_rank: int | None = None
    """MLA: width of the compressed query latent; None uses a direct query projection."""
    rope_head_dim: int = 64
    """MLA: width of the decoupled RoPE part of q and k (shared across heads for k)."""
    v_head_dim: int | None = None
    """MLA: per-head value width; None means `head_dim`."""


@dataclass
class MoEConfig:
    """DeepSeekMoE feed-forward: shared experts plus fine-grained routed SwiGLU experts."""

    num_routed_experts: int = 8
    """Routed experts per MoE layer (N_r)."""
    num_shared_experts: int = 1
    """Shared experts per MoE layer (N_s), fused into one SwiGLU of width N_s * expert_dim."""
    top_k: int = 2
    """Routed experts chosen per token (K_r)."""
    expert_dim: int = 64
    """Hidden width of every routed and shared expert (d_e)."""
    first_k_dense: int = 1
    """The first k blocks use a dense SwiGLU FFN instead of MoE."""
    dense_ffn_dim: int | None = None
    """Width of the dense FFN; None means (num_shared_experts + top_k) * expert_dim."""
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    """Router affinity: `sigmoid` (DeepSeek-V3) or `softmax` over routed experts (V2)."""
    norm_topk_prob: bool = True
    """Normalise the selected affinities to sum to 1 before scaling."""
    routed_scaling_factor: float = 2.5
    """Multiplier on the normalised routing weights (V3: 2.5)."""
    bias_update_rate: float = 1e-3
    """Loss-free balancing step gamma: b_i += gamma * sign(mean_load - load_i) after each optimizer
    step; 0 freezes the bias."""
    seq_aux_loss_coef: float = 0.0
    """Coefficient of the V3 sequence-wise balance loss; 0 disables it."""


@dataclass
class HyperConnectionConfig:
    """Manifold-constrained hyper-connections (mHC); `num_streams: 1` is a plain pre-norm residual."""

    num_streams: int = 4
    """Residual streams M (the paper uses 4); 1 disables mHC."""
    sinkhorn_iters: int = 20
    """Sinkhorn-Knopp iterations for H_res (row normalisation last)."""
    alpha_init: float = 0.01
    """Initial value of the three gating scalars (alpha_pre, alpha_post, alpha_res)."""
    phi_init_std: float = 0.006
    """Std of the random init of the dynamic projection phi (random, not zero, to break symmetry)."""
    eps: float = 1e-6
    """Epsilon of the RMS scaling, H_pre and Sinkhorn."""


@dataclass
class EngramConfig:
    """Engram conditional memory (hashed n-gram embedding tables); empty `layers` disables it."""

    layers: list[int] = field(default_factory=list)
    """0-based block indices that get an Engram module (paper's 27B: [1, 15] as in the demo)."""
    max_ngram: int = 3
    """Largest n-gram order N; orders 2..N are hashed (`+4-gram` ablation: 4)."""
    num_heads: int = 8
    """Hash heads K per order."""
    d_mem: int = 64
    """Width of the concatenated memory vector e_t; must be divisible by (max_ngram - 1) * num_heads."""
    base_table_size: list[int] = field(default_factory=lambda: [1009, 1009])
    """Per order (2..N) the start of the prime search for the head table sizes; one value is
    broadcast to every order."""
    pad_token_id: int = 2
    """Raw token id whose compressed id fills positions before the sequence start (demo: 2)."""
    seed: int = 0
    """Seed of the per-layer hash multipliers."""
    conv_kernel: int = 4
    """Kernel size of the depthwise causal short convolution (dilation = max_ngram)."""
    conv_zero_init: bool = True
    """Zero-initialise the short-conv weights (paper); False uses PyTorch's default init (demo)."""
    signed_sqrt_gate: bool = True
    """Apply sign(s) * sqrt(|s|) to the gate logit before the sigmoid (demo); False is paper Eq. 4."""
    multi_branch: bool = True
    """Per-stream gating (one key projection per mHC stream); False is the `w/o multi branch`
    ablation (one fusion on the H_pre aggregate, added like a sublayer output)."""
    token_compression: bool = True
    """Hash compressed ids; False (`w/o token compress`) hashes raw ids."""
    gating: bool = True
    """Context-aware gate; False (`w/o gating`) sets alpha = 1."""
    short_conv: bool = True
    """Short convolution; False (`w/o short conv`) makes Y = u."""
    reset_at_doc_boundary: bool = False
    """Fill n-gram positions that cross a document boundary (EOD) with the pad id."""
    table_init_std: float = 0.02
    """Std of the normal init of the table rows."""
    norm_eps: float = 1e-6
    """Epsilon of the Engram RMSNorms."""


@dataclass
class ModelConfig:
    """Decoder-only MoE transformer with optional mHC and Engram."""

    vocab_size: int = 1024
    """Backbone vocabulary size (raw token ids)."""
    hidden_size: int = 64
    """Model width d."""
    num_layers: int = 4
    """Number of transformer blocks."""
    max_seq_len: int = 256
    """Longest sequence the RoPE cache is built for."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon of the block and final norms."""
    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights."""
    tie_embeddings: bool = False
    """Share the token embedding with the LM head."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Attention sublayer."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """MoE feed-forward."""
    hyper_connections: HyperConnectionConfig = field(default_factory=HyperConnectionConfig)
    """mHC residual streams."""
    engram: EngramConfig = field(default_factory=EngramConfig)
    """Engram memory."""

    def validate(self) -> None:
        """Raise ValueError naming the offending key for inconsistent values."""
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"model.{key}: {msg}")

        a, m, h, e = self.attention, self.moe, self.hyper_connections, self.engram
        for key in ("vocab_size", "hidden_size", "num_layers", "max_seq_len"):
            need(getattr(self, key) > 0, key, "must be positive")
        need(a.num_heads > 0, "attention.num_heads", "must be positive")
        if a.kind == "gqa":
            kv = a.num_kv_heads or a.num_heads
            need(a.num_heads % kv == 0, "attention.num_kv_heads",
                 f"{kv} must divide num_heads={a.num_heads}")
            if a.head_dim is None:
                need(self.hidden_size % a.num_heads == 0, "attention.num_heads",
                     f"hidden_size={self.hidden_size} is not divisible by num_heads={a.num_heads}")
            hd = a.head_dim or self.hidden_size // a.num_heads
            need(hd % 2 == 0, "attention.head_dim", f"{hd} must be even for RoPE")
        elif a.kind == "mla":
            need(a.rope_head_dim % 2 == 0, "attention.rope_head_dim", "must be even for RoPE")
            need(a.kv_lora_rank > 0, "attention.kv_lora_rank", "must be positive")
        else:
            raise ValueError(f"model.attention.kind: unknown '{a.kind}' (expected gqa or mla)")
        need(m.num_routed_experts > 0, "moe.num_routed_experts", "must be positive")
        need(1 <= m.top_k <= m.num_routed_experts, "moe.top_k",
             f"{m.top_k} must be in [1, num_routed_experts={m.num_routed_experts}]")
        need(m.num_shared_experts >= 0, "moe.num_shared_experts", "must be >= 0")
        need(m.expert_dim > 0, "moe.expert_dim", "must be positive")
        need(0 <= m.first_k_dense <= self.num_layers, "moe.first_k_dense",
             f"{m.first_k_dense} must be in [0, num_layers={self.num_layers}]")
        need(m.score_func in ("sigmoid", "softmax"), "moe.score_func",
             f"unknown '{m.score_func}' (expected sigmoid or softmax)")
        need(m.bias_update_rate >= 0, "moe.bias_update_rate", "must be >= 0")
        need(h.num_streams >= 1, "hyper_connections.num_streams", "must be >= 1")
        need(h.sinkhorn_iters >= 1, "hyper_connections.sinkhorn_iters", "must be >= 1")
        for i, layer in enumerate(e.layers):
            need(0 <= layer < self.num_layers, f"engram.layers[{i}]",
                 f"layer index {layer} out of range [0, {self.num_layers})")
        need(len(set(e.layers)) == len(e.layers), "engram.layers", "duplicate layer index")
        need(e.max_ngram >= 2, "engram.max_ngram", "must be >= 2")
        need(e.num_heads >= 1, "engram.num_heads", "must be >= 1")
        groups = (e.max_ngram - 1) * e.num_heads
        need(e.d_mem % groups == 0, "engram.d_mem",
             f"{e.d_mem} is not divisible by (max_ngram - 1) * num_heads = {groups}")
        need(len(e.base_table_size) in (1, e.max_ngram - 1), "engram.base_table_size",
             f"needs 1 or max_ngram - 1 = {e.max_ngram - 1} entries, got {len(e.base_table_size)}")
        need(all(s >= 2 for s in e.base_table_size), "engram.base_table_size", "sizes must be >= 2")
        need(e.conv_kernel >= 1, "engram.conv_kernel", "must be >= 1")
        need(0 <= e.pad_token_id < self.vocab_size, "engram.pad_token_id",
             f"{e.pad_token_id} out of range [0, vocab_size={self.vocab_size})")

    @property
    def dense_ffn_dim(self) -> int:
        """Width of the dense FFN of the first `first_k_dense` blocks."""
        m = self.moe
        return m.dense_ffn_dim or (m.num_shared_experts + m.top_k) * m.expert_dim

    def engram_base_sizes(self) -> list[int]:
        """Per-order prime-search starts, with a single value broadcast to every order."""
        e = self.engram
        sizes = list(e.base_table_size)
        return sizes * (e.max_ngram - 1) if len(sizes) == 1 else sizes

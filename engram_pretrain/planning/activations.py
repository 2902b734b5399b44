"""Activation bytes of one micro-batch: what autograd saves for the backward, term by term, as the model's
forward saves it (`model/`; checked within 15% against the saved-tensor meter of `model.recompute` on CPU
runs in tests/test_plan.py).

Every term is bytes per token of one module, in the dtype the module saves it: `a` is the activation dtype
(bf16: 2, fp32: 4); mHC coefficient maths, router scores, the Engram gate dot product, the MoE combine and
the loss run in fp32 (4) whatever the model dtype, and under bf16 they save fp32 *copies* of their inputs.
Constants per micro-batch (stacked Engram weights, RoPE tables) are added separately. FlashAttention-style
SDPA keeps q, k, v, the output and the log-sum-exp (no T x T matrix).

A recompute mode is one function `(per-block bytes, outside-block bytes, inputs) -> ActivationBytes`
registered in `MODES`: `none` keeps every block's tensors; `full` keeps only the inputs of the
checkpointed blocks (streams and row ids) and needs one block's tensors again while recomputing it in the
backward (`recompute_peak`); `selective` keeps, per block, the input streams of every mHC layer, the
sublayer outputs, the matmul outputs and lookups (`selective_block_bytes`), and needs one cheap region's
internals back at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import RunConfig
from ..model.config import ModelConfig

F32 = 4
I64 = 8


@dataclass
class ActivationBytes:
    """Saved-for-backward bytes of one micro-batch on one rank."""

    saved: int
    """Held from the end of the forward until the backward reaches them (what the meter counts)."""
    recompute_peak: int = 0
    """Extra bytes while one checkpointed block is recomputed in the backward (full recompute)."""

    @property
    def peak(self) -> int:
        return self.saved + self.recompute_peak


def _norm(width: int, a: int) -> int:
    """RMSNorm: input, normalised value (for the weight gradient), fp32 rstd; the output is counted by
    its consumer."""
    return 2 * width * a + F32


def _hyper_connection(model: ModelConfig, a: int) -> int:
    """One mHC layer: the streams (fp32 copies under bf16: one for the coefficients, one for the mixing),
    the fused coefficient projection and its products, pre/post/res coefficients and the Sinkhorn logits,
    the sublayer output (fp32)."""
    m, d = model.hyper_connections.num_streams, model.hidden_size
    if m == 1:
        return 0
    n = m * m + 2 * m
    streams = m * d * (F32 if a == F32 else 2 * F32)
    return streams + F32 * (1 + 2 * n + 4 * m + 2 * m * m + d)


def _attention(model: ModelConfig, a: int) -> int:
    """Attention after its norm: the norm output, q/k/v as SDPA saves them, the output, the log-sum-exp,
    the output projection's (transposed, copied) input."""
    at, d = model.attention, model.hidden_size
    h = at.num_heads
    if at.kind == "gqa":
        hd = at.head_dim or d // h
        hk = at.num_kv_heads or h
        return d * a + a * (h * hd + 2 * hk * hd + 2 * h * hd) + F32 * h
    dn = at.head_dim or d // h
    dr, dv, dc = at.rope_head_dim, at.v_head_dim or dn, at.kv_lora_rank
    q = 0 if at.q_lora_rank is None else 3 * at.q_lora_rank * a + F32  # wq_a output, its norm, norm output
    kv = (dc + dr) * a + dc * a + F32 + dc * a
    return d * a + q + kv + 2 * h * (dn + dr) * a + h * (dn + dv) * a + F32 * h + 2 * h * dv * a


def _rope_constant(model: ModelConfig, seq_len: int) -> int:
    """cos/sin slices of the q and k rotations (fp32), per attention layer and micro-batch."""
    at = model.attention
    rd = (at.head_dim or model.hidden_size // at.num_heads) if at.kind == "gqa" else at.rope_head_dim
    return 4 * seq_len * (rd // 2) * F32


def _dense_ffn(model: ModelConfig, a: int) -> int:
    """Dense SwiGLU: the norm output, gate pre-activation, SiLU output, up projection, their product."""
    return model.hidden_size * a + 4 * model.dense_ffn_dim * a


def _moe(model: ModelConfig, a: int) -> int:
    """MoE: router (fp32 input copy under bf16, scores, top-k indices and weights), the sorted token copies
    and four hidden-width tensors per routed slot, the fp32 combine (expert outputs and weighted products),
    and the shared experts' four hidden-width tensors."""
    m, d = model.moe, model.hidden_size
    k, fe = m.top_k, m.expert_dim
    router = d * a + (d * F32 if a != F32 else 0) + m.num_routed_experts * F32 + I64 * k + F32 + F32 * k
    dispatch = I64 * k + k * d * a + 4 * k * fe * a + I64 * k + F32 * k + 2 * k * d * F32
    shared = 4 * m.num_shared_experts * fe * a
    return router + dispatch + shared


def _engram(model: ModelConfig, a: int, seq_len: int) -> int:
    """One Engram module: row ids (+ head offsets), the memory vector e, key and query branch norms, the
    fp32 gate dot product and the signed-sqrt/sigmoid chain, the value, the short conv's norm, its padded
    input and the SiLU input."""
    e, d = model.engram, model.hidden_size
    g = model.hyper_connections.num_streams if e.multi_branch else 1
    heads = (e.max_ngram - 1) * e.num_heads
    out = I64 * heads + e.d_mem * a + d * a
    if e.gating:
        out += 2 * (2 * g * d * a + F32 * g) + 2 * g * d * F32 + 5 * g * F32 + (g * a if a != F32 else 0)
    if e.short_conv:
        width = (e.conv_kernel - 1) * e.max_ngram
        out += 2 * g * d * a + F32 * g + g * d * a * (seq_len + width) // seq_len + g * d * a
    if not e.multi_branch:
        out += _hyper_connection(model, a)
    return out


def _engram_constant(model: ModelConfig, a: int) -> int:
    """Per micro-batch: the concatenated key projections, the stacked branch-norm weights, the conv taps."""
    e, d = model.engram, model.hidden_size
    g = model.hyper_connections.num_streams if e.multi_branch else 1
    out = 0
    if e.gating:
        out += g * d * e.d_mem * a + 2 * g * d * a
    if e.short_conv:
        out += g * d * a + e.conv_kernel * g * d * a
    return out


def block_bytes(model: ModelConfig, layer: int, tokens: int, seq_len: int, a: int) -> int:
    """Saved bytes of block `layer` for `tokens` tokens (sequences of `seq_len`)."""
    per_token = (_norm(model.hidden_size, a) + _attention(model, a) + _hyper_connection(model, a)
                 + _norm(model.hidden_size, a) + _hyper_connection(model, a)
                 + (_moe(model, a) if layer >= model.moe.first_k_dense else _dense_ffn(model, a)))
    const = _rope_constant(model, seq_len)
    if layer in model.engram.layers:
        per_token += _engram(model, a, seq_len)
        const += _engram_constant(model, a)
    return per_token * tokens + const


def outside_bytes(model: ModelConfig, tokens: int, a: int) -> int:
    """Embedding ids, head collapse, final norm, LM head input, fp32 log-softmax and labels."""
    m, d = model.hyper_connections.num_streams, model.hidden_size
    collapse = 0 if m == 1 else m * d * (F32 if a == F32 else 2 * F32) + F32 + 4 * F32 * m
    per_token = I64 + collapse + _norm(d, a) + d * a + model.vocab_size * F32 + I64
    return per_token * tokens


def checkpoint_input_bytes(model: ModelConfig, layer: int, tokens: int, a: int) -> int:
    """What a checkpointed block keeps: its input streams and (Engram blocks) its row ids."""
    out = model.hyper_connections.num_streams * model.hidden_size * a * tokens
    if layer in model.engram.layers:
        out += I64 * (model.engram.max_ngram - 1) * model.engram.num_heads * tokens
    return out


Mode = Callable[[ModelConfig, int, int, int, int], ActivationBytes]


def _none(model: ModelConfig, tokens: int, seq_len: int, a: int, every: int) -> ActivationBytes:
    blocks = sum(block_bytes(model, i, tokens, seq_len, a) for i in range(model.num_layers))
    return ActivationBytes(saved=blocks + outside_bytes(model, tokens, a))


def _full(model: ModelConfig, tokens: int, seq_len: int, a: int, every: int) -> ActivationBytes:
    saved, peak = outside_bytes(model, tokens, a), 0
    for i in range(model.num_layers):
        b = block_bytes(model, i, tokens, seq_len, a)
        if i % every == 0:
            saved += checkpoint_input_bytes(model, i, tokens, a)
            peak = max(peak, b)
        else:
            saved += b
    return ActivationBytes(saved=saved, recompute_peak=peak)


def selective_block_bytes(model: ModelConfig, layer: int, tokens: int, seq_len: int, a: int) -> int:
    """Saved bytes of block `layer` under selective recompute (`model/recompute.py`): norms, mHC
    coefficients and mixes, SwiGLU products and the Engram gate/conv chain are recipes; what stays is each
    mHC layer's input streams and real sublayer output, the attention core, the up projections' outputs, the
    router and dispatch tensors, the Engram ids, lookup, key and value."""
    d, m = model.hidden_size, model.hyper_connections.num_streams
    at, moe = model.attention, model.moe

    def hc(output_saved: bool) -> int:  # the layer's input streams (+ its sublayer output)
        return m * d * a + (d * a if m > 1 and output_saved else 0)

    if at.kind == "gqa":
        attn = _attention(model, a) - d * a  # the norm output is a recipe
    else:
        dn = at.head_dim or d // at.num_heads
        h, dr, dv, dc = at.num_heads, at.rope_head_dim, at.v_head_dim or dn, at.kv_lora_rank
        q = 0 if at.q_lora_rank is None else at.q_lora_rank * a  # wq_a output (its norm is a recipe)
        attn = q + (dc + dr) * a + 2 * h * (dn + dr) * a + h * (dn + dv) * a + F32 * h + 2 * h * dv * a
    if layer >= moe.first_k_dense:
        k, fe = moe.top_k, moe.expert_dim
        router = (d * F32 if a != F32 else 0) + moe.num_routed_experts * F32 + I64 * k + F32 + F32 * k
        dispatch = I64 * k + k * d * a + 2 * k * fe * a + I64 * k + F32 * k + 2 * k * d * F32
        ffn = router + dispatch + 2 * moe.num_shared_experts * fe * a
    else:
        ffn = 2 * model.dense_ffn_dim * a
    per_token = hc(True) + attn + hc(True) + ffn
    const = _rope_constant(model, seq_len)
    if layer in model.engram.layers:
        e = model.engram
        g = m if e.multi_branch else 1
        per_token += I64 * (e.max_ngram - 1) * e.num_heads + e.d_mem * a + d * a
        if e.gating:
            per_token += g * d * a + (m * d * a if e.multi_branch else 0)  # key; the branch states
            const += g * d * e.d_mem * a  # the concatenated key projections
        if not e.multi_branch:
            per_token += hc(False)  # the Engram output is a recipe
    return per_token * tokens + const


def _selective(model: ModelConfig, tokens: int, seq_len: int, a: int, every: int) -> ActivationBytes:
    saved = outside_bytes(model, tokens, a)
    for i in range(model.num_layers):
        block = selective_block_bytes if i % every == 0 else block_bytes
        saved += block(model, i, tokens, seq_len, a)
    return ActivationBytes(saved=saved, recompute_peak=_hyper_connection(model, a) * tokens)


MODES: dict[str, Mode] = {"none": _none, "full": _full, "selective": _selective}
"""train.activation_checkpointing -> its accounting."""


def activation_bytes(model: ModelConfig, micro_batch: int, seq_len: int, mode: str, bf16: bool,
                     every: int = 1) -> ActivationBytes:
    """Saved-for-backward bytes of one micro-batch of `micro_batch` x `seq_len` tokens."""
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing: no planner accounting for '{mode}' "
                         f"(known: {', '.join(MODES)})")
    return MODES[mode](model, micro_batch * seq_len, seq_len, 2 if bf16 else F32, every)


def logits_buffer_bytes(model: ModelConfig, tokens: int, bf16: bool) -> int:
    """Temporary buffers of the loss: the logits, their fp32 copy (bf16 runs) and the fp32 logits gradient
    (the saved log-softmax is counted in the activations)."""
    v = model.vocab_size
    return tokens * v * ((2 + F32) if bf16 else F32) + tokens * v * F32


def activations_for(cfg: RunConfig, micro_batch: int, mode: str, bf16: bool) -> ActivationBytes:
    """`activation_bytes` at the run's sequence length and recompute spacing."""
    return activation_bytes(cfg.model, micro_batch, cfg.data.seq_len, mode, bf16,
                            cfg.train.activation_checkpointing_every)

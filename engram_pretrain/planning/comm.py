"""Communication bytes and FLOPs of one optimizer step on one GPU, and the step time they imply.

Collectives are counted as ring algorithms, bytes *sent* per GPU: all-reduce 2 (P - 1) / P x S,
reduce-scatter and all-gather (P - 1) / P x S. Per step (G micro-batches of `tokens` each):

- backbone (dense over the world, routed experts over the expert-data-parallel group of world / ep):
  ZeRO-0 all-reduces the fp32 gradients once per step; ZeRO-1 reduce-scatters them once and all-gathers the
  updated parameters; ZeRO-2 reduce-scatters every micro-batch; ZeRO-3 all-gathers the parameters for the
  forward and the backward (and the recompute) and reduce-scatters the gradients, every micro-batch.
- expert all-to-all: per MoE layer and micro-batch, tokens x top_k rows of D go out (dispatch) and come
  back (combine) in the forward, and again in the backward; (ep - 1) / ep of them leave the rank under
  uniform routing. Full recompute runs the forward exchange again.
- sharded tables: per Engram layer and micro-batch, tokens x heads ids of which a fraction `dedup` are
  duplicates (docs/parallelism.md measures 20% at 1K and 50% at 16K tokens per rank of text); (W - 1) / W of
  the distinct ids cross ranks, each costing 8 bytes (id) + 4 x dim (row) forward + 4 x dim (gradient).
- replicated tables: `RowSparseAdam(grad_sync="mean")` all-gathers every rank's distinct gradient rows
  (id + fp32 row) once per step: (W - 1) x U x (8 + 4 x dim) bytes sent per GPU.

FLOPs: model FLOPs = 6 x activated parameters (with the LM head, as `train.metrics` reports MFU) x tokens +
attention 3 x L x T x H x (d_qk + d_v) per token (causal: half of the T x T products); full recompute adds
one forward of the checkpointed blocks (hardware FLOPs, not model FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model.config import ModelConfig
from .hardware import Cluster
from .inventory import ModelInventory
from .layout import Layout
from .memory import expert_share

FP32 = 4


def _ring(size: int) -> float:
    return (size - 1) / size if size > 1 else 0.0


@dataclass
class CommBytes:
    """Bytes one GPU sends per optimizer step, by collective, with the bandwidth each runs at."""

    items: dict[str, float] = field(default_factory=dict)
    bandwidth: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, nbytes: float, bw: float) -> None:
        if nbytes > 0:
            self.items[name] = self.items.get(name, 0.0) + nbytes
            self.bandwidth[name] = bw

    @property
    def total(self) -> float:
        return sum(self.items.values())

    @property
    def seconds(self) -> float:
        """Time of all of it back to back (no overlap with compute or with each other)."""
        return sum(b / self.bandwidth[k] for k, b in self.items.items())


def attention_dims(model: ModelConfig) -> tuple[int, int, int]:
    """(heads, d_qk, d_v) of the attention."""
    a = model.attention
    hd = a.head_dim or model.hidden_size // a.num_heads
    if a.kind == "gqa":
        return a.num_heads, hd, hd
    return a.num_heads, hd + a.rope_head_dim, a.v_head_dim or hd


def comm_bytes(model: ModelConfig, inv: ModelInventory, layout: Layout, cluster: Cluster, seq_len: int,
               bf16: bool, dedup: float) -> CommBytes:
    """Bytes one GPU sends in one optimizer step (module docstring)."""
    world, ep, g = cluster.world, layout.ep_size, layout.grad_accum_steps
    w = 2 if bf16 else FP32
    tokens = layout.micro_batch_size * seq_len
    local, total = expert_share(model.moe.num_routed_experts, ep)
    dense, experts = inv.dense_params, inv.expert_params * local // total
    c = CommBytes()
    groups = [("dense", dense, world, cluster.group_bandwidth(world)),
              ("experts", experts, world // ep, cluster.group_bandwidth(world // ep, strided=ep > 1))]
    recompute = layout.activation_checkpointing == "full"
    for name, n, p, bw in groups:
        r = _ring(p)
        if layout.zero_stage == 0:
            c.add(f"{name} grad all-reduce", 2 * r * FP32 * n, bw)
        elif layout.zero_stage == 1:
            c.add(f"{name} grad reduce-scatter", r * FP32 * n, bw)
            c.add(f"{name} param all-gather", r * w * n, bw)
        elif layout.zero_stage == 2:
            c.add(f"{name} grad reduce-scatter", g * r * FP32 * n, bw)
            c.add(f"{name} param all-gather", r * w * n, bw)
        else:
            gathers = 2 + (1 if recompute else 0)
            c.add(f"{name} param all-gather", g * gathers * r * w * n, bw)
            c.add(f"{name} grad reduce-scatter", g * r * FP32 * n, bw)
    moe_layers = model.num_layers - model.moe.first_k_dense
    if ep > 1:
        exchanges = 4 + (2 if recompute else 0)
        per_layer = exchanges * tokens * model.moe.top_k * model.hidden_size * w * _ring(ep)
        c.add("expert all-to-all", g * moe_layers * per_layer, cluster.group_bandwidth(ep))
    e = model.engram
    if e.layers:
        heads = (e.max_ngram - 1) * e.num_heads
        dim = inv.table_dim
        distinct = tokens * heads * (1.0 - dedup)
        bw = cluster.group_bandwidth(world)
        if layout.table_sharding == "sharded":
            lookups = 1 + (1 if recompute else 0)
            per_layer = distinct * _ring(world) * (lookups * (8 + FP32 * dim) + FP32 * dim)
            c.add("table all-to-all", g * len(e.layers) * per_layer, bw)
        elif world > 1:
            c.add("table grad all-gather", (world - 1) * g * len(e.layers) * distinct * (8 + FP32 * dim), bw)
    return c


@dataclass
class StepFlops:
    """FLOPs of one optimizer step on one GPU."""

    model: float
    """6 x activated parameters x tokens + attention (what MFU counts)."""
    hardware: float
    """model + the recomputed forward of checkpointed blocks."""


def step_flops(model: ModelConfig, inv: ModelInventory, layout: Layout, seq_len: int,
               every: int = 1) -> StepFlops:
    """Model and hardware FLOPs of one optimizer step on one GPU (`every`: checkpoint spacing)."""
    tokens = layout.micro_batch_size * layout.grad_accum_steps * seq_len
    h, dqk, dv = attention_dims(model)
    attn_fwd_per_layer = seq_len * h * (dqk + dv)  # per token, causal
    act = inv.counts.activated_with_head
    model_flops = tokens * (6 * act + 3 * model.num_layers * attn_fwd_per_layer)
    extra = 0.0
    if layout.activation_checkpointing == "full":
        # one more forward of the checkpointed blocks (everything but embedding, head and loss)
        head = inv.counts.lm_head
        share = len(range(0, model.num_layers, every)) / model.num_layers
        extra = tokens * share * (2 * (act - head) + model.num_layers * attn_fwd_per_layer)
    return StepFlops(model=model_flops, hardware=model_flops + extra)

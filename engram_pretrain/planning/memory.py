"""Model-state bytes per GPU: backbone parameters, gradients, fp32 master weights and Adam moments as the
DeepSpeed engine holds them for a ZeRO stage (0-3) and offload setting, expert parameters under expert
parallelism, and the Engram tables with their row-sparse Adam state (device or host).

How DeepSpeed lays the backbone out (deepspeed 0.19; the exact figures are checked against real runs in
tests/test_plan.py):

- stage 0: the module's own parameters, one AdamW state (exp_avg, exp_avg_sq, a 4-byte `step`) per tensor.
- stages 1-2: every optimizer group is flattened into one buffer padded to a multiple of 2 x P elements
  (P: the ranks the group is partitioned over, `nccl_start_alignment_factor`), each rank keeps the whole
  flat buffer in the training dtype and an fp32 master copy + Adam moments of its 1/P slice; the inner
  optimizer sees one flat tensor per group (one `step`). Under bf16 ZeRO-1 is DeepSpeed's BF16_Optimizer:
  same layout, plus a *whole* fp32 gradient buffer.
- stage 3: every tensor is split into ceil(n / P)-element partitions (tensors of at most
  `stage3_param_persistence_threshold` elements also stay whole on every rank); master + moments of the
  partition; one `step` per sub-group (`sub_group_size`).
- expert parallelism (`parallel.ep_size` > 1): the routed experts of a rank (ceil(E / ep) on the largest
  rank when ep does not divide E) form groups of their own, partitioned over the expert-data-parallel
  group of world / ep ranks; everything else is partitioned over the whole world.
- optimizer offload: master weights, moments and fp32 gradient partitions live in host memory.

Engram tables never go through DeepSpeed: fp32 rows + exp_avg + exp_avg_sq (fp32), an int32 step per row
and an int64 step per table (`memory.sparse_optim.RowSparseAdam`); replicated: all rows on every rank;
sharded: ceil(R / world) rows of each layer on the largest shard (`parallel.table_shard.shard_bounds`);
`parallel.host_tables`: all of it in host memory instead of device memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .inventory import ModelInventory

if TYPE_CHECKING:
    from .layout import DeepSpeedKnobs, Layout

FP32 = 4
BF16 = 2
ADAM_STEP_BYTES = 4
"""torch AdamW keeps `step` as a float32 scalar tensor per parameter tensor."""


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def expert_share(num_experts: int, ep_size: int) -> tuple[int, int]:
    """(experts on the largest EP rank, all experts): ceil(E / ep) of E."""
    return ceil_div(num_experts, ep_size), num_experts


@dataclass
class FlatGroup:
    """One flattened optimizer group on this rank: its tensors' element counts and the ranks P it is
    partitioned over."""

    numels: tuple[int, ...]
    partitions: int

    @property
    def numel(self) -> int:
        return sum(self.numels)


def flat_groups(inv: ModelInventory, ep_size: int, world: int, num_experts: int) -> list[FlatGroup]:
    """The optimizer groups as DeepSpeed partitions them: with ep_size > 1 the experts of every group
    move to a group of their own over the expert-data-parallel ranks (world / ep_size)."""
    local, total = expert_share(num_experts, ep_size)
    out: list[FlatGroup] = []
    for g in inv.groups:
        experts = tuple(n * local // total for n in g.expert)
        if ep_size == 1:
            out.append(FlatGroup(g.dense + experts, world))
            continue
        if g.dense:
            out.append(FlatGroup(g.dense, world))
        if experts:
            out.append(FlatGroup(experts, world // ep_size))
    return [g for g in out if g.numels]


@dataclass
class StateBytes:
    """Model-state bytes of the largest rank; `*_host` is host memory."""

    params: int = 0
    """Backbone parameters in the training dtype (whole, flat or partitioned by the stage)."""
    grads: int = 0
    """Gradient buffers: whole (stages 0-1) or partitioned (2-3), fp32 accumulation."""
    master: int = 0
    """fp32 master partitions (ZeRO >= 1; stage 0 updates the parameters themselves)."""
    optim: int = 0
    """Adam moments and step counters of the backbone."""
    tables: int = 0
    """Engram table rows held by this rank (fp32)."""
    table_optim: int = 0
    """Row-sparse Adam state of those rows."""
    host: int = 0
    """Host memory: offloaded optimizer state, host tables."""

    @property
    def device_total(self) -> int:
        return self.params + self.grads + self.master + self.optim + self.tables + self.table_optim

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "device_total": self.device_total}


def backbone_state(inv: ModelInventory, layout: Layout, world: int, num_experts: int,
                   ds: DeepSpeedKnobs) -> StateBytes:
    """Backbone parameters, gradients, master weights and Adam state of the largest rank."""
    w = BF16 if ds.bf16 else FP32
    groups = flat_groups(inv, layout.ep_size, world, num_experts)
    s = StateBytes()
    stage = layout.zero_stage
    if stage == 0:
        n = sum(g.numel for g in groups)
        tensors = sum(len(g.numels) for g in groups)
        s.params, s.grads = w * n, FP32 * n
        s.optim = 2 * FP32 * n + ADAM_STEP_BYTES * tensors
        return s
    part_total = 0
    steps = 0
    for g in groups:
        p = g.partitions
        if stage in (1, 2):
            padded = ceil_div(g.numel, 2 * p) * 2 * p
            part = padded // p
            s.params += w * padded
            if stage == 1:
                s.grads += FP32 * padded if ds.bf16 else w * g.numel
            steps += 1
        else:
            part = sum(ceil_div(n, p) for n in g.numels)
            persistent = sum(n for n in g.numels if n <= ds.stage3_param_persistence_threshold)
            s.params += w * (part + persistent)
            steps += max(1, ceil_div(part, ds.sub_group_size))
        part_total += part
    if stage >= 2:
        s.grads = FP32 * part_total
    s.master = FP32 * part_total
    s.optim = 2 * FP32 * part_total + ADAM_STEP_BYTES * steps
    if layout.offload_optimizer:
        offloaded = s.master + s.optim + (s.grads if stage >= 2 else 0)
        s.host += offloaded
        s.master = s.optim = 0
        if stage >= 2:
            s.grads = 0
    return s


def table_rows_held(inv: ModelInventory, layout: Layout, world: int) -> int:
    """Table rows on the largest rank: every row (replicated) or the first shard of each layer."""
    if layout.table_sharding == "sharded":
        return sum(ceil_div(r, world) for r in inv.table_rows)
    return sum(inv.table_rows)


def table_state(inv: ModelInventory, layout: Layout, world: int) -> tuple[int, int]:
    """(table bytes, row-sparse Adam bytes) of the largest rank: fp32 rows; exp_avg + exp_avg_sq fp32, an
    int32 step per row, an int64 step per table (`RowSparseAdam`)."""
    if not inv.table_rows:
        return 0, 0
    rows = table_rows_held(inv, layout, world)
    weights = FP32 * rows * inv.table_dim
    return weights, 2 * weights + 4 * rows + 8 * len(inv.table_rows)


def state_bytes(inv: ModelInventory, layout: Layout, world: int, num_experts: int,
                ds: DeepSpeedKnobs) -> StateBytes:
    """All model-state bytes of the largest rank: the backbone under ZeRO plus the Engram tables."""
    s = backbone_state(inv, layout, world, num_experts, ds)
    tables, table_optim = table_state(inv, layout, world)
    if layout.host_tables:
        s.host += tables + table_optim
    else:
        s.tables, s.table_optim = tables, table_optim
    return s


def buffer_bytes(inv: ModelInventory, layout: Layout, ds: DeepSpeedKnobs) -> dict[str, int]:
    """DeepSpeed's communication buffers of the stage (elements x training dtype, from the ds config):
    stage 1-2 the gradient reduce bucket (two with overlap_comm) and the all-gather bucket of the updated
    parameters; stage 3 the prefetch bucket plus the gathered parameters of the largest block (capped by
    stage3_max_live_parameters) and the reduce bucket."""
    w = BF16 if ds.bf16 else FP32
    stage = layout.zero_stage
    if stage == 0:
        return {}
    buckets = 2 if ds.overlap_comm else 1
    if stage in (1, 2):
        return {"reduce bucket": buckets * FP32 * ds.reduce_bucket_size,
                "all-gather bucket": w * ds.allgather_bucket_size}
    largest = max(inv.block_params) if inv.block_params else 0
    live = min(ds.stage3_max_live_parameters, largest)
    return {"reduce bucket": buckets * FP32 * ds.reduce_bucket_size,
            "prefetch bucket": w * ds.stage3_prefetch_bucket_size,
            "gathered block": w * live}

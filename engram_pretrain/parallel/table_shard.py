"""Row-sharded Engram tables: each layer's flat table split into contiguous row ranges over a process group.

Layout. With `R` rows and `W` ranks in the shard group, `q, m = divmod(R, W)`; rank `r` owns rows
`[b_r, b_{r+1})` with `b_r = r * q + min(r, m)`: the first `m` ranks hold `q + 1` rows, the others `q`
(a rank holds no rows when `R < W`). A rank keeps only its shard (`weight`: [b_{r+1} - b_r, dim]) and the
Adam state of those rows; no rank ever holds the full table or a dense table gradient.

Forward (`lookup`), collective over the group, every rank takes part even with zero ids:

1. deduplicate the requested ids: `unique, inverse = torch.unique(ids, return_inverse=True)`; `unique` is
   sorted, so it is already grouped by owner in rank order (owner = bucketize against the shard ends);
2. exchange the per-owner counts (even `all_to_all_single` of W integers), then the ids themselves
   (uneven `all_to_all_single`);
3. each owner gathers the requested rows from its shard (device or host tier, `memory.host_tables`);
4. the rows go back along the reverse splits (uneven `all_to_all_single`), and `unique_rows[inverse]`
   restores the requested order and duplicates.

Backward (same autograd `Function`): the row gradients are first summed over duplicates on the requester
(`index_add` by `inverse`), sent to the owners along the forward splits, and summed again on the owner
across requesters (the sparse gradient is coalesced). The owner's shard parameter receives a sparse COO
gradient holding only its touched rows, which `RowSparseAdam(grad_sync="none")` applies there: shards are
disjoint, so no further exchange is needed.

Gradient semantics: each rank's loss is its own mean over its local batch, and the trained loss is the
mean of those over the ranks, i.e. the mean over the global batch when every rank has the same batch size
(what DeepSpeed's gradient averaging does for the backbone). So `grad_reduction="mean"` (default) divides
the summed row gradients by the group size W; `"sum"` leaves them summed. A sharded run therefore applies
the same table update as a replicated one (`RowSparseAdam(grad_sync="mean")`) up to summation order.

Prefetch: `prefetch(ids)` runs steps 1-2 now (collective) and starts the owner's gather of step 3 in the
background (host tier); a later `lookup` with the same ids on every rank skips the id exchange and uses
those rows (checked with one all-reduce of a match flag, so ranks can never disagree about it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from ..memory.host_tables import (
    DeviceRows,
    HostRows,
    LookupPlan,
    PrefetchQueue,
    PrefetchStats,
    RowInit,
    plan_lookup,
    sparse_row_grad,
)

GradReduction = Literal["mean", "sum"]


# ---------------------------------------------------------------------------- layout

def shard_bounds(num_rows: int, world: int) -> list[int]:
    """[b_0 = 0, b_1, ..., b_W = num_rows]: rank r owns rows [b_r, b_{r+1}) (module docstring formula)."""
    if num_rows < 0 or world < 1:
        raise ValueError(f"shard_bounds: num_rows={num_rows} must be >= 0 and world={world} >= 1")
    q, m = divmod(num_rows, world)
    return [r * q + min(r, m) for r in range(world + 1)]


def shard_range(num_rows: int, rank: int, world: int) -> tuple[int, int]:
    """(start, end) of the rows rank `rank` owns."""
    if not 0 <= rank < world:
        raise ValueError(f"shard_range: rank {rank} outside a group of {world}")
    b = shard_bounds(num_rows, world)
    return b[rank], b[rank + 1]


def owner_of(ids: Tensor, bounds: list[int]) -> Tensor:
    """ids: [n] global rows -> [n] owning rank (ids must lie in [0, bounds[-1]))."""
    ends = torch.tensor(bounds[1:], dtype=torch.int64, device=ids.device)
    return torch.bucketize(ids.long(), ends, right=True)


def request_counts(flat_ids: Tensor, bounds: list[int], dedup: bool = True) -> Tensor:
    """Ids one rank sends to each owner for a lookup of `flat_ids` ([world] int64); each is answered by one
    row in forward and one gradient row in backward. `dedup=False`: what a lookup without
    deduplication would send."""
    ids = flat_ids.reshape(-1).long()
    if dedup:
        ids = torch.unique(ids)
    return torch.bincount(owner_of(ids, bounds), minlength=len(bounds) - 1)


@dataclass
class ExchangeStats:
    """What one lookup moved for this rank (rows crossing ranks = ids crossing ranks)."""

    ids: int
    """Ids requested (duplicates included)."""
    unique: int
    """Distinct ids requested."""
    ids_sent: int
    """Distinct ids sent to other ranks (= rows received from them, = gradient rows sent in backward)."""
    ids_served: int
    """Ids other ranks asked this rank for (= rows sent to them, = gradient rows received in backward)."""


@dataclass
class ShardPlan(LookupPlan):
    """A deduplicated lookup plus its exchange: who asks whom for which rows."""

    send_counts: list[int] = field(default_factory=list)
    """Distinct ids this rank asks each owner for."""
    recv_counts: list[int] = field(default_factory=list)
    """Ids each requester asks this rank for."""
    local_ids: Tensor | None = None
    """[sum(recv_counts)] shard-local rows this rank serves, grouped by requester."""


# ---------------------------------------------------------------------------- the table

class _ShardedLookup(torch.autograd.Function):
    """rows = exchange(plan)[inverse]; backward sends the deduplicated row gradients to the owners."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, table: ShardedTable, plan: ShardPlan) -> Tensor:
        del weight  # the shard parameter is an input only so autograd routes its gradient here
        ctx.table, ctx.plan = table, plan
        unique_rows = table._fetch(plan)  # [U, dim] on the compute device
        return unique_rows.index_select(0, plan.inverse.to(unique_rows.device))  # [N, dim]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        table: ShardedTable = ctx.table
        plan: ShardPlan = ctx.plan
        dim = table.dim
        summed = torch.zeros(plan.unique.numel(), dim, dtype=table.weight.dtype, device=table.comm_device)
        summed.index_add_(0, plan.inverse.to(table.comm_device),
                          grad.reshape(-1, dim).to(device=table.comm_device, dtype=summed.dtype))  # [U, dim]
        received = summed.new_empty(sum(plan.recv_counts), dim)  # [served, dim]
        dist.all_to_all_single(received, summed, plan.recv_counts, plan.send_counts, group=table.group)
        if table.grad_scale != 1.0:
            received.mul_(table.grad_scale)
        assert plan.local_ids is not None
        return sparse_row_grad(table.weight, plan.local_ids, received), None, None


class ShardedTable:
    """One layer's flat Engram table, row-sharded over `group` (default: the world); an `EngramTable`.

    num_rows: rows of the whole table; init_rows(start, end) -> this rank's initial rows [end-start, dim]
    (called once, for this rank's range only). `host=True` keeps the shard and its Adam state in (pinned)
    host memory (`memory.host_tables.HostRows`); `device` is where lookups return rows; `ops` the kernels'
    dispatch (gathers; None: torch indexing). Collectives run on the compute device under NCCL, on the CPU
    under gloo. Every call of `lookup`/`prefetch` and every backward through a lookup is collective.
    """

    def __init__(self, num_rows: int, dim: int, init_rows: RowInit, *, device: torch.device | str = "cpu",
                 group: Any | None = None, host: bool = False, ops: Any | None = None,
                 grad_reduction: GradReduction = "mean", pin_memory: bool | None = None,
                 max_pending: int = 2) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("ShardedTable needs an initialised torch.distributed process group")
        if num_rows <= 0 or dim <= 0:
            raise ValueError(f"ShardedTable: num_rows={num_rows} and dim={dim} must be positive")
        if grad_reduction not in ("mean", "sum"):
            raise ValueError(f"ShardedTable: grad_reduction='{grad_reduction}' (expected mean or sum)")
        self.num_rows, self.dim = num_rows, dim
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bounds = shard_bounds(num_rows, self.world)
        self.row_start, self.row_end = self.bounds[self.rank], self.bounds[self.rank + 1]
        self.device = torch.device(device)
        self.comm_device = self._comm_device(dist.get_backend(group))
        rows = init_rows(self.row_start, self.row_end)
        if tuple(rows.shape) != (self.row_end - self.row_start, dim):
            raise ValueError(f"ShardedTable: init_rows({self.row_start}, {self.row_end}) gave "
                             f"{tuple(rows.shape)}, expected {(self.row_end - self.row_start, dim)}")
        self.store: DeviceRows | HostRows = (HostRows(rows, self.device, ops, pin_memory) if host
                                             else DeviceRows(rows, self.device, ops))
        self.weight = self.store.weight
        """This rank's shard [row_end - row_start, dim] (the parameter the optimizer updates)."""
        self.grad_scale = 1.0 / self.world if grad_reduction == "mean" else 1.0
        self.compute_dtype: torch.dtype | None = None
        """Cast the looked-up rows to this dtype (bf16 runs keep the table in fp32)."""
        self.last_exchange: ExchangeStats | None = None
        self._ends = torch.tensor(self.bounds[1:], dtype=torch.int64, device=self.comm_device)
        self._queue = PrefetchQueue(max_pending)
        self.dropped_prefetches = 0

    def _comm_device(self, backend: str) -> torch.device:
        """Where the exchange's tensors live: the compute device (NCCL: a GPU; gloo on a CPU run: the CPU
        training device, so the CPU suite takes the path a GPU run takes), the host for gloo with a GPU."""
        if backend == "nccl":
            return self.device if self.device.type == "cuda" else \
                torch.device("cuda", torch.cuda.current_device())
        return self.device if self.device.type == "cpu" else torch.device("cpu")

    @property
    def host(self) -> bool:
        return self.store.host

    @property
    def stats(self) -> PrefetchStats | None:
        """Prefetch statistics of the host tier (None on the device tier)."""
        return self.store.stats if isinstance(self.store, HostRows) else None

    # ------------------------------------------------------------------ exchange

    def _exchange_ids(self, flat_row_ids: Tensor) -> ShardPlan:
        """Steps 1-2: deduplicate, bucket by owner, exchange counts and ids (collective)."""
        base = plan_lookup(flat_row_ids.to(self.comm_device), self.num_rows)
        owners = torch.bucketize(base.unique, self._ends, right=True)  # [U] ascending
        send = torch.bincount(owners, minlength=self.world)  # [W] int64
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        # the one host sync of an exchange: uneven all_to_all_single takes its split sizes as host ints
        send_counts, recv_counts = torch.stack([send, recv]).tolist()
        requested = base.unique.new_empty(sum(recv_counts))  # [served] global ids
        dist.all_to_all_single(requested, base.unique, recv_counts, send_counts, group=self.group)
        self.last_exchange = ExchangeStats(
            ids=base.ids.numel(), unique=base.unique.numel(),
            ids_sent=sum(send_counts) - send_counts[self.rank],
            ids_served=sum(recv_counts) - recv_counts[self.rank])
        return ShardPlan(ids=base.ids, unique=base.unique, inverse=base.inverse, send_counts=send_counts,
                         recv_counts=recv_counts, local_ids=requested - self.row_start)

    def _fetch(self, plan: ShardPlan) -> Tensor:
        """Steps 3-4: serve the requested rows, receive ours -> unique rows [U, dim] on the compute device."""
        assert plan.local_ids is not None
        served = self.store.rows(plan.local_ids, plan.pending)  # [served, dim]
        plan.pending = None
        served = served.to(self.comm_device)
        out = served.new_empty(plan.unique.numel(), self.dim)
        dist.all_to_all_single(out, served, plan.send_counts, plan.recv_counts, group=self.group)
        return out.to(self.device)

    def _take_plan(self, flat_row_ids: Tensor) -> ShardPlan:
        """The prefetched plan when every rank's next prefetch matches its lookup, else a fresh exchange."""
        if len(self._queue):  # the queues advance in lockstep: every rank takes this branch together
            ids = flat_row_ids.to(self.comm_device)
            flag = torch.tensor([int(self._queue.head_matches(ids))], dtype=torch.int64,
                                device=self.comm_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
            if int(flag.item()) == 1:
                plan = self._queue.pop()
                assert isinstance(plan, ShardPlan)
                return plan
            self.dropped_prefetches += self._queue.clear()
            if isinstance(self.store, HostRows):
                self.store.stats.dropped = self.dropped_prefetches
        return self._exchange_ids(flat_row_ids)

    # ------------------------------------------------------------------ EngramTable

    def prefetch(self, flat_row_ids: Tensor) -> None:
        """Collective: exchange the ids of a later `lookup(flat_row_ids)` now and start the owner's gather
        (in the background on the host tier)."""
        plan = self._exchange_ids(flat_row_ids)
        assert plan.local_ids is not None
        plan.pending = self.store.start_gather(plan.local_ids)
        self._queue.push(plan)

    @torch.compiler.disable  # sparse gradients, host copies and collectives stay out of compiled graphs
    def lookup(self, flat_row_ids: Tensor) -> Tensor:
        """flat_row_ids: [...] int64 global rows (offsets included) -> rows [..., dim]. Collective."""
        plan = self._take_plan(flat_row_ids)
        rows = _ShardedLookup.apply(self.weight, self, plan).reshape(*flat_row_ids.shape, self.dim)
        return rows if self.compute_dtype is None else rows.to(self.compute_dtype)

    def close(self) -> None:
        self.store.close()

    def __repr__(self) -> str:
        tier = "host" if self.host else "device"
        return (f"ShardedTable(num_rows={self.num_rows}, dim={self.dim}, rows=[{self.row_start}, "
                f"{self.row_end}) of rank {self.rank}/{self.world}, {tier})")


def gather_full_weight(table: ShardedTable) -> Tensor:
    """Collective: the whole table [num_rows, dim] on the CPU of every rank (export / consolidation only)."""
    width = max(b - a for a, b in zip(table.bounds[:-1], table.bounds[1:], strict=True))
    local = table.weight.detach().to(table.comm_device)
    padded = local.new_zeros(width, table.dim)
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(table.world)]
    dist.all_gather(parts, padded, group=table.group)
    sizes = [b - a for a, b in zip(table.bounds[:-1], table.bounds[1:], strict=True)]
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).cpu()

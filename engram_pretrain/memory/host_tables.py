"""Engram table storage tiers: rows on the compute device, or rows + Adam state in (pinned) host memory.

Every table object implements the model's `EngramTable` protocol (`lookup(flat_row_ids) -> rows`,
`num_rows`, `dim`) and exposes the parameter its optimizer updates as `weight`. The gradient contract is
the same for every tier: backward leaves a *sparse COO* gradient on `weight` holding only the looked-up
rows, which `RowSparseAdam` applies.

Tiers of one block of rows (a whole table, or the shard a rank owns, see `parallel.table_shard`):

- `DeviceRows`: a `[rows, dim]` parameter on the compute device.
- `HostRows`: the parameter in host memory, pinned when CUDA is available (so the host-to-device copy is
  asynchronous), its Adam state next to it on the host (the optimizer keeps state on the parameter's
  device). A lookup gathers the requested rows into a fresh (pinned) host buffer and copies that to the
  compute device. `start_gather(ids)` runs the same gather on a background thread ahead of time; the
  later `rows(ids, pending)` then only copies. A prefetched buffer remembers the parameter's version
  counter at gather time; if the table was updated in between (an optimizer step, a checkpoint load),
  the rows are gathered again, so a prefetch can never return stale rows.

`HostTable` is a whole table in host memory (one process, or replicated over data-parallel ranks with the
row gradients exchanged by `RowSparseAdam`). A lookup deduplicates the ids first (`torch.unique`), gathers
and moves each distinct row once, and expands on the device; backward sums the duplicates on the device
and moves one gradient row per distinct id back to the host. `prefetch(ids)` with the next micro-batch's
ids (the addresses are known from the batch) starts that gather in the background; a later
`lookup(ids)` with equal ids consumes it. On a CPU-only machine the host is the device, but the same code
path runs (buffers, thread, copy).

Host tables are stepped by `RowSparseAdam(ops=kernels.get_ops(backend))`: the per-row update is the
kernels' sparse Adam (the C++/OpenMP op when it builds, the torch reference otherwise); identical
semantics and state layout, so checkpoints are interchangeable.

Initialisation: `init_table_rows` draws row blocks of `INIT_BLOCK_ROWS` rows from generators seeded by
(seed, layer, block), so any row range of a table can be produced on its own and a sharded table equals
the replicated one whatever the world size.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

INIT_BLOCK_ROWS = 1 << 16
"""Rows per independently seeded init block."""

RowInit = Callable[[int, int], Tensor]
"""(row_start, row_end) -> rows [row_end - row_start, dim] of a table's initial values."""


# ---------------------------------------------------------------------------- initialisation

def _block_seed(seed: int, layer: int, block: int) -> int:
    digest = hashlib.blake2b(f"engram-table:{seed}:{layer}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def init_table_rows(seed: int, layer: int, num_rows: int, dim: int, std: float, start: int = 0,
                    end: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Rows [start, end) of layer `layer`'s table (num_rows x dim, N(0, std^2)): [end - start, dim] on CPU.

    Block b (rows [b * INIT_BLOCK_ROWS, ...)) comes from its own generator, so the values do not depend on
    which range is asked for; at most one block beyond the range is generated at a time."""
    end = num_rows if end is None else end
    if not 0 <= start <= end <= num_rows:
        raise ValueError(f"init_table_rows: range [{start}, {end}) outside a table of {num_rows} rows")
    out = torch.empty(end - start, dim, dtype=dtype)
    block = start // INIT_BLOCK_ROWS
    while block * INIT_BLOCK_ROWS < end:
        lo = block * INIT_BLOCK_ROWS
        hi = min(lo + INIT_BLOCK_ROWS, num_rows)
        gen = torch.Generator().manual_seed(_block_seed(seed, layer, block))
        rows = torch.empty(hi - lo, dim, dtype=torch.float32).normal_(0.0, std, generator=gen)
        a, b = max(lo, start), min(hi, end)
        out[a - start:b - start] = rows[a - lo:b - lo]
        block += 1
    return out


# ---------------------------------------------------------------------------- lookups

def check_row_ids(ids: Tensor, num_rows: int) -> None:
    """Raise for non-integer ids or ids outside [0, num_rows).

    No host sync: the range is checked by a device-side assert (`torch._assert_async`). On a GPU an
    out-of-range id fails the next synchronising call ("device-side assert triggered"; the id came from a
    bug, the run cannot continue); on the CPU the assert is immediate and re-raised as an IndexError with
    the offending range (docs/training.md, "Host syncs of a step")."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"engram row ids must be int64 or int32, got {ids.dtype}")
    if not ids.numel():
        return
    in_range = ((ids >= 0) & (ids < num_rows)).all()
    message = f"engram row ids out of range [0, {num_rows})"
    if ids.is_cuda:
        torch._assert_async(in_range, message)
        return
    try:
        torch._assert_async(in_range, message)
    except RuntimeError:
        raise IndexError(f"{message}: min {int(ids.min())}, max {int(ids.max())}") from None


@dataclass
class LookupPlan:
    """Deduplicated addresses of one lookup."""

    ids: Tensor
    """The flat ids as requested [N] (to match a prefetch against the later lookup)."""
    unique: Tensor
    """Distinct ids [U], ascending."""
    inverse: Tensor
    """[N] position of each requested id in `unique`."""
    pending: Any = None
    """Background gather of the rows (a `Future`), when prefetched."""


def plan_lookup(flat_ids: Tensor, num_rows: int) -> LookupPlan:
    """flat_ids: [N] -> the plan (unique ids and inverse index, on flat_ids' device)."""
    check_row_ids(flat_ids, num_rows)
    ids = flat_ids.reshape(-1).long()
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    return LookupPlan(ids=ids, unique=unique, inverse=inverse)


def sparse_row_grad(weight: Tensor, local_ids: Tensor, grads: Tensor) -> Tensor:
    """Coalesced sparse COO gradient of `weight` [R, dim] with rows `local_ids` [n] (duplicates summed)."""
    ids = local_ids.to(device=weight.device, dtype=torch.int64).unsqueeze(0)
    vals = grads.to(device=weight.device, dtype=weight.dtype)
    return torch.sparse_coo_tensor(ids, vals, tuple(weight.shape), check_invariants=False).coalesce()


def same_ids(a: Tensor, b: Tensor) -> bool:
    """Exactly the same flat ids (shape, device and values)."""
    return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))


# ---------------------------------------------------------------------------- row tiers

class DeviceRows:
    """A block of table rows as a parameter on the compute device."""

    host = False

    def __init__(self, rows: Tensor, device: torch.device | str, ops: Any | None = None) -> None:
        self.device = torch.device(device)
        self.weight = nn.Parameter(rows.to(self.device).contiguous())
        self.ops = ops

    def start_gather(self, local_ids: Tensor) -> None:
        """Nothing to do ahead of time for device-resident rows."""
        del local_ids

    def rows(self, local_ids: Tensor, pending: Any = None) -> Tensor:
        """local_ids: [n] int64 -> rows [n, dim] on the compute device (no autograd)."""
        del pending
        ids = local_ids.to(self.weight.device)
        w = self.weight.detach()
        if self.ops is not None and ids.numel():
            return self.ops.gather_rows(w, ids)
        return w.index_select(0, ids)

    def close(self) -> None:
        pass


@dataclass
class PrefetchStats:
    """How lookups of a host tier got their rows."""

    hits: int = 0
    """Rows were gathered ahead of time and still current."""
    stale: int = 0
    """Gathered ahead of time, but the table changed since: gathered again."""
    direct: int = 0
    """Not prefetched: gathered synchronously."""
    dropped: int = 0
    """Prefetches discarded because the lookup asked for other ids."""


def page_lock(owner: object, tensor: Tensor) -> None:
    """Page-lock `tensor`'s host memory in place (`cudaHostRegister`) until `owner` is freed.

    A table is allocated pageable and registered at exactly its size: `torch.empty(pin_memory=True)` goes
    through the caching host allocator, which rounds a block up to a power of two (an 11.6 GB table would
    pin 16 GB). Per-lookup buffers still come from the caching allocator, which reuses them."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return
    cudart = torch.cuda.cudart()
    ptr = tensor.data_ptr()
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes of table rows failed (error {int(err)}); "
                           "set pin_memory=False or free host memory")
    weakref.finalize(owner, cudart.cudaHostUnregister, ptr)


class HostRows:
    """A block of table rows as a parameter in (pinned) host memory, gathered into host buffers and copied
    to the compute device; gathers can run ahead on a background thread."""

    host = True

    def __init__(self, rows: Tensor, device: torch.device | str, ops: Any | None = None,
                 pin_memory: bool | None = None) -> None:
        self.device = torch.device(device)
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        host = torch.empty(tuple(rows.shape), dtype=rows.dtype)
        if self.pin:
            page_lock(self, host)
        host.copy_(rows)
        self.weight = nn.Parameter(host)
        self.ops = ops
        self.stats = PrefetchStats()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _gather_host(self, local_ids: Tensor) -> tuple[Tensor, int]:
        """(rows [n, dim] in a fresh host buffer, the weight's version before the gather)."""
        version = self.weight._version
        ids = local_ids.to("cpu", dtype=torch.int64)
        buf = torch.empty((ids.numel(), self.weight.shape[1]), dtype=self.weight.dtype, pin_memory=self.pin)
        if ids.numel():
            w = self.weight.detach()
            if self.ops is not None:
                self.ops.gather_rows(w, ids, out=buf)
            else:
                torch.index_select(w, 0, ids, out=buf)
        return buf, version

    def start_gather(self, local_ids: Tensor) -> Future:
        """Gather `local_ids`' rows on the background thread; pass the result to `rows`."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-host-gather")
        return self._pool.submit(self._gather_host, local_ids)

    def rows(self, local_ids: Tensor, pending: Future | None = None) -> Tensor:
        """local_ids: [n] -> rows [n, dim] on the compute device; uses `pending` when still current."""
        if pending is None:
            buf, _ = self._gather_host(local_ids)
            self.stats.direct += 1
        else:
            buf, version = pending.result()
            if version != self.weight._version:
                buf, _ = self._gather_host(local_ids)
                self.stats.stale += 1
            else:
                self.stats.hits += 1
        out = torch.empty(tuple(buf.shape), dtype=buf.dtype, device=self.device)
        out.copy_(buf, non_blocking=self.pin)
        return out

    def close(self) -> None:
        """Stop the background thread (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


# ---------------------------------------------------------------------------- host-resident table

class _GatheredLookup(torch.autograd.Function):
    """rows = unique_rows[inverse]; backward: duplicates summed on the device, one row per distinct id to
    `weight`'s device as a sparse gradient."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, unique_rows: Tensor, plan: LookupPlan) -> Tensor:
        ctx.plan = plan
        ctx.weight_shape = weight.shape
        ctx.weight_device, ctx.weight_dtype = weight.device, weight.dtype
        return unique_rows.index_select(0, plan.inverse.to(unique_rows.device))  # [N, dim]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        plan: LookupPlan = ctx.plan
        summed = grad.new_zeros(plan.unique.numel(), grad.shape[-1])
        summed.index_add_(0, plan.inverse.to(grad.device), grad.reshape(-1, grad.shape[-1]))  # [U, dim]
        ids = plan.unique.to(ctx.weight_device).unsqueeze(0)
        vals = summed.to(device=ctx.weight_device, dtype=ctx.weight_dtype)
        return torch.sparse_coo_tensor(ids, vals, tuple(ctx.weight_shape), check_invariants=False), None, None


class PrefetchQueue:
    """Pending prefetched plans, consumed in order by lookups with the same ids."""

    def __init__(self, max_pending: int = 2) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending} must be >= 1")
        self.max_pending = max_pending
        self._plans: deque[LookupPlan] = deque()

    def __len__(self) -> int:
        return len(self._plans)

    def push(self, plan: LookupPlan) -> None:
        if len(self._plans) >= self.max_pending:
            self._plans.popleft()
        self._plans.append(plan)

    def head_matches(self, flat_ids: Tensor) -> bool:
        return bool(self._plans) and same_ids(self._plans[0].ids, flat_ids.reshape(-1).long())

    def pop(self) -> LookupPlan:
        return self._plans.popleft()

    def clear(self) -> int:
        n = len(self._plans)
        self._plans.clear()
        return n


class HostTable:
    """A whole Engram table (rows + Adam state) in (pinned) host memory; implements `EngramTable`.

    `weight` is the host parameter (sparse gradient after backward); lookups return rows on `device`.
    """

    def __init__(self, num_rows: int, dim: int, device: torch.device | str, init_rows: RowInit,
                 ops: Any | None = None, pin_memory: bool | None = None, max_pending: int = 2) -> None:
        if num_rows <= 0 or dim <= 0:
            raise ValueError(f"HostTable: num_rows={num_rows} and dim={dim} must be positive")
        rows = init_rows(0, num_rows)
        if tuple(rows.shape) != (num_rows, dim):
            raise ValueError(f"HostTable: init_rows gave {tuple(rows.shape)}, expected {(num_rows, dim)}")
        self.num_rows, self.dim = num_rows, dim
        self.store = HostRows(rows, device, ops, pin_memory)
        self.weight = self.store.weight
        self.compute_dtype: torch.dtype | None = None
        """Cast the looked-up rows to this dtype (bf16 runs keep the table in fp32)."""
        self._queue = PrefetchQueue(max_pending)

    @property
    def stats(self) -> PrefetchStats:
        return self.store.stats

    def prefetch(self, flat_row_ids: Tensor) -> None:
        """Start gathering the rows a later `lookup(flat_row_ids)` will need (background thread)."""
        plan = plan_lookup(flat_row_ids, self.num_rows)
        plan.pending = self.store.start_gather(plan.unique)
        self._queue.push(plan)

    def _plan(self, flat_row_ids: Tensor) -> LookupPlan:
        if self._queue.head_matches(flat_row_ids):
            return self._queue.pop()
        self.store.stats.dropped += self._queue.clear()
        return plan_lookup(flat_row_ids, self.num_rows)

    @torch.compiler.disable  # sparse gradients, host copies and collectives stay out of compiled graphs
    def lookup(self, flat_row_ids: Tensor) -> Tensor:
        """flat_row_ids: [...] int64 (offsets included) -> rows [..., dim] on the compute device."""
        plan = self._plan(flat_row_ids)
        unique_rows = self.store.rows(plan.unique, plan.pending)  # [U, dim]
        plan.pending = None
        rows = _GatheredLookup.apply(self.weight, unique_rows, plan).reshape(*flat_row_ids.shape, self.dim)
        return rows if self.compute_dtype is None else rows.to(self.compute_dtype)

    def close(self) -> None:
        self.store.close()

    def __repr__(self) -> str:
        return f"HostTable(num_rows={self.num_rows}, dim={self.dim}, pinned={self.store.pin})"

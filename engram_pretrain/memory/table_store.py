"""The trainer's Engram tables: `TableStore` (this rank's rows of every table, outside DeepSpeed) and
`DeviceTable` (the device-resident `EngramTable` view the model gets).

The tables are deliberately *not* parameters of the module DeepSpeed wraps. DeepSpeed's ZeRO
stages register gradient hooks on, flatten, partition and reduce every parameter of the module it is
given; a row-sparse table must not go through any of that. So the tables live in a separate
`TableStore` module, and the model receives views of them through its table factory. `DeviceTable` is a
plain object (not an `nn.Module`), so `EngramModule` keeps it as an attribute and the table never appears
in `model.parameters()`. Table gradients are sparse (`F.embedding(sparse=True)`) and are applied by
`RowSparseAdam` (`memory.sparse_optim`), which exchanges the touched rows across the data-parallel ranks
so every replica applies the same update. `parallel.table_sharding: sharded` gives each rank a contiguous
row range instead (`parallel.table_shard.ShardedTable`: lookups and row gradients travel by all-to-all,
each rank steps its own rows) and `parallel.host_tables: true` keeps the rows and their Adam state in host
memory with prefetch (`memory.host_tables.HostTable`); see docs/parallelism.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class TableStore(nn.Module):
    """Owns this rank's Engram table rows (one fp32 matrix per Engram layer), outside the module that
    DeepSpeed wraps. `tables["<layer>"]` is the parameter the table optimizer updates: the whole
    [num_rows, dim] table (`replicated`) or this rank's contiguous row range of it (`sharded`, see
    `parallel.table_shard`), on `device` or, with `host=True`, in (pinned) host memory. `views[layer]` is
    the `EngramTable` handed to the model.

    Tables are created directly where they live (never moved afterwards: do not call `.to()` on a store
    with host tables) and initialised by `memory.host_tables.init_table_rows` from (seed, layer): any layout
    (replicated, sharded over any world size, host or device) starts from the same table.
    """

    def __init__(self, sharding: str = "replicated", host: bool = False, device: torch.device | str = "cpu",
                 group: Any | None = None, ops: Any | None = None, seed: int = 0) -> None:
        super().__init__()
        if sharding not in ("replicated", "sharded"):
            raise ValueError(f"table sharding '{sharding}' (expected replicated or sharded)")
        self.tables = nn.ParameterDict()
        self.views: dict[int, Any] = {}
        self.sharding = sharding
        self.host = host
        self.device = torch.device(device)
        self.group = group
        """Shard group of sharded tables (None: the world)."""
        self.ops = ops
        """Kernel ops (`kernels.get_ops(parallel.kernel_backend)`): host-tier gathers and updates, and the
        lookups and updates of device tables where they resolve to compiled ops (`device_ops`); None: torch
        indexing."""
        self.seed = seed
        self._device_ops: Any | None = None
        self._device_ops_known = False

    @property
    def device_ops(self) -> Any | None:
        """The compiled ops device-resident tables use (`kernels.device_table_ops`: CUDA tables with backend
        auto|cuda, CPU tables with cpp), None for the torch path. Resolved once (auto may build the CUDA
        extension here)."""
        if not self._device_ops_known:
            from ..kernels.dispatch import device_table_ops

            self._device_ops = device_table_ops(self.ops, self.device)
            self._device_ops_known = True
        return self._device_ops

    @property
    def sharded(self) -> bool:
        return self.sharding == "sharded"

    def factory(self, init_std: float, sparse: bool = True) -> Any:
        """A model `table_factory` that creates the table here and hands the model its `EngramTable` view:
        `DeviceTable` (replicated, device), `HostTable` (replicated, host) or `ShardedTable`."""
        from ..memory.host_tables import HostTable, init_table_rows
        from ..parallel.table_shard import ShardedTable

        def make(layer_id: int, num_rows: int, dim: int) -> Any:
            if num_rows <= 0 or dim <= 0:
                raise ValueError(f"engram table of layer {layer_id}: num_rows={num_rows}, dim={dim} must be "
                                 "positive")

            def init(start: int, end: int) -> torch.Tensor:
                return init_table_rows(self.seed, layer_id, num_rows, dim, init_std, start, end)

            table: Any
            if self.sharded:
                table = ShardedTable(num_rows, dim, init, device=self.device, group=self.group,
                                     host=self.host, ops=self.ops if self.host else None)
            elif self.host:
                table = HostTable(num_rows, dim, self.device, init, ops=self.ops)
            else:
                table = DeviceTable(nn.Parameter(init(0, num_rows).to(self.device)), sparse=sparse,
                                    ops=self.device_ops)
            self.tables[str(layer_id)] = table.weight
            self.views[layer_id] = table
            return table

        return make

    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.tables.keys())

    def weight(self, layer: int) -> nn.Parameter:
        """This rank's rows of `layer`'s table (the optimizer's parameter)."""
        return self.tables[str(layer)]

    def table(self, layer: int) -> Any:
        """The `EngramTable` of `layer`."""
        return self.views[layer]

    def row_range(self, layer: int) -> tuple[int, int]:
        """Global rows [start, end) of `layer` held by this rank."""
        view = self.views[layer]
        return (view.row_start, view.row_end) if self.sharded else (0, view.num_rows)

    def writes_rows(self, layer: int, rank: int) -> bool:
        """Whether `rank` writes its rows of `layer` to a checkpoint (each row is written exactly once)."""
        start, end = self.row_range(layer)
        return end > start if self.sharded else rank == 0

    @property
    def num_rows(self) -> int:
        """Rows of all tables (whole tables, whatever this rank holds)."""
        return sum(view.num_rows for view in self.views.values())

    def full_weight(self, layer: int) -> torch.Tensor:
        """The whole table of `layer` on the CPU; collective for sharded tables (export/consolidation)."""
        if self.sharded:
            from ..parallel.table_shard import gather_full_weight

            return gather_full_weight(self.views[layer])
        return self.weight(layer).detach().cpu().clone()

    def prefetch(self, layer: int, flat_row_ids: torch.Tensor) -> None:
        """Start gathering the rows a later lookup of `layer` with the same ids needs (host tier; collective
        when sharded). No-op for device-resident tables."""
        if self.host:
            self.views[layer].prefetch(flat_row_ids)

    def close(self) -> None:
        """Stop the host tier's prefetch threads."""
        for view in self.views.values():
            close = getattr(view, "close", None)
            if close is not None:
                close()


class _KernelLookup(torch.autograd.Function):
    """rows = ops.gather_rows(weight, ids) without a host sync (ids come from the in-model hash; an
    out-of-range id is reported by `check_deferred_errors`); backward: the sparse row gradient that
    `F.embedding(sparse=True)` gives (one row per lookup, duplicates summed by the optimizer's kernels)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, flat_ids: torch.Tensor, ops: Any) -> torch.Tensor:
        ctx.save_for_backward(flat_ids)
        ctx.weight_shape = tuple(weight.shape)
        return ops.gather_rows(weight, flat_ids, validate=False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (ids,) = ctx.saved_tensors
        rows = grad.reshape(-1, ctx.weight_shape[1])
        indices = ids.reshape(1, -1).to(torch.int64)
        return torch.sparse_coo_tensor(indices, rows, ctx.weight_shape, check_invariants=False), None, None


class DeviceTable:
    """`EngramTable` view of one `TableStore` parameter. Not an `nn.Module` on purpose: the model keeps it
    as a plain attribute, so the table stays out of `model.parameters()` and out of DeepSpeed.

    With `ops` (compiled kernel ops for the table's device, `TableStore.device_ops`) sparse lookups gather
    through `ops.gather_rows`; otherwise through `F.embedding`. Both give the same rows and the same sparse
    gradient."""

    def __init__(self, weight: nn.Parameter, sparse: bool = True, ops: Any | None = None) -> None:
        self.weight = weight
        self.sparse = sparse
        self.ops = ops
        self.num_rows, self.dim = int(weight.shape[0]), int(weight.shape[1])
        self.compute_dtype: torch.dtype | None = None
        """Cast the looked-up rows to this dtype (bf16 runs keep the table itself in fp32)."""

    @torch.compiler.disable  # sparse gradients, host copies and collectives stay out of compiled graphs
    def lookup(self, flat_row_ids: torch.Tensor) -> torch.Tensor:
        """flat_row_ids: [...] int64 (offsets included) -> rows [..., dim]; sparse row gradient."""
        if self.ops is not None and self.sparse:
            rows = _KernelLookup.apply(self.weight, flat_row_ids, self.ops)
        else:
            rows = F.embedding(flat_row_ids, self.weight, sparse=self.sparse)
        return rows if self.compute_dtype is None else rows.to(self.compute_dtype)

    def __repr__(self) -> str:
        ops = "torch" if self.ops is None else self.ops.name
        return f"DeviceTable(num_rows={self.num_rows}, dim={self.dim}, sparse={self.sparse}, ops={ops})"

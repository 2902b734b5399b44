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
        """Kernel ops (`kernels.get_ops`) for host-tier gathers and updates; None: torch indexing."""
        self.seed = seed

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
                table = DeviceTable(nn.Parameter(init(0, num_rows).to(self.device)), sparse=sparse)
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


class DeviceTable:
    """`EngramTable` view of one `TableStore` parameter. Not an `nn.Module` on purpose: the model keeps it
    as a plain attribute, so the table stays out of `model.parameters()` and out of DeepSpeed."""

    def __init__(self, weight: nn.Parameter, sparse: bool = True) -> None:
        self.weight = weight
        self.sparse = sparse
        self.num_rows, self.dim = int(weight.shape[0]), int(weight.shape[1])
        self.compute_dtype: torch.dtype | None = None
        """Cast the looked-up rows to this dtype (bf16 runs keep the table itself in fp32)."""

    @torch.compiler.disable  # sparse gradients, host copies and collectives stay out of compiled graphs
    def lookup(self, flat_row_ids: torch.Tensor) -> torch.Tensor:
        """flat_row_ids: [...] int64 (offsets included) -> rows [..., dim]; sparse row gradient."""
        rows = F.embedding(flat_row_ids, self.weight, sparse=self.sparse)
        return rows if self.compute_dtype is None else rows.to(self.compute_dtype)

    def __repr__(self) -> str:
        return f"DeviceTable(num_rows={self.num_rows}, dim={self.dim}, sparse={self.sparse})"

"""Row-sparse ("lazy") Adam for Engram tables (Engram paper §4.1; docs/model.md rule O6).

Gradients are torch sparse COO tensors, as produced by `F.embedding(..., sparse=True)` (tables built with
`sparse=True`) or assembled with `add_row_grad` (e.g. row gradients routed to a table shard). A row is
*touched* in a step when it appears among the gradient's indices, i.e. when it was looked up, even if its
gradient is exactly zero. Duplicate indices (a row looked up several times) are summed.

Semantics of one `step(lr)`, for every touched row r with summed (and, in data-parallel runs, reduced)
gradient g_r:

    k_r  = k_r + 1                                        # per-row step count (int32 state `row_step`)
    m_r  = b1 * m_r + (1 - b1) * g_r
    v_r  = b2 * v_r + (1 - b2) * g_r^2
    mhat = m_r / (1 - b1^t),  vhat = v_r / (1 - b2^t)     # t = k_r ("row", default) or the global step
    w_r  = w_r * (1 - lr * weight_decay)                  # decoupled, touched rows only (paper: wd = 0)
    w_r  = w_r - lr * mhat / (sqrt(vhat) + eps)

Rows that are not touched are left bitwise unchanged, and so are their m, v and k: no decay of the moments,
no weight decay. With the default per-row bias correction (t = k_r) each row follows exactly the Adam
trajectory it would have if the optimizer only ever saw the steps in which that row was looked up, so a
rarely used row gets a properly bias-corrected first update however late it comes. `bias_correction=
"global"` uses t = the number of steps this table has taken, as `torch.optim.SparseAdam` does (which
differs from this only in placing eps as `sqrt(v) + eps * sqrt(1 - b2^t)`). A table's global step counts
the steps in which at least one of its rows was touched on some rank (a step without any is skipped
entirely, also for the counter).

Data parallelism (tables replicated on every rank): before updating, each table's sparse gradient is
gathered from all ranks of `process_group` (gloo has no uneven all_gather, so the row counts are gathered
first and the indices/values padded to the largest count), concatenated in rank order, coalesced (summing
duplicate rows) and divided by the world size (`grad_sync="mean"`, like DDP) or left summed (`"sum"`).
Every rank then holds the identical gradient and applies the identical update, so replicas stay bitwise
equal. `grad_sync="none"` applies the local gradient only (tables sharded by owner, whose row gradients
were already routed to the owning rank).

Kernels (`ops`, docs/kernels.md): when `ops` resolves to compiled ops for a table's device (the CUDA ops for
CUDA tables, the C++ ops for CPU tables with kernel_backend=cpp; `kernels.device_table_ops`), a step without
exchange runs one fused `sparse_adam_step_nosync_` on the raw (uncoalesced) lookups: sort, duplicate sums in
fp32 (bf16 gradients included), the update and the row-step bump, with the touched-row count left on the
device (no host sync; `touched_rows_*` read it when asked). With an exchange, the local and the gathered rows
are reduced by the ops' `segment_reduce` and applied by `sparse_adam_update_(validate=False)`. Without
compiled ops (`ops=None` or the torch ops) the torch path below is used; its duplicate sums of bf16/fp16
gradients are taken in fp32 too.

Memory: exp_avg and exp_avg_sq are dense like the table (fp32 for fp32/bf16 tables, fp64 for fp64), plus
4 bytes per row of step count: about 2x the table (fp32) + 4 B/row. Time per step is proportional to the
number of touched rows, not to the table size.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

BiasCorrection = Literal["row", "global"]
GradSync = Literal["mean", "sum", "none"]


def add_row_grad(param: Tensor, row_ids: Tensor, row_grads: Tensor) -> None:
    """Accumulate row gradients into `param.grad` as a sparse COO tensor.

    param: [num_rows, dim]; row_ids: [...] int64; row_grads: [..., dim]. Duplicates are kept (summed later).
    """
    if param.dim() != 2:
        raise ValueError(f"add_row_grad: param must be [num_rows, dim], got {tuple(param.shape)}")
    ids = row_ids.reshape(-1).to(device=param.device, dtype=torch.int64)
    vals = row_grads.reshape(-1, param.shape[1]).to(device=param.device, dtype=param.dtype)
    if ids.numel() != vals.shape[0]:
        raise ValueError(f"add_row_grad: {ids.numel()} row ids but {vals.shape[0]} gradient rows")
    grad = torch.sparse_coo_tensor(ids.unsqueeze(0), vals, tuple(param.shape), check_invariants=True)
    param.grad = grad if param.grad is None else param.grad + grad


class RowSparseAdam(torch.optim.Optimizer):
    """Lazy Adam over 2-D tables with sparse gradients; see the module docstring for the exact update.

    `step(lr)` takes the learning rate of this step (the trainer's schedule x the Engram multiplier) and
    writes it into every group; `step()` uses the groups' current `lr`. `process_group=None` is the default
    (world) group when torch.distributed is initialised with more than one rank, else no exchange.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 bias_correction: BiasCorrection = "row", process_group: Any | None = None,
                 grad_sync: GradSync = "mean", ops: Any | None = None) -> None:
        if lr < 0:
            raise ValueError(f"RowSparseAdam: lr={lr} must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"RowSparseAdam: betas={betas} must be two values in [0, 1)")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"RowSparseAdam: eps={eps} and weight_decay={weight_decay} must be >= 0")
        if bias_correction not in ("row", "global"):
            raise ValueError(f"RowSparseAdam: bias_correction='{bias_correction}' (expected row or global)")
        if grad_sync not in ("mean", "sum", "none"):
            raise ValueError(f"RowSparseAdam: grad_sync='{grad_sync}' (expected mean, sum or none)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError("RowSparseAdam: tables must be 2-D [num_rows, dim], "
                                     f"got {tuple(p.shape)}")
        self.process_group = process_group
        self.grad_sync: GradSync = grad_sync
        self.ops = ops
        """Kernel ops (`kernels.get_ops(backend)`) that step the tables on the devices where they resolve to
        compiled ops (see the module docstring); None: the torch reference (`kernels.reference`)."""
        self._touched: list[int | Tensor] = []

    @property
    def touched_rows_per_table(self) -> list[int]:
        """Distinct rows updated by the last step per table, in parameter order (after the exchange). Reads
        counts the fused kernels left on the device (one host sync each on a GPU)."""
        return [int(t) for t in self._touched]

    @property
    def touched_rows_last_step(self) -> int:
        """Distinct rows updated by the last step, summed over all tables."""
        return sum(self.touched_rows_per_table)

    def check_deferred_errors(self) -> None:
        """Raise IndexError if a row id outside its table reached the kernels since the last check (the
        no-sync CUDA path defers the check to here; `state_dict` calls it, i.e. every checkpoint)."""
        check = getattr(self.ops, "check_deferred_errors", None)
        if check is not None:
            check()

    def state_dict(self) -> dict[str, Any]:
        self.check_deferred_errors()
        return super().state_dict()

    def _kernels(self, p: Tensor) -> Any | None:
        """The compiled ops that step `p` (None: the torch path)."""
        if self.ops is None:
            return None
        from ..kernels.dispatch import resolve

        ops = resolve(self.ops, p.device)
        return None if ops.name == "torch" else ops

    # ------------------------------------------------------------------------------------------- state

    def _state_of(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            dt = torch.promote_types(p.dtype, torch.float32)
            state["step"] = torch.zeros((), dtype=torch.int64)
            state["exp_avg"] = torch.zeros(p.shape, dtype=dt, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dt, device=p.device)
            state["row_step"] = torch.zeros(p.shape[0], dtype=torch.int32, device=p.device)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts floating state to the parameter dtype; keep the saved dtypes instead."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(pid)
            if saved is not None:
                self.state[p] = {k: v.to(p.device).clone() if torch.is_tensor(v) else v
                                 for k, v in saved.items()}

    # ------------------------------------------------------------------------------------- gradients

    def _world(self) -> int:
        if self.grad_sync == "none" or not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.process_group)

    @staticmethod
    def _raw_rows(p: Tensor) -> tuple[Tensor, Tensor] | None:
        """(indices [M], values [M, dim]) of p's sparse gradient as accumulated (duplicates kept), or None
        without a gradient."""
        g = p.grad
        if g is None:
            return None
        if not g.is_sparse:
            raise ValueError("RowSparseAdam needs sparse row gradients (the rows that were looked up): build "
                             "the tables with sparse=True (F.embedding(sparse=True)) or use add_row_grad")
        if g.sparse_dim() != 1 or g.dense_dim() != 1 or tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"RowSparseAdam: gradient of shape {tuple(g.shape)} (sparse_dim="
                             f"{g.sparse_dim()}) does not match a row-sparse table {tuple(p.shape)}")
        return g._indices()[0], g._values()

    def _local_rows(self, p: Tensor, kernels: Any | None) -> tuple[Tensor, Tensor]:
        """(indices [n] int64 ascending unique, values [n, dim] in the accumulation dtype: fp32 for fp32 and
        16-bit tables, fp64 for fp64) of p's summed sparse gradient (n = 0 without one)."""
        raw = self._raw_rows(p)
        acc = torch.promote_types(p.dtype, torch.float32)
        if raw is None:
            return (torch.zeros(0, dtype=torch.int64, device=p.device),
                    torch.zeros(0, p.shape[1], dtype=acc, device=p.device))
        idx, vals = raw
        if kernels is not None:
            return kernels.segment_reduce(idx, vals)
        if vals.dtype != acc:  # bf16/fp16 rows summed in fp32
            from ..kernels import reference

            return reference.segment_reduce(idx, vals)
        g = p.grad.coalesce()
        return g.indices()[0], g.values()

    def _gather(self, locals_: list[tuple[Tensor, Tensor]], params: list[Tensor],
                kernels: list[Any | None]) -> list[tuple[Tensor, Tensor]]:
        """All-gather every table's rows across the group, sum duplicates, apply the reduction."""
        world = self._world()
        if world == 1:  # `_local_rows` already coalesced them (sorted unique rows); nothing to reduce
            return locals_
        group = self.process_group
        device = params[0].device
        counts = torch.tensor([idx.numel() for idx, _ in locals_], dtype=torch.int64, device=device)
        all_counts = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(all_counts, counts, group=group)
        table = torch.stack(all_counts).cpu()  # [world, num_tables]
        out = []
        for t, ((idx, val), p, ops) in enumerate(zip(locals_, params, kernels, strict=True)):
            per_rank = table[:, t].tolist()
            width = max(per_rank)
            if width == 0:
                out.append(self._coalesce(idx, val, p, world, ops))
                continue
            pad = width - idx.numel()
            idx_pad = torch.cat([idx, idx.new_zeros(pad)])
            val_pad = torch.cat([val, val.new_zeros(pad, val.shape[1])])
            idx_all = [torch.empty_like(idx_pad) for _ in range(world)]
            val_all = [torch.empty_like(val_pad) for _ in range(world)]
            dist.all_gather(idx_all, idx_pad, group=group)
            dist.all_gather(val_all, val_pad, group=group)
            idx_cat = torch.cat([a[:n] for a, n in zip(idx_all, per_rank, strict=True)])
            val_cat = torch.cat([a[:n] for a, n in zip(val_all, per_rank, strict=True)])
            out.append(self._coalesce(idx_cat, val_cat, p, world, ops))
        return out

    def _coalesce(self, idx: Tensor, val: Tensor, p: Tensor, world: int,
                  kernels: Any | None) -> tuple[Tensor, Tensor]:
        """Sum duplicate rows (sorted unique ids [n], rows [n, dim]) and divide by `world` for the mean."""
        if kernels is not None:
            rows, vals = kernels.segment_reduce(idx, val)
        else:
            g = torch.sparse_coo_tensor(idx.unsqueeze(0), val, tuple(p.shape), check_invariants=False)
            g = g.coalesce()
            rows, vals = g.indices()[0], g.values()
        if self.grad_sync == "mean" and world > 1:
            vals = vals / world
        return rows, vals

    # ------------------------------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:  # type: ignore[override]
        """Apply one update to the touched rows of every table (collective when data-parallel)."""
        if lr is not None:
            if lr < 0:
                raise ValueError(f"RowSparseAdam.step: lr={lr} must be >= 0")
            for group in self.param_groups:
                group["lr"] = lr
        groups = [(p, group) for group in self.param_groups for p in group["params"]]
        if not groups:
            return
        kernels = [self._kernels(p) for p, _ in groups]
        touched: list[int | Tensor] = []
        if self._world() == 1:
            for (p, group), ops in zip(groups, kernels, strict=True):
                if ops is not None:
                    touched.append(self._fused_step(p, group, ops))
                    continue
                rows, grads = self._local_rows(p, None)
                touched.append(int(rows.numel()))
                if rows.numel() > 0:
                    self._update(p, rows, grads, group, None)
        else:
            params = [p for p, _ in groups]
            reduced = self._gather([self._local_rows(p, ops) for p, ops in zip(params, kernels, strict=True)],
                                   params, kernels)
            for (p, group), (rows, grads), ops in zip(groups, reduced, kernels, strict=True):
                touched.append(int(rows.numel()))
                if rows.numel() > 0:
                    self._update(p, rows, grads, group, ops)
        self._touched = touched

    def _hyper(self, p: Tensor, group: dict[str, Any]) -> tuple[dict[str, Tensor], tuple[Any, ...]]:
        """Count the step of `p`'s table; (state, the update's hyper-parameters lr .. global_step)."""
        state = self._state_of(p)
        state["step"] += 1  # a host tensor
        b1, b2 = group["betas"]
        global_step = int(state["step"]) if group["bias_correction"] == "global" else None
        return state, (group["lr"], b1, b2, group["eps"], group["weight_decay"], global_step)

    def _fused_step(self, p: Tensor, group: dict[str, Any], ops: Any) -> int | Tensor:
        """One kernel step on p's raw lookups; the touched-row count (a device tensor from the kernels)."""
        raw = self._raw_rows(p)
        if raw is None or raw[0].numel() == 0:  # no lookups: no touched row, the table does not step
            return 0
        idx, vals = raw
        state, hyper = self._hyper(p, group)
        count = ops.sparse_adam_step_nosync_(p.data, state["exp_avg"], state["exp_avg_sq"], state["row_step"],
                                             idx, vals, *hyper)
        torch.autograd.graph.increment_version(p)  # extension ops write through raw pointers
        return count

    def _update(self, p: Tensor, rows: Tensor, g: Tensor, group: dict[str, Any], ops: Any | None) -> None:
        """rows: [n] unique ascending int64 (from a coalesce: not checked again); g: [n, dim] reduced gradient
        of those rows."""
        from ..kernels import reference

        state, hyper = self._hyper(p, group)
        grads = g.to(device=p.device, dtype=state["exp_avg"].dtype).contiguous()
        args = (p.data, state["exp_avg"], state["exp_avg_sq"], state["row_step"],
                rows.to(p.device).contiguous(), grads, *hyper)
        if ops is None:
            reference.sparse_adam_update_(*args, check_rows=False)
        else:
            ops.sparse_adam_update_(*args, validate=False)
        torch.autograd.graph.increment_version(p)  # extension ops write through raw pointers

"""Plain-torch reference ops: they define the semantics of every custom op and are the test oracle.

All functions work on any device. Row ids are int64 (int32 accepted) and index rows of a 2-D table
`[R, d]`. Out-of-range ids raise `IndexError` in every backend.

Row-sparse AdamW (`sparse_adam_update_`), the update of `memory.sparse_optim.RowSparseAdam`: on each
touched row r with (summed) gradient g -- rows not in `unique_ids` are left untouched, their step
count included:

    k[r] += 1;  t = k[r]  (or t = global_step when given: RowSparseAdam's bias_correction="global")
    m[r]  = beta1 * m[r] + (1 - beta1) * g
    v[r]  = beta2 * v[r] + (1 - beta2) * (g * g)
    u     = (m[r] / (1 - beta1^t)) / (sqrt(v[r] / (1 - beta2^t)) + eps)
    w     = p[r] * (1 - lr * weight_decay)                  # decoupled (AdamW); skipped when wd == 0
    p[r]  = w - lr * u

State dtype S is float32 or float64; the parameter has dtype S or is a 16-bit float table with float32
state (computed in S, rounded once to the parameter dtype). Gradients are cast to S. The bias
corrections 1 - beta^t are computed in float64 and rounded to S. Row step counts are int32 or int64.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)
LOW_PRECISION = (torch.bfloat16, torch.float16)
"""Dtypes supported by the reductions and the optimizer update (gathers copy any dtype)."""


def check_ids(ids: torch.Tensor, num_rows: int, what: str = "row ids") -> None:
    """Raise ValueError for a non-integer id tensor, IndexError for ids outside [0, num_rows)."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what} must be int64 or int32, got {ids.dtype}")
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_rows:
        raise IndexError(f"{what} out of range: min {lo}, max {hi}, table has {num_rows} rows")


def check_table(table: torch.Tensor) -> None:
    if table.dim() != 2:
        raise ValueError(f"table must be 2-D [rows, dim], got shape {tuple(table.shape)}")


def check_out(out: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> None:
    """A preallocated output must have the exact shape, the table's dtype and be contiguous."""
    if tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
    if out.dtype != like.dtype:
        raise ValueError(f"out dtype {out.dtype} != table dtype {like.dtype}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def gather_rows(table: torch.Tensor, flat_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """table: [R, d], flat_ids: [...] -> rows [..., d] (written into `out` when given)."""
    check_table(table)
    check_ids(flat_ids, table.shape[0])
    shape = (*flat_ids.shape, table.shape[1])
    rows = table.index_select(0, flat_ids.reshape(-1).long()).reshape(shape)
    if out is None:
        return rows
    check_out(out, shape, table)
    return out.copy_(rows)


def multihead_gather(
    table: torch.Tensor, row_ids: torch.Tensor, head_offsets: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """table: [R, d], row_ids: [..., H] per-head rows, head_offsets: [H] -> [..., H, d].

    out[..., h, :] = table[row_ids[..., h] + head_offsets[h]].
    """
    check_table(table)
    if head_offsets.dim() != 1 or row_ids.dim() < 1 or row_ids.shape[-1] != head_offsets.shape[0]:
        raise ValueError(f"row_ids {tuple(row_ids.shape)} must end in H = head_offsets "
                         f"{tuple(head_offsets.shape)}[0]")
    check_ids(head_offsets, table.shape[0] + 1, "head_offsets")
    flat = row_ids.long() + head_offsets.long()
    check_ids(row_ids, table.shape[0], "row_ids")
    return gather_rows(table, flat, out)


def accumulation_dtype(grads: torch.Tensor) -> torch.Tensor:
    """`grads` in the dtype row gradients are summed in: float32/float64 as they are, bfloat16/float16 as
    float32; anything else is a ValueError."""
    if grads.dtype in LOW_PRECISION:
        return grads.float()
    if grads.dtype not in FLOAT_DTYPES:
        raise ValueError(f"segment_reduce: grads dtype {grads.dtype} not in {FLOAT_DTYPES + LOW_PRECISION}")
    return grads


def segment_reduce(row_ids: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """row_ids: [M], grads: [M, d] -> (unique_ids [U] sorted ascending int64, summed [U, d]).

    summed[u] is the sum of grads[i] over all i with row_ids[i] == unique_ids[u], accumulated in
    order of occurrence. bfloat16/float16 gradients (bf16 runs) are summed in float32 and `summed` is
    float32, the dtype of the tables' optimizer state.
    """
    if row_ids.dim() != 1 or grads.dim() != 2 or grads.shape[0] != row_ids.shape[0]:
        raise ValueError(f"segment_reduce: row_ids [M] and grads [M, d] expected, got "
                         f"{tuple(row_ids.shape)} and {tuple(grads.shape)}")
    grads = accumulation_dtype(grads)
    check_ids(row_ids, torch.iinfo(torch.int64).max)
    unique, inverse = torch.unique(row_ids.long(), sorted=True, return_inverse=True)
    summed = grads.new_zeros(unique.shape[0], grads.shape[1]).index_add_(0, inverse, grads)
    return unique, summed


STATE_DTYPES = (torch.float32, torch.float64)


def check_adam_args(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step_per_row: torch.Tensor,
    grads: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    global_step: int | None = None,
) -> None:
    """Shapes, dtypes and hyper-parameters shared by every backend's sparse Adam."""
    if param.dim() != 2:
        raise ValueError(f"param must be [R, d], got {tuple(param.shape)}")
    state_dtype = exp_avg.dtype
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"sparse Adam: state dtype {state_dtype} not in {STATE_DTYPES}")
    if not (param.dtype == state_dtype or (param.dtype in LOW_PRECISION and state_dtype == torch.float32)):
        raise ValueError(f"sparse Adam: param dtype {param.dtype} with state dtype {state_dtype}: the param "
                         f"must have the state dtype, or be bf16/fp16 with float32 state")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape or t.dtype != state_dtype or t.device != param.device:
            raise ValueError(f"{name} must be {state_dtype} {tuple(param.shape)} on {param.device}")
    if step_per_row.shape != param.shape[:1] or step_per_row.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"step_per_row must be int32/int64 [{param.shape[0]}], got {step_per_row.dtype} "
                         f"{tuple(step_per_row.shape)}")
    low_grads = state_dtype == torch.float32 and grads.dtype in LOW_PRECISION  # summed/applied in fp32
    if grads.dim() != 2 or grads.shape[1] != param.shape[1] or not (
            grads.dtype in (state_dtype, param.dtype) or low_grads):
        raise ValueError(f"grads must be [*, {param.shape[1]}] of the state or param dtype (or bf16/fp16 "
                         f"with float32 state), got {grads.dtype} {tuple(grads.shape)}")
    if not (lr >= 0.0 and 0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0 and eps > 0.0):
        raise ValueError(f"sparse Adam: need lr >= 0, 0 <= betas < 1, eps > 0; got lr={lr}, "
                         f"betas=({beta1}, {beta2}), eps={eps}")
    if global_step is not None and global_step < 1:
        raise ValueError(f"sparse Adam: global_step={global_step} must be >= 1")


def check_sorted_unique(ids: torch.Tensor) -> None:
    """Update ids must be strictly increasing (as `segment_reduce` returns them)."""
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError("unique_ids must be sorted strictly increasing (use segment_reduce first)")


def sparse_adam_update_(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step_per_row: torch.Tensor,
    unique_ids: torch.Tensor,
    grads: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    global_step: int | None = None,
    check_rows: bool = True,
) -> None:
    """Row-sparse AdamW in place on rows `unique_ids` [U] (sorted, unique) with grads [U, d].

    param: [R, d]; exp_avg, exp_avg_sq: [R, d] state dtype; step_per_row: [R] int32/int64.
    `check_rows=False` skips the range and ordering checks of `unique_ids` (each a device -> host sync on
    a GPU) for callers whose ids come from a coalesce. See the module docstring.
    """
    check_adam_args(param, exp_avg, exp_avg_sq, step_per_row, grads, lr, beta1, beta2, eps, global_step)
    if unique_ids.dim() != 1 or unique_ids.shape[0] != grads.shape[0]:
        raise ValueError(f"unique_ids [U] and grads [U, d] disagree: {tuple(unique_ids.shape)} vs "
                         f"{tuple(grads.shape)}")
    if check_rows:
        check_ids(unique_ids, param.shape[0], "unique_ids")
        check_sorted_unique(unique_ids)
    if unique_ids.numel() == 0:
        return
    ids = unique_ids.long()
    sdt = exp_avg.dtype
    g = grads.to(sdt)
    steps = step_per_row.index_select(0, ids) + 1  # [U]
    step_per_row.index_copy_(0, ids, steps)
    t = steps.to(torch.float64)  # [U] bias-correction step
    if global_step is not None:
        t = torch.full_like(t, float(global_step))
    bc1 = (1.0 - torch.pow(beta1, t)).to(sdt).unsqueeze(1)  # [U, 1]
    bc2 = (1.0 - torch.pow(beta2, t)).to(sdt).unsqueeze(1)  # [U, 1]

    m = exp_avg.index_select(0, ids) * beta1 + g * (1.0 - beta1)  # [U, d]
    v = exp_avg_sq.index_select(0, ids) * beta2 + (g * g) * (1.0 - beta2)
    update = (m / bc1) / (torch.sqrt(v / bc2) + eps)
    w = param.index_select(0, ids).to(sdt)
    if weight_decay != 0.0:
        w = w * (1.0 - lr * weight_decay)
    w = w - lr * update
    param.index_copy_(0, ids, w.to(param.dtype))
    exp_avg.index_copy_(0, ids, m)
    exp_avg_sq.index_copy_(0, ids, v)


def sparse_adam_step_(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step_per_row: torch.Tensor,
    row_ids: torch.Tensor,
    grads: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    global_step: int | None = None,
) -> torch.Tensor:
    """Raw per-lookup gradients: row_ids [M] (duplicates allowed), grads [M, d] -> segment_reduce (in
    the state dtype), then `sparse_adam_update_`. Returns the touched rows (unique_ids [U])."""
    unique, summed = segment_reduce(row_ids, grads.to(exp_avg.dtype))
    sparse_adam_update_(param, exp_avg, exp_avg_sq, step_per_row, unique, summed, lr, beta1, beta2, eps,
                        weight_decay, global_step)
    return unique

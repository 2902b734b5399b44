"""Row-sparse Adam of the Engram tables: equals a dense per-row Adam restricted to the touched rows."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engram_pretrain.memory.sparse_optim import RowSparseAdam, add_row_grad
from engram_pretrain.testing.distributed import run_distributed

ROWS, DIM = 12, 3
BETAS = (0.9, 0.95)
EPS = 1e-8

# (looked-up ids, per-lookup gradient scale, lr) per step; duplicates, a zero-gradient lookup (row 5 at
# step 1), a row touched only at the last step (row 11) and rows never touched (0, 10).
STEPS = [
    ([1, 2, 2, 3, 7], [1.0, -0.5, 2.0, 0.3, 1.5], 1e-2),
    ([2, 5, 7, 7, 7], [0.7, 0.0, -1.0, 0.2, 0.4], 2e-2),
    ([1, 4, 8, 9, 3], [0.1, 0.9, -2.0, 1.1, -0.6], 5e-3),
    ([4, 11, 1, 2, 6], [1.3, -0.4, 0.8, 0.5, 2.2], 1e-2),
]


def _sparse_grad(table: torch.Tensor, ids: list[int], scale: list[float], seed: int) -> None:
    """Backward of sum_i scale_i * <E[ids_i], u_i> through F.embedding(sparse=True)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(len(ids), DIM, generator=gen, dtype=torch.float64).to(table.dtype)
    rows = F.embedding(torch.tensor(ids), table, sparse=True)
    (rows * u * torch.tensor(scale, dtype=table.dtype).unsqueeze(-1)).sum().backward()


def _dense_grad(ids: list[int], scale: list[float], seed: int) -> list[list[float]]:
    """The same gradient summed per row by hand (fp64): [ROWS][DIM]."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(len(ids), DIM, generator=gen, dtype=torch.float64).tolist()
    g = [[0.0] * DIM for _ in range(ROWS)]
    for i, r in enumerate(ids):
        for d in range(DIM):
            g[r][d] += scale[i] * u[i][d]
    return g


def _reference(init: torch.Tensor, steps: list, weight_decay: float, per_row: bool) -> dict[str, np.ndarray]:
    """Dense Adam over the whole table where untouched rows are masked out (plain loops, fp64)."""
    w = init.double().tolist()
    m = [[0.0] * DIM for _ in range(ROWS)]
    v = [[0.0] * DIM for _ in range(ROWS)]
    k = [0] * ROWS
    b1, b2 = BETAS
    for s, (ids, scale, lr) in enumerate(steps):
        g = _dense_grad(ids, scale, seed=s)
        touched = set(ids)
        for r in range(ROWS):
            if r not in touched:
                continue
            k[r] += 1
            t = k[r] if per_row else s + 1
            for d in range(DIM):
                m[r][d] = b1 * m[r][d] + (1 - b1) * g[r][d]
                v[r][d] = b2 * v[r][d] + (1 - b2) * g[r][d] ** 2
                mhat, vhat = m[r][d] / (1 - b1**t), v[r][d] / (1 - b2**t)
                w[r][d] *= 1 - lr * weight_decay
                w[r][d] -= lr * mhat / (math.sqrt(vhat) + EPS)
    return {"w": np.array(w), "m": np.array(m), "v": np.array(v), "k": np.array(k)}


def _run(table: torch.nn.Parameter, opt: RowSparseAdam, steps: list) -> None:
    for s, (ids, scale, lr) in enumerate(steps):
        opt.zero_grad()
        _sparse_grad(table, ids, scale, seed=s)
        opt.step(lr)


def _table(dtype: torch.dtype = torch.float64) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(7), dtype=dtype))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("bias_correction", ["row", "global"])
def test_matches_dense_adam_restricted_to_touched_rows(weight_decay: float, bias_correction: str) -> None:
    table = _table()
    ref = _reference(table.detach().clone(), STEPS, weight_decay, per_row=bias_correction == "row")
    opt = RowSparseAdam([table], lr=1.0, betas=BETAS, eps=EPS, weight_decay=weight_decay,
                        bias_correction=bias_correction)
    _run(table, opt, STEPS)
    st = opt.state[table]
    np.testing.assert_allclose(table.detach().numpy(), ref["w"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(st["exp_avg"].numpy(), ref["m"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(st["exp_avg_sq"].numpy(), ref["v"], rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(st["row_step"].numpy(), ref["k"])
    assert int(st["step"]) == len(STEPS)
    assert opt.touched_rows_last_step == len(set(STEPS[-1][0]))


def test_per_row_and_global_bias_correction_differ() -> None:
    """Guards the reference comparison above: the two modes really produce different tables here."""
    a, b = _table(), _table()
    _run(a, RowSparseAdam([a], betas=BETAS, eps=EPS), STEPS)
    _run(b, RowSparseAdam([b], betas=BETAS, eps=EPS, bias_correction="global"), STEPS)
    assert not torch.allclose(a, b)


def test_untouched_rows_and_their_state_are_bitwise_unchanged() -> None:
    table = _table(torch.float32)
    opt = RowSparseAdam([table], lr=1e-2, betas=BETAS, eps=EPS, weight_decay=0.1)
    _run(table, opt, STEPS[:2])
    before = table.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[table].items()}
    ids, scale, lr = STEPS[2]
    opt.zero_grad()
    _sparse_grad(table, ids, scale, seed=2)
    opt.step(lr)
    untouched = torch.tensor([r for r in range(ROWS) if r not in ids])
    touched = torch.tensor(sorted(set(ids)))
    assert torch.equal(table.detach()[untouched], before[untouched])
    for key in ("exp_avg", "exp_avg_sq", "row_step"):
        assert torch.equal(opt.state[table][key][untouched], state_before[key][untouched]), key
    assert state_before["exp_avg"][untouched].abs().sum() > 0  # some untouched rows carry earlier state
    assert (table.detach()[touched] != before[touched]).all(dim=-1).all()


def test_zero_gradient_lookup_counts_as_touched() -> None:
    table = _table()
    opt = RowSparseAdam([table], betas=BETAS, eps=EPS)
    _run(table, opt, STEPS[:2])
    assert int(opt.state[table]["row_step"][5]) == 1  # looked up with a zero gradient at step 1
    assert int(opt.state[table]["row_step"][0]) == 0


def test_global_mode_matches_torch_sparse_adam() -> None:
    """SparseAdam uses the global step for bias correction and eps * sqrt(1 - b2^t) in place of eps."""
    ours, theirs = _table(), _table()
    opt = RowSparseAdam([ours], lr=1e-2, betas=BETAS, eps=EPS, bias_correction="global")
    ref = torch.optim.SparseAdam([theirs], lr=1e-2, betas=BETAS, eps=EPS)
    for s, (ids, scale, lr) in enumerate(STEPS):
        for p, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            _sparse_grad(p, ids, scale, seed=s)
            o.param_groups[0]["lr"] = lr
            o.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)  # eps placement only
    torch.testing.assert_close(opt.state[ours]["exp_avg"], ref.state[theirs]["exp_avg"], rtol=1e-12, atol=0)


def test_add_row_grad_equals_embedding_backward() -> None:
    a, b = _table(), _table()
    ids, scale, _ = STEPS[1]
    _sparse_grad(a, ids, scale, seed=1)
    dense = torch.tensor(_dense_grad(ids, scale, seed=1), dtype=torch.float64)
    rows = torch.tensor(ids)
    per_lookup = torch.zeros(len(ids), DIM, dtype=torch.float64)
    for i, r in enumerate(ids):  # put each row's whole gradient on its first occurrence, zeros elsewhere
        if ids.index(r) == i:
            per_lookup[i] = dense[r]
    add_row_grad(b, rows, per_lookup)
    torch.testing.assert_close(a.grad.to_dense(), b.grad.to_dense(), rtol=1e-12, atol=1e-15)
    oa, ob = RowSparseAdam([a]), RowSparseAdam([b])
    oa.step(1e-2)
    ob.step(1e-2)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_user_errors() -> None:
    table = _table()
    with pytest.raises(ValueError, match="2-D"):
        RowSparseAdam([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="bias_correction"):
        RowSparseAdam([table], bias_correction="none")  # type: ignore[arg-type]
    opt = RowSparseAdam([table])
    table.grad = torch.ones_like(table)
    with pytest.raises(ValueError, match="sparse=True"):
        opt.step(1e-3)


def test_state_dict_round_trip_keeps_dtypes_and_continues_identically() -> None:
    a = _table(torch.bfloat16)
    opt_a = RowSparseAdam([a], lr=1e-2, betas=BETAS, eps=EPS)
    _run(a, opt_a, STEPS[:2])
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    b = torch.nn.Parameter(a.detach().clone())
    opt_b = RowSparseAdam([b], lr=1.0)
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf))
    sb = opt_b.state[b]
    assert sb["exp_avg"].dtype == torch.float32 and sb["row_step"].dtype == torch.int32
    assert opt_b.param_groups[0]["betas"] == BETAS
    _run(a, opt_a, STEPS[2:])
    _run(b, opt_b, STEPS[2:])
    assert torch.equal(a, b)
    for key in ("exp_avg", "exp_avg_sq", "row_step", "step"):
        assert torch.equal(opt_a.state[a][key], opt_b.state[b][key]), key


# ------------------------------------------------------------------------------ data-parallel exchange

RANK_STEPS = {  # per rank: (ids, scales) of two steps; overlapping rows, duplicates, rank-only rows
    0: [([1, 2, 2, 7], [1.0, -0.5, 2.0, 0.3]), ([3, 3, 9], [0.5, 0.5, -1.0])],
    1: [([2, 4, 7, 7, 7, 11], [0.7, 0.1, -1.0, 0.2, 0.4, 1.2]), ([9, 0], [2.0, 0.25])],
}


def _rank_grad(table: torch.Tensor, rank: int, step: int) -> None:
    ids, scale = RANK_STEPS[rank][step]
    _sparse_grad(table, ids, scale, seed=100 * rank + step)


def _dp_body(rank: int, world_size: int) -> dict[str, dict[str, np.ndarray]]:
    return {mode: _dp_run(rank, mode) for mode in ("mean", "sum")}


def _dp_run(rank: int, grad_sync: str) -> dict[str, np.ndarray]:
    tables = [_table(torch.float32), _table(torch.float32)]
    opt = RowSparseAdam(tables, lr=1e-2, betas=BETAS, eps=EPS, grad_sync=grad_sync)  # type: ignore[arg-type]
    for step in range(2):
        opt.zero_grad()
        _rank_grad(tables[0], rank, step)
        if rank == 0:  # the second table is looked up on rank 0 only (rank 1 has no gradient at all)
            _rank_grad(tables[1], rank, step)
        opt.step()
    out = {f"w{i}": t.detach().numpy().copy() for i, t in enumerate(tables)}
    out.update({f"m{i}": opt.state[t]["exp_avg"].numpy().copy() for i, t in enumerate(tables)})
    out["touched"] = np.array(opt.touched_rows_per_table)
    return out


def _single_process_reference(grad_sync: str) -> dict[str, np.ndarray]:
    """One process, stepping on the mean (or sum) of both ranks' gradients."""
    tables = [_table(torch.float32), _table(torch.float32)]
    opt = RowSparseAdam(tables, lr=1e-2, betas=BETAS, eps=EPS)
    div = 2.0 if grad_sync == "mean" else 1.0
    for step in range(2):
        opt.zero_grad()
        for rank in (0, 1):
            probe = torch.nn.Parameter(tables[0].detach().clone())
            _rank_grad(probe, rank, step)
            g = probe.grad.coalesce()
            add_row_grad(tables[0], g.indices()[0], g.values() / div)
        probe = torch.nn.Parameter(tables[1].detach().clone())
        _rank_grad(probe, 0, step)
        g = probe.grad.coalesce()
        add_row_grad(tables[1], g.indices()[0], g.values() / div)
        opt.step()
    return {f"w{i}": t.detach().numpy() for i, t in enumerate(tables)}


def test_two_replicas_apply_the_identical_update() -> None:
    results = run_distributed(_dp_body, 2, timeout=120)
    for grad_sync in ("mean", "sum"):
        _check_replicas(results[0][grad_sync], results[1][grad_sync], grad_sync)


def _check_replicas(r0: dict[str, np.ndarray], r1: dict[str, np.ndarray], grad_sync: str) -> None:
    for key in r0:
        np.testing.assert_array_equal(r0[key], r1[key], err_msg=key)
    ref = _single_process_reference(grad_sync)
    for key in ("w0", "w1"):
        np.testing.assert_allclose(r0[key], ref[key], rtol=1e-6, atol=1e-7, err_msg=key)
    init = _table(torch.float32).detach().numpy()
    assert not np.array_equal(r0["w0"][[0, 4, 11]], init[[0, 4, 11]])  # rows only rank 1 touched moved
    np.testing.assert_array_equal(r0["w0"][[5, 6, 8, 10]], init[[5, 6, 8, 10]])
    assert r0["touched"].tolist() == [len({9, 3, 0}), len({3, 9})]


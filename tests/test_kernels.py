"""Custom ops: the torch reference against fp64 loops, the C++ ops against the reference, dispatch,
the JIT builder, the standalone nvcc compile check of the CUDA kernels and the syntax check of their
binding, and (marked gpu) the CUDA ops. The CUDA kernels' bodies run on the CPU in test_cuda_emulation.py.

The C++ extension is built once per session (cached under ~/.cache/engram_pretrain/ops, so later runs
load it in about a second); a failed build fails the tests, only a missing compiler skips them.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from engram_pretrain.kernels import OpBuildError, dispatch, get_ops
from engram_pretrain.kernels import builder as bld
from engram_pretrain.kernels import reference as ref

HYPER = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8)
PARAM_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float64: dict(rtol=1e-14, atol=1e-15),
             torch.bfloat16: dict(rtol=8e-3, atol=1e-5)}


# ----------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def nvcc_check() -> Future:
    """Standalone nvcc compile of engram_ops.cu, started in the background (overlaps the C++ build)."""
    if bld.nvcc_path() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH): CUDA kernels not compile-checked")
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(bld.compile_check_cuda)
    pool.shutdown(wait=False)
    return future


@pytest.fixture(scope="session")
def cpp(request: pytest.FixtureRequest) -> dispatch.ExtensionOps:
    """The C++ ops, built once per session; a build failure errors every dependent test."""
    if bld.cxx_compiler() is None:
        pytest.skip("no C++ compiler on PATH: C++ ops cannot be built")
    if bld.nvcc_path() is not None:
        request.getfixturevalue("nvcc_check")  # start the nvcc check first so both compile together
    ops = get_ops("cpp")
    assert isinstance(ops, dispatch.ExtensionOps)
    return ops


@pytest.fixture()
def torch_ops() -> dispatch.TorchOps:
    return get_ops("torch")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def adam_state(rows: int, d: int, dtype: torch.dtype, seed: int, state_dtype: torch.dtype | None = None,
               step_dtype: torch.dtype = torch.int64) -> list[torch.Tensor]:
    """[param, exp_avg, exp_avg_sq, step_per_row] with non-trivial starting values."""
    g = gen(seed)
    sdt = state_dtype or dtype
    param = torch.randn(rows, d, generator=g, dtype=torch.float64).to(dtype)
    m = (0.1 * torch.randn(rows, d, generator=g, dtype=torch.float64)).to(sdt)
    v = (0.01 * torch.rand(rows, d, generator=g, dtype=torch.float64)).to(sdt)
    step = torch.randint(0, 4, (rows,), generator=g).to(step_dtype)
    return [param, m, v, step]


def clone_all(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in ts]


# ----------------------------------------------------------------------------------------------------
# Independent fp64 loop references
# ----------------------------------------------------------------------------------------------------

def loop_gather(table: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return torch.stack([table[i] for i in ids]) if ids else table.new_zeros(0, table.shape[1])


def loop_segment_reduce(ids: list[int], grads: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    sums: dict[int, list[float]] = {}
    for i, r in enumerate(ids):
        row = sums.setdefault(r, [0.0] * grads.shape[1])
        for c in range(grads.shape[1]):
            row[c] += float(grads[i, c])
    keys = sorted(sums)
    return keys, torch.tensor([sums[k] for k in keys], dtype=torch.float64).reshape(len(keys), grads.shape[1])


def loop_adam(state: list[torch.Tensor], ids: list[int], grads: torch.Tensor, lr: float, beta1: float,
              beta2: float, eps: float, weight_decay: float, global_step: int | None = None) -> None:
    """AdamW, one row and one element at a time, in Python floats (fp64), on unique rows."""
    param, m, v, step = state
    for k, r in enumerate(ids):
        step[r] += 1
        s = int(step[r]) if global_step is None else global_step
        for c in range(param.shape[1]):
            g = float(grads[k, c])
            p = float(param[r, c]) * (1.0 - lr * weight_decay)
            mc = beta1 * float(m[r, c]) + (1.0 - beta1) * g
            vc = beta2 * float(v[r, c]) + (1.0 - beta2) * g * g
            m_hat = mc / (1.0 - beta1**s)
            v_hat = vc / (1.0 - beta2**s)
            param[r, c] = p - lr * m_hat / (math.sqrt(v_hat) + eps)
            m[r, c], v[r, c] = mc, vc


# ----------------------------------------------------------------------------------------------------
# Reference semantics
# ----------------------------------------------------------------------------------------------------

def test_reference_gather_and_multihead_match_loops() -> None:
    table = torch.randn(50, 6, generator=gen(0), dtype=torch.float64)
    ids = torch.randint(0, 50, (4, 7), generator=gen(1))
    got = ref.gather_rows(table, ids)
    assert got.shape == (4, 7, 6)
    assert torch.equal(got.reshape(-1, 6), loop_gather(table, ids.reshape(-1).tolist()))

    sizes = [11, 13, 26]
    offsets = torch.tensor([0, 11, 24])
    row_ids = torch.stack([torch.randint(0, s, (9,), generator=gen(2 + k)) for k, s in enumerate(sizes)],
                          dim=-1)
    got = ref.multihead_gather(table, row_ids, offsets)
    assert got.shape == (9, 3, 6)
    for n in range(9):
        for h in range(3):
            assert torch.equal(got[n, h], table[int(row_ids[n, h]) + int(offsets[h])])


def test_reference_segment_reduce_matches_loop() -> None:
    ids = torch.randint(0, 12, (40,), generator=gen(3))
    grads = torch.randn(40, 5, generator=gen(4), dtype=torch.float64)
    unique, summed = ref.segment_reduce(ids, grads)
    keys, expected = loop_segment_reduce(ids.tolist(), grads)
    assert unique.tolist() == keys
    torch.testing.assert_close(summed, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("global_bias", [False, True])
def test_reference_sparse_adam_matches_loop(weight_decay: float, global_bias: bool) -> None:
    state = adam_state(8, 3, torch.float64, seed=5, step_dtype=torch.int32)
    expected = clone_all(state)
    for t in range(4):
        ids = sorted({int(i) for i in torch.randint(0, 8, (5,), generator=gen(10 + t))})
        grads = torch.randn(len(ids), 3, generator=gen(20 + t), dtype=torch.float64)
        gs = t + 2 if global_bias else None
        ref.sparse_adam_update_(*state, torch.tensor(ids), grads, weight_decay=weight_decay, global_step=gs,
                                **HYPER)
        loop_adam(expected, ids, grads, weight_decay=weight_decay, global_step=gs, **HYPER)
    for got, exp in zip(state, expected, strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_reference_sparse_adam_equals_torch_adamw_when_every_row_is_touched() -> None:
    """All rows touched every step -> identical to torch.optim.AdamW (same eps placement, decay)."""
    p0 = torch.randn(5, 4, generator=gen(6), dtype=torch.float64)
    dense = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([dense], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                            weight_decay=0.1)
    param, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    step = torch.zeros(5, dtype=torch.int64)
    for t in range(3):
        grads = torch.randn(5, 4, generator=gen(30 + t), dtype=torch.float64)
        dense.grad = grads.clone()
        opt.step()
        ref.sparse_adam_update_(param, m, v, step, torch.arange(5), grads, weight_decay=0.1, **HYPER)
    torch.testing.assert_close(param, dense.detach(), rtol=1e-12, atol=1e-12)
    assert step.tolist() == [3] * 5


def test_reference_rejects_bad_inputs() -> None:
    table = torch.randn(4, 2)
    with pytest.raises(IndexError):
        ref.gather_rows(table, torch.tensor([4]))
    with pytest.raises(IndexError):
        ref.gather_rows(table, torch.tensor([-1]))
    with pytest.raises(ValueError, match="int64 or int32"):
        ref.gather_rows(table, torch.tensor([1.0]))
    state = adam_state(4, 2, torch.float32, seed=0)
    with pytest.raises(ValueError, match="sorted strictly increasing"):
        ref.sparse_adam_update_(*state, torch.tensor([2, 1]), torch.zeros(2, 2), **HYPER)
    with pytest.raises(ValueError, match="grads"):
        ref.sparse_adam_update_(*state, torch.tensor([1]), torch.zeros(1, 3), **HYPER)


# ----------------------------------------------------------------------------------------------------
# C++ ops == reference
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_cpp_gather_equals_reference(cpp, torch_ops, dtype: torch.dtype, index_dtype: torch.dtype) -> None:
    table = torch.randn(300, 7, generator=gen(7)).to(dtype)
    ids = torch.randint(0, 30, (5, 40), generator=gen(8)).to(index_dtype)  # many duplicates
    got = cpp.gather_rows(table, ids)
    assert got.dtype == dtype and got.shape == (5, 40, 7)
    assert torch.equal(got, torch_ops.gather_rows(table, ids))


def test_cpp_gather_writes_into_preallocated_buffer(cpp) -> None:
    table = torch.randn(100, 8, generator=gen(9))
    ids = torch.randint(0, 100, (33,), generator=gen(10))
    out = dispatch.empty_rows((33, 8), torch.float32)
    got = cpp.gather_rows(table, ids, out=out)
    assert got is out
    assert torch.equal(out, ref.gather_rows(table, ids))
    with pytest.raises(ValueError, match="shape"):
        cpp.gather_rows(table, ids, out=torch.empty(32, 8))
    with pytest.raises(ValueError, match="dtype"):
        cpp.gather_rows(table, ids, out=torch.empty(33, 8, dtype=torch.float64))


def test_cpp_gather_large_ids_and_out_of_range(cpp, torch_ops) -> None:
    rows = 3_000_001  # ids above 2^21; byte offsets above 2^23
    table = torch.arange(rows, dtype=torch.float32).unsqueeze(1)  # [R, 1]: row r holds r
    ids = torch.tensor([rows - 1, 0, 2**21 + 5, rows - 1, 1_999_999])
    got = cpp.gather_rows(table, ids)
    assert torch.equal(got, torch_ops.gather_rows(table, ids))
    assert got[:, 0].tolist() == [float(i) for i in ids.tolist()]
    for bad in ([rows], [-1], [2**40], [0, rows + 7]):
        with pytest.raises(IndexError):
            cpp.gather_rows(table, torch.tensor(bad))
        with pytest.raises(IndexError):
            torch_ops.gather_rows(table, torch.tensor(bad))


def test_cpp_empty_inputs(cpp, torch_ops) -> None:
    table = torch.randn(10, 4)
    for shape in [(0,), (3, 0)]:
        ids = torch.zeros(shape, dtype=torch.int64)
        got = cpp.gather_rows(table, ids)
        assert got.shape == (*shape, 4)
        assert torch.equal(got, torch_ops.gather_rows(table, ids))
    got = cpp.multihead_gather(table, torch.zeros(0, 2, dtype=torch.int64), torch.tensor([0, 5]))
    assert got.shape == (0, 2, 4)
    unique, summed = cpp.segment_reduce(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    assert unique.shape == (0,) and summed.shape == (0, 4)
    state = adam_state(10, 4, torch.float32, seed=1)
    before = clone_all(state)
    cpp.sparse_adam_update_(*state, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4), **HYPER)
    touched = cpp.sparse_adam_step_(*state, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4), **HYPER)
    assert touched.numel() == 0
    assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_multihead_gather_equals_reference(cpp, torch_ops, dtype: torch.dtype) -> None:
    sizes = [101, 97, 89, 83]
    offsets = torch.tensor([0, 101, 198, 287])
    table = torch.randn(sum(sizes), 5, generator=gen(11)).to(dtype)
    row_ids = torch.stack([torch.randint(0, s, (2, 16), generator=gen(12 + k)) for k, s in enumerate(sizes)],
                          dim=-1)  # [B, T, H]
    got = cpp.multihead_gather(table, row_ids, offsets)
    assert got.shape == (2, 16, 4, 5)
    assert torch.equal(got, torch_ops.multihead_gather(table, row_ids, offsets))
    flat = cpp.multihead_gather(table, row_ids.reshape(-1, 4), offsets)  # [N, H]
    assert torch.equal(flat, got.reshape(-1, 4, 5))
    bad = row_ids.clone()
    bad[1, 3, 3] = 83  # offset + id = 370 = R
    with pytest.raises(IndexError):
        cpp.multihead_gather(table, bad, offsets)
    with pytest.raises(IndexError):
        torch_ops.multihead_gather(table, bad, offsets)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_are_summed_in_fp32(cpp, torch_ops, dtype: torch.dtype) -> None:
    """bf16 runs: row gradients in bf16/fp16 are summed in fp32 (the table state's dtype), by every backend,
    equal to an fp64 sum of the same values within fp32 rounding."""
    ids = torch.randint(0, 30, (500,), generator=gen(15))
    grads = torch.randn(500, 4, generator=gen(16)).to(dtype)
    want = torch.zeros(30, 4, dtype=torch.float64).index_add_(0, ids, grads.double())
    for ops in (torch_ops, cpp):
        unique, summed = ops.segment_reduce(ids, grads)
        assert summed.dtype == torch.float32
        torch.testing.assert_close(summed.double(), want[unique], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="dtype"):
        torch_ops.segment_reduce(ids, grads.to(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_segment_reduce_equals_reference(cpp, torch_ops, dtype: torch.dtype) -> None:
    ids = torch.randint(0, 50, (700,), generator=gen(13))
    ids[:20] = 7  # a hot row
    grads = torch.randn(700, 6, generator=gen(14)).to(dtype)
    unique, summed = cpp.segment_reduce(ids, grads)
    ref_unique, ref_summed = torch_ops.segment_reduce(ids, grads)
    assert torch.equal(unique, ref_unique)
    assert torch.equal(summed, ref_summed)  # both sum in order of occurrence
    unique32, summed32 = cpp.segment_reduce(ids.int(), grads)
    assert torch.equal(unique32, unique) and torch.equal(summed32, summed)
    with pytest.raises(IndexError):
        cpp.segment_reduce(torch.tensor([1, -2]), torch.zeros(2, 6, dtype=dtype))


# (param dtype, state dtype, step dtype): RowSparseAdam keeps fp32 state for bf16 tables, int32 steps
ADAM_CONFIGS = [
    (torch.float32, torch.float32, torch.int64),
    (torch.float64, torch.float64, torch.int32),
    (torch.bfloat16, torch.float32, torch.int32),
]


@pytest.mark.parametrize("dtypes", ADAM_CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}".replace("torch.", ""))
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("global_bias", [False, True])
def test_cpp_sparse_adam_equals_reference_over_steps(cpp, torch_ops, dtypes: tuple[torch.dtype, ...],
                                                     weight_decay: float, global_bias: bool) -> None:
    pdt, sdt, stdt = dtypes
    rows, d = 64, 9
    ours = adam_state(rows, d, pdt, seed=15, state_dtype=sdt, step_dtype=stdt)
    theirs = clone_all(ours)
    fused = clone_all(ours)
    kw = dict(weight_decay=weight_decay, **HYPER)
    for t in range(5):
        ids = torch.randint(0, rows, (90,), generator=gen(40 + t))  # duplicates; some rows untouched
        grads = torch.randn(90, d, generator=gen(50 + t)).to(sdt)
        gs = 10 + t if global_bias else None
        unique, summed = cpp.segment_reduce(ids, grads)
        cpp.sparse_adam_update_(*ours, unique, summed, global_step=gs, **kw)
        touched = cpp.sparse_adam_step_(*fused, ids, grads, global_step=gs, **kw)
        ref_touched = torch_ops.sparse_adam_step_(*theirs, ids, grads, global_step=gs, **kw)
        assert torch.equal(touched, ref_touched)
    for a, b in zip(ours, fused, strict=True):
        assert torch.equal(a, b)  # unfused and fused C++ run the same float ops in the same order
    for a, c in zip(ours[1:], theirs[1:], strict=True):
        assert a.dtype == c.dtype
        assert torch.equal(a, c)  # moments and step counts: same ops, same order, no FMA contraction
    # param: torch's vectorised CPU sqrt is not correctly rounded (1 ulp off for ~15% of inputs), so an
    # update may differ by an ulp per step (bf16 tables: at most one bf16 rounding step)
    torch.testing.assert_close(ours[0], theirs[0], **PARAM_TOL[pdt])
    assert not torch.equal(ours[3], adam_state(rows, d, pdt, 15, sdt, stdt)[3])  # steps advanced


@pytest.mark.parametrize("bias_correction", ["row", "global"])
def test_cpp_sparse_adam_matches_row_sparse_adam_optimizer(cpp, bias_correction: str) -> None:
    """The fused update reproduces memory.sparse_optim.RowSparseAdam (the optimizer it can back)."""
    from engram_pretrain.memory.sparse_optim import RowSparseAdam, add_row_grad

    rows, d = 40, 6
    table = torch.nn.Parameter(torch.randn(rows, d, generator=gen(21)))
    opt = RowSparseAdam([table], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                        bias_correction=bias_correction)  # type: ignore[arg-type]
    param = table.detach().clone()
    m, v = torch.zeros(rows, d), torch.zeros(rows, d)
    step = torch.zeros(rows, dtype=torch.int32)
    for t in range(4):
        ids = torch.randint(0, rows, (50,), generator=gen(60 + t))
        grads = torch.randn(50, d, generator=gen(70 + t))
        table.grad = None
        add_row_grad(table, ids, grads)
        opt.step(lr=0.01 * (t + 1))
        cpp.sparse_adam_step_(param, m, v, step, ids, grads, lr=0.01 * (t + 1), beta1=0.9, beta2=0.95,
                              eps=1e-8, weight_decay=0.1,
                              global_step=t + 1 if bias_correction == "global" else None)
    state = opt.state[table]
    assert torch.equal(step, state["row_step"])
    torch.testing.assert_close(m, state["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, state["exp_avg_sq"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(param, table.detach(), rtol=1e-6, atol=1e-6)


def test_cpp_sparse_adam_rejects_bad_inputs(cpp) -> None:
    state = adam_state(6, 2, torch.float32, seed=2)
    with pytest.raises(ValueError, match="sorted strictly increasing"):
        cpp.sparse_adam_update_(*state, torch.tensor([3, 3]), torch.zeros(2, 2), **HYPER)
    with pytest.raises(IndexError):
        cpp.sparse_adam_update_(*state, torch.tensor([6]), torch.zeros(1, 2), **HYPER)
    with pytest.raises(IndexError):
        cpp.sparse_adam_step_(*state, torch.tensor([1, 6]), torch.zeros(2, 2), **HYPER)
    with pytest.raises(ValueError, match="state dtype"):
        cpp.sparse_adam_update_(*[t.bfloat16() if t.is_floating_point() else t for t in state],
                                torch.tensor([1]), torch.zeros(1, 2, dtype=torch.bfloat16), **HYPER)
    with pytest.raises(ValueError, match="param dtype"):
        cpp.sparse_adam_update_(state[0].double(), *state[1:], torch.tensor([1]), torch.zeros(1, 2), **HYPER)
    with pytest.raises(ValueError, match="global_step"):
        cpp.sparse_adam_update_(*state, torch.tensor([1]), torch.zeros(1, 2), global_step=0, **HYPER)
    with pytest.raises(ValueError, match="contiguous"):
        p, m, v, s = state
        strided = p.t().contiguous().t()
        cpp.sparse_adam_update_(strided, m, v, s, torch.tensor([1]), torch.zeros(1, 2), **HYPER)


def test_cpp_ops_are_deterministic_across_thread_counts(cpp) -> None:
    table = torch.randn(2000, 16, generator=gen(16))
    ids = torch.randint(0, 2000, (5000,), generator=gen(17))
    grads = torch.randn(5000, 16, generator=gen(18))
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert cpp.module.num_threads() == threads
            state = adam_state(2000, 16, torch.float32, seed=19)
            cpp.sparse_adam_step_(*state, ids, grads, **HYPER)
            results.append((cpp.gather_rows(table, ids), *cpp.segment_reduce(ids, grads), *state))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------
# Dispatch and builder
# ----------------------------------------------------------------------------------------------------

def test_dispatch_backends(cpp, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="unknown kernel backend"):
        get_ops("triton")  # type: ignore[arg-type]
    assert get_ops("torch").name == "torch"
    auto = dispatch.AutoOps()
    with caplog.at_level(logging.INFO, logger="engram_pretrain.kernels.dispatch"):
        assert auto.backend_for(torch.device("cpu")).name == "cpp"
        auto.gather_rows(torch.randn(3, 2), torch.tensor([2]))
    assert sum("cpp extension for cpu" in r.getMessage() for r in caplog.records) == 1  # logged once
    table = torch.randn(20, 3)
    ids = torch.randint(0, 20, (11,), generator=gen(20))
    assert torch.equal(auto.gather_rows(table, ids), ref.gather_rows(table, ids))
    if not torch.cuda.is_available():
        with pytest.raises(OpBuildError, match="CUDA device"):
            get_ops("cuda")


def test_auto_falls_back_to_torch_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise OpBuildError("cannot build op 'engram_cpu_ops': simulated")

    monkeypatch.setattr(dispatch, "cpp_ops", broken)
    auto = dispatch.AutoOps()
    with caplog.at_level(logging.WARNING, logger="engram_pretrain.kernels.dispatch"):
        ops = auto.backend_for(torch.device("cpu"))
        auto.backend_for(torch.device("cpu"))
    assert ops.name == "torch"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "simulated" in warnings[0].getMessage()


def test_cpp_backend_rejects_other_devices(cpp) -> None:
    with pytest.raises(ValueError, match="cpu tensors"):
        cpp.gather_rows(torch.randn(3, 2, device="meta"), torch.tensor([0], device="meta"))


def test_import_builds_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "ops-cache"
    env = {**os.environ, "ENGRAM_OPS_CACHE": str(cache)}
    code = "import engram_pretrain.kernels as k; k.get_ops('torch'); k.get_ops('auto')"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert not cache.exists()


def test_builder_cache_key_and_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "broken_op.cpp"
    src.write_text("int f() { return undefined_symbol_here; }\n")
    monkeypatch.setenv("ENGRAM_OPS_CACHE", str(tmp_path / "cache"))
    op = bld.OpBuilder(name="broken_op", sources=(src,))
    key = op.key()
    assert op.build_dir() == tmp_path / "cache" / f"broken_op-{key}"
    assert bld.OpBuilder(name="broken_op", sources=(src,), extra_cflags=("-O1",)).key() != key
    src.write_text("int f() { return still_undefined; }\n")
    assert op.key() != key
    if bld.cxx_compiler() is not None:
        with pytest.raises(OpBuildError, match="still_undefined") as err:
            op.load()
        assert "backend='torch'" in str(err.value)
        assert not list(op.build_dir().glob("*.so"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert "no C++ compiler" in (op.compatibility() or "")
    with pytest.raises(OpBuildError, match="no C\\+\\+ compiler"):
        op.load()


def test_nvcc_compile_check_of_cuda_kernels(nvcc_check: Future) -> None:
    objs = nvcc_check.result(timeout=600)
    assert len(objs) == len(bld.NVCC_CHECK_ARCHS)
    for obj in objs:
        assert obj.exists() and obj.stat().st_size > 0
    declared = re.findall(r"^(?:cudaError_t|size_t) (\w+)\(", bld.CUDA_HEADER.read_text(), flags=re.M)
    assert len(declared) >= 6
    if shutil.which("nm"):  # every host launcher the binding links against is defined in the object
        symbols = subprocess.run(["nm", "-C", "--defined-only", str(objs[0])], capture_output=True,
                                 text=True, check=True).stdout
        for name in declared:
            assert f" T engram::{name}(" in symbols, name


def test_cuda_binding_syntax_check() -> None:
    """The torch binding of the CUDA ops (and the binding header it shares with the CPU emulation)
    compiles against this torch's headers and the CUDA runtime headers; no CUDA build of torch needed."""
    if bld.nvcc_path() is None or bld.cxx_compiler() is None:
        pytest.skip("nvcc's toolkit or a C++ compiler is missing: CUDA binding not syntax-checked")
    try:
        marker = bld.syntax_check_cuda_binding()
    except OpBuildError as err:
        if "not found" in str(err):
            pytest.skip(str(err))
        raise
    assert marker.exists()


# ----------------------------------------------------------------------------------------------------
# CUDA ops == reference (needs a GPU)
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_ops() -> dispatch.ExtensionOps:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ops = get_ops("cuda")
    assert isinstance(ops, dispatch.ExtensionOps)
    return ops


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 7])  # vectorised (16-byte) rows and odd rows
def test_cuda_gather_equals_reference(cuda_ops, dtype: torch.dtype, d: int) -> None:
    table = torch.randn(5000, d, generator=gen(60)).to(dtype)
    ids = torch.randint(0, 5000, (3, 999), generator=gen(61))
    expected = ref.gather_rows(table, ids)
    for index_dtype in (torch.int64, torch.int32):
        got = cuda_ops.gather_rows(table.cuda(), ids.to(index_dtype).cuda())
        assert torch.equal(got.cpu(), expected)
    sizes = [1000, 2000, 1500, 500]
    offsets = torch.tensor([0, 1000, 3000, 4500])
    row_ids = torch.stack([torch.randint(0, s, (4, 33), generator=gen(62 + k)) for k, s in enumerate(sizes)],
                          dim=-1)
    got = cuda_ops.multihead_gather(table.cuda(), row_ids.cuda(), offsets.cuda())
    assert torch.equal(got.cpu(), ref.multihead_gather(table, row_ids, offsets))
    with pytest.raises(IndexError):
        cuda_ops.gather_rows(table.cuda(), torch.tensor([5000], device="cuda"))
    empty = torch.zeros(0, dtype=torch.int64, device="cuda")
    assert cuda_ops.gather_rows(table.cuda(), empty).shape == (0, d)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_segment_reduce_equals_reference(cuda_ops, dtype: torch.dtype) -> None:
    ids = torch.randint(0, 800, (5000,), generator=gen(70))
    ids[:300] = 11  # a hot row
    grads = torch.randn(5000, 64, generator=gen(71)).to(dtype)
    for index_dtype in (torch.int64, torch.int32):
        unique, summed = cuda_ops.segment_reduce(ids.to(index_dtype).cuda(), grads.cuda())
        ref_unique, ref_summed = ref.segment_reduce(ids, grads)
        assert torch.equal(unique.cpu(), ref_unique)
        assert torch.equal(summed.cpu(), ref_summed)  # stable sort: sums in order of occurrence
    empty_u, empty_s = cuda_ops.segment_reduce(torch.zeros(0, dtype=torch.int64, device="cuda"),
                                               torch.zeros(0, 64, dtype=dtype, device="cuda"))
    assert empty_u.numel() == 0 and empty_s.shape == (0, 64)
    with pytest.raises(IndexError):
        cuda_ops.segment_reduce(torch.tensor([3, -1], device="cuda"), torch.zeros(2, 64, dtype=dtype,
                                                                                  device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtypes", ADAM_CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}".replace("torch.", ""))
@pytest.mark.parametrize("global_bias", [False, True])
def test_cuda_sparse_adam_equals_reference(cuda_ops, dtypes: tuple[torch.dtype, ...],
                                           global_bias: bool) -> None:
    pdt, sdt, stdt = dtypes
    rows, d = 3000, 64
    cpu_state = adam_state(rows, d, pdt, seed=72, state_dtype=sdt, step_dtype=stdt)
    upd_state = [t.cuda() for t in cpu_state]
    fused_state = [t.cuda() for t in cpu_state]
    kw = dict(weight_decay=0.01, **HYPER)
    for t in range(4):
        step_ids = torch.randint(0, rows, (4000,), generator=gen(80 + t))
        step_grads = torch.randn(4000, d, generator=gen(90 + t)).to(sdt)
        gs = t + 1 if global_bias else None
        ref.sparse_adam_step_(*cpu_state, step_ids, step_grads, global_step=gs, **kw)
        u, s = cuda_ops.segment_reduce(step_ids.cuda(), step_grads.cuda())
        cuda_ops.sparse_adam_update_(*upd_state, u, s, global_step=gs, **kw)
        touched = cuda_ops.sparse_adam_step_(*fused_state, step_ids.cuda(), step_grads.cuda(), global_step=gs,
                                             **kw)
        assert torch.equal(touched.cpu(), torch.unique(step_ids))
    for a, b in zip(upd_state, fused_state, strict=True):
        assert torch.equal(a, b)
    for a, c in zip(fused_state[1:], cpu_state[1:], strict=True):
        assert torch.equal(a.cpu(), c)  # moments and steps: same ops, same order, --fmad=false
    torch.testing.assert_close(fused_state[0].cpu(), cpu_state[0], **PARAM_TOL[pdt])
    with pytest.raises(IndexError):
        cuda_ops.sparse_adam_step_(*fused_state, torch.tensor([rows], device="cuda"),
                                   torch.zeros(1, d, dtype=sdt, device="cuda"), **HYPER)
    with pytest.raises(ValueError):
        cuda_ops.sparse_adam_update_(*fused_state, torch.tensor([2, 1], device="cuda"),
                                     torch.zeros(2, d, dtype=sdt, device="cuda"), **HYPER)


def test_cuda_build_key_follows_the_target_architectures(monkeypatch: pytest.MonkeyPatch) -> None:
    """A JIT cache built for one GPU architecture is never loaded for another; the CPU build ignores it."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    cuda80, cpu80 = bld.CUDA_BUILDER.key(), bld.CPU_BUILDER.key()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert bld.cuda_arch_list() == "9.0"
    assert bld.CUDA_BUILDER.key() != cuda80 and bld.CPU_BUILDER.key() == cpu80

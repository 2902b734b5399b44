"""The CUDA kernels' code on the CPU: the per-element bodies of kernels/include/engram_kernels.h (the ones
the __global__ kernels of cuda/engram_ops.cu call) run over every (block, thread) of the launch
configurations the CUDA launchers use, behind the same torch binding (include/engram_binding.h), against
the torch reference: index arithmetic, bounds, grid-stride loops, vector widths, dtype paths (fp32, fp64,
bf16/fp16 tables with fp32 state, bf16/fp16 gradients summed in fp32, int32/int64 ids), device-side
counts and error flags, and int64 offsets of rows beyond 2^31 elements. See docs/kernels.md.
"""

from __future__ import annotations

import pytest
import torch

from engram_pretrain.kernels import builder as bld
from engram_pretrain.kernels import dispatch, get_ops
from engram_pretrain.kernels import reference as ref

HYPER = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8)
PARAM_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float64: dict(rtol=1e-14, atol=1e-15),
             torch.bfloat16: dict(rtol=8e-3, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-6)}
# (param, state, gradient, step dtype): what RowSparseAdam keeps, and 16-bit gradients read natively
ADAM_CONFIGS = [
    (torch.float32, torch.float32, torch.float32, torch.int64),
    (torch.float64, torch.float64, torch.float64, torch.int32),
    (torch.bfloat16, torch.float32, torch.float32, torch.int32),
    (torch.bfloat16, torch.float32, torch.bfloat16, torch.int32),
    (torch.float16, torch.float32, torch.float16, torch.int64),
    (torch.float32, torch.float32, torch.bfloat16, torch.int32),
]


@pytest.fixture(scope="module")
def emu() -> dispatch.CudaStyleOps:
    if bld.cxx_compiler() is None:
        pytest.skip("no C++ compiler on PATH: the CUDA emulation cannot be built")
    ops = get_ops("cuda-emulated")
    assert isinstance(ops, dispatch.CudaStyleOps)
    return ops


@pytest.fixture()
def reverse_order(emu: dispatch.CudaStyleOps):
    """Blocks and threads run in reverse order for the test's duration."""
    emu.module.set_reverse_order(True)
    yield
    emu.module.set_reverse_order(False)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def adam_state(rows: int, d: int, dtype: torch.dtype, state_dtype: torch.dtype, step_dtype: torch.dtype,
               seed: int) -> list[torch.Tensor]:
    g = gen(seed)
    param = torch.randn(rows, d, generator=g, dtype=torch.float64).to(dtype)
    m = (0.1 * torch.randn(rows, d, generator=g, dtype=torch.float64)).to(state_dtype)
    v = (0.01 * torch.rand(rows, d, generator=g, dtype=torch.float64)).to(state_dtype)
    return [param, m, v, torch.randint(0, 4, (rows,), generator=g).to(step_dtype)]


# ------------------------------------------------------------------------------------------ gathers

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.uint8])
@pytest.mark.parametrize("d", [64, 7, 3, 2, 1])  # 16-, 8-, 4-, 2- and 1-byte copy units
def test_gather_equals_reference(emu, dtype: torch.dtype, d: int) -> None:
    table = (torch.randn(300, d, generator=gen(1)) * 40).to(dtype)
    ids = torch.randint(0, 300, (5, 41), generator=gen(2))
    want = ref.gather_rows(table, ids)
    for index_dtype in (torch.int64, torch.int32):
        assert torch.equal(emu.gather_rows(table, ids.to(index_dtype)), want)
    out = torch.empty_like(want)
    assert emu.gather_rows(table, ids, out=out) is out and torch.equal(out, want)


def test_vector_width_and_launch_configs(emu) -> None:
    """The copy unit and the launch shapes the CUDA launcher derives, for small and huge launches."""
    table = torch.zeros(4, 16)  # 64-byte rows: 16-byte vectors, 4 per row -> 4 lanes x 64 rows per block
    assert emu.module.launch_config("gather", 1000, 4) == [16, 4, 64]
    n = 3 * 2**32  # lookups beyond 2^33: the grid is clamped and the grid-stride loop covers the rest
    grid, lanes, rows_per_block = emu.module.launch_config("gather", n, 1)
    assert grid == 65535 * 32 and lanes == 1 and rows_per_block == 256
    assert emu.module.launch_config("rows", 5000, 7) == [5000, 32, 1]  # one block per row, a warp
    assert emu.module.launch_config("rows", 2**40, 1000) == [2**30, 256, 1]
    assert emu.module.launch_config("elementwise", 0, 0) == [1, 256, 1]
    assert torch.equal(emu.gather_rows(table, torch.tensor([3, 0])), table[[3, 0]])


def test_multihead_gather_and_errors(emu) -> None:
    sizes, offsets = [101, 97, 89], torch.tensor([0, 101, 198])
    table = torch.randn(sum(sizes), 5, generator=gen(3))
    row_ids = torch.stack([torch.randint(0, s, (2, 16), generator=gen(4 + k)) for k, s in enumerate(sizes)],
                          dim=-1)
    assert torch.equal(emu.multihead_gather(table, row_ids, offsets),
                       ref.multihead_gather(table, row_ids, offsets))
    bad = row_ids.clone()
    bad[1, 3, 2] = 89  # offset + id = 287 = R
    with pytest.raises(IndexError):
        emu.multihead_gather(table, bad, offsets)
    with pytest.raises(IndexError):
        emu.gather_rows(table, torch.tensor([0, -1]))
    # unchecked: no error at the call (no host sync on a GPU), the row is zero-filled, the sticky flag
    # reports it at the next check, once
    rows = emu.gather_rows(table, torch.tensor([4, 287]), validate=False)
    assert torch.equal(rows[0], table[4]) and not rows[1].any()
    with pytest.raises(IndexError, match="unchecked"):
        emu.check_deferred_errors()
    emu.check_deferred_errors()


# ----------------------------------------------------------------------------------- segment reduce

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_segment_reduce_equals_reference(emu, dtype: torch.dtype) -> None:
    """Bitwise: both sum each row's gradients in order of occurrence from +0; 16-bit gradients in fp32."""
    ids = torch.randint(0, 50, (700,), generator=gen(5))
    ids[:30] = 7  # a hot row
    grads = torch.randn(700, 6, generator=gen(6)).to(dtype)
    want_u, want_s = ref.segment_reduce(ids, grads)
    for index_dtype in (torch.int64, torch.int32):
        unique, summed = emu.segment_reduce(ids.to(index_dtype), grads)
        assert torch.equal(unique, want_u) and summed.dtype == want_s.dtype
        assert torch.equal(summed, want_s)
    unique, summed = emu.segment_reduce(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 6, dtype=dtype))
    assert unique.shape == (0,) and summed.shape == (0, 6)
    with pytest.raises(IndexError):
        emu.segment_reduce(torch.tensor([1, -2]), torch.zeros(2, 6, dtype=dtype))


# ---------------------------------------------------------------------------------------- sparse Adam

@pytest.mark.parametrize("dtypes", ADAM_CONFIGS, ids=lambda c: "-".join(str(t)[6:] for t in c))
@pytest.mark.parametrize("global_bias", [False, True])
def test_sparse_adam_equals_reference_over_steps(emu, dtypes: tuple[torch.dtype, ...],
                                                 global_bias: bool) -> None:
    """update (after segment_reduce), fused step and the no-sync fused step agree bitwise; moments and step
    counts equal the reference bitwise (same ops in the same order, no FMA contraction), params within
    the reference's vectorised-sqrt ulp."""
    pdt, sdt, gdt, stdt = dtypes
    rows, d = 64, 9
    start = adam_state(rows, d, pdt, sdt, stdt, seed=7)
    theirs, upd, fused, nosync = ([t.clone() for t in start] for _ in range(4))
    kw = dict(weight_decay=0.05, **HYPER)
    for t in range(4):
        ids = torch.randint(0, rows, (90,), generator=gen(10 + t))  # duplicates; some rows untouched
        grads = torch.randn(90, d, generator=gen(20 + t)).to(gdt)
        gs = 10 + t if global_bias else None
        exact = ref.accumulation_dtype(grads).to(sdt)  # 16-bit gradients widen exactly
        want = ref.sparse_adam_step_(*theirs, ids, exact, global_step=gs, **kw)
        unique, summed = emu.segment_reduce(ids, grads)
        emu.sparse_adam_update_(*upd, unique, summed.to(sdt), global_step=gs, **kw)
        assert torch.equal(emu.sparse_adam_step_(*fused, ids, grads, global_step=gs, **kw), want)
        count = emu.sparse_adam_step_nosync_(*nosync, ids.int(), grads, global_step=gs, **kw)
        assert count.shape == () and count.dtype == torch.int64 and int(count) == want.numel()
    for a, b, c in zip(upd, fused, nosync, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)
    for a, c in zip(fused[1:], theirs[1:], strict=True):
        assert torch.equal(a, c)
    torch.testing.assert_close(fused[0], theirs[0], **PARAM_TOL[pdt])
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[torch.cat([torch.randint(0, rows, (90,), generator=gen(10 + t)) for t in range(4)])] = False
    for a, s in zip(fused, start, strict=True):
        assert torch.equal(a[untouched], s[untouched])
    emu.check_deferred_errors()


def test_sparse_adam_rejects_bad_inputs_and_defers_unchecked_errors(emu) -> None:
    state = adam_state(6, 2, torch.float32, torch.float32, torch.int32, seed=8)
    with pytest.raises(ValueError, match="sorted strictly increasing"):
        emu.sparse_adam_update_(*state, torch.tensor([3, 3]), torch.zeros(2, 2), **HYPER)
    with pytest.raises(IndexError):
        emu.sparse_adam_step_(*state, torch.tensor([1, 6]), torch.zeros(2, 2), **HYPER)
    with pytest.raises(ValueError, match="grads must be"):
        emu.sparse_adam_update_(*state, torch.tensor([1]), torch.zeros(1, 2, dtype=torch.float64), **HYPER)
    before = [t.clone() for t in state]
    count = emu.sparse_adam_step_nosync_(*state, torch.tensor([6, 7]), torch.ones(2, 2), **HYPER)
    assert int(count) == 2  # counted, but rows outside the table are never written
    assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))
    with pytest.raises(IndexError, match="unchecked"):
        emu.check_deferred_errors()


def test_16_bit_parameters_round_trip_every_bit_pattern(emu) -> None:
    """lr = 0: p = to_16bit(to_float(p)) for all 65536 bf16 and fp16 patterns (NaNs stay NaN), so the host
    conversions are exact inverses like the device intrinsics."""
    for dtype in (torch.bfloat16, torch.float16):
        bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
        p = bits.view(dtype).reshape(-1, 1).clone()
        m, v = torch.zeros(p.shape), torch.zeros(p.shape)
        steps = torch.zeros(p.shape[0], dtype=torch.int32)
        before = p.clone()
        emu.sparse_adam_step_(p, m, v, steps, torch.arange(p.shape[0]), torch.zeros(p.shape), lr=0.0,
                              beta1=0.9, beta2=0.99, eps=1e-8)
        nan = before.isnan()
        assert torch.equal(p.isnan(), nan)
        assert torch.equal(p[~nan].view(torch.int16), before[~nan].view(torch.int16))


def test_results_do_not_depend_on_the_order_of_blocks_and_threads(emu) -> None:
    """No body reads what another thread of its launch writes: reversed execution gives identical results."""
    table = torch.randn(500, 7, generator=gen(9)).bfloat16()
    ids = torch.randint(0, 500, (3000,), generator=gen(10))
    grads = torch.randn(3000, 7, generator=gen(11)).bfloat16()
    results = []
    for reverse in (False, True):
        emu.module.set_reverse_order(reverse)
        try:
            state = adam_state(500, 7, torch.bfloat16, torch.float32, torch.int32, seed=12)
            emu.sparse_adam_step_nosync_(*state, ids, grads, **HYPER)
            results.append([emu.gather_rows(table, ids), *emu.segment_reduce(ids, grads), *state])
        finally:
            emu.module.set_reverse_order(False)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ 64-bit offsets

def test_row_offsets_beyond_2_to_the_31_are_int64(emu) -> None:
    """A tensor as rows [base, base + R) of a virtual table (the kernels get a pointer base rows before its
    data): ids address rows beyond 2^31 and element offsets beyond 2^32, which land inside the window only
    when the bodies compute them in int64 (int32 arithmetic would read or write elsewhere)."""
    window = torch.arange(8 * 3, dtype=torch.uint8).reshape(8, 3)  # 3-byte rows: 1-byte copy units
    for base, index_dtype in ((2**31 - 8, torch.int32), (2**33 + 5, torch.int64)):  # int32 ids, int64 bytes
        local = torch.tensor([7, 0, 3, 3, 5])
        out = torch.empty(5, 3, dtype=torch.uint8)
        flag = torch.zeros(1, dtype=torch.int32)
        emu.module.gather_rows_window(window, (local + base).to(index_dtype), out, flag, base)
        assert torch.equal(out, window[local]) and int(flag) == 0

    base, rows, d = 2**31 + 3, 6, 5  # rows beyond int32; offsets r * d ~ 1.1e10
    state = adam_state(rows, d, torch.float32, torch.float32, torch.int64, seed=13)
    want = [t.clone() for t in state]
    local = torch.tensor([4, 1, 4, 0, 5, 1])
    grads = torch.randn(6, d, generator=gen(14))
    flag = torch.zeros(1, dtype=torch.int32)
    count = emu.module.sparse_adam_step_window_(*state, local + base, grads, HYPER["lr"], HYPER["beta1"],
                                                HYPER["beta2"], HYPER["eps"], 0.0, 0, flag, base)
    emu.sparse_adam_step_(*want, local, grads, **HYPER)
    assert int(count[0]) == 4 and int(flag) == 0
    for a, b in zip(state, want, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------- emulation == GPU (gpu)

@pytest.mark.gpu
@pytest.mark.parametrize("dtypes", ADAM_CONFIGS, ids=lambda c: "-".join(str(t)[6:] for t in c))
def test_emulation_equals_the_cuda_kernels(emu, dtypes: tuple[torch.dtype, ...]) -> None:
    """The same bodies on the GPU and emulated on the CPU: gathers and sums bitwise; Adam state bitwise for
    float32 state (sqrt and division are IEEE on both; only pow(beta, t) may differ by an ulp in fp64,
    which float32 state rounds away), within an ulp for float64 state."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cuda = get_ops("cuda")
    pdt, sdt, gdt, stdt = dtypes
    rows, d = 3000, 64
    table = torch.randn(rows, 7, generator=gen(30)).to(pdt)
    ids = torch.randint(0, rows, (5000,), generator=gen(31))
    gathered = cuda.gather_rows(table.cuda(), ids.cuda(), validate=False)
    assert torch.equal(gathered.cpu(), emu.gather_rows(table, ids))
    grads = torch.randn(5000, d, generator=gen(32)).to(gdt)
    u_gpu, s_gpu = cuda.segment_reduce(ids.cuda(), grads.cuda())
    u_cpu, s_cpu = emu.segment_reduce(ids, grads)
    assert torch.equal(u_gpu.cpu(), u_cpu) and torch.equal(s_gpu.cpu(), s_cpu)
    cpu_state = adam_state(rows, d, pdt, sdt, stdt, seed=33)
    gpu_state = [t.cuda() for t in cpu_state]
    for t in range(3):
        step_ids = torch.randint(0, rows, (4000,), generator=gen(40 + t))
        step_grads = torch.randn(4000, d, generator=gen(50 + t)).to(gdt)
        n_gpu = cuda.sparse_adam_step_nosync_(*gpu_state, step_ids.cuda(), step_grads.cuda(), **HYPER)
        n_cpu = emu.sparse_adam_step_nosync_(*cpu_state, step_ids, step_grads, **HYPER)
        assert n_gpu.device.type == "cuda" and int(n_gpu) == int(n_cpu)
    cuda.check_deferred_errors()
    for a, b in zip(gpu_state, cpu_state, strict=True):
        if sdt == torch.float32 or not a.is_floating_point():
            assert torch.equal(a.cpu(), b)
        else:
            torch.testing.assert_close(a.cpu(), b, rtol=1e-15, atol=1e-15)

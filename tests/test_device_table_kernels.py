"""Device tables on the compiled ops: `TableStore` hands `DeviceTable` and `RowSparseAdam` the kernel ops
where they resolve for the table's device (`kernels.device_table_ops`), and training through them equals the
torch path (F.embedding + sparse coalesce + the reference update): with the C++ ops on a CPU table
(kernel_backend=cpp), and with the CUDA ops' code run by the CPU grid emulation, on 1 and 2 processes.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from engram_pretrain.kernels import OpBuildError, get_ops
from engram_pretrain.kernels.dispatch import device_table_ops
from engram_pretrain.memory.sparse_optim import RowSparseAdam
from engram_pretrain.memory.table_store import TableStore
from engram_pretrain.testing.distributed import run_distributed

ROWS, DIM, LR = 97, 6, 0.02


class RecordingOps:
    """Forwards to kernel ops and counts the calls by method name."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return call


def _ops(backend: str) -> Any:
    try:
        return get_ops(backend)  # type: ignore[arg-type]
    except OpBuildError as err:
        pytest.skip(f"{backend} ops unavailable: {str(err).splitlines()[0]}")


def _train(ops: Any | None, steps: int = 3, compute_dtype: torch.dtype | None = None, rank: int = 0,
           grad_sync: str = "mean") -> dict[str, torch.Tensor]:
    """A few steps of lookups -> weighted loss -> backward -> RowSparseAdam on one device table."""
    store = TableStore(device="cpu", ops=ops, seed=3)
    table = store.factory(init_std=0.5)(1, ROWS, DIM)
    table.compute_dtype = compute_dtype
    opt = RowSparseAdam([store.weight(1)], ops=store.device_ops, lr=LR, betas=(0.9, 0.95), eps=1e-8,
                        weight_decay=0.01, grad_sync=grad_sync)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(100 + rank)
    first = None
    touched = []
    for _ in range(steps):
        ids = torch.randint(0, ROWS, (4, 25), generator=g)  # duplicates
        coef = torch.randn(4, 25, DIM, generator=g)
        rows = table.lookup(ids)
        first = rows.detach().float().clone() if first is None else first
        (rows.float() * coef).sum().backward()
        opt.step()
        opt.zero_grad()
        touched.append(opt.touched_rows_last_step)
    state = opt.state[store.weight(1)]
    return {"first_rows": first, "weight": store.weight(1).detach().clone(), "touched": torch.tensor(touched),
            **{k: state[k].clone() for k in ("exp_avg", "exp_avg_sq", "row_step")}}


def _assert_same_training(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert torch.equal(got["first_rows"], want["first_rows"])  # a gather is a copy
    assert torch.equal(got["touched"], want["touched"]) and torch.equal(got["row_step"], want["row_step"])
    for key in ("exp_avg", "exp_avg_sq", "weight"):  # duplicate sums in another order; sqrt ulps
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("backend", ["cpp", "cuda-emulated"])
def test_device_table_training_uses_the_ops_and_equals_the_torch_path(backend: str) -> None:
    ops = RecordingOps(_ops(backend))
    got = _train(ops)
    assert ops.calls["gather_rows"] == 3 and ops.calls["sparse_adam_step_nosync_"] == 3, ops.calls
    _assert_same_training(got, _train(None))


def test_bf16_compute_with_the_cuda_kernels_equals_the_torch_path() -> None:
    """bf16 runs: fp32 table, rows cast to bf16 for the model; the row gradients are summed in fp32."""
    _assert_same_training(_train(_ops("cuda-emulated"), compute_dtype=torch.bfloat16),
                          _train(None, compute_dtype=torch.bfloat16))


def test_which_tables_use_which_ops() -> None:
    """CUDA tables: the CUDA ops with auto|cuda; CPU tables: the C++ ops only with cpp; else torch."""
    cpp = _ops("cpp")
    assert device_table_ops(cpp, "cpu") is cpp
    assert device_table_ops(get_ops("auto"), "cpu") is None  # CPU runs keep F.embedding by default
    assert device_table_ops(get_ops("torch"), "cpu") is None and device_table_ops(None, "cpu") is None
    assert device_table_ops(cpp, "meta") is None
    if not torch.cuda.is_available():
        assert device_table_ops(get_ops("auto"), "cuda") is None  # no CUDA extension without a GPU
    store = TableStore(device="cpu", ops=cpp)
    table = store.factory(0.1)(2, 10, 4)
    assert table.ops is cpp and "ops=cpp" in repr(table)


def test_run_config_wires_kernel_backend_into_device_tables() -> None:
    from engram_pretrain.config import load_preset
    from engram_pretrain.train.engine import table_store_for
    from engram_pretrain.train.optimizers import build_table_optimizer

    for backend, expected in (("cpp", "cpp"), ("auto", None), ("torch", None)):
        if backend == "cpp":
            _ops("cpp")
        cfg = load_preset("tiny", [f"parallel.kernel_backend={backend}"])
        store = table_store_for(cfg)
        store.factory(0.1)(cfg.model.engram.layers[0], 16, 4)
        opt = build_table_optimizer(store, cfg)
        names = (getattr(store.device_ops, "name", None), getattr(opt.ops, "name", None))
        assert names == (expected, expected), backend


def test_unchecked_ids_surface_at_the_next_checkpoint() -> None:
    """The no-sync CUDA path defers id errors: an out-of-range lookup raises when the optimizer state is
    saved, not silently."""
    store = TableStore(device="cpu", ops=_ops("cuda-emulated"))
    table = store.factory(0.1)(1, 10, 4)
    opt = RowSparseAdam([store.weight(1)], ops=store.device_ops, lr=LR)
    table.lookup(torch.tensor([[1, 10]])).sum().backward()  # row 10 is outside the table
    opt.step()
    with pytest.raises(IndexError, match="outside its table"):
        opt.state_dict()
    opt.state_dict()  # reported once


def _two_rank_job(rank: int, world: int, backend: str | None) -> dict[str, torch.Tensor]:
    ops = None if backend is None else get_ops(backend)  # type: ignore[arg-type]
    return _train(ops, rank=rank)


def test_two_ranks_exchange_rows_through_the_ops() -> None:
    """Data-parallel replicas: local and gathered rows reduced by the ops' segment_reduce, then the update;
    equal to the torch path, replicas bitwise equal."""
    _ops("cuda-emulated")  # built once here, loaded by the workers
    got = run_distributed(_two_rank_job, 2, args=("cuda-emulated",))
    want = run_distributed(_two_rank_job, 2, args=(None,))
    for key in ("weight", "exp_avg", "exp_avg_sq", "row_step"):
        assert torch.equal(got[0][key], got[1][key])
    _assert_same_training(got[0], want[0])


@pytest.mark.gpu
def test_cuda_device_table_training_has_no_host_sync_and_equals_the_torch_path() -> None:
    """On a GPU: a CUDA table with backend cuda gathers and steps through the CUDA ops without one host
    sync (torch's sync debug mode raises on any), in bf16 compute, and equals the torch path."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")

    def run(ops: Any | None, strict: bool) -> dict[str, torch.Tensor]:
        store = TableStore(device="cuda", ops=ops, seed=3)
        table = store.factory(init_std=0.5)(1, ROWS, DIM)
        table.compute_dtype = torch.bfloat16
        opt = RowSparseAdam([store.weight(1)], ops=store.device_ops, lr=LR)
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            ids = torch.randint(0, ROWS, (4, 25), generator=g).cuda()
            coef = torch.randn(4, 25, DIM, generator=g).cuda().bfloat16()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if strict else "default")
            try:
                (table.lookup(ids) * coef).float().sum().backward()
                opt.step()
                opt.zero_grad()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        state = opt.state[store.weight(1)]
        return {"weight": store.weight(1).detach().cpu(), "touched": torch.tensor(opt.touched_rows_last_step),
                **{k: state[k].cpu() for k in ("exp_avg", "exp_avg_sq", "row_step")}}

    cuda = get_ops("cuda")
    assert device_table_ops(cuda, "cuda") is cuda and device_table_ops(get_ops("auto"), "cuda") is cuda
    got, want = run(cuda, strict=True), run(None, strict=False)
    assert torch.equal(got["touched"], want["touched"]) and torch.equal(got["row_step"], want["row_step"])
    for key in ("exp_avg", "exp_avg_sq", "weight"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=key)

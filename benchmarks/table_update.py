"""Table update cost vs table size: row-sparse Adam step at 100K and 10M rows next to dense AdamW (issue 5).

One optimizer step of one Engram table [rows, dim] fp32 whose gradient touches `--lookups` row ids per step
(uniform, like hashed n-gram ids; duplicates included, as the lookup backward produces them):

- row-sparse (torch):  `RowSparseAdam.step` on the sparse COO gradient (coalesce + update of touched rows)
- row-sparse (cpp):    `HostRowSparseAdam` with the C++/OpenMP sparse Adam (host tier; skipped when the
                       extension does not build)
- dense AdamW:         `torch.optim.AdamW` on the same table with the equivalent dense gradient (every
                       row's moments decay and every row moves: the cost of treating tables as dense
                       parameters)

Times are the median (and minimum) wall time of `--repeat` steps after a warm-up that allocates the
optimizer state, at `--threads` threads. The row-sparse step should cost about the same at any table
size (goal: 10M-row step <= 1.2x the 100K-row step); the dense step grows with the rows.

Usage (repo root): python -m benchmarks.table_update [--rows 100000 10000000] [--dim 32] [--lookups 16384]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from engram_pretrain.kernels import OpBuildError, get_ops
from engram_pretrain.memory.sparse_optim import RowSparseAdam
from engram_pretrain.memory.tables import HostRowSparseAdam


def timed(step: Callable[[], None], prepare: Callable[[], None], repeat: int, warmup: int) -> list[float]:
    """Wall seconds of `step()` over `repeat` runs, each after an untimed `prepare()`."""
    times = []
    for i in range(warmup + repeat):
        prepare()
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def sparse_case(rows: int, dim: int, lookups: int, make_opt: Callable[[torch.nn.Parameter], Any],
                repeat: int, warmup: int) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(rows, dim, generator=gen) * 0.02)
    opt = make_opt(weight)

    def prepare() -> None:
        ids = torch.randint(0, rows, (lookups,), generator=gen)
        weight.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), torch.randn(lookups, dim, generator=gen),
                                              (rows, dim))

    return timed(lambda: opt.step(1e-3), prepare, repeat, warmup)


def dense_case(rows: int, dim: int, lookups: int, repeat: int, warmup: int) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(rows, dim, generator=gen) * 0.02)
    opt = torch.optim.AdamW([weight], lr=1e-3, weight_decay=0.0)
    weight.grad = torch.zeros_like(weight)

    def prepare() -> None:
        assert weight.grad is not None
        weight.grad.zero_()
        ids = torch.randint(0, rows, (lookups,), generator=gen)
        weight.grad.index_add_(0, ids, torch.randn(lookups, dim, generator=gen))

    return timed(opt.step, prepare, repeat, warmup)


def fmt(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:9.2f} ({min(times) * 1e3:8.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 10_000_000])
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--lookups", type=int, default=16_384,
                    help="row ids per step (tiny preset: 8 x 128 tokens x 8 heads x 2 layers)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--dense-repeat", type=int, default=5)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense AdamW baseline")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        cpp = get_ops("cpp")
    except OpBuildError as err:
        print(f"C++ ops unavailable ({str(err).splitlines()[0]}); skipping the cpp column")
        cpp = None

    results: dict[str, dict[int, list[float]]] = {"row-sparse (torch)": {}, "row-sparse (cpp)": {},
                                                  "dense AdamW": {}}
    for rows in args.rows:
        results["row-sparse (torch)"][rows] = sparse_case(
            rows, args.dim, args.lookups, lambda w: RowSparseAdam([w], grad_sync="none"), args.repeat, 2)
        gc.collect()
        if cpp is not None:
            results["row-sparse (cpp)"][rows] = sparse_case(
                rows, args.dim, args.lookups, lambda w: HostRowSparseAdam([w], ops=cpp, grad_sync="none"),
                args.repeat, 2)
            gc.collect()
        if not args.no_dense:
            results["dense AdamW"][rows] = dense_case(rows, args.dim, args.lookups, args.dense_repeat, 1)
            gc.collect()

    print(f"\none table step: dim {args.dim}, {args.lookups} looked-up ids/step (uniform), fp32, "
          f"{args.threads} threads; ms per step, median (min)")
    print(f"{'optimizer':<20}" + "".join(f"{rows:>24,}" for rows in args.rows)
          + f"{'ratio ' + f'{args.rows[-1]:,}/{args.rows[0]:,}':>28}")
    for name, by_rows in results.items():
        if not by_rows:
            continue
        ratio = statistics.median(by_rows[args.rows[-1]]) / statistics.median(by_rows[args.rows[0]])
        print(f"{name:<20}" + "".join(f"{fmt(by_rows[r]):>24}" for r in args.rows) + f"{ratio:>27.2f}x")


if __name__ == "__main__":
    main()

"""Table update cost vs table size: row-sparse Adam step at 100K and 10M rows next to dense AdamW (issue 5).

One optimizer step of one Engram table [rows, dim] fp32 whose gradient touches `--lookups` row ids per step
(uniform, like hashed n-gram ids; duplicates included, as the lookup backward produces them):

- row-sparse (torch):  `RowSparseAdam.step` on the sparse COO gradient (coalesce + update of touched rows)
- row-sparse (cpp):    `RowSparseAdam(ops=cpp)` with the C++/OpenMP sparse Adam (host tier; skipped when the
                       extension does not build)
- dense AdamW:         `torch.optim.AdamW` on the same table with the equivalent dense gradient (every
                       row's moments decay and every row moves: the cost of treating tables as dense
                       parameters)

Times are the median and minimum wall time and the median process CPU time of `--repeat` steps after a
warm-up that allocates the optimizer state, at `--threads` threads; the table sizes of one optimizer
alternate step by step, so load from other processes on a shared machine affects them alike. The
row-sparse step should cost about the same at any table size (goal: 10M-row step <= 1.2x the 100K-row
step); the dense step grows with the rows.

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

Case = tuple[Callable[[], None], Callable[[], None]]
"""(step, prepare): one optimizer step, and the untimed set-up of its gradient."""


def interleaved(cases: dict[int, Case], repeat: int, warmup: int) -> dict[int, list[tuple[float, float]]]:
    """(wall, process CPU) seconds of each case's step over `repeat` rounds; the cases alternate within a
    round, so load from other processes on a shared machine hits every table size alike."""
    times: dict[int, list[tuple[float, float]]] = {key: [] for key in cases}
    for i in range(warmup + repeat):
        for key, (step, prepare) in cases.items():
            prepare()
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            if i >= warmup:
                times[key].append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def sparse_case(rows: int, dim: int, lookups: int, make_opt: Callable[[torch.nn.Parameter], Any]) -> Case:
    gen = torch.Generator().manual_seed(rows)
    weight = torch.nn.Parameter(torch.randn(rows, dim, generator=gen) * 0.02)
    opt = make_opt(weight)

    def prepare() -> None:
        ids = torch.randint(0, rows, (lookups,), generator=gen)
        weight.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), torch.randn(lookups, dim, generator=gen),
                                              (rows, dim), check_invariants=False)

    return lambda: opt.step(1e-3), prepare


def dense_case(rows: int, dim: int, lookups: int) -> Case:
    gen = torch.Generator().manual_seed(rows)
    weight = torch.nn.Parameter(torch.randn(rows, dim, generator=gen) * 0.02)
    opt = torch.optim.AdamW([weight], lr=1e-3, weight_decay=0.0)
    weight.grad = torch.zeros_like(weight)

    def prepare() -> None:
        assert weight.grad is not None
        weight.grad.zero_()
        ids = torch.randint(0, rows, (lookups,), generator=gen)
        weight.grad.index_add_(0, ids, torch.randn(lookups, dim, generator=gen))

    return opt.step, prepare


def summary(times: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(median wall, min wall, median CPU) in ms."""
    wall, cpu = [t[0] for t in times], [t[1] for t in times]
    return statistics.median(wall) * 1e3, min(wall) * 1e3, statistics.median(cpu) * 1e3


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

    makers: dict[str, Callable[[int], Case]] = {
        "row-sparse (torch)": lambda rows: sparse_case(rows, args.dim, args.lookups,
                                                       lambda w: RowSparseAdam([w], grad_sync="none"))}
    if cpp is not None:
        makers["row-sparse (cpp)"] = lambda rows: sparse_case(
            rows, args.dim, args.lookups, lambda w: RowSparseAdam([w], ops=cpp, grad_sync="none"))
    if not args.no_dense:
        makers["dense AdamW"] = lambda rows: dense_case(rows, args.dim, args.lookups)
    results: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for name, make in makers.items():
        repeat = args.dense_repeat if name == "dense AdamW" else args.repeat
        results[name] = interleaved({rows: make(rows) for rows in args.rows}, repeat, warmup=3)
        gc.collect()

    print(f"\none table step: dim {args.dim}, {args.lookups} looked-up ids/step (uniform), fp32, "
          f"{args.threads} threads; ms per step: median wall / min wall / median process CPU")
    small, large = args.rows[0], args.rows[-1]
    print(f"{'optimizer':<20}" + "".join(f"{rows:>28,}" for rows in args.rows)
          + f"{f'{large:,}/{small:,} (median, min, CPU)':>40}")
    for name, by_rows in results.items():
        stats = {rows: summary(by_rows[rows]) for rows in args.rows}
        ratios = [stats[large][i] / stats[small][i] for i in range(3)]
        cells = "".join(f"{' / '.join(f'{v:.2f}' for v in stats[r]):>28}" for r in args.rows)
        print(f"{name:<20}{cells}{', '.join(f'{v:.2f}x' for v in ratios):>40}")


if __name__ == "__main__":
    main()

"""C++/OpenMP Engram ops vs the plain-torch reference on CPU (issue 5: "C++ ops vs torch reference").

Host-resident table [rows, dim] fp32 with its Adam state, `lookups` row ids per step drawn uniformly
(hashed n-gram ids are close to uniform; `--zipf` draws a skewed distribution with hot rows instead).
Times, as the minimum wall and CPU time of `--repeat` interleaved runs after a warm-up (the minimum
filters out preemption on a shared machine), at `--threads` threads (default 2):

- gather:      rows of `lookups` ids into a preallocated buffer (reference: index_select(out=))
- mh-gather:   multi-head gather [N, H] + per-head offsets (reference: add offsets, then gather)
- seg-reduce:  sum duplicate row gradients -> (unique ids, summed) (reference: unique + index_add_)
- adam-update: row-sparse AdamW on the unique rows with summed gradients
- adam-step:   seg-reduce + adam-update; the C++ op is fused (one pass per touched row)

Usage (repo root): python -m benchmarks.kernels_cpu [--rows 1000000] [--dim 64] [--lookups 65536]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from engram_pretrain.kernels import get_ops

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)


def timed(fn: Callable[[], object], repeat: int, warmup: int = 2) -> tuple[float, float]:
    """(min wall time, min process CPU time) of fn() in seconds over `repeat` calls.

    The minimum filters out preemption by other processes; CPU time sums over threads.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def make_ids(n: int, rows: int, zipf: float, gen: torch.Generator) -> torch.Tensor:
    """n row ids in [0, rows): uniform, or Zipf(zipf)-ranked over a random permutation of the rows."""
    if zipf <= 0:
        return torch.randint(0, rows, (n,), generator=gen)
    ranks = torch.arange(1, rows + 1, dtype=torch.float64)
    probs = ranks.pow(-zipf)
    picks = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=gen)
    return torch.randperm(rows, generator=gen)[picks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--lookups", type=int, default=65_536)
    ap.add_argument("--heads", type=int, default=8, help="heads of the multi-head gather")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--zipf", type=float, default=0.0, help="Zipf exponent of the ids (0: uniform)")
    args = ap.parse_args()
    if args.lookups % args.heads:
        raise ValueError(f"--lookups {args.lookups} must be divisible by --heads {args.heads}")

    torch.set_num_threads(args.threads)
    ref, cpp = get_ops("torch"), get_ops("cpp")  # builds the extension on first use
    gen = torch.Generator().manual_seed(0)
    rows, dim, n = args.rows, args.dim, args.lookups
    table = torch.randn(rows, dim, generator=gen)
    exp_avg, exp_avg_sq = torch.zeros_like(table), torch.zeros_like(table)
    steps = torch.zeros(rows, dtype=torch.int32)
    ids = make_ids(n, rows, args.zipf, gen)
    grads = torch.randn(n, dim, generator=gen)
    head_rows = rows // args.heads
    offsets = torch.arange(args.heads, dtype=torch.int64) * head_rows
    mh_ids = torch.randint(0, head_rows, (n // args.heads, args.heads), generator=gen)
    buf = torch.empty(n, dim)
    mh_buf = torch.empty(n // args.heads, args.heads, dim)
    unique, summed = ref.segment_reduce(ids, grads)

    def adam(ops):
        return lambda: ops.sparse_adam_update_(table, exp_avg, exp_avg_sq, steps, unique, summed, **HYPER)

    def step(ops):
        return lambda: ops.sparse_adam_step_(table, exp_avg, exp_avg_sq, steps, ids, grads, **HYPER)

    cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        ("gather", lambda: torch.index_select(table, 0, ids, out=buf),
         lambda: cpp.gather_rows(table, ids, buf)),
        ("mh-gather", lambda: ref.multihead_gather(table, mh_ids, offsets, mh_buf),
         lambda: cpp.multihead_gather(table, mh_ids, offsets, mh_buf)),
        ("seg-reduce", lambda: ref.segment_reduce(ids, grads), lambda: cpp.segment_reduce(ids, grads)),
        ("adam-update", adam(ref), adam(cpp)),
        ("adam-step", step(ref), step(cpp)),
    ]
    row_bytes = dim * table.element_size()
    dist = f"zipf {args.zipf}" if args.zipf > 0 else "uniform"
    print(f"table {rows} x {dim} fp32 ({rows * row_bytes / 2**20:.0f} MiB), {n} lookups ({dist}, "
          f"{unique.numel()} unique), {args.threads} threads, torch {torch.__version__}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'op':<12} {'torch ms':>9} {'c++ ms':>9} {'speed-up':>9} {'torch cpu':>10} {'c++ cpu':>9} "
          f"{'cpu ratio':>9} {'c++ GB/s':>9}")
    moved = {  # bytes the op must touch at least (rows read + written)
        "gather": 2 * n * row_bytes, "mh-gather": 2 * n * row_bytes, "seg-reduce": 2 * n * row_bytes,
        "adam-update": unique.numel() * row_bytes * 7, "adam-step": (n + 6 * unique.numel()) * row_bytes,
    }
    for name, ref_fn, cpp_fn in cases:
        best = {"ref": (float("inf"), float("inf")), "cpp": (float("inf"), float("inf"))}
        for _ in range(3):  # interleave to spread machine noise over both
            for key, fn in (("ref", ref_fn), ("cpp", cpp_fn)):
                wall, cpu = timed(fn, max(args.repeat // 3, 1))
                best[key] = (min(best[key][0], wall), min(best[key][1], cpu))
        (w_ref, c_ref), (w_cpp, c_cpp) = best["ref"], best["cpp"]
        print(f"{name:<12} {w_ref * 1e3:>9.2f} {w_cpp * 1e3:>9.2f} {w_ref / w_cpp:>8.2f}x "
              f"{c_ref * 1e3:>10.2f} {c_cpp * 1e3:>9.2f} {c_ref / max(c_cpp, 1e-9):>8.2f}x "
              f"{moved[name] / w_cpp / 1e9:>9.2f}")


if __name__ == "__main__":
    main()

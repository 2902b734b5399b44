"""Shared helpers of the training-step benchmarks (`engram_overhead`, `vs_hf_deepseek`): run configs on a
synthetic dataset, interleaved wall/CPU timing across variants, summaries, paired ratios, tables."""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG = "configs/tiny.yaml"
BENCH_OVERRIDES = [
    "train.steps=100000", "train.log_interval=0", "train.eval_interval=0", "checkpoint.interval=0",
    "logging.jsonl=false", "logging.tensorboard=false", "schedule.warmup_steps=0",
]
"""Every benchmark run: no eval, logging or checkpoints inside the timed steps; a flat LR."""


def synthetic_dataset(root: Path, vocab_size: int, num_docs: int = 600, mean_len: int = 200) -> Path:
    """A dataset directory of seeded Markov-chain documents (`testing.datasets`), ~num_docs x mean_len
    tokens."""
    from engram_pretrain.testing.datasets import make_dataset_dir

    return make_dataset_dir(root / "data", vocab_size=vocab_size, num_docs=(num_docs, 20), mean_len=mean_len)


def run_config(data: Path, out: Path, *overrides: str, config: str = CONFIG) -> Any:
    """`config` (default `configs/tiny.yaml`) with the benchmark settings and `overrides` (later ones win)."""
    from engram_pretrain.config import load_config

    return load_config(config, [*BENCH_OVERRIDES, f"data.paths=[{data}]", f"output_dir={out}", *overrides])


def quiet() -> None:
    """Warnings only from this package and DeepSpeed (the loader and trainer log at INFO)."""
    logging.basicConfig(level=logging.WARNING, force=True)
    for name in ("engram_pretrain", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


Times = dict[str, dict[str, list[list[float]]]]
"""{"wall" | "cpu": {variant: [round][step] seconds}}."""


def interleaved_times(steps: dict[str, Callable[[], Any]], warmup: int, rounds: int, per_round: int,
                      after_warmup: Callable[[], None] | None = None) -> Times:
    """Wall and process CPU seconds of each step call; `warmup` untimed calls of each variant first.

    Round r runs `per_round` timed calls of every variant, in the given order for even r and reversed for
    odd r. Collective step functions must be called in the same order on every rank (they are). CPU time
    (`time.process_time`: all threads of this process) counts the work done and not the time spent waiting
    for a core, so it is the steadier measure on a shared machine.
    """
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    if after_warmup is not None:
        after_warmup()
    times: Times = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn, wall, cpu = steps[name], [], []
            for _ in range(per_round):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            times["wall"][name].append(wall)
            times["cpu"][name].append(cpu)
    return times


def merge_ranks(per_rank: list[Times]) -> Times:
    """Wall time of rank 0 (steps end in a collective, so ranks agree); CPU time averaged over the ranks."""
    wall = per_rank[0]["wall"]
    cpu = {n: [[sum(r["cpu"][n][i][j] for r in per_rank) / len(per_rank) for j in range(len(rnd))]
               for i, rnd in enumerate(rounds)] for n, rounds in per_rank[0]["cpu"].items()}
    return {"wall": wall, "cpu": cpu}


@dataclass
class Summary:
    """Statistics of one variant's step times (seconds)."""

    median: float
    p25: float
    p75: float
    min: float
    n: int


def summarize(rounds: list[list[float]]) -> Summary:
    flat = sorted(t for r in rounds for t in r)
    q = statistics.quantiles(flat, n=4) if len(flat) > 1 else [flat[0]] * 3
    return Summary(median=statistics.median(flat), p25=q[0], p75=q[2], min=flat[0], n=len(flat))


def round_ratios(a: list[list[float]], b: list[list[float]]) -> list[float]:
    """median(a) / median(b) per round (same rounds, interleaved)."""
    return [statistics.median(x) / statistics.median(y) for x, y in zip(a, b, strict=True)]


def spread(values: list[float]) -> str:
    """'median (p25-p75)' of `values`."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    q = statistics.quantiles(values, n=4)
    return f"{statistics.median(values):.3f} ({q[0]:.3f}-{q[2]:.3f})"


def load_average() -> str:
    """1/5/15-minute load averages and the core count, for the report."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cores"


class Stopwatch:
    """Wraps callables and sums their wall time (reset after the warm-up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        self.seconds.setdefault(name, 0.0)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)


def run_jobs(job: Callable[..., Any], nproc: int, args: tuple[Any, ...]) -> list[Any]:
    """Every rank's result of `job(rank, world, *args)` on `nproc` gloo processes (1 thread each)."""
    from engram_pretrain.testing.distributed import run_distributed

    return run_distributed(job, world_size=nproc, args=args, timeout=3600.0)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table on stdout."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")

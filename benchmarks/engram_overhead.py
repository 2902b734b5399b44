"""Training step time of MoE+Engram vs the same backbone without Engram at equal activated parameters
(issue 4, benchmark 1; goal: ratio <= 1.10 on the CPU proxy).

Variants, all trained by the real trainer (`Trainer.train_step`: data, Engram hashing on the batch, the
DeepSpeed forward/backward/step, the per-step all-reduce, the row-sparse table update and the MoE bias
update) under the same DeepSpeed config (default ZeRO-2):

- `engram`:   the run config as is (`--config`; default `configs/tiny.yaml`: MoE + mHC M=4 + Engram at
              blocks 1 and 3; `configs/proxy-engram.yaml`: the 12-layer CPU proxy of the 3B ablation).
- `iso`:      the same backbone without Engram, its dense FFN (blocks < first_k_dense) widened so that its
              activated parameters (`count_parameters(...).activated_with_head`) equal the Engram model's:
              Engram adds activated weights (W_V, W_K per branch, norms, short conv), the baseline gets the
              same number as FFN width. This is the reference of the goal.
- `plain`:    the same backbone without Engram and without the extra width (information only).

The variants are stepped in the same process(es), interleaved round by round (the order reversed every
round) so that a load change on a shared machine hits all of them alike; warm-up steps are excluded. Each
step's wall time is taken on rank 0 (steps end in a collective, so all ranks agree) and its process CPU
time on every rank (averaged): on a machine shared with other jobs the CPU time, which does not count the
time spent waiting for a core, is the steadier measure. Reported: medians with their interquartile range
(IQR); ratios both as the ratio of the medians and as the median (IQR) of the per-round ratios (paired:
adjacent steps share the machine's slow drifts, so pairing cancels them; with the default one step per
round, a round is one step of every variant). Separately, the mean wall time per
step of the Engram pieces outside the module: hashing, the table lookup (forward), the row-sparse Adam step.

Usage (repo root): python -m benchmarks.engram_overhead [--config configs/tiny.yaml] [--nproc 1]
    [--rounds 30] [--steps-per-round 1] [--warmup 3] [--zero-stage 2] [--json out.json] [override ...]
Overrides (`key=value`, as for `engram-pretrain train`) apply to every variant, e.g. data.seq_len=256.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CONFIG = "configs/tiny.yaml"
BENCH_OVERRIDES = [
    "train.steps=100000", "train.log_interval=0", "train.eval_interval=0", "checkpoint.interval=0",
    "logging.jsonl=false", "logging.tensorboard=false", "schedule.warmup_steps=0",
]
"""Every benchmark run: no eval, logging or checkpoints inside the timed steps; a flat LR."""


# ---------------------------------------------------------------------------- shared helpers

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


# ---------------------------------------------------------------------------- the variants

def iso_overrides(data: Path, out: Path, overrides: list[str], config: str) -> tuple[list[str], int, int]:
    """Overrides of the no-Engram baseline with the Engram model's activated parameters (widened dense
    FFN), and the two activated counts (with the LM head)."""
    from engram_pretrain.analysis.params import count_parameters

    engram_cfg = run_config(data, out, *overrides, config=config).model
    target = count_parameters(engram_cfg).activated_with_head
    plain = run_config(data, out, *overrides, "model.engram.layers=[]", config=config).model
    if not plain.moe.first_k_dense:
        raise ValueError("the iso-activated baseline widens the dense FFN: model.moe.first_k_dense must be "
                         ">= 1")
    per_unit = 3 * plain.hidden_size * plain.moe.first_k_dense  # w1, w3, w2 of every dense block
    width = plain.dense_ffn_dim + round((target - count_parameters(plain).activated_with_head) / per_unit)
    iso = ["model.engram.layers=[]", f"model.moe.dense_ffn_dim={width}"]
    iso_cfg = run_config(data, out, *overrides, *iso, config=config).model
    return iso, target, count_parameters(iso_cfg).activated_with_head


def _job(rank: int, world: int, config: str, data: str, out: str, variants: dict[str, list[str]], warmup: int,
         rounds: int, per_round: int) -> dict[str, Any]:
    """One rank: a trainer per variant, interleaved timed steps; the Engram parts timed separately."""
    quiet()
    from engram_pretrain.analysis.params import count_parameters
    from engram_pretrain.model.engram import EngramModule
    from engram_pretrain.train.loop import build_trainer

    del rank, world
    trainers, activated, steps = {}, {}, {}
    watch = Stopwatch()
    for name, overrides in variants.items():
        cfg = run_config(Path(data), Path(out) / name, *overrides, config=config)
        trainer = build_trainer(cfg, resume="none")
        trainers[name] = trainer
        activated[name] = count_parameters(cfg.model).activated_with_head
        steps[name] = trainer.train_step
        c = trainer.components
        if c.table_optimizer is not None:
            c.row_ids = watch.wrap(f"{name}: hashing (row ids)", c.row_ids)
            c.table_optimizer.step = watch.wrap(f"{name}: row-sparse Adam (+ row exchange)",
                                                c.table_optimizer.step)
            for module in c.model.modules():
                if isinstance(module, EngramModule):
                    table = module.table
                    table.lookup = watch.wrap(f"{name}: table lookup (forward)", table.lookup)
    times = interleaved_times(steps, warmup, rounds, per_round, after_warmup=watch.reset)
    timed_steps = rounds * per_round
    parts = {k: v / timed_steps for k, v in watch.seconds.items()}
    for trainer in trainers.values():
        destroy = getattr(trainer.components.engine, "destroy", None)
        if destroy is not None:
            destroy()
    return {"times": times, "activated": activated, "parts": parts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=CONFIG, help="MoE+Engram run config (e.g. configs/proxy-engram.yaml)")
    ap.add_argument("--nproc", type=int, default=1, help="gloo processes (1 thread each)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps-per-round", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the raw times and summaries here")
    ap.add_argument("overrides", nargs="*", help="config overrides for every variant (key=value)")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    quiet()
    with tempfile.TemporaryDirectory(prefix="bench_engram_") as tmp:
        root = Path(tmp)
        common = [*args.overrides, f"deepspeed.zero_stage={args.zero_stage}"]
        vocab = run_config(root, root, *common, config=args.config).model.vocab_size
        data = synthetic_dataset(root, vocab)
        iso, target, iso_act = iso_overrides(data, root, common, args.config)
        variants = {"engram": common, "iso": [*common, *iso], "plain": [*common, "model.engram.layers=[]"]}
        load_before = load_average()
        res = run_jobs(_job, args.nproc, (args.config, str(data), str(root / "runs"), variants, args.warmup,
                                          args.rounds, args.steps_per_round))
        load_after = load_average()
        cfg = run_config(data, root, *common, config=args.config)
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len * args.nproc
    times = merge_ranks([r["times"] for r in res])
    parts, activated = res[0]["parts"], res[0]["activated"]
    wall = {n: summarize(t) for n, t in times["wall"].items()}
    cpu = {n: summarize(t) for n, t in times["cpu"].items()}
    labels = {"engram": f"MoE + Engram ({Path(args.config).name})",
              "iso": f"MoE, no Engram, iso-activated ({iso[1]})", "plain": "MoE, no Engram (same backbone)"}
    print(f"\nEngram overhead: {args.config}, {args.nproc} process(es) x 1 thread, ZeRO-{args.zero_stage}, "
          f"{tokens} tokens/step (micro batch {cfg.train.micro_batch_size} x seq {cfg.data.seq_len}), "
          f"{args.warmup} warm-up + {args.rounds} rounds x {args.steps_per_round} timed steps per variant")
    print(f"before: {load_before}; after: {load_after}\n")
    rows = []
    paired = {k: {n: round_ratios(times[k][n], times[k]["iso"]) for n in wall} for k in ("wall", "cpu")}
    for name in wall:
        w, c = wall[name], cpu[name]
        rows.append([labels[name], f"{activated[name]:,}", f"{w.median * 1e3:.0f} ({w.p25 * 1e3:.0f}-"
                     f"{w.p75 * 1e3:.0f})", f"{c.median * 1e3:.0f} ({c.p25 * 1e3:.0f}-{c.p75 * 1e3:.0f})",
                     f"{tokens / w.median:,.0f}", f"{w.median / wall['iso'].median:.3f}",
                     spread(paired["wall"][name]), f"{c.median / cpu['iso'].median:.3f}",
                     spread(paired["cpu"][name])])
    print_table(["variant", "activated params (with head)", "wall ms: median (IQR)", "CPU ms: median (IQR)",
                 "tokens/s (wall)", "wall / iso", "paired wall / iso: median (IQR)", "CPU / iso",
                 "paired CPU / iso: median (IQR)"], rows)
    print(f"\nactivated: Engram model {target:,}, iso baseline {iso_act:,} "
          f"(difference {iso_act - target:+,}; dense FFN width step = {3 * cfg.model.hidden_size} params)")
    print("Engram parts inside the Engram step (mean wall ms per step): "
          + ", ".join(f"{k.split(': ', 1)[1]} {v * 1e3:.2f}" for k, v in parts.items()))
    for kind, summ in (("wall", wall), ("cpu", cpu)):
        ratio = summ["engram"].median / summ["iso"].median
        pair = statistics.median(paired[kind]["engram"])
        print(f"overhead (Engram / iso-activated backbone), {kind}: ratio of medians {ratio:.3f}, paired "
              f"median {pair:.3f}  goal <= 1.10: {'met' if max(ratio, pair) <= 1.10 else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({
            "args": vars(args) | {"json": str(args.json)}, "load_before": load_before,
            "load_after": load_after, "tokens_per_step": tokens, "variants": variants, "activated": activated,
            "parts_seconds_per_step": parts, "times": times,
            "summaries": {"wall": {n: asdict(v) for n, v in wall.items()},
                          "cpu": {n: asdict(v) for n, v in cpu.items()}}}, indent=1))


if __name__ == "__main__":
    main()

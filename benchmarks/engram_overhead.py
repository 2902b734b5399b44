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
import os
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    CONFIG,
    Stopwatch,
    interleaved_times,
    load_average,
    merge_ranks,
    print_table,
    quiet,
    round_ratios,
    run_config,
    run_jobs,
    spread,
    summarize,
    synthetic_dataset,
)

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

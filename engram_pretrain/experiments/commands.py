"""`engram-pretrain experiment ablation|allocation`: build a run set, train it (here or as a SLURM array),
collect the final validation losses and draw the paper's figure.

    engram-pretrain experiment ablation --preset proxy --data data/default --steps 1000
    engram-pretrain experiment ablation --preset tiny --only baseline,reference,w/o_gating --steps 3
    engram-pretrain experiment ablation --preset 3b --data /data/web --slurm \\
        --slurm-args "--nodes 1 --gpus-per-node 8 --partition gpu --time 24:00:00 --max-parallel 4"
    engram-pretrain experiment allocation --preset proxy --data data/default --shares 0,10,20,30,50,70

Re-running the same command skips finished runs, resumes interrupted ones, and re-collects the results;
`--collect` only collects and plots. Options go before the overrides (argparse does not interleave them).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .plan import FAMILIES, PlannedRun, RunSettings, finalize, load_family, select

ISO_TOLERANCE = 0.01
"""Largest relative difference of total parameters from the reference accepted without a warning."""


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `experiment ablation` and `experiment allocation` to the `engram-pretrain` subcommands."""
    p = sub.add_parser("experiment", help="the paper's experiments: ablation set + layer sweep (Figure 5), "
                                          "sparsity allocation (Figure 3)")
    exp = p.add_subparsers(dest="experiment", required=True)

    a = exp.add_parser("ablation", help="baseline, reference, layer sweep and component ablations (Figure 5)")
    _common(a, "ablation")
    a.add_argument("--layers", default=None,
                   help="sweep layers: comma-separated 0-based block indices, or 'none' (default: all)")
    a.add_argument("--ablations", default=None,
                   help="comma-separated component ablations (default: all: wo_multi_branch, "
                        "wo_token_compress, wo_gating, wo_short_conv, plus_4gram), or 'none'")
    a.add_argument("--repeat-seeds", type=int, default=0,
                   help="also run the reference with K further seeds (train.seed + 1..K): seed-to-seed noise")
    a.set_defaults(func=cmd_ablation)

    b = exp.add_parser("allocation",
                       help="sparsity allocation sweep at fixed total/activated params (Figure 3)")
    _common(b, "allocation")
    b.add_argument("--shares", default="0,10,20,30,50,70",
                   help="target Engram shares of the sparse parameters, in percent "
                        "(default: 0,10,20,30,50,70)")
    b.set_defaults(func=cmd_allocation)


def _common(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--preset", required=True,
                   help=f"model family: {', '.join(FAMILIES)} (or a name for --baseline/--reference)")
    p.add_argument("--baseline", default=None, help="MoE baseline preset or YAML (replaces the family's)")
    p.add_argument("--reference", default=None,
                   help="MoE+Engram reference preset or YAML (replaces the family's)")
    p.add_argument("--out", default=None, help=f"experiment directory (default: runs/{kind}/<preset>)")
    p.add_argument("--steps", type=int, default=None, help="train.steps of every run (default: the presets')")
    p.add_argument("--data", action="append", default=None,
                   help="dataset directory (repeatable; default: the presets' data.paths)")
    p.add_argument("--seed", type=int, default=None, help="train.seed of every run (default: the presets')")
    p.add_argument("--only", default=None,
                   help="comma-separated subset of runs, e.g. baseline,reference,w/o_gating")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes per local run (1: the CLI; >1: torchrun via launchers/local.sh). "
                        "The global batch is micro_batch_size x nproc")
    p.add_argument("--keep-last", type=int, default=1, help="checkpoints kept per run (default 1)")
    p.add_argument("--slurm", action="store_true", help="submit the unfinished runs as one SLURM job array")
    p.add_argument("--slurm-args", default="",
                   help="options for `engram-pretrain submit`, quoted: e.g. \"--nodes 1 --gpus-per-node 8 "
                        "--partition gpu --time 12:00:00 --max-parallel 4\"")
    p.add_argument("--dry-run", action="store_true",
                   help="write configs, plan and task list (and with --slurm the sbatch script); "
                        "train nothing")
    p.add_argument("--collect", action="store_true", help="only collect results and plot; train nothing")
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides applied to both family presets before the variants are derived")


def _csv(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [] if text.strip().lower() == "none" else [t.strip() for t in text.split(",") if t.strip()]


def _settings(args: argparse.Namespace, kind: str) -> RunSettings:
    if args.nproc < 1:
        raise ValueError(f"--nproc: must be >= 1, got {args.nproc}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps: must be >= 1, got {args.steps}")
    out = Path(args.out) if args.out else Path("runs") / kind / args.preset
    return RunSettings(out_dir=out, family=args.preset, steps=args.steps, data=args.data, nproc=args.nproc,
                       keep_last=args.keep_last)


def _family(args: argparse.Namespace) -> tuple[Any, Any, str]:
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    return load_family(args.preset, overrides, args.baseline, args.reference)


def _execute(args: argparse.Namespace, runs: list[PlannedRun], settings: RunSettings, reference_total: int,
             reference_name: str, meta: dict[str, Any],
             plot: Callable[[list[dict[str, Any]], Path], Any]) -> int:
    """Shared tail of both experiments: finalize, plan, configs, train / submit, collect, plot."""
    from .budget import relative_delta
    from .runner import (
        is_finished,
        local_command,
        result_row,
        run_local,
        submit_array,
        write_configs,
        write_plan,
        write_results,
        write_task_list,
    )

    by_note: dict[str, list[str]] = {}
    for run in runs:
        for note in finalize(run, settings):
            by_note.setdefault(note, []).append(run.name)
    notes = list(meta.get("notes", []))
    for note, names in by_note.items():
        notes.append(f"{note} ({'all runs' if len(names) == len(runs) else ', '.join(names)})")
    chosen = select(runs, _csv(args.only))
    out = settings.out_dir
    meta = {**meta, "notes": notes, "out_dir": str(out.absolute()),
            "command": shlex.join(["engram-pretrain", *sys.argv[1:]]) if sys.argv else ""}
    table = write_plan(runs, out, reference_total, meta, reference_name)
    print(table)
    for note in meta["notes"]:
        print(f"note: {note}")
    for run in runs:
        delta = relative_delta(run.accounting().total, reference_total)
        if abs(delta) > ISO_TOLERANCE:
            print(f"warning: {run.name} has {100 * delta:+.2f}% total parameters vs {reference_name} "
                  f"(more than {100 * ISO_TOLERANCE:.0f}%)", file=sys.stderr)
    code = 0
    if not args.collect:
        if not all(run.cfg.data.paths for run in chosen):
            raise ValueError("data.paths is empty: give --data DIR (e.g. data/default from `make data`)")
        write_configs(chosen)
        if args.slurm:
            todo = write_task_list(chosen, out / "tasks.txt")
            if todo:
                print(f"{len(todo)} unfinished run(s) -> {out / 'tasks.txt'}")
                code = submit_array(out / "tasks.txt", out / "slurm", shlex.split(args.slurm_args),
                                    args.dry_run)
            else:
                print("every selected run is finished")
        elif args.dry_run:
            todo = write_task_list(chosen, out / "tasks.txt")
            print(f"{len(todo)} unfinished run(s); would run, one after the other:")
            for run in todo:
                print("  " + shlex.join(local_command(run, settings.nproc)))
        else:
            codes = run_local(chosen, settings.nproc)
            code = 0 if all(c == 0 for c in codes.values()) else 1
    rows = [result_row(run, reference_total) for run in runs]
    csv_path, json_path = write_results(rows, out, meta)
    paths = plot(rows, out) if any(r["val_loss"] is not None for r in rows) else None
    finished = sum(r["status"] == "finished" for r in rows)
    print(f"results: {finished} of {len(rows)} run(s) finished -> {csv_path}, {json_path}"
          + (f"; figure {paths['png']}" if paths else ""))
    if not args.collect and not args.slurm and not args.dry_run:
        missing = [r.name for r in chosen if not is_finished(r.cfg)]
        if missing:
            print(f"unfinished: {', '.join(missing)}", file=sys.stderr)
            code = code or 1
    return code


def cmd_ablation(args: argparse.Namespace) -> int:
    from ..analysis.figures import plot_layer_sweep, seed_noise
    from .ablation import ablation_plan
    from .budget import accounting

    try:
        baseline, reference, how = _family(args)
        settings = _settings(args, "ablation")
        layers = _csv(args.layers)
        runs = ablation_plan(baseline, reference, None if layers is None else [int(x) for x in layers],
                             _csv(args.ablations), args.repeat_seeds)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ref_total = accounting(reference.model).total
    meta = {"experiment": "ablation", "family": args.preset, "baseline": how, "reference": reference.name,
            "reference_total_params": ref_total, "steps": args.steps or reference.train.steps,
            "x_axis": "layer_1based = block index + 1 (paper convention)", "created": time.time()}

    def plot(rows: list[dict[str, Any]], out: Path) -> Any:
        paths = plot_layer_sweep(rows, out / "figure5.png", num_layers=reference.model.num_layers,
                                 title=f"{args.preset}: Engram ablations ({meta['steps']} steps)")
        noise = seed_noise(rows)
        if noise is not None:
            results = json.loads((out / "results.json").read_text())
            results["seed_noise"] = noise
            (out / "results.json").write_text(json.dumps(results, indent=1))
        return paths

    try:
        return _execute(args, runs, settings, ref_total, "reference", meta, plot)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def cmd_allocation(args: argparse.Namespace) -> int:
    from ..analysis.figures import plot_allocation
    from .allocation import allocation_plan
    from .budget import accounting

    try:
        baseline, reference, how = _family(args)
        settings = _settings(args, "allocation")
        shares = [float(s) / 100 for s in _csv(args.shares) or []]
        runs, notes = allocation_plan(baseline, reference, shares)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    base_total = accounting(baseline.model).total
    meta = {"experiment": "allocation", "family": args.preset, "baseline": how, "reference": reference.name,
            "baseline_total_params": base_total, "steps": args.steps or baseline.train.steps, "notes": notes,
            "created": time.time()}

    def plot(rows: list[dict[str, Any]], out: Path) -> Any:
        return plot_allocation(rows, out / "figure3.png",
                               title=f"{args.preset}: sparsity allocation ({meta['steps']} steps)")

    try:
        return _execute(args, runs, settings, base_total, "baseline", meta, plot)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

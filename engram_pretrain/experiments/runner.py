"""Executing a run set: configs on disk, skip-finished, local runs or a SLURM array, results collection.

Layout of an experiment directory `<out>/`:

    plan.json, plan.md        the run set with its parameter accounting (written before anything runs)
    tasks.txt                 one `<config.yaml>` per unfinished run (the SLURM array's task list)
    slurm/submit.sbatch       the array script (`--slurm`), logs under slurm/logs/
    <run>/config.yaml         the resolved config of the run (what `engram-pretrain train` reads)
    <run>/train.log           the trainer's output (local runs)
    <run>/metrics.jsonl, <run>/checkpoints/step_<N>/   written by the trainer
    results.csv, results.json the final validation loss and the accounting of every run

A run is *finished* when its `metrics.jsonl` holds a validation loss at the final step (`train.steps`) and
the complete checkpoint of that step exists. Finished runs are never started again.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..config import RunConfig, config_diff, dump_config, load_config
from ..launch.commands import LOCAL_SCRIPT
from ..train.checkpoint import checkpoint_dir, is_complete, step_dir_name
from .budget import relative_delta
from .plan import PlannedRun

METRICS_NAME = "metrics.jsonl"
RUN_RECORD = "experiment_run.json"
"""Written next to the config after a local run: exit code, wall seconds, command."""
IGNORED_SECTIONS = ("launcher.", "logging.", "checkpoint.resume")
"""Config keys that may differ between the planned config and a run's saved one (launch layout)."""
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT")


# ---------------------------------------------------------------------------- state of a run

def final_validation(cfg: RunConfig) -> dict[str, Any] | None:
    """The last `metrics.jsonl` record with a validation loss at step `train.steps`, or None."""
    path = Path(cfg.output_dir) / METRICS_NAME
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        val = rec.get("val_loss")
        if rec.get("step") == cfg.train.steps and isinstance(val, int | float) and math.isfinite(val):
            found = rec
    return found


def final_checkpoint(cfg: RunConfig) -> Path:
    return checkpoint_dir(cfg) / step_dir_name(cfg.train.steps)


def is_finished(cfg: RunConfig) -> bool:
    """Final validation loss recorded and the final checkpoint complete."""
    return final_validation(cfg) is not None and is_complete(final_checkpoint(cfg))


def has_started(cfg: RunConfig) -> bool:
    out = Path(cfg.output_dir)
    return (out / METRICS_NAME).exists() or checkpoint_dir(cfg).exists()


def config_path(run: PlannedRun) -> Path:
    return Path(run.cfg.output_dir) / "config.yaml"


def write_configs(runs: Sequence[PlannedRun]) -> None:
    """Write every run's `config.yaml`. A run that has started with a different config (ignoring the launch
    layout) raises ValueError naming the keys: use another --out, or delete that run's directory."""
    for run in runs:
        path = config_path(run)
        if path.exists() and has_started(run.cfg):
            diff = {k: v for k, v in config_diff(load_config(path), run.cfg).items()
                    if not k.startswith(IGNORED_SECTIONS)}
            if diff:
                keys = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in list(diff.items())[:6])
                raise ValueError(f"{path.parent} holds a run of a different config: {keys}. Use another "
                                 "--out or delete that directory.")
        path.parent.mkdir(parents=True, exist_ok=True)
        dump_config(run.cfg, path)


# ---------------------------------------------------------------------------- local execution

def _clean_env(backend: str) -> dict[str, str]:
    import torch

    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env["ENGRAM_BACKEND"] = backend
    env.setdefault("PYTHON", sys.executable)
    return env


def local_command(run: PlannedRun, nproc: int) -> list[str]:
    """The command that trains `run` on this machine: the CLI (1 process) or launchers/local.sh (torchrun)."""
    cfg = str(config_path(run))
    if nproc == 1:
        return [sys.executable, "-m", "engram_pretrain.cli", "train", cfg, "--resume", "auto"]
    log_dir = Path(run.cfg.output_dir) / "logs" / "local"
    return ["bash", str(LOCAL_SCRIPT), "--nproc", str(nproc), "--log-dir", str(log_dir), "--", "train", cfg,
            "--resume", "auto"]


def train_one(run: PlannedRun, nproc: int = 1) -> int:
    """Train `run` to completion (resuming from its latest checkpoint) in a new process; return its exit code.

    One process: the CLI in a fresh interpreter (a run leaves DeepSpeed/torch.distributed state behind, so
    runs never share a process); several: torchrun through launchers/local.sh. The output is appended to
    `<run>/train.log`; `<run>/experiment_run.json` records the exit code and the wall time."""
    run_dir = Path(run.cfg.output_dir)
    cmd = local_command(run, nproc)
    start = time.perf_counter()
    with open(run_dir / "train.log", "a") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                              env=_clean_env(run.cfg.launcher.backend)).returncode
    record = {"exit_code": code, "seconds": time.perf_counter() - start, "nproc": nproc,
              "command": shlex.join(cmd), "finished_at": time.time()}
    (run_dir / RUN_RECORD).write_text(json.dumps(record, indent=1))
    return code


def run_local(runs: Sequence[PlannedRun], nproc: int = 1,
              echo: Callable[[str], None] = print) -> dict[str, int]:
    """Train the unfinished runs one after the other; return {name: exit code} of those started."""
    todo = [r for r in runs if not is_finished(r.cfg)]
    echo(f"{len(runs) - len(todo)} of {len(runs)} run(s) already finished; {len(todo)} to train "
         f"({nproc} process(es) each)")
    codes = {}
    for i, run in enumerate(todo, 1):
        echo(f"[{i}/{len(todo)}] {run.name}: training ({run.cfg.train.steps} steps) -> "
             f"{Path(run.cfg.output_dir) / 'train.log'}")
        start = time.perf_counter()
        codes[run.name] = code = train_one(run, nproc)
        val = final_validation(run.cfg)
        if code == 0 and val is not None:
            echo(f"[{i}/{len(todo)}] {run.name}: done in {time.perf_counter() - start:.0f} s, "
                 f"val loss {val['val_loss']:.4f}")
        else:
            tail = _tail(Path(run.cfg.output_dir) / "train.log")
            echo(f"[{i}/{len(todo)}] {run.name}: FAILED (exit code {code}); last lines of the log:\n{tail}")
    return codes


def _tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return "  (no log)"
    return "\n".join("  " + line for line in path.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------------------- SLURM

def write_task_list(runs: Sequence[PlannedRun], path: Path) -> list[PlannedRun]:
    """`path`: one config path per unfinished run (array index i = line i); returns those runs."""
    todo = [r for r in runs if not is_finished(r.cfg)]
    lines = ["# engram-pretrain experiment task list: array index i trains the i-th config",
             *(f"{shlex.quote(str(config_path(r).absolute()))}  # {r.name}" for r in todo)]
    path.write_text("\n".join(lines) + "\n")
    return todo


def submit_array(task_list: Path, run_dir: Path, slurm_args: Sequence[str], dry_run: bool) -> int:
    """Submit `task_list` as one SLURM array into `run_dir`; `slurm_args`: `submit`'s options."""
    from dataclasses import replace

    from ..launch.commands import SubmitOptions, submit_jobs

    options = SubmitOptions.parse(slurm_args)
    options = replace(options, array=True, run_dir=str(run_dir), dry_run=dry_run or options.dry_run)
    return submit_jobs(str(task_list), [], options)


# ---------------------------------------------------------------------------- results

def result_row(run: PlannedRun, reference_total: int) -> dict[str, Any]:
    """One results line: what ran, its parameter accounting and its final validation loss."""
    acc = run.accounting()
    e, m = run.cfg.model.engram, run.cfg.model
    rec = final_validation(run.cfg)
    finished = rec is not None and is_complete(final_checkpoint(run.cfg))
    status = "finished" if finished else "started" if has_started(run.cfg) else "not run"
    record = Path(run.cfg.output_dir) / RUN_RECORD
    seconds = json.loads(record.read_text()).get("seconds") if record.exists() else None
    if status != "finished" and record.exists() and json.loads(record.read_text()).get("exit_code"):
        status = "failed"
    return {
        "run": run.name, "label": run.label, "kind": run.kind,
        "layer": run.layer, "layer_1based": None if run.layer is None else run.layer + 1,
        "engram_layers": " ".join(str(x) for x in e.layers),
        "val_loss": rec["val_loss"] if finished else None,
        "status": status, "steps": run.cfg.train.steps,
        "tokens_seen": rec.get("tokens_seen") if rec else None, "seconds": seconds,
        "train_seed": run.cfg.train.seed,
        "total_params": acc.total, "delta_total_pct": 100 * relative_delta(acc.total, reference_total),
        "activated_params": acc.activated, "sparse_params": acc.sparse,
        "engram_table_params": acc.engram_tables, "engram_dense_params": acc.engram_dense,
        "table_rows": acc.table_rows, "engram_share": acc.engram_share,
        "routed_experts": m.moe.num_routed_experts, "top_k": m.moe.top_k,
        "max_ngram": e.max_ngram if e.layers else None, "d_mem": e.d_mem if e.layers else None,
        "base_table_size": " ".join(str(b) for b in m.engram_base_sizes()) if e.layers else "",
        **run.info,
        "changes": json.dumps(run.changes, sort_keys=True),
    }


def write_results(rows: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> tuple[Path, Path]:
    """`results.csv` (one line per run) and `results.json` ({**meta, "runs": rows})."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    csv_path, json_path = out_dir / "results.csv", out_dir / "results.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    json_path.write_text(json.dumps({**meta, "runs": rows}, indent=1))
    return csv_path, json_path


def _fmt(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.3f}M" if n >= 1e6 else f"{n:,}"


def plan_table(runs: Sequence[PlannedRun], reference_total: int, reference_name: str = "reference") -> str:
    """Markdown table of the run set and its parameter accounting."""
    head = ("| run | kind | Engram layers | changes | total | Δ total vs " + reference_name
            + " | activated | Engram tables | table rows | Engram share of sparse |")
    lines = [head, "|" + "---|" * 10]
    for r in runs:
        a = r.accounting()
        changes = ", ".join(f"{k.removeprefix('model.')}={v}" for k, v in r.changes.items()) or "—"
        layers = ",".join(str(x) for x in r.cfg.model.engram.layers) or "—"
        lines.append(f"| {r.name} | {r.kind} | {layers} | {changes} | {_fmt(a.total)} | "
                     f"{100 * relative_delta(a.total, reference_total):+.3f}% | {_fmt(a.activated)} | "
                     f"{_fmt(a.engram_tables)} | {a.table_rows:,} | {100 * a.engram_share:.1f}% |")
    return "\n".join(lines)


def write_plan(runs: Sequence[PlannedRun], out_dir: Path, reference_total: int, meta: dict[str, Any],
               reference_name: str = "reference") -> str:
    """`plan.json` and `plan.md` (the accounting table); returns the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = plan_table(runs, reference_total, reference_name)
    (out_dir / "plan.md").write_text(table + "\n")
    plan = [{"run": r.name, "label": r.label, "kind": r.kind, "layer": r.layer, "config": str(config_path(r)),
             "changes": r.changes, **r.info, **r.accounting().as_dict()} for r in runs]
    (out_dir / "plan.json").write_text(json.dumps({**meta, "runs": plan}, indent=1, default=str))
    return table

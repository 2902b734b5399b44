"""`engram-pretrain launch` (one machine) and `engram-pretrain submit` (SLURM): argparse wiring and actions.

    engram-pretrain launch tiny --nproc 2 train.steps=100
    engram-pretrain submit moe-3b --nodes 4 --gpus-per-node 8 --partition gpu --time 04:00:00
    engram-pretrain submit tiny --nodes 2 --gpus-per-node 0 --procs-per-node 2 --dry-run
    engram-pretrain submit sweep.txt --array --nodes 1 --gpus-per-node 8 --max-parallel 4

Options go before the config or after the overrides (argparse does not interleave them).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from ..config import REPO_ROOT, SLURM_OPTIONS, ConfigError, RunConfig, load_preset, resolve_config_path
from .slurm import SbatchSpec, read_task_list, sbatch_command, submit, write_script

LOCAL_SCRIPT = REPO_ROOT / "launchers" / "local.sh"
"""The one-machine launcher (torchrun with per-rank logs)."""


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `launch` and `submit` to the `engram-pretrain` subcommands."""
    p = sub.add_parser("launch", help="train on this machine: torchrun with --nproc ranks "
                                      "(launchers/local.sh)")
    p.add_argument("config", help="preset name (configs/<name>.yaml) or YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    p.add_argument("--nproc", type=int, default=None, help="processes (default: launcher.procs_per_node)")
    p.add_argument("--resume", default=None, help="auto | PATH | none (default: checkpoint.resume)")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("submit", help="render the sbatch script into the run directory and submit it (SLURM)")
    p.add_argument("config", help="preset name or YAML path; with --array: a task list file "
                                  "(one `<config> [overrides...]` per line)")
    p.add_argument("overrides", nargs="*", help="dotted overrides (with --array: applied to every task)")
    add_submit_options(p)
    p.set_defaults(func=cmd_submit)


def add_submit_options(p: argparse.ArgumentParser) -> None:
    """The options of `submit` (each one a `SubmitOptions` field of the same name)."""
    g = p.add_argument_group("resources (default: the config's launcher section)")
    g.add_argument("--nodes", type=int, default=None, help="nodes")
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node, one rank each; 0 for CPU nodes (gloo, no GRES request). "
                        "Default: launcher.procs_per_node, or 0 when launcher.backend is gloo")
    g.add_argument("--procs-per-node", type=int, default=None,
                   help="ranks per node on CPU nodes (default: launcher.procs_per_node)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs of each node's task (all ranks)")
    g.add_argument("--mem", default=None, help="memory per node, e.g. 200G")
    g.add_argument("--exclusive", action="store_true", help="whole nodes")
    for name in SLURM_OPTIONS:
        g.add_argument(f"--{name}", default=None, help=f"SLURM {name} (default: launcher.{name})")
    j = p.add_argument_group("job control")
    j.add_argument("--signal-seconds", type=int, default=None,
                   help="SIGUSR1 this long before the time limit: checkpoint, requeue, resume "
                        "(default: launcher.signal_seconds; 0: none)")
    j.add_argument("--no-requeue", action="store_true",
                   help="stop after a SIGUSR1 checkpoint, do not requeue")
    j.add_argument("--dependency", default=None,
                   help="SLURM dependency of the (first) job, e.g. afterok:1234")
    j.add_argument("--chain", type=int, default=1,
                   help="submit this many jobs, each starting after the previous one succeeded (afterok)")
    j.add_argument("--array", action="store_true", help="CONFIG is a task list: one array index per line")
    j.add_argument("--max-parallel", type=int, default=None, help="array tasks running at once")
    j.add_argument("--run-dir", default=None,
                   help="where the script and job logs go (default: output_dir; arrays: runs/sweeps/<list>)")
    j.add_argument("--dry-run", action="store_true", help="write and print the script, do not submit")
    j.add_argument("--parsable", action="store_true", help="print only the job id(s)")


@dataclass
class SubmitOptions:
    """What `submit` takes besides the config and overrides; None: the config's launcher section."""

    nodes: int | None = None
    gpus_per_node: int | None = None
    procs_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    exclusive: bool = False
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_seconds: int | None = None
    no_requeue: bool = False
    dependency: str | None = None
    chain: int = 1
    array: bool = False
    max_parallel: int | None = None
    run_dir: str | None = None
    dry_run: bool = False
    parsable: bool = False

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> SubmitOptions:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    @classmethod
    def parse(cls, argv: Sequence[str]) -> SubmitOptions:
        """From `submit`'s command-line options (e.g. an experiment's `--slurm-args`)."""
        parser = argparse.ArgumentParser(prog="engram-pretrain submit", add_help=False)
        add_submit_options(parser)
        return cls.from_namespace(parser.parse_args(list(argv)))


# ---------------------------------------------------------------------------- launch

def cmd_launch(args: argparse.Namespace) -> int:
    cfg = load_preset(args.config, args.overrides)
    nproc = args.nproc if args.nproc is not None else cfg.launcher.procs_per_node
    overrides = [*args.overrides, "launcher.nodes=1", f"launcher.procs_per_node={nproc}"]
    load_preset(args.config, overrides)  # validates the launch settings too
    config = str(resolve_config_path(args.config).absolute())
    log_dir = Path(cfg.output_dir).absolute() / "logs" / "local"
    cmd = ["bash", str(LOCAL_SCRIPT), "--nproc", str(nproc), "--log-dir", str(log_dir), "--",
           "train", config, *overrides, *(["--resume", args.resume] if args.resume else [])]
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable),
           "ENGRAM_BACKEND": cfg.launcher.backend}
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    os.execve("/bin/bash", cmd, env)
    return 1  # unreachable: execve replaces this process


# ---------------------------------------------------------------------------- submit

def _load_tasks(config: str, overrides: Sequence[str], array: bool) -> list[tuple[str, list[str], RunConfig]]:
    entries = read_task_list(Path(config)) if array else [[config]]
    return [(e[0], [*e[1:], *overrides], load_preset(e[0], [*e[1:], *overrides])) for e in entries]


def build_spec(config: str, overrides: Sequence[str], args: SubmitOptions) -> SbatchSpec:
    """The SbatchSpec of a submission: options over the (first) config's launcher section.

    Every task's config is loaded and validated with the launch settings as overrides
    (`launcher.nodes`, `launcher.procs_per_node`, and `launcher.backend=gloo` on CPU nodes)."""
    tasks = _load_tasks(config, overrides, args.array)
    lc = tasks[0][2].launcher
    gpus = args.gpus_per_node
    if gpus is None:
        gpus = 0 if lc.backend == "gloo" else lc.procs_per_node
    procs = args.procs_per_node
    if procs is None:
        procs = gpus if gpus > 0 else lc.procs_per_node
    nodes = args.nodes if args.nodes is not None else lc.nodes
    argvs = []
    for name, task_overrides, cfg in tasks:
        launch = [f"launcher.nodes={nodes}", f"launcher.procs_per_node={procs}"]
        if gpus == 0 and cfg.launcher.backend == "auto":
            launch.append("launcher.backend=gloo")
        load_preset(name, [*task_overrides, *launch])
        argvs.append(["train", str(resolve_config_path(name).absolute()), *task_overrides, *launch,
                      "--resume", "auto"])
    out_dirs = [str(Path(cfg.output_dir).absolute()) for _, _, cfg in tasks]
    if len(set(out_dirs)) != len(out_dirs):
        raise ConfigError("array tasks share an output_dir (their checkpoints would collide): "
                          + ", ".join(sorted({d for d in out_dirs if out_dirs.count(d) > 1})))
    if args.run_dir:
        run_dir = Path(args.run_dir)
    elif args.array:
        run_dir = Path("runs") / "sweeps" / Path(config).stem
    else:
        run_dir = Path(tasks[0][2].output_dir)
    pick = {name: getattr(args, name) or getattr(lc, name) for name in SLURM_OPTIONS}
    return SbatchSpec(
        job_name=Path(config).stem if args.array else tasks[0][2].name,
        run_dir=run_dir.absolute(), workdir=Path.cwd(), tasks=argvs, nodes=nodes, procs_per_node=procs,
        gpus_per_node=gpus, backend=lc.backend, cpus_per_task=args.cpus_per_task, mem=args.mem,
        exclusive=args.exclusive,
        signal_seconds=lc.signal_seconds if args.signal_seconds is None else args.signal_seconds,
        requeue=not args.no_requeue, master_port=lc.master_port, array=args.array,
        max_parallel=args.max_parallel, **pick)


def cmd_submit(args: argparse.Namespace) -> int:
    return submit_jobs(args.config, args.overrides, SubmitOptions.from_namespace(args))


def submit_jobs(config: str, overrides: Sequence[str], args: SubmitOptions) -> int:
    """Render the sbatch script of `config` (a task list with `args.array`) and submit it `args.chain`
    times (afterok), or print it with `args.dry_run`; returns the exit code of `engram-pretrain submit`."""
    spec = build_spec(config, overrides, args)
    if args.chain < 1:
        raise ConfigError(f"--chain: must be >= 1, got {args.chain}")
    script = write_script(spec)
    if args.dry_run:
        print(script.read_text(), end="")
        print(f"# written to {script}; would run: {shlex.join(sbatch_command(script, args.dependency))}"
              + (f" (x{args.chain}, chained afterok)" if args.chain > 1 else ""), file=sys.stderr)
        return 0
    dependency = args.dependency
    for _ in range(args.chain):
        try:
            job_id = submit(script, dependency)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        dependency = f"afterok:{job_id}"
        if args.parsable:
            print(job_id)
            continue
        tag = f"{job_id}_<index>" if spec.array else job_id
        log = spec.log_pattern.replace("%A_%a", f"{job_id}_<index>").replace("%j", job_id)
        print(f"submitted job {job_id}: {spec.job_name}, {spec.nodes} node(s) x {spec.procs_per_node} "
              f"process(es)" + (f", {len(spec.tasks)} array tasks" if spec.array else ""))
        print(f"  script:        {script}")
        print(f"  job log:       {log}")
        print(f"  per-rank logs: {spec.run_dir / 'logs' / tag}/restart<k>/node<i>/")
    return 0

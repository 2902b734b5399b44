"""`engram-pretrain submit`: render the sbatch script of a run into its run directory and submit it.

    spec = SbatchSpec(job_name="tiny", run_dir=Path("/runs/tiny"), workdir=Path.cwd(),
                      tasks=[["train", "/repo/configs/tiny.yaml", "--resume", "auto"]], nodes=2,
                      procs_per_node=8, gpus_per_node=8, partition="gpu", time="04:00:00")
    script = write_script(spec)            # <run_dir>/submit.sbatch
    job_id = submit(script, dependency="afterok:1234")

The script is `launchers/slurm/train.sbatch.template` with `{{name}}` fields filled in: `#SBATCH` lines from
the spec, the engram-pretrain arguments of the run (or of every array index), paths, ports. Everything that
happens inside the job (rendezvous, srun + torchrun, signal forwarding, requeue) is in the template.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import REPO_ROOT, SLURM_OPTIONS, ConfigError, LauncherConfig

TEMPLATE = REPO_ROOT / "launchers" / "slurm" / "train.sbatch.template"
SCRIPT_NAME = "submit.sbatch"


@dataclass(kw_only=True)
class SbatchSpec(LauncherConfig):
    """Everything the rendered sbatch script depends on: the run's launcher settings (nodes, ranks per
    node, backend, the SLURM options, signal lead time, rendezvous port; see `LauncherConfig`) plus what
    the submission adds."""

    job_name: str
    run_dir: Path
    """Absolute run directory: the script, `logs/slurm-<job>.out` and the per-rank logs go here."""
    workdir: Path
    """Absolute working directory of the job (relative paths in the config resolve against it)."""
    tasks: list[list[str]]
    """`engram-pretrain` arguments per array index; a single entry without `array` is a plain job."""
    gpus_per_node: int = 0
    """GPUs requested per node (`--gres=gpu:G`); 0: a CPU job (gloo), no GRES request."""
    cpus_per_task: int | None = None
    """CPUs of the one task per node; None: the srun step takes every CPU SLURM gave the job on the node."""
    mem: str | None = None
    exclusive: bool = False
    requeue: bool = True
    """Requeue the job after a SIGUSR1 stop (it resumes from the latest complete checkpoint)."""
    array: bool = False
    max_parallel: int | None = None
    """Array throttle: at most this many array tasks run at once (`--array=0-N%K`)."""
    python: str = field(default_factory=lambda: sys.executable)
    repo: Path = REPO_ROOT

    def validate(self) -> None:
        """Raise ConfigError for inconsistent launch settings."""
        if self.nodes < 1:
            raise ConfigError(f"--nodes: must be >= 1, got {self.nodes}")
        if self.procs_per_node < 1:
            raise ConfigError(f"--procs-per-node: must be >= 1, got {self.procs_per_node}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node: must be >= 0, got {self.gpus_per_node}")
        if self.gpus_per_node > 0 and self.procs_per_node != self.gpus_per_node:
            raise ConfigError(f"--procs-per-node {self.procs_per_node} must equal --gpus-per-node "
                              f"{self.gpus_per_node} (one process per GPU)")
        if self.gpus_per_node == 0 and self.backend == "nccl":
            raise ConfigError("launcher.backend: nccl needs GPUs; use --gpus-per-node G or "
                              "launcher.backend=gloo")
        if self.signal_seconds < 0:
            raise ConfigError(f"launcher.signal_seconds: must be >= 0, got {self.signal_seconds}")
        if not self.tasks or (len(self.tasks) > 1 and not self.array):
            raise ConfigError("a job needs one task, an array at least one")
        for path in (self.run_dir, self.workdir):
            if re.search(r"\s", str(path)):
                raise ConfigError(f"{path}: whitespace in paths is not supported in #SBATCH lines")

    @property
    def script_path(self) -> Path:
        return self.run_dir / SCRIPT_NAME

    @property
    def log_pattern(self) -> str:
        """The job log (`--output`), with SLURM's `%j` (job) or `%A_%a` (array job, index) fields."""
        return str(self.run_dir / "logs" / ("slurm-%A_%a.out" if self.array else "slurm-%j.out"))


def directives(spec: SbatchSpec) -> list[str]:
    """The `#SBATCH` lines of the script."""
    opts = [f"--job-name={_job_name(spec.job_name)}", f"--nodes={spec.nodes}", "--ntasks-per-node=1"]
    if spec.gpus_per_node > 0:
        opts.append(f"--gres=gpu:{spec.gpus_per_node}")
    if spec.cpus_per_task is not None:
        opts.append(f"--cpus-per-task={spec.cpus_per_task}")
    if spec.mem is not None:
        opts.append(f"--mem={spec.mem}")
    if spec.exclusive:
        opts.append("--exclusive")
    for name in SLURM_OPTIONS:
        value = getattr(spec, name)
        if value:
            opts.append(f"--{name}={value}")
    opts += [f"--chdir={spec.workdir}", f"--output={spec.log_pattern}", "--open-mode=append",
             "--requeue" if spec.requeue else "--no-requeue"]
    if spec.signal_seconds > 0:
        opts.append(f"--signal=B:USR1@{spec.signal_seconds}")
    if spec.array:
        throttle = f"%{spec.max_parallel}" if spec.max_parallel else ""
        opts.append(f"--array=0-{len(spec.tasks) - 1}{throttle}")
    return [f"#SBATCH {o}" for o in opts]


def _job_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name) or "engram"


def _task_block(spec: SbatchSpec) -> str:
    if not spec.array:
        return f"TRAIN_ARGS=({shlex.join(spec.tasks[0])})"
    lines = ["# array index -> engram-pretrain arguments"]
    lines.append("TASKS=(")
    lines += [f"    {shlex.quote(shlex.join(task))}  # {i}" for i, task in enumerate(spec.tasks)]
    lines.append(")")
    lines.append('eval "TRAIN_ARGS=(${TASKS[$SLURM_ARRAY_TASK_ID]})"')
    return "\n".join(lines)


def render_sbatch(spec: SbatchSpec) -> str:
    """The sbatch script text of `spec`."""
    spec.validate()
    fields = {
        "script_path": shlex.quote(str(spec.script_path)),
        "directives": "\n".join(directives(spec)),
        "repo": shlex.quote(str(spec.repo)),
        "python": shlex.quote(spec.python),
        "run_dir": shlex.quote(str(spec.run_dir)),
        "nodes": str(spec.nodes),
        "procs_per_node": str(spec.procs_per_node),
        "gpus_per_node": str(spec.gpus_per_node),
        "auto_requeue": "1" if spec.requeue else "0",
        "task_args": _task_block(spec),
        "backend": "gloo" if spec.gpus_per_node == 0 else spec.backend,
        "master_port": str(spec.master_port),
        "srun_cpus": str(spec.cpus_per_task) if spec.cpus_per_task is not None else "$SLURM_CPUS_ON_NODE",
        "srun_gres": f"--gres=gpu:{spec.gpus_per_node} " if spec.gpus_per_node > 0 else "",
        "shutdown_timeout": str(max(30, spec.signal_seconds)),
    }
    text = TEMPLATE.read_text()
    missing = set(re.findall(r"\{\{(\w+)\}\}", text)) - fields.keys()
    assert not missing, f"template fields without a value: {missing}"
    return re.sub(r"\{\{(\w+)\}\}", lambda m: fields[m.group(1)], text)


def write_script(spec: SbatchSpec) -> Path:
    """Render `spec` into `<run_dir>/submit.sbatch` (and create `<run_dir>/logs` for SLURM's output)."""
    text = render_sbatch(spec)
    (spec.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    tmp = spec.script_path.with_name(SCRIPT_NAME + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(spec.script_path)
    return spec.script_path


def sbatch_command(script: Path, dependency: str | None = None) -> list[str]:
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd.append(f"--dependency={dependency}")
    return [*cmd, str(script)]


def submit(script: Path, dependency: str | None = None) -> str:
    """Run sbatch on `script`; return the job id. RuntimeError with sbatch's message on failure."""
    cmd = sbatch_command(script, dependency)
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError("sbatch not found: submit from a SLURM login node (or use --dry-run)") from None
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{shlex.join(cmd)} failed: {err.stderr.strip() or err.stdout.strip()}") from None
    job_id = out.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise RuntimeError(f"unexpected sbatch output: {out.stdout!r}")
    return job_id


def read_task_list(path: Path) -> list[list[str]]:
    """An array's task list: one `<config> [overrides...]` per line (shell quoting); `#` comments."""
    if not path.exists():
        raise ConfigError(f"array task list not found: {path}")
    tasks = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as err:
            raise ConfigError(f"{path}:{number}: {err}") from None
        if words:
            tasks.append(words)
    if not tasks:
        raise ConfigError(f"{path}: no tasks (one `<config> [overrides...]` per line)")
    return tasks

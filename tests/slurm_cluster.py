"""A real two-node SLURM cluster on this machine, for tests: munged + slurmctld + two slurmd (n1, n2).

    reason = ensure_slurm_installed()          # None, or why the cluster cannot run here
    cluster = SlurmCluster.start()             # waits until both nodes are idle
    job_id = cluster.sbatch(script)
    info = cluster.wait_for_state(job_id, {"COMPLETED"}, timeout=120)
    cluster.stop()                             # cancels jobs, stops the daemons by PID

Debian's `slurm-wlm` (22.05) is built with multiple-slurmd support: both nodes are `slurmd -N <node>` on
127.0.0.1 with their own ports, spool and log files. The config is generated (proctrack/linuxproc,
task/none, no accounting daemon; finished jobs are also recorded by jobcomp/filetxt), and every client
finds it through `SLURM_CONF` in `cluster.env`. `cred_expire=5` and `sched_interval=2` make a requeued
job start again within seconds instead of SLURM's default two minutes. The daemons run as the current user
(SlurmUser = SlurmdUser = that user), so root is only needed to install the packages.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun")
NODES = ("n1", "n2")


def ensure_slurm_installed() -> str | None:
    """Install slurm-wlm + munge with apt-get when missing; return a reason when SLURM cannot run here.

    The cluster itself runs as the current user (root is not needed); installing needs root or sudo."""
    if all(shutil.which(b) for b in BINARIES):
        return None
    missing = ", ".join(b for b in BINARIES if not shutil.which(b))
    if not shutil.which("apt-get"):
        return f"SLURM binaries missing ({missing}) and apt-get is unavailable to install them"
    if os.geteuid() == 0:
        prefix = []
    elif shutil.which("sudo"):
        prefix = ["sudo", "-n"]
    else:
        return f"SLURM binaries missing ({missing}); installing them with apt-get needs root or sudo"
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "slurm-wlm", "munge"]):
        result = subprocess.run([*prefix, "env", "DEBIAN_FRONTEND=noninteractive", *cmd],
                                capture_output=True, text=True)
        if result.returncode != 0:
            return f"{' '.join(cmd)} failed: {result.stderr.strip()[-500:]}"
    still = [b for b in BINARIES if not shutil.which(b)]
    return f"still missing after apt-get install: {', '.join(still)}" if still else None


def free_ports(n: int) -> list[int]:
    """`n` distinct unused TCP ports on 127.0.0.1."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def slurm_conf(root: Path, ctld_port: int, node_ports: dict[str, int], cpus_per_node: int) -> str:
    """The generated slurm.conf of the test cluster."""
    user = getpass.getuser()
    host = socket.gethostname()
    lines = [
        "ClusterName=engramtest",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge.sock'},cred_expire=5",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}/%n",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.%n.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.%n.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={root / 'jobcomp.txt'}",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/builtin",
        "SchedulerParameters=sched_interval=2",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ReturnToService=2",
        "JobRequeue=1",
        "SlurmdParameters=config_overrides",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        "MinJobAge=600",
        "KillWait=10",
        "Waittime=0",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
    ]
    for name, port in node_ports.items():
        lines.append(f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} "
                     f"CPUs={cpus_per_node} State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(node_ports)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def parse_job(text: str) -> dict[str, str]:
    """`scontrol show job -o` output -> {field: value} (values may not contain spaces; good enough here)."""
    info: dict[str, str] = {}
    for token in text.split():
        if "=" in token:
            key, value = token.split("=", 1)
            info.setdefault(key, value)
    return info


@dataclass
class SlurmCluster:
    """A running test cluster; `env` is the environment every SLURM client call needs."""

    root: Path
    env: dict[str, str]
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    def start(cls, cpus_per_node: int = 1, timeout: float = 60.0) -> SlurmCluster:
        # Short absolute paths: the munge socket path must fit in sockaddr_un (108 bytes). munged requires
        # the socket directory to be searchable by everyone.
        root = Path(tempfile.mkdtemp(prefix="engram-slurm-"))
        root.chmod(0o755)
        for sub in ("state", "log", *(f"spool/{n}" for n in NODES)):
            (root / sub).mkdir(parents=True, exist_ok=True)
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctld_port, *node_ports = free_ports(1 + len(NODES))
        conf = root / "slurm.conf"
        conf.write_text(slurm_conf(root, ctld_port, dict(zip(NODES, node_ports, strict=True)), cpus_per_node))
        env = {**os.environ, "SLURM_CONF": str(conf)}
        cluster = cls(root=root, env=env)
        try:
            cluster._spawn("munged", ["munged", "--foreground", f"--key-file={key}",
                                      f"--socket={root / 'munge.sock'}", f"--pid-file={root / 'munged.pid'}",
                                      f"--log-file={root / 'log' / 'munged.log'}",
                                      f"--seed-file={root / 'munged.seed'}"])
            cluster._wait(lambda: (root / "munge.sock").exists(), 10, "munged socket")
            cluster._spawn("slurmctld", ["slurmctld", "-D", "-i"])
            cluster._wait(lambda: cluster._ok("scontrol", "ping"), 20, "slurmctld to answer")
            for node in NODES:
                cluster._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node])
            cluster._wait(cluster._nodes_idle, timeout, "both nodes idle")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    # ------------------------------------------------------------------ daemons

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 (owned by the daemon)
        self.daemons[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    def _wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.diagnostics()}")
            if cond():
                return
            time.sleep(0.25)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.diagnostics()}")

    def _ok(self, *cmd: str) -> bool:
        return subprocess.run(cmd, env=self.env, capture_output=True).returncode == 0

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in NODES)

    def stop(self) -> None:
        """Cancel this cluster's jobs, stop the daemons (SIGTERM by PID, then SIGKILL), remove the files."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user", getpass.getuser()], env=self.env, capture_output=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i").strip():
                time.sleep(0.5)
        for name in [*(f"slurmd-{n}" for n in NODES), "slurmctld", "munged"]:
            proc = self.daemons.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ clients

    def run(self, *cmd: str, check: bool = True) -> str:
        """Run a SLURM client command against this cluster; its stdout."""
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def sbatch(self, script: Path, *options: str) -> str:
        return self.run("sbatch", "--parsable", *options, str(script)).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` fields of a job still known to slurmctld ({} otherwise)."""
        return parse_job(self.run("scontrol", "show", "job", "-o", job_id, check=False))

    def wait_for(self, cond: Callable[[], bool], timeout: float, what: str,
                 job_id: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.5)
        state = f"\njob {job_id}: {self.job(job_id)}" if job_id else ""
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{state}\n{self.diagnostics()}")

    def wait_for_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Wait until the job is in one of `states` (or any finished state); its fields."""
        finished = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                    "DEADLINE", "PREEMPTED"}
        self.wait_for(lambda: self.job(job_id).get("JobState") in states | finished, timeout,
                      f"job {job_id} to reach {sorted(states)}", job_id)
        return self.job(job_id)

    def jobcomp(self) -> list[dict[str, str]]:
        """Records of finished (and requeued) job runs written by jobcomp/filetxt."""
        path = self.root / "jobcomp.txt"
        return [parse_job(line) for line in path.read_text().splitlines()] if path.exists() else []

    def diagnostics(self, lines: int = 15) -> str:
        """The tails of the daemon logs, for failure messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)

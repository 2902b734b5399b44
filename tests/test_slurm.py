"""Launchers: rendered sbatch scripts, the rendezvous and world-size checks, the local launcher, and jobs on a
real two-node SLURM cluster started by the fixture (tests/slurm_cluster.py): training, preemption + requeue.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, ensure_slurm_installed

from engram_pretrain.cli import main
from engram_pretrain.launch.rendezvous import RendezvousError, rendezvous_host
from engram_pretrain.launch.slurm import SbatchSpec, write_script
from engram_pretrain.launch.worker import EXIT_WORLD, WorldMismatchError, check_world

REPO = Path(__file__).resolve().parents[1]


def sbatch_lines(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["submit", "--dry-run", *args]) == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------------------- rendering (no cluster)

def test_gpu_job_directives_and_launch_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = dry_run(capsys, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--account", "proj",
                  "--time", "04:00:00", "--qos", "high", "--constraint", "h100", "--cpus-per-task", "64",
                  "tiny", "output_dir=runs/big")
    run_dir = tmp_path / "runs" / "big"
    assert (run_dir / "submit.sbatch").read_text() == out  # written into the run directory as printed
    assert (run_dir / "logs").is_dir()
    assert sbatch_lines(out) == [
        "--job-name=tiny", "--nodes=4", "--ntasks-per-node=1", "--gres=gpu:8", "--cpus-per-task=64",
        "--partition=gpu", "--account=proj", "--time=04:00:00", "--qos=high", "--constraint=h100",
        f"--chdir={tmp_path}", f"--output={run_dir}/logs/slurm-%j.out", "--open-mode=append", "--requeue",
        "--signal=B:USR1@120"]
    assert "NNODES=4\n" in out and "NPROC_PER_NODE=8\n" in out and "GPUS_PER_NODE=8\n" in out
    assert "ENGRAM_BACKEND=auto" in out
    srun = out[out.index("\nsrun "):out.index("srun_pid=$!")]
    for piece in ("--ntasks-per-node=1", "--cpus-per-task=\"64\"", "--gres=gpu:8", "launchers/slurm/node.sh",
                  '--nnodes "$NNODES"', '--nproc-per-node "$NPROC_PER_NODE"', "--rdzv-backend c10d",
                  '--rdzv-endpoint "$RDZV_HOST:$RDZV_PORT"', '--rdzv-id "$SLURM_JOB_ID"',
                  "-m engram_pretrain.launch.worker"):
        assert piece in srun, piece
    code = "\n".join(line for line in out.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"\b(ssh|pdsh)\b", code)
    train_args = shlex.split(re.search(r"^TRAIN_ARGS=\((.*)\)$", out, re.M).group(1))
    assert train_args == ["train", str(REPO / "configs" / "tiny.yaml"), "output_dir=runs/big",
                          "launcher.nodes=4", "launcher.procs_per_node=8", "--resume", "auto"]
    assert subprocess.run(["bash", "-n", str(run_dir / "submit.sbatch")]).returncode == 0


def test_cpu_job_has_no_gres_and_uses_gloo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = dry_run(capsys, "--nodes", "2", "--gpus-per-node", "0", "--procs-per-node", "3",
                  "tiny", "launcher.signal_seconds=300")
    assert "--gres" not in out
    assert "--signal=B:USR1@300" in sbatch_lines(out)
    assert "ENGRAM_BACKEND=gloo" in out and "NPROC_PER_NODE=3\n" in out and "GPUS_PER_NODE=0\n" in out
    assert "launcher.backend=gloo" in out  # the trainer must not pick NCCL on a CPU job
    assert '--cpus-per-task="$SLURM_CPUS_ON_NODE"' in out  # the step gets every CPU of the node


def test_no_signal_no_requeue(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = dry_run(capsys, "--gpus-per-node", "0", "--signal-seconds", "0", "--no-requeue", "tiny")
    lines = sbatch_lines(out)
    assert "--no-requeue" in lines and not any(line.startswith("--signal") for line in lines)
    assert "AUTO_REQUEUE=0\n" in out


def test_array_maps_index_to_task(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tasks = ["tiny output_dir=runs/a", "# a comment", "",
             "tiny output_dir=runs/b 'model.engram.layers=[1, 2]'", "configs/tiny.yaml output_dir=runs/c"]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text((REPO / "configs" / "tiny.yaml").read_text())
    (tmp_path / "sweep.txt").write_text("\n".join(tasks) + "\n")
    out = dry_run(capsys, "--array", "--max-parallel", "2", "--gpus-per-node", "0", "sweep.txt",
                  "train.steps=50")
    lines = sbatch_lines(out)
    assert "--array=0-2%2" in lines and "--job-name=sweep" in lines
    assert f"--output={tmp_path}/runs/sweeps/sweep/logs/slurm-%A_%a.out" in lines
    block = out[out.index("TASKS=("):out.index("\n", out.index('eval "TRAIN_ARGS'))]
    expected = [["tiny", "output_dir=runs/a"], ["tiny", "output_dir=runs/b", "model.engram.layers=[1, 2]"],
                ["configs/tiny.yaml", "output_dir=runs/c"]]
    for index, words in enumerate(expected):
        got = subprocess.run(["bash", "-c", block + '\nprintf "%s\\n" "${TRAIN_ARGS[@]}"'],
                             env={**os.environ, "SLURM_ARRAY_TASK_ID": str(index)},
                             capture_output=True, text=True, check=True).stdout.splitlines()
        config = REPO / "configs" / "tiny.yaml" if words[0] == "tiny" else tmp_path / words[0]
        assert got == ["train", str(config), *words[1:], "train.steps=50", "launcher.nodes=1",
                       "launcher.procs_per_node=1", "launcher.backend=gloo", "--resume", "auto"]


@pytest.mark.parametrize("args, message", [
    (["--gpus-per-node", "8", "--procs-per-node", "4", "tiny"], "must equal --gpus-per-node"),
    (["--gpus-per-node", "0", "tiny", "launcher.backend=nccl"], "nccl needs GPUs"),
    (["--nodes", "0", "tiny"], "launcher.nodes: must be >= 1"),
    (["tiny", "launcher.bogus=1"], "launcher.bogus: unknown key"),
])
def test_invalid_launch_settings_fail_before_writing(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "--dry-run", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_array_tasks_must_not_share_output_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep.txt").write_text("tiny\ntiny train.steps=50\n")
    assert main(["submit", "--dry-run", "--array", "sweep.txt"]) == 2
    assert "share an output_dir" in capsys.readouterr().err


# ---------------------------------------------------------------------------- checks (no cluster)

def test_world_check():
    env = {"WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29500", "ENGRAM_EXPECTED_WORLD_SIZE": "4", "ENGRAM_EXPECTED_NODES": "2"}
    assert check_world(env).startswith("world size 4 = 2 node(s) x 2 process(es)")
    # each node formed its own world of one node: the classic localhost-rendezvous failure
    alone = {**env, "WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "1"}
    with pytest.raises(WorldMismatchError, match="world size 2 formed .* asked for 4 = 2 node"):
        check_world(alone)
    with pytest.raises(WorldMismatchError, match="1 node"):
        check_world({**env, "GROUP_WORLD_SIZE": "1"})
    gpus = {**env, "ENGRAM_EXPECTED_GPUS_PER_NODE": "2"}
    assert check_world(gpus, cuda_device_count=lambda: 2)
    with pytest.raises(WorldMismatchError, match="sees 1 GPU"):
        check_world(gpus, cuda_device_count=lambda: 1)


def test_worker_exits_loudly_on_world_mismatch():
    env = {**os.environ, "WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "RANK": "0",
           "ENGRAM_EXPECTED_WORLD_SIZE": "2", "ENGRAM_EXPECTED_NODES": "2"}
    result = subprocess.run([sys.executable, "-m", "engram_pretrain.launch.worker", "show-config", "tiny"],
                            env=env, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == EXIT_WORLD
    assert "world-size check failed" in result.stderr and "asked for 2" in result.stderr
    assert result.stdout == ""  # nothing ran


def test_rendezvous_host_override_and_failures(monkeypatch):
    assert rendezvous_host({"ENGRAM_RDZV_HOST": "localhost"}) in ("127.0.0.1", "::1")
    with pytest.raises(RendezvousError, match="does not resolve"):
        rendezvous_host({"ENGRAM_RDZV_HOST": "no-such-host.invalid"})
    with pytest.raises(RendezvousError, match="not inside a SLURM allocation"):
        rendezvous_host({})
    # a head node whose name resolves to loopback while the other node has a real address
    from engram_pretrain.launch import rendezvous

    monkeypatch.setattr(rendezvous, "expand_nodelist", lambda nodelist: ["gpu1", "gpu2"])
    monkeypatch.setattr(rendezvous, "node_address",
                        lambda node: {"gpu1": "127.0.1.1", "gpu2": "10.0.0.2"}[node])
    with pytest.raises(RendezvousError, match="loopback address 127.0.1.1.*world of its own"):
        rendezvous_host({"SLURM_JOB_NODELIST": "gpu[1-2]"})


def test_local_launcher_runs_every_rank(tmp_path):
    dry = subprocess.run([sys.executable, "-m", "engram_pretrain.cli", "launch", "--nproc", "2", "--dry-run",
                          "tiny", f"output_dir={tmp_path}/run"], capture_output=True, text=True, cwd=REPO)
    assert dry.returncode == 0, dry.stderr
    cmd = shlex.split(dry.stdout)
    assert cmd[1].endswith("launchers/local.sh") and cmd[2:6] == ["--nproc", "2", "--log-dir",
                                                                   f"{tmp_path}/run/logs/local"]
    assert cmd[7:] == ["train", str(REPO / "configs" / "tiny.yaml"), f"output_dir={tmp_path}/run",
                       "launcher.nodes=1", "launcher.procs_per_node=2"]
    # the script itself: two ranks, each runs the command after the world-size pre-flight
    result = subprocess.run(["bash", str(REPO / "launchers" / "local.sh"), "--nproc", "2", "--log-dir",
                             str(tmp_path / "logs"), "show-config", "tiny"],
                            capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "world size 2 = 1 node(s) x 2 process(es)" in result.stdout
    rank_logs = sorted(p.parent.name for p in tmp_path.glob("logs/*/attempt_0/*/stdout.log"))
    assert rank_logs == ["0", "1"]
    for log in tmp_path.glob("logs/*/attempt_0/*/stdout.log"):
        assert "name: tiny" in log.read_text()


# ---------------------------------------------------------------------------- a real SLURM cluster

@pytest.fixture(scope="module")
def cluster():
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster.start()
    yield c
    c.stop()


def job_log(run_dir: Path, job_id: str) -> str:
    path = run_dir / "logs" / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.slurm
def test_two_node_world_forms_across_slurmds(cluster, tmp_path):
    """srun + torchrun on both nodes meet at the rendezvous resolved on the job's first node."""
    spec = SbatchSpec(job_name="world", run_dir=tmp_path / "run", workdir=REPO,
                      tasks=[["show-config", "tiny"]], nodes=2, procs_per_node=1, master_port=31000)
    script = write_script(spec)
    job_id = cluster.sbatch(script)
    info = cluster.wait_for_state(job_id, {"COMPLETED"}, timeout=90)
    log = job_log(spec.run_dir, job_id)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log}"
    assert info["NodeList"] == "n[1-2]"
    assert "rendezvous 127.0.0.1:" in log
    assert "world size 2 = 2 node(s) x 1 process(es)" in log
    for node in (0, 1):  # per-rank logs, one directory per node
        node_dir = spec.run_dir / "logs" / job_id / "restart0" / f"node{node}"
        logs = list(node_dir.glob("*/attempt_0/0/stdout.log"))
        assert len(logs) == 1 and "name: tiny" in logs[0].read_text(), node


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny BPE dataset built by `python -m data_prep build` from a generated text corpus."""
    root = tmp_path_factory.mktemp("slurm-data")
    words = ("the a engram memory table expert router token layer hash gate model train step loss node rank "
             "world batch shard").split()
    lines = [" ".join(words[(7 * i + 3 * j + i * j) % len(words)] for j in range(5 + i % 13)) + "."
             for i in range(3000)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "data_prep", "build", str(root / "corpus.txt"), "--out", str(root / "data"),
           "--vocab-size", "300", "--workers", "0", "--text-unit", "line"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "data"


def tiny_overrides(data: Path, run_dir: Path, steps: int, port: int) -> list[str]:
    """The tiny preset, made very short: small batches and sequences, no evaluation."""
    return [f"data.paths=[{data}]", f"output_dir={run_dir}", f"train.steps={steps}", "train.eval_interval=0",
            "train.log_interval=1", "schedule.warmup_steps=1", "data.seq_len=32", "train.micro_batch_size=2",
            "model.vocab_size=512", "logging.tensorboard=false", f"launcher.master_port={port}"]


def submit_cli(cluster: SlurmCluster, cwd: Path, *args: str) -> str:
    """`engram-pretrain submit ...` against the test cluster; the job id it reports."""
    result = subprocess.run([sys.executable, "-m", "engram_pretrain.cli", "submit", *args], cwd=cwd,
                            env=cluster.env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    match = re.search(r"^submitted job (\d+)", result.stdout, re.M)
    assert match, result.stdout
    assert "job log:" in result.stdout and "per-rank logs:" in result.stdout
    return match.group(1)


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if "loss" in r]  # training steps (not checkpoint records)


def complete_steps(run_dir: Path) -> list[int]:
    ckpts = run_dir / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in ckpts.glob("step_*") if (p / "complete").is_file())


CPU_JOB = ("--nodes", "2", "--gpus-per-node", "0", "--procs-per-node", "1")


@pytest.mark.slurm
def test_two_node_training_job(cluster, dataset, tmp_path):
    run_dir = tmp_path / "run"
    port = 31000 + os.getpid() % 2000
    job_id = submit_cli(cluster, tmp_path, *CPU_JOB, "tiny",
                        *tiny_overrides(dataset, run_dir, steps=6, port=port), "checkpoint.interval=3")
    info = cluster.wait_for_state(job_id, {"COMPLETED"}, timeout=150)
    log = job_log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log}"
    assert "world size 2 = 2 node(s) x 1 process(es)" in log
    # data parallel over both nodes: tokens per step = micro batch x seq len x world size
    assert f"training tiny from step 0 to 6: {2 * 32 * 2} tokens/step" in log
    assert "finished at step 6" in log
    assert complete_steps(run_dir) == [3, 6]
    assert (run_dir / "checkpoints" / "latest").read_text().strip().endswith("step_6")
    assert metric_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    saved = (run_dir / "config.yaml").read_text()
    assert "nodes: 2" in saved and "backend: gloo" in saved
    rank_logs = list((run_dir / "logs" / job_id / "restart0").glob("node*/*/attempt_0/0/stdout.log"))
    assert sorted(p.relative_to(run_dir / "logs" / job_id / "restart0").parts[0] for p in rank_logs) == \
        ["node0", "node1"]
    assert any("step 6/6" in p.read_text() for p in rank_logs)


@pytest.mark.slurm
def test_preemption_checkpoints_requeues_and_resumes(cluster, dataset, tmp_path):
    """SIGUSR1 to the batch shell -> ranks checkpoint and exit -> scontrol requeue -> resume from it."""
    run_dir = tmp_path / "run"
    steps = 16
    port = 33000 + os.getpid() % 2000
    job_id = submit_cli(cluster, tmp_path, *CPU_JOB, "tiny",
                        *tiny_overrides(dataset, run_dir, steps=steps, port=port), "checkpoint.interval=0")
    cluster.wait_for(lambda: len(metric_steps(run_dir)) >= 2, 120, "training to start", job_id)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    info = cluster.wait_for_state(job_id, {"COMPLETED"}, timeout=180)
    log = job_log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log}"
    assert "SIGUSR1: forwarding to the ranks" in log and "requeueing job" in log
    assert f"job {job_id} restart 1" in log
    stopped = re.search(r"stop requested: saving at step (\d+)", log)
    resumed = re.search(r"resumed from \S*step_(\d+) at step (\d+)", log)
    assert stopped and resumed, log
    k = int(stopped.group(1))
    assert 0 < k < steps and int(resumed.group(1)) == int(resumed.group(2)) == k
    assert f"finished at step {steps}" in log
    assert complete_steps(run_dir) == [k, steps]  # interval 0: only the signal checkpoint and the last one
    assert metric_steps(run_dir) == list(range(1, steps + 1))  # no step trained twice, none skipped
    states = [r.get("JobState") for r in cluster.jobcomp() if r.get("JobId") == job_id]
    assert states[-1] == "COMPLETED" and len(states) == 2, states


@pytest.mark.slurm
def test_array_tasks_run_their_own_arguments(cluster, tmp_path):
    """One array index per task: each runs its own arguments and logs to slurm-<array job>_<index>.out."""
    spec = SbatchSpec(job_name="sweep", run_dir=tmp_path / "sweep", workdir=REPO, array=True,
                      tasks=[["show-config", "tiny", f"name=task{i}"] for i in range(2)], master_port=32000)
    array_id = cluster.sbatch(write_script(spec))
    logs = [spec.run_dir / "logs" / f"slurm-{array_id}_{i}.out" for i in range(2)]
    cluster.wait_for(lambda: all("training exited with status" in p.read_text() for p in logs if p.exists())
                     and all(p.exists() for p in logs), 90, "both array tasks to finish", array_id)
    for i, path in enumerate(logs):
        text = path.read_text()
        assert "training exited with status 0" in text, text
        assert f"job {array_id}_{i} restart 0" in text
        assert f"name: task{i}" in text and f"name: task{1 - i}" not in text


@pytest.mark.slurm
def test_chain_and_dependency_reach_sbatch(cluster, tmp_path):
    def submit_parsable(*args: str) -> list[str]:
        result = subprocess.run([sys.executable, "-m", "engram_pretrain.cli", "submit", "--parsable",
                                 "--gpus-per-node", "0", *args, "tiny", f"output_dir={tmp_path}/run"],
                                cwd=tmp_path, env=cluster.env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    jobs = []
    try:
        jobs += submit_parsable("--chain", "2", "--time", "01:00:00")
        jobs += submit_parsable("--dependency", f"afterany:{jobs[1]}")
        assert len(jobs) == 3
        first, second, third = (cluster.job(j) for j in jobs)
        assert "Dependency" not in first or first["Dependency"] == "(null)"
        assert second["Dependency"].startswith(f"afterok:{jobs[0]}") and second["JobState"] == "PENDING"
        assert third["Dependency"].startswith(f"afterany:{jobs[1]}")
    finally:
        if jobs:
            cluster.run("scancel", *jobs)


def test_submit_options_mirror_the_command_line() -> None:
    """`SubmitOptions` (the typed form experiments submit with) has exactly the options and defaults of
    `submit`."""
    import argparse
    from dataclasses import fields

    from engram_pretrain.launch.commands import SubmitOptions, add_submit_options

    parser = argparse.ArgumentParser(add_help=False)
    add_submit_options(parser)
    assert {a.dest for a in parser._actions} == {f.name for f in fields(SubmitOptions)}
    assert SubmitOptions.parse([]) == SubmitOptions()
    assert SubmitOptions.parse(["--no-requeue", "--chain", "3"]) == SubmitOptions(no_requeue=True, chain=3)

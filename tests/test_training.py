"""Training on the real DeepSpeed engine over gloo: ZeRO stages, exact resume, tables, non-finite policy.

Every distributed scenario runs inside one spawned job per fixture (DeepSpeed's first import costs ~10 s
per process), and the tests assert on its results.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from engram_pretrain.config import ConfigError, RunConfig, load_config
from engram_pretrain.testing.datasets import make_dataset_dir
from engram_pretrain.testing.distributed import run_distributed
from engram_pretrain.train.checkpoint import COMPLETE, LATEST, Checkpointer, find_latest, resolve_resume
from engram_pretrain.train.ds_config import build_ds_config

TINY = [
    "model.vocab_size=96", "model.hidden_size=32", "model.num_layers=3", "model.max_seq_len=64",
    "model.attention.num_heads=2", "model.moe.num_routed_experts=4", "model.moe.top_k=2",
    "model.moe.expert_dim=16", "model.moe.first_k_dense=1", "model.hyper_connections.num_streams=2",
    "model.hyper_connections.sinkhorn_iters=3",
    "model.engram.layers=[1, 2]", "model.engram.num_heads=2", "model.engram.d_mem=16",
    "model.engram.base_table_size=[101]", "data.seq_len=32", "train.micro_batch_size=2",
    "train.grad_accum_steps=2", "train.log_interval=2", "train.eval_interval=3", "train.eval_batches=2",
    "schedule.warmup_steps=2", "optimizer.lr=3.0e-3", "logging.tensorboard=false",
    # small parameters stay partitioned under ZeRO-3 (the default threshold would keep them all whole)
    "deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}",
]


def tiny_config(data: str | Path, out: str | Path, *overrides: str) -> RunConfig:
    return load_config(None, [*TINY, f"data.paths=[{data}]", f"output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset_dir(tmp_path_factory.mktemp("data") / "ds", vocab_size=96, num_docs=(200, 20))


# ----------------------------------------------------------------------------- helpers run on each rank

def _trainer(cfg: RunConfig, resume: str | None = None) -> Any:
    from engram_pretrain.train.loop import build_trainer

    return build_trainer(cfg, resume)


def _state(trainer: Any) -> dict[str, np.ndarray]:
    """Full weights (numpy: tensors do not cross the result queue once the worker exits)."""
    from engram_pretrain.train.checkpoint import consolidated_state_dict

    return {k: v.numpy() for k, v in consolidated_state_dict(trainer.components).items()}


def _close(trainer: Any) -> None:
    trainer.sink.close()
    destroy = getattr(trainer.components.engine, "destroy", None)
    if destroy is not None:
        destroy()


def _zero_stages_job(rank: int, world: int, data: str, out: str, stages: list[int], mbs: int,
                     steps: int) -> dict[int, dict[str, Any]]:
    """Loss trajectory and final weights of `steps` steps under each ZeRO stage."""
    results = {}
    for stage in stages:
        cfg = tiny_config(data, f"{out}/z{stage}", f"deepspeed.zero_stage={stage}", f"train.steps={steps}",
                          f"train.micro_batch_size={mbs}", "checkpoint.interval=0", "train.eval_interval=0")
        trainer = _trainer(cfg)
        res = trainer.fit()
        results[stage] = {"losses": res.losses, "state": _state(trainer)}
        _close(trainer)
    return results


def _flat_rows(c: Any, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Table rows (head offsets added) the batch looks up, per Engram layer."""
    rows = c.row_ids(input_ids)
    return {layer: (r + c.model.blocks[layer].engram.head_offsets).flatten() for layer, r in rows.items()}


class _DyingCheckpointer(Checkpointer):
    """A save killed after DeepSpeed wrote its files and before the `complete` marker (on every rank)."""

    def _write_state(self, *args: Any) -> None:
        super()._write_state(*args)
        raise RuntimeError("killed mid-save")


def _straight_vs_resumed(data: str, out: str, overrides: tuple[str, ...], n: int = 3, m: int = 3
                         ) -> dict[str, Any]:
    """N+M steps straight vs N steps, stop (checkpoint), a fresh trainer resumes and runs M steps."""
    common = (*overrides, f"train.steps={n + m}", "checkpoint.interval=0", "train.deterministic=true")
    result: dict[str, Any] = {}
    trainer = _trainer(tiny_config(data, f"{out}/straight", *common))
    result["straight"] = trainer.fit().losses
    result["straight_state"] = _state(trainer)
    _close(trainer)
    cfg = tiny_config(data, f"{out}/interrupted", *common)
    trainer = _trainer(cfg)
    first = trainer.fit(stop_at=n)
    result["first"], result["stopped"] = first.losses, first.stopped_early
    # one more step whose save dies after DeepSpeed wrote its files: the step-N checkpoint must survive
    trainer.train_step()
    trainer.checkpointer.__class__ = _DyingCheckpointer
    try:
        trainer.save()
    except RuntimeError as err:
        result["save_died"] = str(err)
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    result["after_dead_save"] = sorted(p.name for p in ckpt_dir.iterdir())
    _close(trainer)
    trainer = _trainer(cfg, "auto")
    result["resumed_from"] = trainer.step
    result["second"] = trainer.fit().losses
    result["resumed_state"] = _state(trainer)
    _close(trainer)
    return result


def _resume_job(rank: int, world: int, data: str, out: str) -> dict[str, Any]:
    """Exact resume under ZeRO-2; tables after one step; the non-finite policy."""
    from engram_pretrain.data.loader import TrainBatches
    from engram_pretrain.train.loop import NonFiniteError

    out_dict: dict[str, Any] = _straight_vs_resumed(data, f"{out}/z2", ("deepspeed.zero_stage=2",))

    # -- one step: the tables change exactly in the rows the global batch touched, identically on all ranks
    trainer = _trainer(tiny_config(data, f"{out}/tables", "deepspeed.zero_stage=2", "train.steps=4"))
    c = trainer.components
    peek = TrainBatches(trainer.train_batches.samples, c.cfg.train.micro_batch_size, rank, world,
                        trainer.train_batches.consumed_samples)
    touched: dict[int, set[int]] = {layer: set() for layer in c.tables.layers()}
    for _ in range(c.cfg.train.grad_accum_steps):
        for layer, rows in _flat_rows(c, next(peek)["input_ids"]).items():
            gathered = [torch.zeros_like(rows) for _ in range(world)]
            dist.all_gather(gathered, rows)
            touched[layer].update(torch.cat(gathered).tolist())
    before = {layer: c.tables.weight(layer).detach().clone() for layer in c.tables.layers()}
    trainer.train_step()
    tables = {}
    for layer in c.tables.layers():
        after = c.tables.weight(layer).detach().clone()
        changed = set((after != before[layer]).any(dim=1).nonzero().flatten().tolist())
        copies = [torch.zeros_like(after) for _ in range(world)]
        dist.all_gather(copies, after)
        tables[layer] = {"changed": changed, "touched": touched[layer],
                         "replicas_equal": all(torch.equal(copies[0], x) for x in copies)}
    out_dict["tables"] = tables
    _close(trainer)

    # -- non-finite policy, without ZeRO (GuardedAdamW) and with ZeRO-2 (DeepSpeed's own norm check)
    for stage in (0, 2):
        cfg = tiny_config(data, f"{out}/nan{stage}", f"deepspeed.zero_stage={stage}", "train.steps=20",
                          "train.max_nonfinite_steps=3", "checkpoint.interval=0", "train.eval_interval=0")
        trainer = _trainer(cfg)
        bad = {"on": False}

        def poison(module: Any, args: Any, output: torch.Tensor, bad: dict = bad) -> torch.Tensor | None:
            # NaN logits on rank 1 only: the other rank must skip the step as well
            return output * float("nan") if bad["on"] and dist.get_rank() == 1 else None

        trainer.components.model.lm_head.register_forward_hook(poison)
        trainer.fit(stop_at=1)
        s0 = _state(trainer)
        bad["on"] = True
        stats = trainer.train_step()
        s1 = _state(trainer)
        bad["on"] = False
        good = trainer.train_step()
        bad["on"] = True
        try:
            trainer.fit()
            aborted = None
        except NonFiniteError as err:
            aborted = str(err)
        out_dict[f"nan{stage}"] = {
            "skipped": stats.skipped, "unchanged": all(np.array_equal(s0[k], s1[k]) for k in s0),
            "good_skipped": good.skipped, "skipped_total": trainer.skipped_steps, "aborted": aborted,
            "abort_step": trainer.step}
        _close(trainer)
    return out_dict


@pytest.fixture(scope="module")
def zero_runs(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("zero")
    single = run_distributed(_zero_stages_job, 1, args=(str(dataset), str(out / "w1"), [0], 4, 4))[0]
    multi = run_distributed(_zero_stages_job, 2, args=(str(dataset), str(out / "w2"), [1, 2, 3], 2, 4))
    return {"single": single[0], "multi": multi}


@pytest.fixture(scope="module")
def resume_runs(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_distributed(_resume_job, 2, args=(str(dataset), str(tmp_path_factory.mktemp("resume"))))


# ----------------------------------------------------------------------------- ZeRO stages

@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_on_two_ranks_matches_single_process(zero_runs: dict[str, Any], stage: int) -> None:
    ref = zero_runs["single"]
    for rank_result in zero_runs["multi"]:
        got = rank_result[stage]
        assert len(got["losses"]) == len(ref["losses"]) == 4
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-4, abs=1e-5)
        assert got["losses"][-1] < got["losses"][0]
        # Adam's normalised step turns reduction-order noise in near-zero gradients into differences of a
        # small fraction of the LR (3e-3), so weights get an absolute tolerance well below one LR step.
        # Engram tables step at 5x the LR (1.5e-2 per step): their bound is 1/6 of one table step.
        for name, ref_tensor in ref["state"].items():
            atol = 2.5e-3 if name.endswith("engram.table.weight") else 2e-4
            np.testing.assert_allclose(got["state"][name], ref_tensor, rtol=1e-3, atol=atol, err_msg=name)


# ----------------------------------------------------------------------------- exact resume

def _assert_exact_resume(r: dict[str, Any]) -> None:
    assert r["stopped"] and r["resumed_from"] == 3
    assert r["save_died"] == "killed mid-save"
    assert r["after_dead_save"] == ["latest", "step_3", "step_4.tmp"]
    assert r["first"] + r["second"] == r["straight"]  # exact float equality
    assert r["straight_state"].keys() == r["resumed_state"].keys()
    for name, tensor in r["straight_state"].items():
        assert np.array_equal(tensor, r["resumed_state"][name]), name


def test_resume_reproduces_uninterrupted_run_bitwise(resume_runs: list[dict[str, Any]]) -> None:
    for r in resume_runs:
        _assert_exact_resume(r)


def _resume_variants_job(rank: int, world: int, data: str, out: str) -> dict[str, Any]:
    variants = {"zero3": ("deepspeed.zero_stage=3",),
                "zero1": ("deepspeed.zero_stage=1",),
                "offload": ("deepspeed.config=ds_configs/zero2_offload.json",),
                "muon": ("deepspeed.zero_stage=0", "optimizer.name=muon")}
    return {name: _straight_vs_resumed(data, f"{out}/{name}", o) for name, o in variants.items()}


@pytest.mark.slow
def test_resume_is_bitwise_under_zero1_zero3_offload_and_muon(dataset: Path, tmp_path: Path) -> None:
    for per_rank in run_distributed(_resume_variants_job, 2, args=(str(dataset), str(tmp_path)), timeout=600):
        for name, r in per_rank.items():
            assert r["straight"][-1] < r["straight"][0], name
            _assert_exact_resume(r)


def test_tables_change_only_in_touched_rows_and_stay_replicated(resume_runs: list[dict[str, Any]]) -> None:
    for r in resume_runs:
        for layer, t in r["tables"].items():
            assert t["replicas_equal"], layer
            assert t["changed"] and t["changed"] <= t["touched"], layer
            # Adam moves every touched row unless its summed gradient is exactly zero
            assert len(t["changed"]) >= 0.9 * len(t["touched"]), layer
    assert resume_runs[0]["tables"] == resume_runs[1]["tables"]


@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_step_is_skipped_everywhere_then_aborts(resume_runs: list[dict[str, Any]],
                                                          stage: int) -> None:
    for r in resume_runs:
        nan = r[f"nan{stage}"]
        assert nan["skipped"] and nan["unchanged"]
        assert not nan["good_skipped"]
        assert nan["aborted"] is not None and "max_nonfinite_steps=3" in nan["aborted"]
        assert nan["abort_step"] == 3 + 3  # 1 good, 1 skipped, 1 good, then 3 skipped in a row
        assert nan["skipped_total"] == 4


# ----------------------------------------------------------------------------- config + checkpoint files

def test_ds_config_takes_run_settings(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.micro_batch_size=3", "train.grad_accum_steps=5",
                             "optimizer.grad_clip=0.5", "deepspeed.config=ds_configs/zero2.json",
                             "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                             "deepspeed.overrides={zero_optimization: {reduce_bucket_size: 7}}"])
    ds = build_ds_config(cfg, world_size=4, use_cuda=False)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 60 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_bucket_size"] == 7
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is False and "optimizer" not in ds and "scheduler" not in ds
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        build_ds_config(load_config(None, [f"deepspeed.config={bad}"]), 1, use_cuda=False)
    leftover = tmp_path / "leftover.json"
    leftover.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": "auto"}}))
    with pytest.raises(ConfigError, match="reduce_bucket_size"):
        build_ds_config(load_config(None, [f"deepspeed.config={leftover}"]), 1, use_cuda=False)
    with pytest.raises(ConfigError, match="not found"):
        build_ds_config(load_config(None, ["deepspeed.config=nope.json"]), 1, use_cuda=False)


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "zero2_offload"])
def test_shipped_ds_configs_resolve(name: str) -> None:
    cfg = load_config(None, [f"deepspeed.config=ds_configs/{name}.json"])
    ds = build_ds_config(cfg, world_size=2, use_cuda=False)
    assert ds["zero_optimization"]["stage"] == int(name[4])


def _fake_checkpoint(root: Path, step: int, complete: bool) -> Path:
    path = root / f"step_{step}"
    path.mkdir(parents=True)
    (path / "payload").write_text(str(step))
    if complete:
        (path / COMPLETE).write_text("{}")
    return path


def test_resume_auto_ignores_tmp_and_incomplete_checkpoints(tmp_path: Path) -> None:
    assert find_latest(tmp_path / "missing") is None
    good = _fake_checkpoint(tmp_path, 10, complete=True)
    (tmp_path / LATEST).write_text("step_10\n")
    _fake_checkpoint(tmp_path, 30, complete=False)  # killed before its marker
    tmp = tmp_path / "step_40.tmp"  # killed mid-write, even with a marker inside
    tmp.mkdir()
    (tmp / COMPLETE).write_text("{}")
    assert resolve_resume("auto", tmp_path) == good
    assert resolve_resume("none", tmp_path) is None and resolve_resume(None, tmp_path) is None
    assert resolve_resume(str(tmp_path), tmp_path) == good
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "step_30"), tmp_path)
    # a complete checkpoint newer than `latest` (killed between rename and pointer update) is used
    newer = _fake_checkpoint(tmp_path, 20, complete=True)
    assert resolve_resume("auto", tmp_path) == newer
    # a pointer to a deleted checkpoint falls back to the newest complete one
    (tmp_path / LATEST).write_text("step_99\n")
    assert find_latest(tmp_path) == newer


def test_prune_keeps_newest_complete_checkpoints(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step, complete=True)
    _fake_checkpoint(tmp_path, 5, complete=False)
    (tmp_path / "step_6.tmp").mkdir()
    Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1).prune()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["step_3", "step_4", "step_5"]  # incomplete step_5 is left for inspection; .tmp removed


def test_metrics_sink_flattens_records_and_mfu_uses_activated_params(tmp_path: Path) -> None:
    from engram_pretrain.train.metrics import MetricsSink, load_stats, mfu

    assert mfu(1_000_000, 2_000.0, 1e12, 2) == pytest.approx(6 * 1e6 * 2e3 / 2e12)
    st = load_stats(torch.tensor([6.0, 2.0, 2.0, 2.0]))  # mean 3
    assert st == pytest.approx({"min": 2 / 3, "max": 2.0, "maxvio": 1.0})
    assert load_stats(torch.zeros(4))["maxvio"] == 0.0
    sink = MetricsSink(tmp_path, rank=0, jsonl=True, tensorboard=True)
    sink.write(5, {"loss": 1.5, "val_loss": None, "moe": {"layer1": {"maxvio": 0.25}}, "bad": float("nan")})
    sink.close()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec["step"] == 5 and rec["loss"] == 1.5 and rec["moe/layer1/maxvio"] == 0.25
    assert rec["val_loss"] is None and rec["bad"] == "nan"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    silent = MetricsSink(tmp_path / "other", rank=1)
    silent.write(1, {"loss": 1.0})
    assert not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------- CLI + signals

def _launcher_env() -> dict[str, str]:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _cli(config: Path, *args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "engram_pretrain.cli", "train", str(config), *args]


def _wait_for_step(metrics: Path, step: int, proc: Any, timeout: float) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early with {proc.returncode}: {proc.stdout.read()}")
        if metrics.exists():
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {metrics} after {timeout} s")


def test_cli_reports_a_bad_dataset_with_exit_code_2(tmp_path: Path) -> None:
    import subprocess

    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: bad\n")
    args = [*TINY, f"data.paths=[{tmp_path / 'nope'}]", f"output_dir={tmp_path / 'o'}"]
    done = subprocess.run(_cli(cfg, *args), env=_launcher_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not a usable dataset directory" in done.stdout + done.stderr


def test_sigusr1_checkpoints_exits_zero_and_resume_continues(dataset: Path, tmp_path: Path) -> None:
    import subprocess

    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    base = [*TINY, f"data.paths=[{dataset}]", f"output_dir={out}", "train.log_interval=1",
            "train.eval_interval=0", "checkpoint.interval=0"]
    overrides = [*base, "train.steps=500"]
    cfg.write_text("name: sigusr1\n")
    env = _launcher_env()
    proc = subprocess.Popen(_cli(cfg, *overrides, "--resume", "auto"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(out / "metrics.jsonl", 2, proc, timeout=120)
        proc.send_signal(signal.SIGUSR1)
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log
    assert "stopped by signal" in log
    latest = find_latest(out / "checkpoints")
    assert latest is not None
    stopped_at = int(latest.name.split("_")[1])
    assert 2 <= stopped_at < 500
    assert json.loads((latest / "trainer.json").read_text())["step"] == stopped_at
    done = subprocess.run(_cli(cfg, *base, f"train.steps={stopped_at + 2}"), env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {latest} at step {stopped_at}" in done.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert [r["step"] for r in trained[-2:]] == [stopped_at + 1, stopped_at + 2]
    assert all(math.isfinite(r["loss"]) for r in trained)


@pytest.mark.slow
def test_torchrun_two_ranks_stop_on_forwarded_signal_and_resume(dataset: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from engram_pretrain.testing.distributed import free_port

    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: torchrun\n")
    base = [*TINY, f"data.paths=[{dataset}]", f"output_dir={out}", "train.log_interval=1",
            "train.eval_interval=0", "checkpoint.interval=0", "deepspeed.zero_stage=3"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                "--signals-to-handle=SIGTERM,SIGUSR1", "-m", "engram_pretrain.cli", "train", str(cfg)]
    proc = subprocess.Popen([*torchrun, *base, "train.steps=500"], env=_launcher_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(out / "metrics.jsonl", 2, proc, timeout=180)
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
        log, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped by signal" in log, log  # the ranks exit 0; torchrun itself reports the signal
    latest = find_latest(out / "checkpoints")
    assert latest is not None and len(list((latest / "ds").glob("*optim_states.pt"))) == 2
    stopped_at = json.loads((latest / "trainer.json").read_text())["step"]
    done = subprocess.run([*torchrun, *base, f"train.steps={stopped_at + 2}"], env=_launcher_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {latest} at step {stopped_at}" in done.stdout


@pytest.mark.slow
def test_deepspeed_launcher_runs_the_cli(dataset: Path, tmp_path: Path) -> None:
    import subprocess
    import sys
    from pathlib import Path as P

    from engram_pretrain.testing.distributed import free_port

    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: ds-launcher\n")
    launcher = P(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
           "engram_pretrain.cli", "train", str(cfg), *TINY, f"data.paths=[{dataset}]",
           f"output_dir={tmp_path / 'run'}", "train.steps=4"]
    done = subprocess.run(cmd, env=_launcher_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "finished at step 4" in done.stdout
    assert find_latest(tmp_path / "run" / "checkpoints").name == "step_4"


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_small_corpus(tmp_path: Path) -> None:
    import subprocess
    import sys

    data = make_dataset_dir(tmp_path / "ds", vocab_size=96, num_docs=(400, 40))
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "engram_pretrain.demo", "--data", str(data), "--out", str(out),
           "train.steps=60", "train.eval_interval=30", "schedule.warmup_steps=5", "data.seq_len=64"]
    done = subprocess.run(cmd, env=_launcher_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: below the unigram entropy" in done.stdout
    assert (out / "loss.png").stat().st_size > 10_000
    assert find_latest(out / "checkpoints").name == "step_60"



class _Recorder:
    """A user callback (subclassing `Callback` inside the worker) that records the hooks it sees."""

    @staticmethod
    def make() -> Any:
        from engram_pretrain.train.callbacks import Callback

        class Recorder(Callback):
            def __init__(self) -> None:
                self.events: list[tuple[str, int]] = []
                self.records: dict[int, dict[str, Any]] = {}

            def pre_train(self, trainer: Any) -> None:
                self.events.append(("pre_train", trainer.step))

            def pre_step(self, trainer: Any) -> None:
                self.events.append(("pre_step", trainer.step))

            def post_step(self, trainer: Any, stats: Any) -> None:
                self.events.append(("post_step", trainer.step))
                assert stats.loss == trainer.losses[-1]
                trainer.stopped = trainer.step == 4

            def log(self, trainer: Any, record: dict[str, Any]) -> None:
                if "loss" in record:
                    self.records[trainer.step] = {"loss": record["loss"], "val_loss": record["val_loss"]}

            def post_train(self, trainer: Any) -> None:
                self.events.append(("post_train", trainer.step))

        return Recorder()


def _callbacks_job(rank: int, world: int, data: str, out: str) -> dict[str, Any]:
    from engram_pretrain.train.callbacks import Checkpointing, Evaluation, Metrics

    trainer = _trainer(tiny_config(data, out, "train.steps=6", "checkpoint.interval=0"))
    recorder = _Recorder.make()
    trainer.callbacks.append(recorder)
    defaults = Evaluation | Metrics | Checkpointing
    order = [type(c).__name__ for c in trainer.callbacks if isinstance(c, defaults)]
    result = trainer.fit()
    _close(trainer)
    return {"order": order, "events": recorder.events, "records": recorder.records, "step": result.step,
            "stopped": result.stopped_early, "losses": result.losses, "val_losses": result.val_losses,
            "last_checkpoint": result.last_checkpoint}


def test_callbacks_see_every_step_in_order_and_can_stop_the_run(dataset: Path, tmp_path: Path) -> None:
    """Extra callbacks run after the defaults: pre/post hooks around every step, the metrics records of
    log steps (with the validation loss of eval steps) reach `log`, and setting `trainer.stopped` ends
    `fit` after that step (no checkpoint is forced)."""
    res = run_distributed(_callbacks_job, 1, args=(str(dataset), str(tmp_path / "run")))[0]
    assert res["order"] == ["Evaluation", "Metrics", "Checkpointing"]
    assert res["step"] == 4 and res["stopped"] and len(res["losses"]) == 4
    want = [("pre_train", 0)] + [e for s in range(4) for e in (("pre_step", s), ("post_step", s + 1))]
    assert res["events"] == [*want, ("post_train", 4)]
    records = res["records"]
    assert sorted(records) == [2, 3, 4]  # log_interval=2, plus the eval at step 3
    assert records[3]["val_loss"] == res["val_losses"][3] and records[2]["val_loss"] is None
    assert records[4]["loss"] == pytest.approx(res["losses"][3])  # the window since step 3's record
    assert res["last_checkpoint"] is None


def test_bf16_accumulates_and_reduces_gradients_in_fp32() -> None:
    bf16 = build_ds_config(load_config(None, ["deepspeed.bf16=true"]), 2, use_cuda=True)
    assert bf16["bf16"]["enabled"] is True and bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    cpu = build_ds_config(load_config(None, ["deepspeed.bf16=true"]), 2, use_cuda=False)
    assert cpu["bf16"]["enabled"] is False and "data_types" not in cpu  # CPU runs stay fp32


def test_deterministic_sets_the_cublas_workspace_in_a_fresh_process() -> None:
    code = ("import os, torch; from engram_pretrain.train.distributed import enable_deterministic; "
            "enable_deterministic(); print(os.environ['CUBLAS_WORKSPACE_CONFIG'], "
            "torch.are_deterministic_algorithms_enabled())")
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [":4096:8", "True"]
    env["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"  # an explicit setting is kept
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == ":16:8"


def test_an_op_that_cannot_build_is_a_config_error(dataset: Path, tmp_path: Path) -> None:
    """kernel_backend=cpp for host tables with no C++ compiler: exit code 2 and the reason, no traceback."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CXX": "no-such-compiler",
           "ENGRAM_OPS_CACHE": str(tmp_path / "ops")}
    overrides = [*TINY, f"data.paths=[{dataset}]", f"output_dir={tmp_path / 'run'}", "train.steps=2",
                 "parallel.host_tables=true", "parallel.kernel_backend=cpp"]
    (tmp_path / "run.yaml").write_text("name: op-build\n")
    done = subprocess.run([sys.executable, "-m", "engram_pretrain.cli", "train", str(tmp_path / "run.yaml"),
                           *overrides], env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "cannot build op 'engram_cpu_ops': no C++ compiler" in out and "Traceback" not in out


RECOMPUTE_LAYOUTS = {  # layout -> (overrides, recompute modes compared with none)
    "replicated": (["parallel.table_sharding=replicated"], ("full", "selective")),
    "sharded": (["parallel.table_sharding=sharded"], ("full", "selective")),
    "zero3-host": (["parallel.table_sharding=replicated", "parallel.host_tables=true",
                    "deepspeed.zero_stage=3"], ("full",)),
    "zero1-host": (["parallel.table_sharding=replicated", "parallel.host_tables=true",
                    "deepspeed.zero_stage=1"], ("selective",)),
    "ep2-sharded": (["parallel.table_sharding=sharded", "parallel.ep_size=2"], ("selective",)),
}


def _recompute_job(rank: int, world: int, data: str, out: str) -> dict[str, Any]:
    res = {}
    for layout, (overrides, modes) in RECOMPUTE_LAYOUTS.items():
        for mode in ("none", *modes):
            cfg = tiny_config(data, f"{out}/{layout}-{mode}", "train.steps=3", "checkpoint.interval=0",
                              "train.eval_interval=0", f"train.activation_checkpointing={mode}", *overrides)
            trainer = _trainer(cfg)
            losses = trainer.fit().losses
            res[(layout, mode)] = {"losses": losses, "state": _state(trainer)}
            _close(trainer)
    try:
        _trainer(tiny_config(data, f"{out}/zero3-selective", "deepspeed.zero_stage=3",
                             "train.activation_checkpointing=selective"))
        res["zero3-selective"] = "built"
    except ConfigError as err:
        res["zero3-selective"] = str(err)
    return res


def test_activation_recompute_trains_like_no_recompute_on_two_ranks(dataset: Path, tmp_path: Path) -> None:
    """2 ranks, ZeRO-2 with replicated and row-sharded tables, ZeRO-1 and 3 with host tables, expert
    parallelism with sharded tables: the same losses and weights (tables included) with
    train.activation_checkpointing=full and selective as without (the lookups of a selective block are
    never recomputed; those of a full one run again with the same rows). Selective under ZeRO-3 is refused
    (a ConfigError naming the key)."""
    for r in run_distributed(_recompute_job, 2, args=(str(dataset), str(tmp_path)), timeout=600):
        for layout, (_, modes) in RECOMPUTE_LAYOUTS.items():
            plain = r[(layout, "none")]
            for mode in modes:
                recomputed = r[(layout, mode)]
                assert recomputed["losses"] == pytest.approx(plain["losses"], rel=1e-6, abs=0), (layout, mode)
                assert plain["state"].keys() == recomputed["state"].keys()
                # full replays the forward's ops; selective sums a parameter's fp32 gradient contributions in
                # another order (its regions' backward), which Adam's normalisation amplifies on near-zero
                # gradients after 3 steps (the fp64 gradients are equal: tests/test_model.py)
                atol = 1e-6 if mode == "full" else 5e-4
                for name, want in plain["state"].items():
                    np.testing.assert_allclose(recomputed["state"][name], want, rtol=1e-5, atol=atol,
                                               err_msg=f"{layout} {mode}: {name}")
        assert r["zero3-selective"].startswith("train.activation_checkpointing: selective")
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        load_config(None, ["train.compile=true", "train.activation_checkpointing=selective"])


def test_guarded_adamw_checks_gradients_only_without_zero() -> None:
    """ZeRO 1-3 skip a non-finite step themselves (test_nonfinite_step_is_skipped_everywhere_then_aborts
    covers stage 2): the client AdamW does not scan the gradients a second time there."""
    from engram_pretrain.train.optimizers import build_backbone_optimizer

    model = torch.nn.Linear(4, 4)
    for stage, check in ((0, True), (1, False), (2, False), (3, False)):
        cfg = load_config(None, [f"deepspeed.zero_stage={stage}"])
        opt = build_backbone_optimizer(model, cfg, build_ds_config(cfg, 1, use_cuda=False))
        assert opt.check_finite is check, stage
    opt = build_backbone_optimizer(model, load_config(None, ["deepspeed.zero_stage=0"]),
                                   build_ds_config(load_config(None, ["deepspeed.zero_stage=0"]), 1, False))
    model.weight.grad = torch.full_like(model.weight, float("nan"))
    before = model.weight.detach().clone()
    opt.step()
    assert opt.overflow and torch.equal(model.weight.detach(), before)


# Device syncs of one training step and an evaluation (ZeRO-2, MoE + Engram, expert-parallel over 2 ranks,
# every table layout), as the device-strict mode's recorder names them (reads of host tensors, e.g. of the
# step's host copy, are no syncs and not listed). A GPU waits for the host at each; docs/training.md
# ("Host syncs of a step") says why each remains. A new site fails the test below: remove it, or add it
# here with the reason.
KNOWN_SYNC_SITES = {
    # DeepSpeed's own step (gradient norm, overflow check, bucket bookkeeping)
    "engram_pretrain.train.loop:_optimizer_step: engine.step()",
    # the one device-to-host copy of the step: the all-reduced totals, loads and the gradient norm
    "engram_pretrain.train.loop:_optimizer_step: packed = packed.cpu()",
    # the mean validation loss of an evaluation (once per eval, not per step)
    "engram_pretrain.train.loop:evaluate: return float(total[0] / total[1])",
    # replicated tables: the padded all-gather of the row gradients needs every rank's row count on the
    # host (one copy per step for all tables)
    "engram_pretrain.memory.sparse_optim:_gather: table = torch.stack(all_counts).cpu()  # [world, num_tables]",  # noqa: E501
    # sharded tables: uneven all_to_all_single takes host split sizes (one copy per id exchange)
    "engram_pretrain.parallel.table_shard:_exchange_ids: send_counts, recv_counts = torch.stack([send, recv]).tolist()",  # noqa: E501
    # sharded host tables: whether every rank's prefetch matches is host control flow (one flag per lookup)
    "engram_pretrain.parallel.table_shard:_take_plan: if int(flag.item()) == 1:",
    # host tables: a lookup that was not prefetched (evaluation) copies its ids to the host for the gather
    # (training lookups are prefetched: the copy runs on the gather thread, off the step's critical path)
    'engram_pretrain.memory.host_tables:_gather_host: ids = local_ids.to("cpu", dtype=torch.int64)',
    # expert parallelism: uneven all_to_all_single takes host split sizes (one copy per dispatch)
    "engram_pretrain.parallel.expert_parallel:__call__: counts = torch.cat([send_counts, recv_counts]).cpu()  # one host copy for both",  # noqa: E501
    # the local expert dispatcher splits the sorted slots by per-expert counts (host ints; ep_size=1 runs;
    # docs/training.md: torch 2.13's grouped matmul has no CPU backward and no fp64)
    "engram_pretrain.model.moe:__call__: y = experts.forward_sorted(x_sorted, counts.tolist()).to(acc_dtype)"
    "  # [N*K, D] sorted-slot order",
}

STRICT_LAYOUTS = {
    "replicated": [], "sharded": ["parallel.table_sharding=sharded"], "host": ["parallel.host_tables=true"],
    "sharded_host": ["parallel.table_sharding=sharded", "parallel.host_tables=true"],
}


def _strict_steps_job(rank: int, world: int, data: str, out: str, extra: list[str]) -> dict[str, Any]:
    """Per layout: a first step, then a step and an evaluation whose syncs are recorded, all device-strict."""
    from engram_pretrain.testing.device_strict import (
        device_strict,
        host_groups_of,
        host_resident_tensors,
        strict_training_device,
    )

    results = {}
    for name, overrides in STRICT_LAYOUTS.items():
        with strict_training_device():
            trainer = _trainer(tiny_config(data, f"{out}/{name}", "train.steps=3", "checkpoint.interval=0",
                                           *extra, *overrides))
        c = trainer.components
        groups = host_groups_of(c)
        with device_strict(groups, host_resident_tensors(c)):
            trainer.train_step()  # first step: lazy state (optimizer moments, step counters) made in the mode
        with device_strict(groups, host_resident_tensors(c)) as strict:
            trainer.train_step()
            val = trainer.evaluate()
        results[name] = {"checked": strict.mode.collectives_checked, "syncs": sorted(strict.sync_sites),
                         "val": val, "device": str(c.device)}
        _close(trainer)
    return results


@pytest.fixture(scope="module")
def strict_steps(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("strict")
    return run_distributed(_strict_steps_job, 2, args=(str(dataset), str(out), ["parallel.ep_size=2"]))


def test_training_steps_are_device_strict(strict_steps: list[dict[str, Any]]) -> None:
    """Every layout steps and evaluates with no host tensor in a collective or a device op (the job raises
    otherwise), its collectives were checked, and its syncs are known."""
    for rank in strict_steps:
        assert set(rank) == set(STRICT_LAYOUTS)
        for name, r in rank.items():
            assert r["device"] == "cpu:0" and math.isfinite(r["val"]), name
            assert r["checked"] > 0, name
    assert strict_steps[0]["replicated"]["val"] == strict_steps[1]["replicated"]["val"]


def test_a_training_step_has_no_new_host_syncs(strict_steps: list[dict[str, Any]]) -> None:
    for name in STRICT_LAYOUTS:
        sites = set(strict_steps[0][name]["syncs"])
        assert "engram_pretrain.train.loop:_optimizer_step: packed = packed.cpu()" in sites  # the guard sees
        assert sites <= KNOWN_SYNC_SITES, f"{name}: new host syncs in the step: {sorted(sites - KNOWN_SYNC_SITES)}"  # noqa: E501

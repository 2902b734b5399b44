"""Experiment runner: run sets and their iso-parameter budgets, skip-finished, SLURM task lists, results
collection from real tiny runs, and the figures."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from engram_pretrain.analysis.figures import plot_allocation, plot_layer_sweep
from engram_pretrain.analysis.params import count_parameters
from engram_pretrain.cli import main
from engram_pretrain.config import flat
from engram_pretrain.experiments import runner
from engram_pretrain.experiments.ablation import ABLATIONS, ablation_plan
from engram_pretrain.experiments.allocation import allocation_plan
from engram_pretrain.experiments.budget import calibrate_tables, counts, with_engram
from engram_pretrain.experiments.plan import RunSettings, finalize, load_family, select
from engram_pretrain.testing.datasets import make_dataset_dir
from engram_pretrain.train.checkpoint import COMPLETE

ISO = 0.01


def rows_of(model) -> int:
    """Table rows from the meta-device count: table parameters / row width."""
    e = model.engram
    return count_parameters(model).engram_tables // (e.d_mem // ((e.max_ngram - 1) * e.num_heads))


@pytest.fixture(scope="module")
def tiny_family():
    return load_family("tiny")


@pytest.fixture(scope="module")
def tiny_plan(tiny_family):
    baseline, reference, _ = tiny_family
    return ablation_plan(baseline, reference, repeat_seeds=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset_dir(tmp_path_factory.mktemp("data") / "ds", vocab_size=96, num_docs=(200, 20))


# ----------------------------------------------------------------------------- run set and budget

def test_run_set_names_and_iso_parameter_budget(tiny_family, tiny_plan) -> None:
    baseline, reference, how = tiny_family
    names = [r.name for r in tiny_plan]
    assert names == ["baseline", "reference", "layer_0", "layer_1", "layer_2", "layer_3", *ABLATIONS,
                     "reference_seed1"]
    ref_counts = count_parameters(reference.model)
    for run in tiny_plan:
        total = count_parameters(run.cfg.model).total
        assert abs(total - ref_counts.total) / ref_counts.total < ISO, (run.name, total, ref_counts.total)
    # the derived baseline: no Engram, its parameters as routed experts, top_k unchanged
    base = tiny_plan[0].cfg.model
    assert not base.engram.layers and base.moe.top_k == reference.model.moe.top_k
    assert base.moe.num_routed_experts > reference.model.moe.num_routed_experts
    assert "routed experts added" in how
    # the layer sweep: one Engram layer holding the reference's table rows (to a few percent)
    ref_rows = rows_of(reference.model)
    for run in tiny_plan[2:6]:
        assert run.cfg.model.engram.layers == [run.layer]
        assert abs(rows_of(run.cfg.model) - ref_rows) / ref_rows < 0.03
    # +4-gram: orders 2..4, d_head shrinks, table parameters about the reference's
    four = next(r for r in tiny_plan if r.name == "plus_4gram").cfg.model.engram
    ref_e = reference.model.engram
    assert four.max_ngram == 4 and len(four.base_table_size) == 3
    assert four.d_mem % (3 * four.num_heads) == 0 and four.d_mem <= ref_e.d_mem
    assert four.d_mem // (3 * four.num_heads) < ref_e.d_mem // (2 * ref_e.num_heads)
    four_model = next(r for r in tiny_plan if r.name == "plus_4gram").cfg.model
    four_tables = count_parameters(four_model).engram_tables
    assert abs(four_tables - ref_counts.engram_tables) / ref_counts.engram_tables < 0.02


def test_proxy_family_ablations_within_one_percent() -> None:
    baseline, reference, _ = load_family("proxy")
    runs = ablation_plan(baseline, reference, layers=[0],
                         ablations=["wo_multi_branch", "wo_gating", "plus_4gram"])
    ref_total = count_parameters(reference.model).total
    assert abs(count_parameters(baseline.model).total - ref_total) / ref_total < ISO
    for run in runs:
        total = count_parameters(run.cfg.model).total
        assert abs(total - ref_total) / ref_total < ISO, run.name
    # the proxy's w/o gating loses more than 1% with its tables unchanged: the calibration gives it back
    no_gate = with_engram(reference.model, gating=False)
    assert (ref_total - count_parameters(no_gate).total) / ref_total > ISO


def test_calibration_and_shape_cache_match_the_meta_device_count(tiny_family) -> None:
    _, reference, _ = tiny_family
    model = reference.model
    target = count_parameters(model).total + 50_000
    got = calibrate_tables(model, target)
    shifts = {a - b for a, b in zip(got.engram_base_sizes(), model.engram_base_sizes(), strict=True)}
    assert len(shifts) == 1 and shifts.pop() > 0
    e = model.engram
    row = e.d_mem // ((e.max_ngram - 1) * e.num_heads)
    heads = len(e.layers) * (e.max_ngram - 1) * e.num_heads
    # within one row per head of a prime gap (~ln of the table size): a few thousand parameters
    gap = 2 * math.log(max(got.engram_base_sizes()))
    assert abs(count_parameters(got).total - target) <= row * heads * gap
    for layers in ([0], [3], [0, 2]):
        m = with_engram(model, layers=layers, base_table_size=[3001, 4001])
        assert counts(m) == count_parameters(m)


def test_only_accepts_paper_spellings_and_rejects_unknown(tiny_plan) -> None:
    picked = select(tiny_plan, ["w/o gating", "+4-gram", "Layer_2", "w/o_short_conv"])
    assert [r.name for r in picked] == ["layer_2", "wo_gating", "wo_short_conv", "plus_4gram"]
    with pytest.raises(ValueError, match="unknown run"):
        select(tiny_plan, ["w/o everything"])


def test_dry_run_writes_configs_that_differ_only_in_the_intended_keys(tmp_path, dataset, capsys) -> None:
    out = tmp_path / "abl"
    code = main(["experiment", "ablation", "--preset", "tiny", "--out", str(out), "--data", str(dataset),
                 "--steps", "7", "--repeat-seeds", "1", "--dry-run"])
    assert code == 0
    text = capsys.readouterr().out
    assert "| wo_gating | ablation |" in text and "would run" in text
    configs = {p.parent.name: flat(yaml.safe_load(p.read_text())) for p in out.glob("*/config.yaml")}
    ref = configs["reference"]
    allowed = {
        "baseline": {"model.engram.layers", "model.moe.num_routed_experts"},
        **{f"layer_{i}": {"model.engram.layers", "model.engram.base_table_size"} for i in range(4)},
        "wo_multi_branch": {"model.engram.multi_branch", "model.engram.base_table_size"},
        "wo_token_compress": {"model.engram.token_compression", "model.engram.base_table_size"},
        "wo_gating": {"model.engram.gating", "model.engram.base_table_size"},
        "wo_short_conv": {"model.engram.short_conv", "model.engram.base_table_size"},
        "plus_4gram": {"model.engram.max_ngram", "model.engram.d_mem", "model.engram.base_table_size"},
        "reference_seed1": {"train.seed"},
    }
    intended = {"wo_multi_branch": ("model.engram.multi_branch", False),
                "wo_token_compress": ("model.engram.token_compression", False),
                "wo_gating": ("model.engram.gating", False),
                "wo_short_conv": ("model.engram.short_conv", False),
                "plus_4gram": ("model.engram.max_ngram", 4),
                "reference_seed1": ("train.seed", ref["train.seed"] + 1),
                **{f"layer_{i}": ("model.engram.layers", [i]) for i in range(4)}}
    assert set(configs) == set(allowed) | {"reference"}
    for name, cfg in configs.items():
        assert cfg["train.steps"] == 7 and cfg["data.paths"] == [str(dataset)]
        assert cfg["output_dir"] == str((out / name).absolute())
        diff = {k for k in set(cfg) | set(ref) if cfg.get(k) != ref.get(k)} - {"name", "output_dir"}
        if name == "reference":
            assert not diff
            continue
        assert diff <= allowed[name], (name, diff - allowed[name])
        if name in intended:
            key, value = intended[name]
            assert cfg[key] == value
    assert not any((out / name / "metrics.jsonl").exists() for name in configs)
    tasks = [line for line in (out / "tasks.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(tasks) == len(configs)


def test_slurm_dry_run_writes_one_config_per_array_index(tmp_path, dataset, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "abl"
    code = main(["experiment", "ablation", "--preset", "tiny", "--out", str(out), "--data", str(dataset),
                 "--steps", "5", "--layers", "0,2", "--ablations", "wo_gating,plus_4gram", "--slurm",
                 "--dry-run",
                 "--slurm-args", "--nodes 1 --gpus-per-node 0 --procs-per-node 2 --time 01:00:00"])
    assert code == 0
    script = (out / "slurm" / "submit.sbatch").read_text()
    expected = ["baseline", "reference", "layer_0", "layer_2", "wo_gating", "plus_4gram"]
    assert f"#SBATCH --array=0-{len(expected) - 1}" in script
    listed = [line for line in (out / "tasks.txt").read_text().splitlines() if not line.startswith("#")]
    assert [line.split("# ")[1] for line in listed] == expected
    block = script[script.index("TASKS=("):script.index("\n", script.index('eval "TRAIN_ARGS'))]
    for index, name in enumerate(expected):
        got = subprocess.run(["bash", "-c", block + '\nprintf "%s\\n" "${TRAIN_ARGS[@]}"'],
                             env={**os.environ, "SLURM_ARRAY_TASK_ID": str(index)},
                             capture_output=True, text=True, check=True).stdout.splitlines()
        config = out / name / "config.yaml"
        assert got[:2] == ["train", str(config.absolute())] and got[-2:] == ["--resume", "auto"]
        assert "launcher.procs_per_node=2" in got
        assert yaml.safe_load(config.read_text())["name"] == f"tiny-{name}"


# ----------------------------------------------------------------------------- skip-finished

def _finish_by_hand(cfg, val_loss: float, checkpoint: bool = True, step: int | None = None) -> None:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    step = cfg.train.steps if step is None else step
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "loss": 2.0, "val_loss": None}) + "\n")
        f.write(json.dumps({"step": step, "loss": 2.0, "val_loss": val_loss, "tokens_seen": 640}) + "\n")
        f.write('{"step": 3, "val_lo')  # a line cut by a kill
    if checkpoint:
        ckpt = out / "checkpoints" / f"step_{step}"
        ckpt.mkdir(parents=True)
        (ckpt / COMPLETE).write_text("")


def test_finished_runs_are_skipped_and_collected(tmp_path, dataset, tiny_plan, monkeypatch) -> None:
    runs = copy.deepcopy(tiny_plan[:5])
    settings = RunSettings(out_dir=tmp_path / "exp", family="tiny", steps=4, data=[str(dataset)])
    for run in runs:
        finalize(run, settings)
    runner.write_configs(runs)
    _finish_by_hand(runs[0].cfg, 1.25)                    # finished
    _finish_by_hand(runs[1].cfg, 1.5, checkpoint=False)  # validation logged, final checkpoint missing
    _finish_by_hand(runs[2].cfg, 1.75, step=2)           # stopped early (step 2 of 4)
    _finish_by_hand(runs[3].cfg, float("nan"))           # non-finite: not a result
    assert [runner.is_finished(r.cfg) for r in runs] == [True, False, False, False, False]
    started = []
    monkeypatch.setattr(runner, "train_one", lambda run, nproc=1: started.append(run.name) or 0)
    runner.run_local(runs, echo=lambda _: None)
    assert started == [r.name for r in runs[1:]]
    todo = runner.write_task_list(runs, tmp_path / "tasks.txt")
    assert [r.name for r in todo] == started
    rows = [runner.result_row(r, 1000) for r in runs]
    assert rows[0]["val_loss"] == 1.25 and rows[0]["status"] == "finished" and rows[0]["tokens_seen"] == 640
    assert [r["val_loss"] for r in rows[1:]] == [None] * 4
    assert [r["status"] for r in rows] == ["finished", "started", "started", "started", "not run"]
    # a started run whose config changed is refused, not resumed with the wrong config
    changed = copy.deepcopy(runs[1])
    changed.cfg.optimizer.lr *= 2
    with pytest.raises(ValueError, match="optimizer.lr"):
        runner.write_configs([changed])


# ----------------------------------------------------------------------------- real tiny runs

def test_tiny_subset_end_to_end_results_and_figure(tmp_path, dataset, capsys) -> None:
    out = tmp_path / "abl"
    argv = ["experiment", "ablation", "--preset", "tiny", "--out", str(out), "--data", str(dataset),
            "--steps", "2", "--layers", "none", "--ablations", "wo_gating",
            "--only", "baseline,reference,w/o_gating",
            "train.micro_batch_size=2", "data.seq_len=32", "train.eval_batches=1",
            "logging.tensorboard=false", "model.engram.base_table_size=[1009]"]
    assert main(argv) == 0
    capsys.readouterr()
    with open(out / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"baseline", "reference", "wo_gating"}
    for name, row in rows.items():
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        final = [r["val_loss"] for r in records if r["step"] == 2 and r.get("val_loss") is not None]
        assert row["status"] == "finished" and float(row["val_loss"]) == pytest.approx(final[-1])
        assert math.isfinite(float(row["val_loss"])) and (out / name / "checkpoints" / "step_2").is_dir()
    assert json.loads((out / "results.json").read_text())["runs"][0]["run"] == "baseline"
    figure = json.loads((out / "figure5.json").read_text())
    plotted = {p["run"]: p["val_loss"] for p in figure["points"]}
    assert plotted == pytest.approx({k: float(v["val_loss"]) for k, v in rows.items()})
    assert (out / "figure5.png").stat().st_size > 10_000
    # the same command again trains nothing
    stamps = {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in rows}
    assert main(argv) == 0
    assert "3 of 3 run(s) already finished; 0 to train" in capsys.readouterr().out
    assert stamps == {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in rows}


# ----------------------------------------------------------------------------- allocation

def test_allocation_sweep_keeps_total_and_top_k(tiny_family) -> None:
    baseline, reference, _ = tiny_family
    runs, _ = allocation_plan(baseline, reference, [0.0, 0.2, 0.5])
    base = count_parameters(baseline.model)
    shares = []
    for run in runs:
        m = run.cfg.model
        c = count_parameters(m)
        assert abs(c.total - base.total) / base.total < ISO, run.name
        assert m.moe.top_k == baseline.model.moe.top_k
        assert c.routed_experts_active == base.routed_experts_active
        assert m.moe.num_routed_experts == baseline.model.moe.num_routed_experts - run.info["removed_experts"]
        sparse = c.total - c.embedding - c.lm_head - c.activated
        shares.append(c.engram_tables / sparse)
        assert abs(shares[-1] - run.info["target_share"]) < 0.05, (run.name, shares[-1])
        assert run.accounting().engram_share == pytest.approx(shares[-1])
    assert shares[0] == 0 and shares == sorted(shares)


# ----------------------------------------------------------------------------- figures

def _table() -> list[dict[str, Any]]:
    rows = [{"run": "baseline", "label": "MoE baseline", "kind": "baseline", "layer": None,
             "val_loss": 1.808},
            {"run": "reference", "label": "Engram reference", "kind": "reference", "layer": None,
             "val_loss": 1.768},
            {"run": "reference_seed1", "label": "seed", "kind": "seed", "layer": None, "val_loss": 1.772},
            {"run": "reference_seed2", "label": "seed", "kind": "seed", "layer": None, "val_loss": 1.761}]
    rows += [{"run": f"layer_{i}", "label": f"layer {i + 1}", "kind": "sweep", "layer": i,
              "val_loss": 1.77 + 0.003 * abs(i - 1)} for i in range(12)]
    rows += [{"run": n, "label": n, "kind": "ablation", "layer": None, "val_loss": v}
             for n, v in (("wo_gating", 1.79), ("wo_short_conv", 1.772), ("plus_4gram", None))]
    return rows


def test_layer_sweep_figure_writes_png_and_plotted_data(tmp_path) -> None:
    rows = _table()
    paths = plot_layer_sweep(rows, tmp_path / "fig" / "figure5.png")
    assert paths["png"].stat().st_size > 10_000
    data = json.loads(paths["json"].read_text())
    sweep = [p for p in data["points"] if p["series"] == "sweep"]
    assert [p["x"] for p in sweep] == list(range(1, 13))  # 1-based Layer Index
    assert [p["val_loss"] for p in sweep] == [r["val_loss"] for r in rows if r["kind"] == "sweep"]
    ablations = {p["run"]: p for p in data["points"] if p["series"] == "ablation"}
    assert set(ablations) == {"wo_gating", "wo_short_conv", "plus_4gram"}
    assert ablations["plus_4gram"]["val_loss"] is None and min(p["x"] for p in ablations.values()) > 12
    seeds = [1.768, 1.772, 1.761]
    assert data["seed_noise"]["std"] == pytest.approx(statistics.stdev(seeds))
    assert data["seed_noise"]["mean"] == pytest.approx(statistics.fmean(seeds))
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert {r["series"] for r in table} == {"sweep", "ablation", "baseline", "reference"}
    assert float(next(r for r in table if r["series"] == "baseline")["val_loss"]) == 1.808


def test_allocation_figure_sorts_by_actual_share(tmp_path) -> None:
    rows = [{"run": f"alloc_{t}", "label": t, "kind": "allocation", "target_share": t / 100,
             "engram_share": s, "removed_experts": r, "routed_experts": 16 - r, "val_loss": v}
            for t, s, r, v in ((50, 0.49, 7, 1.80), (0, 0.0, 0, 1.81), (20, 0.196, 3, 1.79))]
    paths = plot_allocation(rows, tmp_path / "figure3.png")
    assert paths["png"].stat().st_size > 10_000
    points = json.loads(paths["json"].read_text())["points"]
    assert [p["run"] for p in points] == ["alloc_0", "alloc_20", "alloc_50"]
    assert [p["engram_share_pct"] for p in points] == pytest.approx([0.0, 19.6, 49.0])
    assert re.match(r"run,label,target_share_pct", paths["csv"].read_text())

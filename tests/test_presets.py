"""The paper's systems as presets: meta-device parameter counts match the paper's totals within 3%, and every
preset trains two steps at a tiny width with its own settings."""

from __future__ import annotations

import pytest

from engram_pretrain.analysis.params import count_parameters
from engram_pretrain.cli import PRESET_DIR, main
from engram_pretrain.config import load_config

# Engram paper Table 1 (docs/model.md rule X2): (total, activated w/o embedding and head, Engram).
PAPER = {
    "moe-27b": (26.7e9, 3.8e9, 0.0),
    "engram-27b": (26.7e9, 3.8e9, 5.7e9),
    "engram-40b": (39.5e9, 3.8e9, 18.5e9),
}


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_paper_systems_within_3_percent(preset: str) -> None:
    counts = count_parameters(load_config(PRESET_DIR / f"{preset}.yaml").model)
    total, activated, engram = PAPER[preset]
    assert abs(counts.total / total - 1) < 0.03
    assert abs(counts.activated / activated - 1) < 0.03
    if engram:
        assert abs(counts.engram / engram - 1) < 0.03
    else:
        assert counts.engram == 0


@pytest.mark.parametrize("base, engram", [("moe-3b", "moe-3b-engram-1.6b"), ("moe-27b", "engram-27b"),
                                          ("proxy-moe", "proxy-engram")])
def test_engram_variants_are_iso_parameter(base: str, engram: str) -> None:
    a = count_parameters(load_config(PRESET_DIR / f"{base}.yaml").model)
    b = count_parameters(load_config(PRESET_DIR / f"{engram}.yaml").model)
    assert abs(b.total / a.total - 1) < 0.01
    assert abs(b.activated / a.activated - 1) < 0.05
    assert b.engram > 0.1 * b.sparse


def test_params_cli_prints_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", "engram-27b"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "engram" in out and "activated" in out


def tiny_overrides(preset: str) -> list[str]:
    """`preset` at a width that trains in seconds on a CPU: everything else (attention kind, expert count,
    ZeRO stage, precision, optimizer, table settings) stays the preset's."""
    m = load_config(PRESET_DIR / f"{preset}.yaml").model
    out = ["model.vocab_size=96", "model.hidden_size=32", "model.num_layers=3", "model.max_seq_len=64",
           "model.attention.num_heads=2", "model.moe.expert_dim=16"]
    if m.attention.kind == "mla":
        out += ["model.attention.head_dim=16", "model.attention.v_head_dim=16",
                "model.attention.rope_head_dim=8", "model.attention.kv_lora_rank=16"]
    else:
        out += ["model.attention.num_kv_heads=2"]
    if m.moe.dense_ffn_dim:
        out.append("model.moe.dense_ffn_dim=64")
    e = m.engram
    if e.layers:
        d_mem = 2 * e.num_heads * (e.max_ngram - 1)  # d_head 2
        out += ["model.engram.layers=[1, 2]", f"model.engram.d_mem={d_mem}", "model.engram.pad_token_id=2",
                f"model.engram.base_table_size={[101] * len(e.base_table_size)}"]
    return out


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_trains_two_steps_at_a_tiny_width(preset: str, tmp_path_factory: pytest.TempPathFactory
                                                       ) -> None:
    """With its own ZeRO stage, precision (bf16 is fp32 on a CPU), optimizer and table settings."""
    import json
    import os
    import subprocess
    import sys

    from engram_pretrain.testing.datasets import make_dataset_dir

    root = tmp_path_factory.mktemp(preset)
    data = make_dataset_dir(root / "ds", vocab_size=96, num_docs=(40, 4))
    run = ["data.seq_len=32", "train.steps=2", "train.micro_batch_size=1", "train.grad_accum_steps=1",
           "schedule.warmup_steps=1", "train.eval_interval=0", "train.log_interval=1",
           "checkpoint.interval=0", "logging.tensorboard=false", f"data.paths=[{data}]",
           f"output_dir={root / 'run'}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "engram_pretrain.cli", "train", preset, *tiny_overrides(preset), *run,
           "--resume", "none"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), float)]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses), rows

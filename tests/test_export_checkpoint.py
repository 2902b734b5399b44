"""`engram-pretrain export`: a real ZeRO-2 training checkpoint -> HF folder with logit parity."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engram_pretrain.testing.datasets import make_dataset_dir

TINY = [
    "model.vocab_size=96", "model.hidden_size=32", "model.num_layers=3", "model.max_seq_len=64",
    "model.attention.num_heads=2", "model.moe.num_routed_experts=4", "model.moe.expert_dim=16",
    "model.hyper_connections.num_streams=2", "model.hyper_connections.sinkhorn_iters=3",
    "model.engram.layers=[1, 2]", "model.engram.num_heads=2", "model.engram.d_mem=16",
    "model.engram.base_table_size=[101]", "data.seq_len=32", "train.micro_batch_size=2",
    "train.steps=3", "train.eval_interval=0", "schedule.warmup_steps=1", "logging.tensorboard=false",
    "deepspeed.config=ds_configs/zero2.json",
]
REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "engram_pretrain.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_export_checkpoint_matches_training_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from engram_pretrain.analysis.hidden import load_model
    from engram_pretrain.data.dataset_dir import DatasetDir

    data = make_dataset_dir(tmp_path / "ds", vocab_size=96, num_docs=(60, 6))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: export-test\n")
    _run("train", str(cfg), *TINY, f"data.paths=[{data}]", f"output_dir={tmp_path / 'run'}")
    out = tmp_path / "hf"
    _run("export", str(tmp_path / "run"), str(out))
    ours = load_model(tmp_path / "run", DatasetDir(data))
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(3, 96, (2, 20))
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    biases = [m.router.expert_bias for m in ours.moe_layers()]
    assert any(b.abs().sum() > 0 for b in biases)  # the loss-free biases travelled with the export
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-m", "engram_pretrain.cli", "export", str(tmp_path / "run"),
                        str(out)], cwd=REPO, check=True, capture_output=True, timeout=300)

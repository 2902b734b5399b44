"""`engram-pretrain export` / `import` and `checkpoint.init_from` on real ZeRO-2 training checkpoints:
logit parity of the export, a bitwise round trip back to a training checkpoint, continued pretraining from
the export == from the original checkpoint, and loading into another parallel layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engram_pretrain.testing.datasets import make_dataset_dir
from engram_pretrain.testing.distributed import run_distributed

MODEL = [
    "model.vocab_size=96", "model.hidden_size=32", "model.num_layers=3", "model.max_seq_len=64",
    "model.attention.num_heads=2", "model.moe.num_routed_experts=4", "model.moe.expert_dim=16",
    "model.hyper_connections.num_streams=2", "model.hyper_connections.sinkhorn_iters=3",
    "model.engram.layers=[1, 2]", "model.engram.num_heads=2", "model.engram.d_mem=16",
    "model.engram.base_table_size=[101]",
]
TRAINING = [
    "data.seq_len=32", "train.micro_batch_size=2", "train.steps=3", "train.eval_interval=0",
    "train.log_interval=1", "schedule.warmup_steps=1", "logging.tensorboard=false",
    "deepspeed.config=ds_configs/zero2.json",
]
REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "engram_pretrain.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("loss") is not None]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-step ZeRO-2 run (Engram + MoE with loss-free biases) and its export."""
    root = tmp_path_factory.mktemp("export")
    data = make_dataset_dir(root / "ds", vocab_size=96, num_docs=(60, 6))
    cfg = root / "run.yaml"
    cfg.write_text("name: export-test\n")
    _run("train", str(cfg), *MODEL, *TRAINING, f"data.paths=[{data}]", f"output_dir={root / 'run'}")
    _run("export", str(root / "run"), str(root / "hf"))
    return {"root": root, "data": data, "config": cfg, "run": root / "run", "hf": root / "hf"}


def _source_state(run: Path) -> dict[str, torch.Tensor]:
    from engram_pretrain.train.checkpoint import checkpoint_state_dict, resolve_checkpoint

    step = resolve_checkpoint(run)
    assert step is not None
    return checkpoint_state_dict(step)


def test_export_checkpoint_matches_training_model(source: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    from engram_pretrain.analysis.hidden import load_model
    from engram_pretrain.data.dataset_dir import DatasetDir

    ours = load_model(source["run"], DatasetDir(source["data"]))
    hf = AutoModelForCausalLM.from_pretrained(source["hf"], trust_remote_code=True).eval()
    ids = torch.randint(3, 96, (2, 20))
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    biases = [m.router.expert_bias for m in ours.moe_layers()]
    assert any(b.abs().sum() > 0 for b in biases)  # the loss-free biases travelled with the export
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-m", "engram_pretrain.cli", "export", str(source["run"]),
                        str(source["hf"])], cwd=REPO, check=True, capture_output=True, timeout=300)


def test_import_round_trip_and_continued_pretraining(source: dict[str, Path]) -> None:
    root = source["root"]
    imported = root / "imported"
    done = _run("import", "--data", str(source["data"]), str(source["hf"]), str(imported), *TRAINING)
    assert "continue pretraining" in done.stdout
    step0 = imported / "checkpoints" / "step_0"
    assert (step0 / "complete").is_file() and (imported / "config.yaml").is_file()

    from engram_pretrain.train.checkpoint import checkpoint_state_dict

    want, got = _source_state(source["run"]), checkpoint_state_dict(step0)
    assert sorted(got) == sorted(want)
    assert any(k.endswith(".engram.table.weight") for k in got)
    assert any(k.endswith("expert_bias") for k in got)
    for name, value in want.items():
        assert torch.equal(got[name], value), name  # export -> import is bitwise

    # step_0 was written by one process: 2 ranks with expert parallelism cannot resume it and load the
    # export it names instead (it holds nothing else)
    results = run_distributed(_layout_job, 2, args=(
        str(source["data"]), str(root / "imported-ep2"), str(source["hf"]),
        ["parallel.ep_size=2", f"checkpoint.dir={imported / 'checkpoints'}"], "auto"))
    for result in results:
        assert not result["resumed"] and result["init_from"] == str(source["hf"])
        for name, value in want.items():
            np.testing.assert_array_equal(result["state"][name], value.numpy(), err_msg=name)

    # Continued pretraining: the imported run (resuming step_0) and a run initialised straight from the
    # source checkpoint see the same weights, data and fresh optimizer: the same losses.
    done = _run("train", str(imported / "config.yaml"))
    assert "resumed from" in done.stdout and "step_0" in done.stdout
    direct = root / "direct"
    done = _run("train", str(source["config"]), *MODEL, *TRAINING, f"data.paths=[{source['data']}]",
                f"output_dir={direct}", f"checkpoint.init_from={source['run']}")
    assert f"starting from the weights of {source['run']}" in done.stdout
    continued, from_ckpt, scratch = _losses(imported), _losses(direct), _losses(source["run"])
    assert len(continued) == len(from_ckpt) == 3
    np.testing.assert_allclose(continued, from_ckpt, rtol=0, atol=1e-6)
    assert continued[0] < scratch[0]  # it continued from trained weights, not from a fresh init


def _layout_job(rank: int, world: int, data: str, out: str, source: str, overrides: list[str],
                resume: str = "none") -> dict[str, Any]:
    from engram_pretrain.config import load_config
    from engram_pretrain.train.checkpoint import consolidated_state_dict
    from engram_pretrain.train.loop import build_trainer

    cfg = load_config(None, [*MODEL, *TRAINING, f"data.paths=[{data}]", f"output_dir={out}",
                             f"checkpoint.init_from={source}", *overrides])
    trainer = build_trainer(cfg, resume)
    state = {k: v.numpy() for k, v in consolidated_state_dict(trainer.components).items()}
    trainer.sink.close()
    return {"state": state, "init_from": trainer.init_from, "resumed": trainer.last_checkpoint is not None}


@pytest.mark.parametrize("overrides", [
    ["parallel.ep_size=2", "parallel.table_sharding=sharded"],
    ["deepspeed.config=ds_configs/zero3.json", "deepspeed.overrides={zero_optimization: "
     "{stage3_param_persistence_threshold: 0}}", "parallel.host_tables=true"],
], ids=["ep2-sharded-tables", "zero3-host-tables"])
def test_init_from_export_into_another_parallel_layout(source: dict[str, Path], tmp_path: Path,
                                                       overrides: list[str]) -> None:
    """Two ranks load the single-process export: experts cut to each EP rank, tables to each row shard,
    ZeRO-3 partitions built from the loaded values; gathered back, every tensor equals the source."""
    want = _source_state(source["run"])
    results = run_distributed(_layout_job, 2, args=(str(source["data"]), str(tmp_path / "run"),
                                                    str(source["hf"]), overrides))
    for result in results:
        state = result["state"]
        assert sorted(state) == sorted(want)
        for name, value in want.items():
            np.testing.assert_array_equal(state[name], value.numpy(), err_msg=name)


def test_init_from_rejects_a_model_it_does_not_fit(source: dict[str, Path], tmp_path: Path) -> None:
    from engram_pretrain.config import ConfigError, load_config
    from engram_pretrain.train.loop import build_trainer

    base = [*MODEL, *TRAINING, f"data.paths=[{source['data']}]", f"checkpoint.init_from={source['hf']}"]
    cases = {"model.engram.seed=1": "addresses its Engram tables differently",
             "model.moe.expert_dim=24": "do not fit this run's model",
             "model.tie_embeddings=true": "separate embedding and LM head weights",
             "model.engram.base_table_size=[103]": r"do not fit .*layer 1 table \(420, 4\) vs \(432, 4\)",
             "model.engram.layers=[1]": r"do not fit .*unexpected \['Engram tables at layers \[2\]'"}
    for i, (override, message) in enumerate(cases.items()):
        cfg = load_config(None, [*base, override, f"output_dir={tmp_path / str(i)}"])
        with pytest.raises(ConfigError, match=f"checkpoint.init_from: .*{message}"):
            build_trainer(cfg, "none")
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    cfg = load_config(None, [*base[:-1], f"checkpoint.init_from={tmp_path / 'nothing'}",
                             f"output_dir={tmp_path / 'x'}"])
    with pytest.raises(ConfigError, match="neither an exported Hugging Face folder"):
        build_trainer(cfg, "none")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()




def test_init_from_a_tied_export_reads_the_shared_head(source: dict[str, Path], tmp_path: Path) -> None:
    """An export stores a tied LM head once (as the embedding); loading it fills both names."""
    from engram_pretrain.config import load_config
    from engram_pretrain.data.dataset_dir import DatasetDir
    from engram_pretrain.export.exporter import export_model
    from engram_pretrain.memory.addressing_builder import build_addressing
    from engram_pretrain.model.transformer import EngramMoEModel
    from engram_pretrain.train.engine import build_model
    from engram_pretrain.train.init_from import load_initial_weights

    dataset = DatasetDir(source["data"])
    cfg = load_config(None, [*MODEL, *TRAINING, "model.tie_embeddings=true",
                             f"data.paths=[{source['data']}]"])
    torch.manual_seed(7)
    original = EngramMoEModel(cfg.model, build_addressing(cfg.model, dataset.compression_map()))
    out = export_model(original, None, dataset.tokenizer_dir, dataset.path / "compression_map.npz",
                       tmp_path / "hf")
    model, store = build_model(cfg, dataset.compression_map())  # another seed: different weights before
    load_initial_weights(cfg, model, store, None, out)
    want = original.state_dict()
    got = {**model.state_dict(), **{f"blocks.{k}.engram.table.weight": store.full_weight(k)
                                    for k in store.layers()}}
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()  # still tied after loading

"""The planner (`engram_pretrain.planning`) against real runs: model-state bytes exactly as the DeepSpeed
engine and the table store hold them (ZeRO 0-3 on 1 and 2 gloo ranks), activation bytes against the
saved-tensor meter (none and full recompute), and the `plan` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from engram_pretrain.cli import main
from engram_pretrain.config import load_preset
from engram_pretrain.planning.activations import activations_for
from engram_pretrain.planning.inventory import model_inventory
from engram_pretrain.planning.layout import deepspeed_knobs, layout_of
from engram_pretrain.planning.memory import state_bytes
from engram_pretrain.testing.datasets import make_dataset_dir
from engram_pretrain.testing.distributed import run_distributed

ONE_STEP = ("train.steps=1", "schedule.warmup_steps=0", "checkpoint.interval=0", "train.eval_interval=0")


def _held_bytes(engine: Any, store: Any, table_optimizer: Any) -> dict[str, int]:
    """Bytes of the distinct storages the engine and the table store hold, by what they are."""
    seen: dict[int, tuple[str, int]] = {}

    def add(kind: str, t: Any) -> None:
        if torch.is_tensor(t) and t.numel() > 0:
            s = t.untyped_storage()
            seen.setdefault(s.data_ptr(), (kind, s.nbytes()))

    opt = engine.optimizer
    for name in ("bit16_groups_flat", "bf16_groups_flat", "fp16_partitioned_groups_flat"):
        for t in getattr(opt, name, None) or []:
            add("params", t)
    for p in engine.module.parameters():
        add("params", getattr(p, "ds_tensor", None))
        add("params", p.data)
    masters = ("single_partition_of_fp32_groups", "fp32_groups_flat_partition",
               "fp32_partitioned_groups_flat")
    for name in masters:
        for t in getattr(opt, name, None) or []:
            add("master", t)
    for state in getattr(opt, "optimizer", opt).state.values():
        for t in state.values():
            add("optim", t)
    for p in store.parameters():
        add("tables", p.data)
    for state in table_optimizer.state.values():
        for t in state.values():
            add("table_optim", t)
    out = {"params": 0, "master": 0, "optim": 0, "tables": 0, "table_optim": 0}
    for kind, nbytes in seen.values():
        out[kind] += nbytes
    return out


def _cfg(data: str, out: str, overrides: tuple[str, ...]) -> Any:
    from test_training import tiny_config

    return tiny_config(data, out, *ONE_STEP, *overrides)


def _held_job(rank: int, world: int, data: str, out: str,
              cases: list[tuple[str, ...]]) -> list[dict[str, int]]:
    from test_training import _close, _trainer

    results = []
    for i, overrides in enumerate(cases):
        trainer = _trainer(_cfg(data, f"{out}/{world}_{i}", overrides))
        trainer.fit()  # stage 0 creates the AdamW state on the first step
        c = trainer.components
        results.append(_held_bytes(c.engine, c.tables, c.table_optimizer))
        _close(trainer)
    return results


CASES = {
    1: [("deepspeed.zero_stage=0",)],
    2: [("deepspeed.zero_stage=1",),
        ("deepspeed.zero_stage=2", "parallel.ep_size=2", "parallel.table_sharding=sharded"),
        ("deepspeed.zero_stage=3",)],
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset_dir(tmp_path_factory.mktemp("data") / "ds", vocab_size=96, num_docs=(200, 20))


@pytest.mark.parametrize("world", sorted(CASES))
def test_state_bytes_equal_what_the_engine_holds(world: int, dataset: Path, tmp_path: Path) -> None:
    measured = run_distributed(_held_job, world, args=(str(dataset), str(tmp_path), CASES[world]))
    for i, overrides in enumerate(CASES[world]):
        cfg = _cfg(str(dataset), str(tmp_path), overrides)
        planned = state_bytes(model_inventory(cfg.model, cfg.optimizer), layout_of(cfg), world,
                              cfg.model.moe.num_routed_experts, deepspeed_knobs(cfg, world, use_cuda=False))
        expected = {k: getattr(planned, k) for k in ("params", "master", "optim", "tables", "table_optim")}
        # every rank holds the same bytes here (even splits), so the largest rank is each rank
        for rank, per_case in enumerate(measured):
            assert per_case[i] == expected, (overrides, rank)


def _measured_activations(cfg: Any, batch: int) -> int:
    """Saved-tensor bytes of one forward (parameters excluded) plus what checkpointed blocks keep (their
    input streams and row ids)."""
    from engram_pretrain.model.recompute import measure_saved_activations
    from engram_pretrain.train.engine import build_model

    model = build_model(cfg, None)[0].train()
    ids = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len),
                        generator=torch.Generator().manual_seed(0))
    return measure_saved_activations(model, ids)


MLA = ["model.attention.kind=mla", "model.attention.head_dim=16", "model.attention.rope_head_dim=8",
       "model.attention.kv_lora_rank=32", "model.attention.v_head_dim=24"]


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
@pytest.mark.parametrize("variant", [[], MLA, ["model.hyper_connections.num_streams=1"],
                                     ["model.engram.multi_branch=true",
                                      "train.activation_checkpointing_every=2"]],
                         ids=["tiny", "mla", "no-mhc", "multi-branch-every-2"])
def test_activation_bytes_match_the_saved_tensor_meter(mode: str, variant: list[str]) -> None:
    cfg = load_preset("tiny", [*variant, "model.engram.token_compression=false", "data.seq_len=64",
                               f"train.activation_checkpointing={mode}"])
    measured = _measured_activations(cfg, batch=2)
    planned = activations_for(cfg, 2, mode, bf16=False).saved
    assert planned == pytest.approx(measured, rel=0.02)  # the issue asks 15%; the accounting is tighter


def test_full_recompute_keeps_only_block_inputs_and_needs_one_block_back() -> None:
    cfg = load_preset("tiny", ["train.activation_checkpointing=full"])
    none = activations_for(cfg, 8, "none", bf16=True)
    full = activations_for(cfg, 8, "full", bf16=True)
    assert full.saved < none.saved / 2
    assert 0 < full.recompute_peak < none.saved - full.saved


def test_plan_command_json_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "tiny", "--nodes", "1", "--gpus-per-node", "2", "--gpu", "a100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    req = report["requested"]
    assert req["fits"] and report["proposal"] is None and report["gpu"] == "a100"
    assert req["device_bytes"] == (req["state"]["device_total"] + req["activations"]["saved"]
                                   + req["activations"]["recompute_peak"] + req["logits_buffers"]
                                   + sum(req["deepspeed_buffers"].values()))
    assert main(["plan", "tiny", "parallel.table_sharding=sharded", "--nodes", "2"]) == 0
    assert "table all-to-all" in capsys.readouterr().out


def test_plan_proposes_a_layout_that_fits_when_the_run_does_not(capsys: pytest.CaptureFixture[str]) -> None:
    # tiny with a huge table on one small GPU's worth of memory: sharding or host tables must be proposed
    args = ["plan", "tiny", "model.engram.base_table_size=[40000000]", "--nodes", "1", "--gpus-per-node", "8",
            "--usable", "0.1", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["requested"]["fits"]
    assert report["proposal"]["fits"]
    assert any(c.startswith(("parallel.table_sharding", "parallel.host_tables")) for c in report["changes"])


def test_plan_rejects_an_unknown_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "tiny", "--gpu", "v100"]) == 2
    assert "--gpu" in capsys.readouterr().err

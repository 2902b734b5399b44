"""`Checkpointer`: atomic save and load of training checkpoints (the protocol: the package docstring)."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from ...config import dump_config
from .experts import check_expert_checkpoint, load_experts, module_loader_without_experts, save_experts
from .layout import (
    BUFFERS,
    COMPLETE,
    CONFIG_FILE,
    DS_TAG,
    FORMAT,
    LATEST,
    PREFIX,
    RNG_DIR,
    TMP_SUFFIX,
    TRAINER_STATE,
    complete_checkpoints,
    is_complete,
    read_trainer_state,
    step_dir_name,
)
from .tables import TABLES_DIR, load_table_shards, save_table_shards

if TYPE_CHECKING:
    from ..components import TrainComponents


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class SaveReport:
    """What a save produced."""

    path: Path
    step: int
    seconds: float
    num_bytes: int


class Checkpointer:
    """Saves and loads checkpoints of one run in `ckpt_dir`, keeping the newest `keep_last`."""

    def __init__(self, ckpt_dir: str | Path, keep_last: int, rank: int, world_size: int) -> None:
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    # ------------------------------------------------------------------ save

    def save(self, c: TrainComponents, step: int, trainer_state: dict[str, Any]) -> SaveReport:
        """Collective: every rank calls it at the same step. Returns the report (size measured on rank 0)."""
        start = time.perf_counter()
        final = self.dir / step_dir_name(step)
        tmp = self.dir / (step_dir_name(step) + TMP_SUFFIX)
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            (tmp / RNG_DIR).mkdir()
            (tmp / TABLES_DIR).mkdir()
        _barrier()
        c.engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={}, save_latest=False)
        self._write_state(c, tmp, step, trainer_state)
        _barrier()
        num_bytes = 0
        if self.rank == 0:
            _write_atomic(tmp / COMPLETE, json.dumps({"step": step, "time": time.time()}) + "\n")
            if final.exists():  # a re-save of the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.dir / LATEST, final.name + "\n")
            self.prune()
            num_bytes = _dir_bytes(final)
        _barrier()
        return SaveReport(final, step, time.perf_counter() - start, num_bytes)

    def _write_state(self, c: TrainComponents, tmp: Path, step: int, trainer_state: dict[str, Any]) -> None:
        """Everything besides DeepSpeed's files: RNG of every rank; table rows (+ their optimizer state) of
        every rank that writes some; buffers, counters and config on rank 0."""
        torch.save(rng_state(), tmp / RNG_DIR / f"rank_{self.rank:05d}.pt")
        save_table_shards(c.tables, c.table_optimizer, tmp / TABLES_DIR, self.rank)
        if c.expert_parallel is not None:  # collective: experts/ep_rank_<r>.pt per EP rank
            save_experts(c.expert_parallel, c.model, tmp)
        if self.rank != 0:
            return
        biases = [m.router.expert_bias.detach().cpu().clone() for m in c.model.moe_layers()]
        torch.save({"moe_expert_bias": biases}, tmp / BUFFERS)
        state = {"format": FORMAT, "step": step, "world_size": self.world_size, "zero_stage": c.zero_stage,
                 **trainer_state}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        dump_config(c.cfg, tmp / CONFIG_FILE)

    def prune(self) -> None:
        """Rank 0: delete complete checkpoints older than the newest `keep_last`, and stale `*.tmp` dirs."""
        complete = complete_checkpoints(self.dir)
        for _, path in complete[:-self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.dir.glob(f"{PREFIX}*{TMP_SUFFIX}"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def load(self, c: TrainComponents, path: str | Path) -> dict[str, Any]:
        """Restore engine, tables, table optimizer, MoE biases and RNG from `path`; return trainer.json."""
        path = Path(path)
        if not is_complete(path):
            raise ValueError(f"{path} is not a complete checkpoint (no '{COMPLETE}' marker)")
        state = read_trainer_state(path)
        if state.get("format") != FORMAT:
            raise ValueError(f"{path}/trainer.json has format {state.get('format')!r}, expected {FORMAT} "
                             "(written by another version of engram-pretrain)")
        if state["world_size"] != self.world_size and c.zero_stage > 0:
            raise ValueError(f"{path} was written by {state['world_size']} ranks with ZeRO stage "
                             f"{state['zero_stage']}; resuming on {self.world_size} ranks is not supported "
                             "yet (relaunch with the original world size)")
        check_expert_checkpoint(path, c.cfg.parallel.ep_size)
        ep = c.expert_parallel  # DeepSpeed's module file holds EP rank 0's experts; load_experts sets ours
        loader = None if ep is None else module_loader_without_experts(ep, c.model)
        load_path, _ = c.engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False, load_module_strict=True,
                                                custom_load_fn=loader)
        if load_path is None:
            raise ValueError(f"DeepSpeed found no engine state in {path / DS_TAG}")
        if c.expert_parallel is not None:
            load_experts(c.expert_parallel, c.model, path)
        load_table_shards(c.tables, c.table_optimizer, path / TABLES_DIR)  # this rank's rows, any layout
        biases = torch.load(path / BUFFERS, map_location="cpu", weights_only=True)["moe_expert_bias"]
        with torch.no_grad():
            for moe, bias in zip(c.model.moe_layers(), biases, strict=True):
                moe.router.expert_bias.copy_(bias.to(moe.router.expert_bias.device))
                moe.load_accum.zero_()
        rng_file = path / RNG_DIR / f"rank_{self.rank:05d}.pt"
        if not rng_file.is_file():
            rng_file = path / RNG_DIR / "rank_00000.pt"
        set_rng_state(torch.load(rng_file, weights_only=False))
        return state

"""Atomic training checkpoints: DeepSpeed engine state plus everything DeepSpeed does not know about.

Layout of one checkpoint (`<ckpt_dir>/step_<N>/`):

    ds/                      DeepSpeed `engine.save_checkpoint(tag="ds")`: module weights and buffers (MoE
                             router biases included), ZeRO optimizer partitions (one file per rank)
    tables/                  Engram tables with their RowSparseAdam state, one file per row range:
                             table_<layer>_rows_<start>_<end>.pt (replicated: rank 0 writes [0, rows);
                             sharded: every rank its shard); reloads under any world size and layout
                             (`table_checkpoint`)
    buffers.pt               MoE router biases [E] per MoE layer (also inside ds/; restored from here too)
    experts/                 (parallel.ep_size > 1) routed expert weights, ep_rank_<r>.pt per EP rank with its
                             global expert range, and meta.json (docs/expert_parallel.md)
    rng/rank_<r>.pt          python / numpy / torch (/ CUDA) RNG states of every rank
    trainer.json             step, data-loader position, counters, world size, ZeRO stage
    config.yaml              the resolved run config
    complete                 marker, written last inside the directory

Protocol: every rank writes into `step_<N>.tmp/`; after a barrier rank 0 writes `complete`, renames the
directory to `step_<N>/`, then replaces the `latest` pointer file (temp file + `os.replace`), then prunes
old checkpoints beyond `keep_last`. A save killed at any point leaves at most a `*.tmp` directory, which
resume ignores (and the next save removes); the previous checkpoints are untouched until the new one is
complete. The checkpoint directory must be shared by all ranks (one filesystem).
"""

from __future__ import annotations

import json
import logging
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

from ..config import RunConfig, dump_config
from ..model.transformer import ROUTER_BIAS_SUFFIX, table_weight_name
from ..parallel.expert_parallel import check_expert_checkpoint
from .table_checkpoint import TABLES_DIR, load_table_shards, save_table_shards

if TYPE_CHECKING:
    from .components import TrainComponents

logger = logging.getLogger(__name__)

PREFIX = "step_"
TMP_SUFFIX = ".tmp"
COMPLETE = "complete"
LATEST = "latest"
DS_TAG = "ds"
BUFFERS = "buffers.pt"
FORMAT = 2
"""1: tables.pt + table_optim.pt (replicated only); 2: tables/ row-range files."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step}"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(PREFIX) or name.endswith(TMP_SUFFIX):
        return None
    try:
        return int(name[len(PREFIX):])
    except ValueError:
        return None


def is_complete(path: Path) -> bool:
    """A finished checkpoint: a `step_<N>` directory (not `.tmp`) holding the `complete` marker."""
    return path.is_dir() and _step_of(path) is not None and (path / COMPLETE).is_file()


def complete_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [(_step_of(p), p) for p in root.iterdir() if is_complete(p)]
    return sorted((s, p) for s, p in found if s is not None)


def find_latest(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None.

    The `latest` pointer is read first; a checkpoint newer than it can only be one whose rename finished
    but whose pointer update did not (it is complete: the marker is written before the rename), so the
    newest complete directory wins. Incomplete and `*.tmp` directories are never chosen.
    """
    complete = complete_checkpoints(ckpt_dir)
    pointer = Path(ckpt_dir) / LATEST
    named = None
    if pointer.is_file():
        candidate = Path(ckpt_dir) / pointer.read_text().strip()
        named = candidate if is_complete(candidate) else None
        if named is None:
            logger.warning("%s names %s, which is not a complete checkpoint; ignoring it", pointer, candidate)
    if not complete:
        return named
    newest = complete[-1][1]
    return newest if named is None or _step_of(newest) >= (_step_of(named) or 0) else named


def resolve_resume(resume: str | None, ckpt_dir: str | Path) -> Path | None:
    """`--resume` semantics: None / "none" start fresh; "auto" takes the latest complete checkpoint if any;
    anything else is a checkpoint path (a `step_<N>` directory, or a checkpoint dir whose latest is taken)."""
    if resume is None or resume.lower() == "none":
        return None
    if resume == "auto":
        return find_latest(ckpt_dir)
    path = Path(resume)
    if is_complete(path):
        return path
    if path.is_dir():
        latest = find_latest(path)
        if latest is not None:
            return latest
    raise ValueError(f"--resume {resume}: not a complete checkpoint (a step_<N> directory with a "
                     f"'{COMPLETE}' marker) nor a checkpoint directory containing one")


def resolve_checkpoint(path: str | Path) -> Path | None:
    """The `step_<N>` directory `path` names: itself, the latest in a checkpoint dir, or the latest in a run
    directory's `checkpoints/`. None when `path` is none of these."""
    p = Path(path)
    if is_complete(p):
        return p
    for root in (p, p / "checkpoints"):
        if root.is_dir():
            latest = find_latest(root)
            if latest is not None:
                return latest
    return None


def checkpoint_state_dict(step_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of a training checkpoint: the names of a model with local Engram tables
    (`blocks.<L>.engram.table.weight`), MoE router biases included.

    Backbone: with ZeRO stages 1-3, the fp32 master weights reconstructed by DeepSpeed's `zero_to_fp32` from
    the optimizer partitions; with stage 0 or expert parallelism, the engine's module file (its compute
    dtype), the routed experts then replaced by the fp32 shards of `experts/ep_rank_<r>.pt` concatenated in
    expert order. Engram tables: the `tables/` row-range files (format 2) or `tables.pt` (format 1). Router
    biases: `buffers.pt`, the copy the trainer restores from.
    """
    from ..parallel.expert_parallel import EXPERTS_DIR
    from .table_checkpoint import read_full_tables

    step_dir = Path(step_dir)
    trainer = json.loads((step_dir / "trainer.json").read_text())
    experts_dir = step_dir / EXPERTS_DIR
    expert_parallel = (experts_dir / "meta.json").is_file()
    if int(trainer.get("zero_stage", 0)) > 0 and not expert_parallel:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = dict(get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DS_TAG))
    else:
        files = sorted((step_dir / DS_TAG).glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ValueError(f"{step_dir}/{DS_TAG}: no mp_rank_*_model_states.pt "
                             "(not a DeepSpeed checkpoint)")
        state = dict(torch.load(files[0], map_location="cpu", weights_only=False)["module"])
    if expert_parallel:
        shards = [torch.load(f, map_location="cpu", weights_only=True)
                  for f in sorted(experts_dir.glob("ep_rank_*.pt"))]
        shards.sort(key=lambda sh: sh["expert_range"][0])
        for name in json.loads((experts_dir / "meta.json").read_text())["weights"]:
            state[name] = torch.cat([sh["weights"][name] for sh in shards])
    state = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in state.items()}
    if (step_dir / TABLES_DIR).is_dir():  # row-range files of replicated or sharded tables, assembled whole
        tables = read_full_tables(step_dir / TABLES_DIR)
    elif (step_dir / "tables.pt").is_file():
        tables = torch.load(step_dir / "tables.pt", map_location="cpu", weights_only=True)
    else:
        tables = {}
    for layer, weight in tables.items():
        state[table_weight_name(layer)] = weight.float()
    if (step_dir / BUFFERS).is_file():
        biases = torch.load(step_dir / BUFFERS, map_location="cpu", weights_only=True)["moe_expert_bias"]
        names = sorted((k for k in state if k.endswith(ROUTER_BIAS_SUFFIX)),
                       key=lambda k: int(k.split(".")[1]))
        if len(names) != len(biases):
            raise ValueError(f"{step_dir}/{BUFFERS}: {len(biases)} router biases for {len(names)} MoE layers")
        state.update({name: bias.float() for name, bias in zip(names, biases, strict=True)})
    return state


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
            (tmp / "rng").mkdir()
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
        torch.save(rng_state(), tmp / "rng" / f"rank_{self.rank:05d}.pt")
        save_table_shards(c.tables, c.table_optimizer, tmp / TABLES_DIR, self.rank)
        if c.expert_parallel is not None:  # collective: experts/ep_rank_<r>.pt per EP rank
            c.expert_parallel.save(c.model, tmp)
        if self.rank != 0:
            return
        biases = [m.router.expert_bias.detach().cpu().clone() for m in c.model.moe_layers()]
        torch.save({"moe_expert_bias": biases}, tmp / BUFFERS)
        state = {"format": FORMAT, "step": step, "world_size": self.world_size, "zero_stage": c.zero_stage,
                 **trainer_state}
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        dump_config(c.cfg, tmp / "config.yaml")

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
        state = json.loads((path / "trainer.json").read_text())
        if state.get("format") != FORMAT:
            raise ValueError(f"{path}/trainer.json has format {state.get('format')!r}, expected {FORMAT} "
                             "(written by another version of engram-pretrain)")
        if state["world_size"] != self.world_size and c.zero_stage > 0:
            raise ValueError(f"{path} was written by {state['world_size']} ranks with ZeRO stage "
                             f"{state['zero_stage']}; resuming on {self.world_size} ranks is not supported "
                             "yet (relaunch with the original world size)")
        check_expert_checkpoint(path, c.cfg.parallel.ep_size)
        load_path, _ = c.engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False, load_module_strict=True)
        if load_path is None:
            raise ValueError(f"DeepSpeed found no engine state in {path / DS_TAG}")
        if c.expert_parallel is not None:
            c.expert_parallel.load(c.model, path)
        load_table_shards(c.tables, c.table_optimizer, path / TABLES_DIR)  # this rank's rows, any layout
        biases = torch.load(path / BUFFERS, map_location="cpu", weights_only=True)["moe_expert_bias"]
        with torch.no_grad():
            for moe, bias in zip(c.model.moe_layers(), biases, strict=True):
                moe.router.expert_bias.copy_(bias.to(moe.router.expert_bias.device))
                moe.load_accum.zero_()
        rng_file = path / "rng" / f"rank_{self.rank:05d}.pt"
        if not rng_file.is_file():
            rng_file = path / "rng" / "rank_00000.pt"
        set_rng_state(torch.load(rng_file, weights_only=False))
        return state


def checkpoint_dir(cfg: RunConfig) -> Path:
    """`checkpoint.dir`, defaulting to `<output_dir>/checkpoints`."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.output_dir) / "checkpoints"

"""What an assembled run is made of (`TrainComponents`, built by `train.engine.build_components`) and the
operations on it that the loop, checkpoints and export share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import RunConfig
from ..memory.table_store import TableStore
from ..model.engram_hash import segment_ids_from_eod
from ..model.transformer import EngramMoEModel
from ..parallel.expert_parallel import ExpertParallel
from .distributed import DistInfo


@dataclass
class TrainComponents:
    """Everything the trainer steps."""

    cfg: RunConfig
    dist: DistInfo
    engine: Any
    """The DeepSpeed engine wrapping `model`."""
    model: EngramMoEModel
    tables: TableStore
    table_optimizer: Any | None
    """`RowSparseAdam` over the tables (None without Engram)."""
    ds_config: dict[str, Any]
    eod_token_id: int | None = None
    expert_parallel: ExpertParallel | None = None
    """Expert-parallel groups and dispatcher (None when `parallel.ep_size` is 1)."""

    @property
    def device(self) -> torch.device:
        """The training device (`dist.device`: `cuda:<local rank>` or the CPU), where the step's tensors and
        collectives live (DeepSpeed's `engine.device` is the same device; on a CPU it may be spelled
        differently, see docs/training.md, "Device-strict mode")."""
        return self.dist.device

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config["zero_optimization"]["stage"])

    def row_ids(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        return engram_row_ids(self.model, input_ids, self.eod_token_id)

    @property
    def prefetches_tables(self) -> bool:
        """Whether `prefetch_tables` does anything (host-resident tables)."""
        return self.tables.host and bool(self.tables.views)

    def prefetch_tables(self, row_ids: dict[int, torch.Tensor]) -> None:
        """Start gathering the table rows of a later micro-batch with these row ids (from `row_ids`); the
        lookups of that micro-batch then overlap with the compute before them. Collective when sharded."""
        for block in self.model.blocks:
            if block.engram is not None and block.layer_id in row_ids:
                self.tables.prefetch(block.layer_id, row_ids[block.layer_id] + block.engram.head_offsets)


def engram_row_ids(model: EngramMoEModel, input_ids: torch.Tensor,
                   eod_token_id: int | None) -> dict[int, torch.Tensor]:
    """input_ids: [B, T] -> {layer: [B, T, H]} row ids, computed outside the DeepSpeed-wrapped forward.

    Hashing is done here rather than inside `model.forward` so the lookup addresses are plain batch data.
    """
    addresser = model.addresser
    if addresser is None:
        return {}
    segment_ids = None
    if model.config.engram.reset_at_doc_boundary:
        if eod_token_id is None:
            raise ValueError("model.engram.reset_at_doc_boundary needs the dataset's eod_token_id")
        segment_ids = segment_ids_from_eod(input_ids, eod_token_id)
    return addresser.row_ids(input_ids, segment_ids)


def set_learning_rates(c: TrainComponents, multiplier: float) -> tuple[float, float]:
    """Write `base_lr x multiplier` into every backbone group and the table optimizer's LR.

    Returns (backbone peak-relative LR, table LR)."""
    o = c.cfg.optimizer
    for g in c.engine.optimizer.param_groups:
        g["lr"] = g.get("base_lr", o.lr) * multiplier
    return o.lr * multiplier, o.lr * o.engram_lr_multiplier * multiplier
